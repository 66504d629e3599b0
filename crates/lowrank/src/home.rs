//! Where lowrank keeps its files (in progress).

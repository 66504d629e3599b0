//! generate (in progress).

//! adapter (in progress).

//! generate (in progress).
pub mod sampling;
pub mod stop;

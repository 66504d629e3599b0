//! The `lowrank` binary as a user runs it, one test binary: each file is a module named for the
//! commands it drives.

mod cli;
mod families;
mod hub;
mod merge_combine_export;
mod serve;
mod serve_hardening;
mod train;

//! Process setup, done once at the start of `main` (the library does none): threads for candle,
//! the allocator, the file-size signal.
//!
//! candle asks the OS for its thread count on every matmul unless `RAYON_NUM_THREADS` is set
//! (reading `/proc` each time), and its barrier pool spins 25 000 times before sleeping, which on
//! a machine with few cores steals the core the gemm threads need. Measured on the 2-core CI
//! machine, setting both roughly doubles training throughput. Values already in the
//! environment are left alone.
//!
//! glibc's malloc serves big blocks with fresh `mmap`s and gives freed heap back to the OS, so a
//! training step that allocates and frees gigabytes of activations page-faults (and the kernel
//! zeroes) every one of those pages again, each step. Raising the mmap threshold to its maximum
//! (32 MiB) and not trimming the heap keeps freed blocks for reuse.

/// Sets `RAYON_NUM_THREADS` (to the available parallelism) and a short barrier spin for candle,
/// unless the user set them; keeps freed memory; makes a write past the file-size limit an error.
/// Call before any tensor work, while the program is single-threaded.
pub fn configure() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
    }
    keep_freed_memory();
    file_size_limit_is_an_error();
}

/// A write past `ulimit -f` then fails with EFBIG, like a full disk, instead of SIGXFSZ killing
/// the process before it can remove its half-written temporary output.
#[cfg(unix)]
fn file_size_limit_is_an_error() {
    // SAFETY: installs the ignore disposition for one signal; no handler code runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

#[cfg(not(unix))]
fn file_size_limit_is_an_error() {}

/// Big blocks from the heap, and the heap never trimmed (see the module docs).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

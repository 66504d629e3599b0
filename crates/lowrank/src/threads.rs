//! CPU threading defaults for candle, set once at program start.
//!
//! candle asks the OS for its thread count on every matmul unless `RAYON_NUM_THREADS` is set
//! (reading `/proc` each time), and its barrier pool spins 25 000 times before sleeping, which on
//! a machine with few cores steals the core the gemm threads need. Measured on the 2-core CI
//! machine, setting both roughly doubles training throughput. Values already in the
//! environment are left alone.

/// Sets `RAYON_NUM_THREADS` (to the available parallelism) and a short barrier spin for candle,
/// unless the user set them. Call before any tensor work, while the program is single-threaded.
pub fn configure() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
    }
}

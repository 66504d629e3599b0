//! The process's matmul precision for frozen weights, in the manner of PyTorch's
//! `torch.set_float32_matmul_precision`: f32 (the default: every parity with the references is
//! exact to f32 rounding) or bf16 operands with f32 accumulation where the CPU has AVX-512-BF16
//! (what PyTorch's CPU autocast computes).
//!
//! It is read when a product is dispatched, so set it before a run, not during one;
//! [`with_matmul_precision`] sets it for one thread's work only (tests, a library caller).
//! `LOWRANK_BF16=0` in the environment makes bf16 unavailable (the fallback, as on a CPU
//! without it).

use std::sync::atomic::{AtomicU8, Ordering};

use super::WeightRows;

/// How the frozen-weight products multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 operands, f32 sums.
    F32,
    /// bf16 operands (rounded to nearest even), f32 sums.
    Bf16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Whether bf16 products can run here: the CPU has AVX-512-BF16 and `LOWRANK_BF16` is not `0`.
pub fn bf16_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var("LOWRANK_BF16").as_deref() != Ok("0") && super::bf16::cpu_has_bf16())
}

fn check(precision: Precision) -> crate::Result<()> {
    if precision == Precision::Bf16 && !bf16_available() {
        return Err(crate::Error::Config(
            "bf16 matmuls need a CPU with AVX-512-BF16 (and LOWRANK_BF16 not set to 0)".into(),
        ));
    }
    Ok(())
}

/// Sets the precision of every frozen-weight product that follows; [`Precision::Bf16`] where
/// [`bf16_available`] is false is an error naming why.
pub fn set_matmul_precision(precision: Precision) -> crate::Result<()> {
    check(precision)?;
    PRECISION.store(u8::from(precision == Precision::Bf16), Ordering::Relaxed);
    Ok(())
}

thread_local! {
    static SCOPED: std::cell::Cell<Option<Precision>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with products dispatched from this thread in `precision` (the products' own worker
/// threads follow the dispatching one), whatever the process's setting; the same error as
/// [`set_matmul_precision`] when bf16 is not available.
pub fn with_matmul_precision<T>(precision: Precision, f: impl FnOnce() -> T) -> crate::Result<T> {
    check(precision)?;
    struct Restore(Option<Precision>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPED.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SCOPED.with(|s| s.replace(Some(precision))));
    Ok(f())
}

/// The precision products dispatched from this thread run in: [`with_matmul_precision`]'s
/// inside one, else the one set by [`set_matmul_precision`] (f32 until then).
pub fn matmul_precision() -> Precision {
    if let Some(p) = SCOPED.with(std::cell::Cell::get) {
        return p;
    }
    if PRECISION.load(Ordering::Relaxed) == 1 {
        Precision::Bf16
    } else {
        Precision::F32
    }
}

/// Whether a product of `n` rows in `precision` runs in bf16: decoding-sized ones stay in f32
/// (their cost is reading the weight, which bf16 operands do not shorten).
pub(crate) fn runs_in_bf16(precision: Precision, n: usize) -> bool {
    precision == Precision::Bf16 && n > super::qmatmul::GEMV_ROWS && bf16_available()
}

/// `y[n, m] = x[n, k] · Wᵀ` in `precision` ([`bf16::xwt_bf16`](super::bf16::xwt_bf16) or
/// [`xwt_tiled`](super::xwt_tiled)).
pub fn xwt(x: &[f32], n: usize, m: usize, k: usize, w: &dyn WeightRows, precision: Precision) -> Vec<f32> {
    if runs_in_bf16(precision, n) {
        super::bf16::xwt_bf16(x, n, m, k, w)
    } else {
        super::xwt_tiled(x, n, m, k, w)
    }
}

/// `dx[n, k] = dy[n, m] · W` in `precision` ([`bf16::dyw_bf16`](super::bf16::dyw_bf16) or
/// [`dyw_tiled`](super::dyw_tiled)).
pub fn dyw(dy: &[f32], n: usize, m: usize, k: usize, w: &dyn WeightRows, precision: Precision) -> Vec<f32> {
    if runs_in_bf16(precision, n) {
        super::bf16::dyw_bf16(dy, n, m, k, w)
    } else {
        super::dyw_tiled(dy, n, m, k, w)
    }
}

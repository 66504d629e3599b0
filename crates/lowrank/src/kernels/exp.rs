//! `exp` over slices, vectorised: the softmax rows of attention and of the loss spend most of
//! their time here, and libm's scalar `expf` is a function call per element.
//!
//! Cephes' single-precision method: `e^x = 2^k · e^r` with `k = round(x / ln 2)` and a degree-6
//! polynomial for `e^r` on `|r| ≤ ln 2 / 2`; within 2 ulp of `expf` for `x ≥ -87.3` (smaller
//! inputs give `e^-87.3 ≈ 1e-38`, a denormal's neighbour, instead of 0 — below anything f32
//! softmax arithmetic can see after the max is subtracted).

use std::mem::MaybeUninit;

/// `row[i] = e^(row[i] - shift)`; returns the sum of the new values.
pub fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { exp_shifted_avx512(row, shift) };
    }
    exp_shifted_portable(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_avx512(row: &mut [f32], shift: f32) -> f32 {
    exp_shifted_portable(row, shift)
}

/// `dst[i] = e^(src[i] - shift)`, every element of `dst` written; returns their sum. `dst` may
/// be uninitialised (a fresh buffer need not be zero-filled first); it must be as long as `src`.
pub fn exp_shifted_into(src: &[f32], dst: &mut [MaybeUninit<f32>], shift: f32) -> f32 {
    assert_eq!(src.len(), dst.len(), "exp_shifted_into: source and destination lengths differ");
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { exp_shifted_into_avx512(src, dst, shift) };
    }
    exp_shifted_into_portable(src, dst, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_into_avx512(src: &[f32], dst: &mut [MaybeUninit<f32>], shift: f32) -> f32 {
    exp_shifted_into_portable(src, dst, shift)
}

#[inline(always)]
fn exp_shifted_into_portable(src: &[f32], dst: &mut [MaybeUninit<f32>], shift: f32) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let mut d = dst.chunks_exact_mut(LANES);
    let mut s = src.chunks_exact(LANES);
    for (dc, sc) in (&mut d).zip(&mut s) {
        for ((a, o), x) in acc.iter_mut().zip(dc.iter_mut()).zip(sc) {
            let e = exp(*x - shift);
            o.write(e);
            *a += e;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (o, x) in d.into_remainder().iter_mut().zip(s.remainder()) {
        let e = exp(*x - shift);
        o.write(e);
        sum += e;
    }
    sum
}

/// Sixteen partial sums, so the compiler can keep them in one vector register.
#[inline(always)]
fn exp_shifted_portable(row: &mut [f32], shift: f32) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            *x = exp(*x - shift);
            *a += *x;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        sum += *x;
    }
    sum
}

/// `e^x` (see the module docs for the range).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer without a rounding instruction.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // 2^k from the exponent bits; k is in [-126, 128].
    e * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn into_an_uninitialised_buffer_equals_in_place() {
        let src: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let mut in_place = src.clone();
        let sum = exp_shifted(&mut in_place, 1.5);
        let mut dst: Vec<f32> = Vec::with_capacity(src.len());
        let sum_into = exp_shifted_into(&src, &mut dst.spare_capacity_mut()[..src.len()], 1.5);
        // SAFETY: exp_shifted_into wrote all src.len() elements.
        unsafe { dst.set_len(src.len()) };
        assert_eq!(sum, sum_into);
        assert_eq!(in_place, dst);
    }

    #[test]
    fn within_two_ulp_of_libm() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
    }

    #[test]
    fn shifted_slice_and_sum() {
        let mut row: Vec<f32> = (0..37).map(|i| -(i as f32) * 0.7).collect();
        let want: Vec<f32> = row.iter().map(|x| (x - 1.5).exp()).collect();
        let sum = exp_shifted(&mut row, 1.5);
        for (g, w) in row.iter().zip(&want) {
            assert!((g - w).abs() <= 2.5e-7 * w, "{g} vs {w}");
        }
        assert!((sum - want.iter().sum::<f32>()).abs() < 1e-5);
    }
}

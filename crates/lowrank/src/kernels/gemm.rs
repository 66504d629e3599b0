//! Strided f32 matrix products on slices (the `gemm` crate, bounds checked; products of a few
//! rows as AVX-512 dot products or row updates), for the fused ops.

/// A matrix operand: a slice and the element strides of its rows and columns.
pub struct Mat<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// Row-major with row stride `stride`.
    pub fn rows(data: &'a [f32], stride: usize) -> Self {
        Self { data, row_stride: stride, col_stride: 1 }
    }

    /// The transpose of a row-major matrix with row stride `stride`.
    pub fn cols(data: &'a [f32], stride: usize) -> Self {
        Self { data, row_stride: 1, col_stride: stride }
    }

    /// Whether an `m × n` view fits in the slice.
    fn fits(&self, m: usize, n: usize) -> bool {
        m == 0 || n == 0 || (m - 1) * self.row_stride + (n - 1) * self.col_stride < self.data.len()
    }
}

/// Up to this many rows, a small product is done as dot products or row updates (decoding:
/// LoRA's `x Aᵀ`, `h Bᵀ` and attention over the cache for a token or a few). The `gemm` crate
/// packs an operand per call, which costs more than the product at these sizes.
const SMALL_ROWS: usize = 16;
/// ... and below this many multiply-adds.
const SMALL_WORK: usize = 1 << 18;

/// `dst[m, n] (row stride dst_stride) = (dst if accumulate) + scale · lhs[m, k] · rhs[k, n]`, on
/// rayon's threads when `parallel` (otherwise on the caller's: for ops that already run one
/// task per thread).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_stride: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallel: bool,
) {
    let dst_fits = m == 0 || n == 0 || (m - 1) * dst_stride + n <= dst.len();
    assert!(dst_fits && lhs.fits(m, k) && rhs.fits(k, n), "gemm operand out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_stride).take(m).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    if m <= SMALL_ROWS && m * n * k < SMALL_WORK && small(m, n, k, dst, dst_stride, accumulate, &lhs, &rhs, scale) {
        return;
    }
    // Splitting small products across threads costs more than it saves.
    let parallelism = match rayon::current_num_threads() {
        t if parallel && t > 1 && m * n * k >= 1 << 18 => gemm::Parallelism::Rayon(t),
        _ => gemm::Parallelism::None,
    };
    // SAFETY: the assert above checks that every element each operand's strides address lies
    // inside its slice; dst is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The product of [`gemm`] for a few rows of `lhs` (every row alone, so a row's result does not
/// depend on `m`) when `lhs` rows are contiguous: as dot products when `rhs` columns are too, as
/// scaled row sums when `rhs` rows are; `false` (nothing written) otherwise or without AVX-512.
#[allow(clippy::too_many_arguments)]
fn small(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ds: usize,
    acc: bool,
    lhs: &Mat,
    rhs: &Mat,
    scale: f32,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if lhs.col_stride != 1 || !(rhs.row_stride == 1 || rhs.col_stride == 1) {
            return false;
        }
        if !std::is_x86_feature_detected!("avx512f") {
            return false;
        }
        for i in 0..m {
            let a = &lhs.data[i * lhs.row_stride..][..k];
            let out = &mut dst[i * ds..][..n];
            if rhs.row_stride == 1 {
                // out[j] (+)= scale · a · rhs[.., j], column j contiguous
                for (j, o) in out.iter_mut().enumerate() {
                    // SAFETY: the CPU has AVX-512F (checked above); the column lies in the slice
                    // (`Mat::fits`, asserted by the caller).
                    let d = scale * unsafe { avx512::dot(a, &rhs.data[j * rhs.col_stride..][..k]) };
                    *o = if acc { *o + d } else { d };
                }
            } else {
                if !acc {
                    out.fill(0.0);
                }
                for (p, &a) in a.iter().enumerate() {
                    // SAFETY: as above; row p of rhs lies in the slice.
                    unsafe { avx512::axpy(scale * a, &rhs.data[p * rhs.row_stride..][..n], out) };
                }
            }
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, dst, ds, acc, lhs, rhs, scale);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `Σ a[i] · b[i]` over 16 lanes, then across them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut s = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            s = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s);
            i += 16;
        }
        if i < n {
            let mask = (1u16 << (n - i)) - 1;
            s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, pa.add(i)), _mm512_maskz_loadu_ps(mask, pb.add(i)), s);
        }
        _mm512_reduce_add_ps(s)
    }

    /// `y[i] += a · x[i]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let av = _mm512_set1_ps(a);
        let mut i = 0;
        while i + 16 <= n {
            _mm512_storeu_ps(py.add(i), _mm512_fmadd_ps(av, _mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(py.add(i))));
            i += 16;
        }
        if i < n {
            let mask = (1u16 << (n - i)) - 1;
            let y = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(mask, px.add(i)), _mm512_maskz_loadu_ps(mask, py.add(i)));
            _mm512_mask_storeu_ps(py.add(i), mask, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layout of a small product (the dot-product and row-update paths and the `gemm`
    /// crate's) against the textbook sum, accumulating or not, with a tail of odd length.
    #[test]
    fn small_products_equal_the_textbook_sum() {
        let value = |i: usize| ((i * 7919) % 23) as f32 / 11.0 - 1.0;
        for (m, n, k) in [(1, 37, 64), (3, 19, 21), (16, 5, 576), (17, 4, 8)] {
            let lhs: Vec<f32> = (0..m * k).map(value).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| value(i + 5)).collect();
            for rhs_rows in [true, false] {
                // rhs[p, j] at p·n + j (rows contiguous) or at j·k + p (columns contiguous)
                let at = |p: usize, j: usize| if rhs_rows { rhs[p * n + j] } else { rhs[j * k + p] };
                let r = || if rhs_rows { Mat::rows(&rhs, n) } else { Mat::cols(&rhs, k) };
                for accumulate in [false, true] {
                    let mut dst: Vec<f32> = (0..m * n).map(|i| value(i + 9)).collect();
                    let before = dst.clone();
                    gemm(m, n, k, &mut dst, n, accumulate, Mat::rows(&lhs, k), r(), 0.5, false);
                    for i in 0..m {
                        for j in 0..n {
                            let sum: f32 = (0..k).map(|p| lhs[i * k + p] * at(p, j)).sum();
                            let want = 0.5 * sum + if accumulate { before[i * n + j] } else { 0.0 };
                            let got = dst[i * n + j];
                            assert!(
                                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "{m}x{n}x{k} [{i},{j}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

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
                // out[j] (+)= scale · a · rhs[.., j], column j contiguous: 16 columns at a time
                let cs = rhs.col_stride;
                for j0 in (0..n).step_by(16) {
                    let cols = 16.min(n - j0);
                    // SAFETY: the CPU has AVX-512F (checked above); columns j0..j0 + cols lie in
                    // the slice (`Mat::fits`, asserted by the caller) and so does `out[j0..]`.
                    unsafe { avx512::dots16(a, &rhs.data[j0 * cs..], cs, scale, &mut out[j0..j0 + cols], acc) };
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

    /// `out[j] (+)= scale · Σ_i a[i] · b[j·stride + i]` for the `out.len() ≤ 16` columns `j`:
    /// each column summed over 16 lanes, then the 16 sums reduced across lanes together (a
    /// reduction each cost more than the products when columns are short, as LoRA's `h Bᵀ`'s are).
    ///
    /// # Safety
    /// AVX-512F; `b` holds `(out.len() - 1) · stride + a.len()` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dots16(a: &[f32], b: &[f32], stride: usize, scale: f32, out: &mut [f32], acc: bool) {
        let (k, cols) = (a.len(), out.len());
        assert!(cols <= 16 && (cols == 0 || (cols - 1) * stride + k <= b.len()));
        if cols == 0 {
            return;
        }
        let mut s = [_mm512_setzero_ps(); 16];
        let mut i = 0;
        while i < k {
            let mask = if k - i >= 16 { 0xffff } else { (1u16 << (k - i)) - 1 };
            let x = _mm512_maskz_loadu_ps(mask, a.as_ptr().add(i));
            // All 16 every time (so the sums stay in registers): a column past `cols` loads
            // nothing, from the last column's address.
            for (j, sj) in s.iter_mut().enumerate() {
                let (mask, j) = if j < cols { (mask, j) } else { (0, cols - 1) };
                *sj = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(mask, b.as_ptr().add(j * stride + i)), *sj);
            }
            i += 16;
        }
        let lanes = if cols == 16 { 0xffff } else { (1u16 << cols) - 1 };
        let mut sums = _mm512_mul_ps(sum16(&s), _mm512_set1_ps(scale));
        if acc {
            sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(lanes, out.as_ptr()));
        }
        _mm512_mask_storeu_ps(out.as_mut_ptr(), lanes, sums);
    }

    /// Lane `j` of the result is the sum of the 16 lanes of `s[j]`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn sum16(s: &[__m512; 16]) -> __m512 {
        // Pairs: per 128-bit block L, [s0 (lanes 0 + 2), s1 (0 + 2), s0 (1 + 3), s1 (1 + 3)].
        let mut t = [_mm512_setzero_ps(); 8];
        for (p, tp) in t.iter_mut().enumerate() {
            let (x, y) = (s[2 * p], s[2 * p + 1]);
            *tp = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
        }
        // Fours: per block L, [s4g, s4g+1, s4g+2, s4g+3] each summed over block L.
        let mut u = [_mm512_setzero_ps(); 4];
        for (g, ug) in u.iter_mut().enumerate() {
            let (x, y) = (t[2 * g], t[2 * g + 1]);
            *ug = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xee>(x, y));
        }
        // Across blocks: block g of the result is the sum of u[g]'s four blocks.
        let half = |x: __m512, y: __m512| {
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x, y), _mm512_shuffle_f32x4::<0xee>(x, y))
        }; // [x.b0 + x.b2, x.b1 + x.b3, y.b0 + y.b2, y.b1 + y.b3]
        let (x01, x23) = (half(u[0], u[1]), half(u[2], u[3]));
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x01, x23), _mm512_shuffle_f32x4::<0xdd>(x01, x23))
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

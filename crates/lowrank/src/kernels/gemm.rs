//! Strided f32 matrix products on slices (the `gemm` crate, bounds checked), for the fused ops.

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

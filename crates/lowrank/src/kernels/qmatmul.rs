//! Quantized matmul in f32 arithmetic: `y = x Wᵀ` with `W` in GGUF blocks.
//!
//! candle's CPU kernel rounds the activations to 8 bits before the dot products, which moves the
//! logits of a 30-layer model by ~0.1 — enough to flip near-tied greedy choices against the
//! reference (transformers dequantises GGUF weights to f32). Here the weight is dequantised a
//! block of rows at a time into a small cache-resident buffer and multiplied in f32 by `gemm`;
//! only the packed weight stays resident, and the activations are never quantized.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

use super::gemm::{gemm, Mat};

/// Output rows dequantised at a time (a `ROWS × K` f32 tile stays in L2; 32 made the gemm
/// under-fed: 128 measured ~15% faster training).
const ROWS: usize = 128;

/// Up to this many rows of `x` (decoding, small batches), blocks are decoded in registers
/// instead of into tiles (`qgemv`).
pub(crate) const GEMV_ROWS: usize = 16;

/// `x: [n, k]` (row-major) times `Wᵀ` where `W: [m, k]` is quantized; returns `[n, m]`.
pub fn qmatmul_f32(w: &QTensor, x: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
    let (m, k) = w.shape().dims2()?;
    if x.len() != n * k {
        candle_core::bail!("qmatmul: input has {} values, expected {n}×{k}", x.len())
    }
    let data = w.data()?;
    if n <= GEMV_ROWS {
        if let Some(y) = super::qgemv::qgemv(w.dtype(), &data, m, k, x, n) {
            return Ok(y);
        }
    }
    let rows = quant_rows(w.dtype(), &data, m, k)?;
    Ok(xwt_tiled(x, n, m, k, rows.as_ref()))
}

/// `dy: [n, m]` (row-major) times `W: [m, k]` quantized; returns `dy W: [n, k]` (the input
/// gradient of `x Wᵀ`) without dequantising all of `W` at once.
pub fn qmatmul_t_f32(w: &QTensor, dy: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
    let (m, k) = w.shape().dims2()?;
    if dy.len() != n * m {
        candle_core::bail!("qmatmul: gradient has {} values, expected {n}×{m}", dy.len())
    }
    let data = w.data()?;
    let rows = quant_rows(w.dtype(), &data, m, k)?;
    Ok(dyw_tiled(dy, n, m, k, rows.as_ref()))
}

/// The rows of a quantized `[m, k]` weight stored in `bytes`, for its block type.
pub(crate) fn quant_rows<'a>(
    dtype: GgmlDType,
    bytes: &'a [u8],
    m: usize,
    k: usize,
) -> candle_core::Result<Box<dyn WeightRows + 'a>> {
    fn rows<'a, T: GgmlType + Sync + 'a>(
        bytes: &'a [u8],
        m: usize,
        k: usize,
    ) -> candle_core::Result<Box<dyn WeightRows + 'a>> {
        Ok(Box::new(QuantRows { blocks: blocks::<T>(bytes, m, k)?, per_row: k / T::BLCK_SIZE }))
    }
    match dtype {
        GgmlDType::Q4_0 => rows::<BlockQ4_0>(bytes, m, k),
        GgmlDType::Q4_1 => rows::<BlockQ4_1>(bytes, m, k),
        GgmlDType::Q5_0 => rows::<BlockQ5_0>(bytes, m, k),
        GgmlDType::Q5_1 => rows::<BlockQ5_1>(bytes, m, k),
        GgmlDType::Q8_0 => rows::<BlockQ8_0>(bytes, m, k),
        GgmlDType::Q2K => rows::<BlockQ2K>(bytes, m, k),
        GgmlDType::Q3K => rows::<BlockQ3K>(bytes, m, k),
        GgmlDType::Q4K => rows::<BlockQ4K>(bytes, m, k),
        GgmlDType::Q5K => rows::<BlockQ5K>(bytes, m, k),
        GgmlDType::Q6K => rows::<BlockQ6K>(bytes, m, k),
        other => candle_core::bail!("qmatmul: no f32 kernel for {other:?}"),
    }
}

/// The weight's bytes as `m` rows of `k / BLCK_SIZE` blocks, checked.
fn blocks<T: GgmlType>(bytes: &[u8], m: usize, k: usize) -> candle_core::Result<&[T]> {
    if !k.is_multiple_of(T::BLCK_SIZE) {
        candle_core::bail!("qmatmul: row length {k} is not a multiple of the block size {}", T::BLCK_SIZE)
    }
    let per_row = k / T::BLCK_SIZE;
    let size = std::mem::size_of::<T>();
    if bytes.len() != m * per_row * size || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        candle_core::bail!("qmatmul: weight storage does not hold {m}×{k} {:?} blocks", T::DTYPE)
    }
    // SAFETY: length and alignment checked above; the blocks are plain-old-data `repr(C)` structs
    // and the bytes come from candle's own typed storage of this dtype.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, m * per_row) })
}

/// Rows of a frozen `W: [m, k]` as f32, a tile at a time.
pub trait WeightRows: Sync {
    /// Rows `r0..r0 + rows`, row-major; `buf` (`rows × k`) is there to hold them if needed.
    fn rows<'a>(&'a self, r0: usize, rows: usize, buf: &'a mut [f32]) -> &'a [f32];
    /// Elements of the buffer [`WeightRows::rows`] needs for `rows` rows (none when tiles are
    /// borrowed).
    fn buffer_len(&self, rows: usize, k: usize) -> usize {
        rows * k
    }
    /// The whole `W` as stored, when that is bf16 (the bf16 kernels pack it as it is).
    fn bf16(&self) -> Option<&[half::bf16]> {
        None
    }
}

/// A dense f32 `W` (row-major, `k` columns): tiles are borrowed.
pub struct DenseRows<'w> {
    /// The `[M, K]` values, row-major.
    pub w: &'w [f32],
    /// `K`, the length of a row.
    pub k: usize,
}

impl WeightRows for DenseRows<'_> {
    fn rows<'a>(&'a self, r0: usize, rows: usize, _buf: &'a mut [f32]) -> &'a [f32] {
        &self.w[r0 * self.k..(r0 + rows) * self.k]
    }

    fn buffer_len(&self, _rows: usize, _k: usize) -> usize {
        0
    }
}

/// A dense bf16 `W` (row-major, `k` columns), as an HF checkpoint stores it: tiles are widened
/// to f32 into the buffer, exactly.
pub struct Bf16Rows<'w> {
    /// The `[M, K]` values, row-major.
    pub w: &'w [half::bf16],
    /// `K`, the length of a row.
    pub k: usize,
}

impl WeightRows for Bf16Rows<'_> {
    fn rows<'a>(&'a self, r0: usize, rows: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let src = &self.w[r0 * self.k..(r0 + rows) * self.k];
        let out = &mut buf[..src.len()];
        for (o, v) in out.iter_mut().zip(src) {
            *o = v.to_f32(); // exact: the bits, shifted
        }
        out
    }

    fn bf16(&self) -> Option<&[half::bf16]> {
        Some(self.w)
    }
}

/// A quantized `W`: tiles are dequantised into the buffer (vectorised for Q4_0, Q4_1 and
/// Q8_0, with candle's own values; by candle otherwise).
struct QuantRows<'b, T> {
    blocks: &'b [T],
    per_row: usize,
}

impl<T: GgmlType + Sync> WeightRows for QuantRows<'_, T> {
    fn rows<'a>(&'a self, r0: usize, rows: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let blocks = &self.blocks[r0 * self.per_row..(r0 + rows) * self.per_row];
        // SAFETY: the blocks are plain-old-data `repr(C)` structs, read as their bytes.
        let bytes = unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks)) };
        if !super::qgemv::dequantize_blocks(T::DTYPE, bytes, buf) {
            T::to_float(blocks, buf);
        }
        buf
    }
}

/// `dx[n, k] = dy[n, m] · W[m, k]`: each thread's rows of `dy` take `W` a tile at a time and
/// accumulate `dy[rows, tile] · tile` into their rows of `dx`.
pub fn dyw_tiled(dy: &[f32], n: usize, m: usize, k: usize, w: &(impl WeightRows + ?Sized)) -> Vec<f32> {
    by_row_blocks_and_tiles(n, k, m, k, w, |r0, rows, t0, tr, tile, out| {
        gemm(rows, k, tr, out, k, t0 > 0, Mat::rows(&dy[r0 * m + t0..], m), Mat::rows(tile, k), 1.0, false);
    })
}

/// `y[n, m] = x[n, k] · Wᵀ`: each thread's rows of `x` take `W` a tile at a time and write
/// `x[rows] · tileᵀ` straight into their block of `y` (a small cache-resident gemm whose operands
/// pack quickly; no per-tile buffer, no copy).
pub fn xwt_tiled(x: &[f32], n: usize, m: usize, k: usize, w: &(impl WeightRows + ?Sized)) -> Vec<f32> {
    by_row_blocks_and_tiles(n, m, m, k, w, |r0, rows, t0, tr, tile, out| {
        // out[rows, t0..t0 + tr] = x[rows, k] · tileᵀ[k, tr]
        gemm(rows, tr, k, &mut out[t0..], m, false, Mat::rows(&x[r0 * k..], k), Mat::cols(tile, k), 1.0, false);
    })
}

/// A fresh `[n, cols]` output whose rows are split among rayon's threads; each thread walks the
/// `m` rows of `W` (`k` columns) in tiles of [`ROWS`] and calls `step(r0, rows, t0, tr, tile,
/// out)` with its first row `r0`, row count, the tile's first row `t0` and size `tr`, the tile
/// (`tr × k`, dequantised into a per-thread buffer when packed) and its block of the output.
fn by_row_blocks_and_tiles(
    n: usize,
    cols: usize,
    m: usize,
    k: usize,
    w: &(impl WeightRows + ?Sized),
    step: impl Fn(usize, usize, usize, usize, &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; n * cols];
    let rows_per_task = n.div_ceil(rayon::current_num_threads().max(1)).max(1);
    out.par_chunks_mut(rows_per_task * cols.max(1)).enumerate().for_each(|(task, block)| {
        let (r0, rows) = (task * rows_per_task, block.len() / cols.max(1));
        let mut buf = vec![0f32; w.buffer_len(ROWS.min(m), k)];
        for t0 in (0..m).step_by(ROWS) {
            let tr = ROWS.min(m - t0);
            let tile = w.rows(t0, tr, &mut buf[..w.buffer_len(tr, k)]);
            step(r0, rows, t0, tr, tile, block);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn equals_f32_matmul_with_the_dequantised_weight() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let w = Tensor::randn(0f32, 1.0, (70, 256), &dev)?;
            let q = QTensor::quantize(&w, dtype)?;
            let wd = q.dequantize(&dev)?;
            for n in [1, 3, 40] {
                let x = Tensor::randn(0f32, 1.0, (n, 256), &dev)?;
                let want = x.matmul(&wd.t()?)?;
                let got = qmatmul_f32(&q, &x.flatten_all()?.to_vec1()?, n)?;
                let got = Tensor::from_vec(got, (n, 70), &dev)?;
                let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-3, "{dtype:?} n={n}: {d}");
                // The transposed product: [n, 70] · W [70, 256].
                let dy = Tensor::randn(0f32, 1.0, (n, 70), &dev)?;
                let want = dy.matmul(&wd)?;
                let got = qmatmul_t_f32(&q, &dy.flatten_all()?.to_vec1()?, n)?;
                let d = (Tensor::from_vec(got, (n, 256), &dev)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-3, "{dtype:?} transposed n={n}: {d}");
            }
        }
        Ok(())
    }
}

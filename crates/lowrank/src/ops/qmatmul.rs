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

/// Output rows dequantised at a time (a `ROWS × K` f32 tile stays in L2).
const ROWS: usize = 32;

/// `x: [n, k]` (row-major) times `Wᵀ` where `W: [m, k]` is quantized; returns `[n, m]`.
pub fn qmatmul_f32(w: &QTensor, x: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
    let (m, k) = w.shape().dims2()?;
    if x.len() != n * k {
        candle_core::bail!("qmatmul: input has {} values, expected {n}×{k}", x.len())
    }
    let data = w.data()?;
    match w.dtype() {
        GgmlDType::Q4_0 => run::<BlockQ4_0>(&data, x, n, m, k),
        GgmlDType::Q4_1 => run::<BlockQ4_1>(&data, x, n, m, k),
        GgmlDType::Q5_0 => run::<BlockQ5_0>(&data, x, n, m, k),
        GgmlDType::Q5_1 => run::<BlockQ5_1>(&data, x, n, m, k),
        GgmlDType::Q8_0 => run::<BlockQ8_0>(&data, x, n, m, k),
        GgmlDType::Q2K => run::<BlockQ2K>(&data, x, n, m, k),
        GgmlDType::Q3K => run::<BlockQ3K>(&data, x, n, m, k),
        GgmlDType::Q4K => run::<BlockQ4K>(&data, x, n, m, k),
        GgmlDType::Q5K => run::<BlockQ5K>(&data, x, n, m, k),
        GgmlDType::Q6K => run::<BlockQ6K>(&data, x, n, m, k),
        other => candle_core::bail!("qmatmul: no f32 kernel for {other:?}"),
    }
}

fn run<T: GgmlType>(bytes: &[u8], x: &[f32], n: usize, m: usize, k: usize) -> candle_core::Result<Vec<f32>> {
    if k % T::BLCK_SIZE != 0 {
        candle_core::bail!("qmatmul: row length {k} is not a multiple of the block size {}", T::BLCK_SIZE)
    }
    let per_row = k / T::BLCK_SIZE;
    let size = std::mem::size_of::<T>();
    if bytes.len() != m * per_row * size || (bytes.as_ptr() as usize) % std::mem::align_of::<T>() != 0 {
        candle_core::bail!("qmatmul: weight storage does not hold {m}×{k} {:?} blocks", T::DTYPE)
    }
    // SAFETY: length and alignment checked above; the blocks are plain-old-data `repr(C)` structs
    // and the bytes come from candle's own typed storage of this dtype.
    let blocks: &[T] = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, m * per_row) };

    // yᵀ: [m, n], filled tile by tile in parallel.
    let mut yt = vec![0f32; m * n];
    yt.par_chunks_mut(ROWS * n).enumerate().for_each(|(tile, out)| {
        let r0 = tile * ROWS;
        let rows = out.len() / n;
        let mut w = vec![0f32; rows * k];
        T::to_float(&blocks[r0 * per_row..(r0 + rows) * per_row], &mut w);
        // out[rows, n] = w[rows, k] · xᵀ[k, n]
        // SAFETY: every pointer/stride pair addresses inside its buffer: w is rows×k row-major,
        // x is n×k row-major (read as k×n with row stride 1, column stride k), out is rows×n.
        unsafe {
            gemm::gemm(
                rows, n, k,
                out.as_mut_ptr(), 1, n as isize,
                false,
                w.as_ptr(), 1, k as isize,
                x.as_ptr(), k as isize, 1,
                0.0, 1.0,
                false, false, false,
                gemm::Parallelism::None,
            );
        }
    });
    if n == 1 {
        return Ok(yt);
    }
    let mut y = vec![0f32; n * m];
    for (j, row) in yt.chunks_exact(n).enumerate() {
        for (i, v) in row.iter().enumerate() {
            y[i * m + j] = *v;
        }
    }
    Ok(y)
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
            }
        }
        Ok(())
    }
}

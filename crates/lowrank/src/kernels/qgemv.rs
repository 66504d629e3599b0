//! `y = x Wᵀ` for a few rows of `x` (decoding) straight from GGUF blocks: each block of 32
//! weights is dequantised into registers and used at once for every row of `x`, in f32 — no
//! tile buffer, the activations never quantised. Decoding one token otherwise dequantises all
//! of `W` into memory and reads it back. With AVX-512 a block is two 16-lane registers and up to
//! 8 rows of `x` share each decoded block, their accumulators in registers (batched decode);
//! with AVX2 only, four 8-lane registers.
//!
//! Block layouts (ggml): Q4_0 `d: f16, qs: [u8; 16]`, value `(q − 8)·d`; Q4_1 `d, m: f16,
//! qs: [u8; 16]`, value `q·d + m`; Q8_0 `d: f16, qs: [i8; 32]`, value `q·d`. In the 4-bit types,
//! byte `i` holds element `i` in its low nibble and element `i + 16` in its high nibble.

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

/// Weights per block.
const QK: usize = 32;
/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// `x: [n, k]` times `Wᵀ` for `W: [m, k]` stored as `bytes` of `dtype` blocks; `None` for block
/// types this kernel does not decode (the caller falls back to dequantised tiles).
pub fn qgemv(dtype: GgmlDType, bytes: &[u8], m: usize, k: usize, x: &[f32], n: usize) -> Option<Vec<f32>> {
    let block_bytes = block_bytes(dtype)?;
    let row_bytes = k / QK * block_bytes;
    if !k.is_multiple_of(QK) || bytes.len() != m * row_bytes || x.len() != n * k {
        return None;
    }
    // yt[j, i] = row j of W · row i of x
    let mut yt = vec![0f32; m * n];
    yt.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(t, out)| {
        let j0 = t * ROWS_PER_TASK;
        let rows = &bytes[j0 * row_bytes..(j0 + out.len() / n.max(1)) * row_bytes];
        rows_dispatch(dtype, rows, row_bytes, x, n, k, out);
    });
    let mut y = vec![0f32; n * m];
    for j in 0..m {
        for i in 0..n {
            y[i * m + j] = yt[j * n + i];
        }
    }
    Some(y)
}

/// The values of whole `dtype` blocks (`bytes`, 32 values each) into `out`, as candle's
/// `to_float` computes them (`q·d + m`, `(q − 8)·d`, `q·d`: a multiply, then an add), to the bit;
/// `false` (nothing written) for other block types or a CPU without AVX2 and F16C.
pub(crate) fn dequantize_blocks(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
    let Some(block_bytes) = block_bytes(dtype) else { return false };
    assert!(bytes.len().is_multiple_of(block_bytes) && out.len() >= bytes.len() / block_bytes * QK);
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has AVX2 and F16C (checked just above); sizes as asserted.
            unsafe { simd::dequantize(dtype, bytes, block_bytes, out) };
            return true;
        }
    }
    false
}

/// Bytes of one block of the types these kernels decode.
fn block_bytes(dtype: GgmlDType) -> Option<usize> {
    match dtype {
        GgmlDType::Q4_0 => Some(18),
        GgmlDType::Q4_1 => Some(20),
        GgmlDType::Q8_0 => Some(34),
        _ => None,
    }
}

fn rows_dispatch(dtype: GgmlDType, rows: &[u8], row_bytes: usize, x: &[f32], n: usize, k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has AVX-512F and F16C (checked just above).
            return unsafe { simd::rows_avx512(dtype, rows, row_bytes, x, n, k, out) };
        }
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
            return unsafe { simd::rows(dtype, rows, row_bytes, x, n, k, out) };
        }
    }
    rows_generic(dtype, rows, row_bytes, x, n, k, out)
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{GgmlDType, QK};

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;

    /// `f::<KIND>(args)` for the block type (Q4_0, Q4_1, else Q8_0), the type fixed at compile
    /// time in the inner loops.
    macro_rules! by_kind {
        ($dtype:expr, $f:ident($($arg:expr),*)) => {
            match $dtype {
                GgmlDType::Q4_0 => $f::<Q4_0>($($arg),*),
                GgmlDType::Q4_1 => $f::<Q4_1>($($arg),*),
                _ => $f::<Q8_0>($($arg),*),
            }
        };
    }

    /// `rows` with 8-lane registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows(
        dtype: GgmlDType,
        rows: &[u8],
        row_bytes: usize,
        x: &[f32],
        n: usize,
        k: usize,
        out: &mut [f32],
    ) {
        by_kind!(dtype, rows_of(rows, row_bytes, x, n, k, out))
    }

    /// `rows` with 16-lane registers: rows of `x` go in groups of up to 8, whose 16 accumulators
    /// stay in registers while each block is decoded once for the group. Every row of `x` gets
    /// the same operations in the same order whatever `n` and its group, so a sequence decodes
    /// to the same bits alone and in a batch.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn rows_avx512(
        dtype: GgmlDType,
        rows: &[u8],
        row_bytes: usize,
        x: &[f32],
        n: usize,
        k: usize,
        out: &mut [f32],
    ) {
        by_kind!(dtype, groups(rows, row_bytes, x, n, k, out))
    }

    #[inline(always)]
    unsafe fn groups<const KIND: u8>(rows: &[u8], row_bytes: usize, x: &[f32], n: usize, k: usize, out: &mut [f32]) {
        let mut i = 0;
        while i < n {
            let left = n - i;
            let xs = x.as_ptr().add(i * k);
            i += match left {
                8.. => group::<KIND, 8>(rows, row_bytes, xs, k, out, n, i),
                4..=7 => group::<KIND, 4>(rows, row_bytes, xs, k, out, n, i),
                2 | 3 => group::<KIND, 2>(rows, row_bytes, xs, k, out, n, i),
                _ => group::<KIND, 1>(rows, row_bytes, xs, k, out, n, i),
            };
        }
    }

    /// Rows `i..i + G` of `x` (starting at `xs`) against every row of `W` in `rows`: writes
    /// `out[j * n + i + g]`; returns `G`.
    #[inline(always)]
    unsafe fn group<const KIND: u8, const G: usize>(
        rows: &[u8],
        row_bytes: usize,
        xs: *const f32,
        k: usize,
        out: &mut [f32],
        n: usize,
        i: usize,
    ) -> usize {
        let blocks = k / QK;
        let block_bytes = row_bytes / blocks;
        for (j, row) in rows.chunks_exact(row_bytes).enumerate() {
            let mut acc = [[_mm512_setzero_ps(); 2]; G];
            for b in 0..blocks {
                let w = decode16::<KIND>(row.as_ptr().add(b * block_bytes));
                for (g, a) in acc.iter_mut().enumerate() {
                    let x = xs.add(g * k + b * QK);
                    a[0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x), a[0]);
                    a[1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x.add(16)), a[1]);
                }
            }
            for (g, a) in acc.iter().enumerate() {
                out[j * n + i + g] = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
            }
        }
        G
    }

    /// The 32 weights of a block as two vectors of 16, `q·d + m` fused as in [`decode`].
    #[inline(always)]
    unsafe fn decode16<const KIND: u8>(b: *const u8) -> [__m512; 2] {
        let dm = scales(b);
        let d = _mm512_broadcastss_ps(dm);
        if KIND == Q8_0 {
            let w = |i: usize| {
                _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(2 + 16 * i) as *const __m128i))),
                    d,
                )
            };
            return [w(0), w(1)];
        }
        let qs = _mm_loadu_si128(b.add(if KIND == Q4_1 { 4 } else { 2 }) as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let (lo, hi) = (_mm_and_si128(qs, mask), _mm_and_si128(_mm_srli_epi16::<4>(qs), mask));
        let value = |bytes: __m128i| {
            let q = _mm512_cvtepu8_epi32(bytes);
            if KIND == Q4_1 {
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), d, _mm512_broadcastss_ps(_mm_movehdup_ps(dm)))
            } else {
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(8))), d)
            }
        };
        [value(lo), value(hi)]
    }

    /// A block's scale `d` in lane 0 and, for Q4_1, its offset `m` in lane 1: its first four
    /// bytes as two f16. A plain 32-bit load, so that nothing carries over from the last block
    /// (inserting a 16-bit word into a register kept one long dependency chain per row).
    #[inline(always)]
    unsafe fn scales(b: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_loadu_si32(b))
    }

    /// The 32 weights of a block as four vectors of 8. `FUSED`: `q·d + m` in one fused
    /// multiply-add (decoding into registers); else a multiply, then an add, as candle's
    /// `to_float` rounds (dequantised tiles, equal to candle's to the bit).
    #[inline(always)]
    unsafe fn decode<const KIND: u8, const FUSED: bool>(b: *const u8) -> [__m256; 4] {
        let dm = scales(b);
        let d = _mm256_broadcastss_ps(dm);
        if KIND == Q8_0 {
            let w = |i: usize| {
                _mm256_mul_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(2 + 8 * i) as *const __m128i))),
                    d,
                )
            };
            return [w(0), w(1), w(2), w(3)];
        }
        let qs = _mm_loadu_si128(b.add(if KIND == Q4_1 { 4 } else { 2 }) as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let (lo, hi) = (_mm_and_si128(qs, mask), _mm_and_si128(_mm_srli_epi16::<4>(qs), mask));
        let value = |bytes: __m128i| {
            let q = _mm256_cvtepu8_epi32(bytes);
            if KIND == Q4_1 {
                // q·d + m
                let (q, m) = (_mm256_cvtepi32_ps(q), _mm256_broadcastss_ps(_mm_movehdup_ps(dm)));
                if FUSED {
                    _mm256_fmadd_ps(q, d, m)
                } else {
                    _mm256_add_ps(_mm256_mul_ps(q, d), m)
                }
            } else {
                // Q4_0: (q − 8)·d
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(8))), d)
            }
        };
        [value(lo), value(_mm_srli_si128::<8>(lo)), value(hi), value(_mm_srli_si128::<8>(hi))]
    }

    /// [`super::dequantize_blocks`] for the block type.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dequantize(dtype: GgmlDType, bytes: &[u8], block_bytes: usize, out: &mut [f32]) {
        by_kind!(dtype, dequantize_of(bytes, block_bytes, out))
    }

    #[inline(always)]
    unsafe fn dequantize_of<const KIND: u8>(bytes: &[u8], block_bytes: usize, out: &mut [f32]) {
        for (i, block) in bytes.chunks_exact(block_bytes).enumerate() {
            let w = decode::<KIND, false>(block.as_ptr());
            let o = out.as_mut_ptr().add(i * QK);
            for (v, w) in w.iter().enumerate() {
                _mm256_storeu_ps(o.add(8 * v), *w);
            }
        }
    }

    #[inline(always)]
    unsafe fn hsum(a: &[__m256; 4]) -> f32 {
        let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    #[inline(always)]
    unsafe fn rows_of<const KIND: u8>(rows: &[u8], row_bytes: usize, x: &[f32], n: usize, k: usize, out: &mut [f32]) {
        let blocks = k / QK;
        let block_bytes = row_bytes / blocks;
        let mut acc = vec![[_mm256_setzero_ps(); 4]; n];
        for (row, o) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
            if n == 1 {
                // Decoding one token: the accumulators stay in registers.
                let mut a = [_mm256_setzero_ps(); 4];
                for b in 0..blocks {
                    let w = decode::<KIND, true>(row.as_ptr().add(b * block_bytes));
                    let xs = x.as_ptr().add(b * QK);
                    for v in 0..4 {
                        a[v] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(xs.add(8 * v)), a[v]);
                    }
                }
                o[0] = hsum(&a);
                continue;
            }
            acc.iter_mut().for_each(|a| *a = [_mm256_setzero_ps(); 4]);
            for b in 0..blocks {
                let w = decode::<KIND, true>(row.as_ptr().add(b * block_bytes));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xs = x.as_ptr().add(i * k + b * QK);
                    for v in 0..4 {
                        a[v] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(xs.add(8 * v)), a[v]);
                    }
                }
            }
            for (o, a) in o.iter_mut().zip(&acc) {
                *o = hsum(a);
            }
        }
    }
}

/// The portable kernel (no AVX2/FMA/F16C).
fn rows_generic(dtype: GgmlDType, rows: &[u8], row_bytes: usize, x: &[f32], n: usize, k: usize, out: &mut [f32]) {
    let block_bytes = row_bytes / (k / QK);
    let mut w = [0f32; QK];
    for (row, o) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        o.fill(0.0);
        for (b, block) in row.chunks_exact(block_bytes).enumerate() {
            decode(dtype, block, &mut w);
            for (o, xr) in o.iter_mut().zip(x.chunks_exact(k)) {
                *o += w.iter().zip(&xr[b * QK..(b + 1) * QK]).map(|(w, x)| w * x).sum::<f32>();
            }
        }
    }
}

/// The 32 weights of one block.
#[inline(always)]
fn decode(dtype: GgmlDType, block: &[u8], w: &mut [f32; QK]) {
    let half = |i: usize| f16::from_le_bytes([block[i], block[i + 1]]).to_f32();
    match dtype {
        GgmlDType::Q4_0 => {
            let d = half(0);
            for i in 0..16 {
                let q = block[2 + i];
                w[i] = ((q & 0x0F) as i32 - 8) as f32 * d;
                w[i + 16] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlDType::Q4_1 => {
            let (d, m) = (half(0), half(2));
            for i in 0..16 {
                let q = block[4 + i];
                w[i] = (q & 0x0F) as f32 * d + m;
                w[i + 16] = (q >> 4) as f32 * d + m;
            }
        }
        _ => {
            let d = half(0);
            for i in 0..QK {
                w[i] = (block[2 + i] as i8) as f32 * d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    #[test]
    fn equals_the_dequantised_matmul() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, k) = (70, 256);
            let w = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let q = QTensor::quantize(&w, dtype)?;
            let wd = q.dequantize(&dev)?;
            for n in [1, 3, 6, 17] {
                let x = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                let want = x.matmul(&wd.t()?)?;
                let got = qgemv(dtype, &q.data()?, m, k, &x.flatten_all()?.to_vec1()?, n).expect("supported");
                let d = (Tensor::from_vec(got, (n, m), &dev)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-4, "{dtype:?} n={n}: {d}");
            }
        }
        assert!(qgemv(GgmlDType::Q4K, &[], 0, 256, &[], 0).is_none());
        Ok(())
    }

    /// A row of `x` gives the same bits alone as in any batch (groups of 8, 4, 2, 1 here): a
    /// sequence decodes alike whether the server batches it or not.
    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (m, k, n) = (40, 128, 15);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&Tensor::randn(0f32, 1.0, (m, k), &dev)?, dtype)?;
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (n, k), &dev)?.flatten_all()?.to_vec1()?;
            let batch = qgemv(dtype, &q.data()?, m, k, &x, n).expect("supported");
            for (i, xi) in x.chunks_exact(k).enumerate() {
                let alone = qgemv(dtype, &q.data()?, m, k, xi, 1).expect("supported");
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert!(bits(&alone) == bits(&batch[i * m..(i + 1) * m]), "{dtype:?}: row {i} of {n}");
            }
        }
        Ok(())
    }

    /// Whole blocks dequantised here equal candle's `dequantize` to the bit.
    #[test]
    fn dequantized_blocks_equal_candles() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = Tensor::randn(0f32, 1.0, (9, 128), &dev)?;
            let q = QTensor::quantize(&w, dtype)?;
            let want: Vec<f32> = q.dequantize(&dev)?.flatten_all()?.to_vec1()?;
            let mut got = vec![f32::NAN; want.len()];
            if !dequantize_blocks(dtype, &q.data()?, &mut got) {
                eprintln!("no AVX2/F16C here: nothing to check");
                return Ok(());
            }
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert!(bits(&got) == bits(&want), "{dtype:?} differs from candle's");
        }
        assert!(!dequantize_blocks(GgmlDType::Q4K, &[], &mut []));
        Ok(())
    }
}

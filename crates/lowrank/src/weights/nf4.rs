//! NF4, QLoRA's 4-bit base format (bitsandbytes `quant_type="nf4"`, `compress_statistics=True`).
//!
//! The weight, flattened row-major, is cut into blocks of 64. Each block keeps its absolute
//! maximum and, per element, the index of the nearest of 16 NormalFloat levels to `w / absmax`,
//! two indices a byte (the first element in the high nibble). Double quantisation then stores
//! the block maxima themselves in 8 bits: their mean is subtracted, and they are quantised in
//! blocks of 256 to bitsandbytes' signed dynamic 8-bit map, each block with its own f32 maximum.
//! About 4.13 bits per weight; dequantisation is `NF4[q] · (DYN[c] · absmax₂ + mean)`.
//!
//! `quantize` writes the bytes bitsandbytes 0.50.2 writes on CPU (`tests/qlora.rs` checks it
//! against `scripts/fixtures/nf4.py`). That means following its arithmetic, not just the scheme:
//! - levels: the bucket bounds are the f32 midpoints of the levels and an exact tie goes to the
//!   lower level (`torch.bucketize`); a full block is scaled by `x · (1/absmax)`, the short last
//!   block by `x / absmax`, and the divisor is at least `1e-38` (so an all-zero block is at
//!   level 7, 0.0, and a short all-zero block stores `1e-38` as its maximum). An odd element
//!   count pads the last byte with level 7;
//! - the mean of the block maxima is torch's CPU `mean`: its cascade sum in f32, then `/ n`;
//! - the maxima are quantised through bitsandbytes' 65536-entry lookup table over [-1, 1], not
//!   to the exactly nearest map value, and a 256-block whose maxima all equal the mean gets
//!   index 0;
//! - the dynamic map is built from `torch.linspace` as torch computes it (fused multiply-adds).

use candle_core::{Device, Tensor};

use crate::kernels::WeightRows;
use crate::{Error, Result};

mod bnb;
pub use bnb::dynamic_map;
use bnb::{dynamic_index, torch_sum};

/// Elements per NF4 block.
pub const BLOCK: usize = 64;
/// Block maxima per 8-bit block of the double quantisation.
pub const BLOCK2: usize = 256;

/// The 16 NormalFloat levels (QLoRA, Appendix E): the f32 values of bitsandbytes' table.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The NF4 level of 0.0, which bitsandbytes pads an odd element count with.
const ZERO_LEVEL: u8 = 7;

/// bitsandbytes' floor on a block maximum before dividing by it (`absmax.clamp(min=1e-38)`).
const MIN_ABSMAX: f32 = 1e-38;

/// A weight `[rows, cols]` in NF4 with double-quantised block maxima.
#[derive(Debug)]
pub struct Nf4Tensor {
    rows: usize,
    cols: usize,
    /// Two 4-bit level indices per byte, element `2i` in the high nibble.
    packed: Vec<u8>,
    /// Per 64-block: its maximum's index in the dynamic map.
    absmax_q: Vec<u8>,
    /// Per 256 blocks: the scale of their quantised maxima.
    absmax2: Vec<f32>,
    /// The mean subtracted from the block maxima before quantising them.
    offset: f32,
}

impl Nf4Tensor {
    /// Quantises a dense `[rows, cols]` f32 weight as bitsandbytes does (see the module doc).
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let values: Vec<f32> = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Quantize(format!("NF4: element {i} of a {rows}×{cols} weight is not finite")));
        }
        let bounds: [f32; 15] = std::array::from_fn(|i| (NF4[i] + NF4[i + 1]) / 2.0);
        let mut packed = vec![0u8; values.len().div_ceil(2)];
        if values.len() % 2 == 1 {
            packed[values.len() / 2] = ZERO_LEVEL;
        }
        let mut absmax = Vec::with_capacity(values.len().div_ceil(BLOCK));
        for (bi, block) in values.chunks(BLOCK).enumerate() {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let divisor = max.max(MIN_ABSMAX);
            let full = block.len() == BLOCK;
            // bitsandbytes keeps a full block's true maximum but the short last block's floored one.
            absmax.push(if full { max } else { divisor });
            let inv = 1.0 / divisor;
            for (j, &v) in block.iter().enumerate() {
                let x = if full { v * inv } else { v / divisor };
                let q = bounds.partition_point(|&b| b < x) as u8;
                let i = bi * BLOCK + j;
                packed[i / 2] |= if i.is_multiple_of(2) { q << 4 } else { q };
            }
        }
        // Double quantisation of the block maxima.
        let offset = if absmax.is_empty() { 0.0 } else { torch_sum(&absmax) / absmax.len() as f32 };
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let absmax2: Vec<f32> = centred.chunks(BLOCK2).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
        let absmax_q = centred
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let s = absmax2[i / BLOCK2];
                if s == 0.0 {
                    0
                } else {
                    dynamic_index(c * (1.0 / s))
                }
            })
            .collect();
        Ok(Self { rows, cols, packed, absmax_q, absmax2, offset })
    }

    /// The packed level indices, two a byte, element `2i` in the high nibble (bitsandbytes' layout).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// Per 64-block: the index of its maximum in the dynamic map (bitsandbytes' `QuantState.absmax`).
    pub fn absmax_indices(&self) -> &[u8] {
        &self.absmax_q
    }

    /// Per 256 blocks: the scale of their quantised maxima (bitsandbytes' `state2.absmax`).
    pub fn absmax2(&self) -> &[f32] {
        &self.absmax2
    }

    /// The mean subtracted from the block maxima (bitsandbytes' `QuantState.offset`).
    pub fn offset(&self) -> f32 {
        self.offset
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.packed.len() + self.absmax_q.len() + 4 * self.absmax2.len() + 4
    }

    /// The maximum of 64-block `b` as stored (after double quantisation).
    pub fn block_absmax(&self, b: usize) -> f32 {
        dynamic_map()[self.absmax_q[b] as usize] * self.absmax2[b / BLOCK2] + self.offset
    }

    /// Elements `start..start + out.len()` of the flattened weight, dequantised into `out`: a
    /// block at a time, each byte's two levels looked up at once.
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        let pairs = level_pairs();
        let end = start + out.len();
        let mut i = start;
        while i < end {
            let block = i / BLOCK;
            let stop = ((block + 1) * BLOCK).min(end);
            let scale = self.block_absmax(block);
            let mut dst = &mut out[i - start..stop - start];
            if i % 2 == 1 {
                dst[0] = NF4[(self.packed[i / 2] & 0x0f) as usize] * scale;
                dst = &mut dst[1..];
                i += 1;
            }
            let whole = (stop - i) / 2;
            for (d, &byte) in dst.chunks_exact_mut(2).zip(&self.packed[i / 2..i / 2 + whole]) {
                let [hi, lo] = pairs[byte as usize];
                d[0] = hi * scale;
                d[1] = lo * scale;
            }
            if (stop - i) % 2 == 1 {
                dst[2 * whole] = NF4[(self.packed[stop / 2] >> 4) as usize] * scale;
            }
            i = stop;
        }
    }

    /// The whole weight as a dense f32 tensor.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_range(0, &mut out);
        Ok(Tensor::from_vec(out, (self.rows, self.cols), device)?)
    }
}

impl WeightRows for Nf4Tensor {
    fn rows<'a>(&'a self, r0: usize, rows: usize, buf: &'a mut [f32]) -> &'a [f32] {
        self.dequantize_range(r0 * self.cols, &mut buf[..rows * self.cols]);
        buf
    }
}

/// The two levels of each byte: (high nibble, low nibble).
fn level_pairs() -> &'static [[f32; 2]; 256] {
    static PAIRS: std::sync::OnceLock<[[f32; 2]; 256]> = std::sync::OnceLock::new();
    PAIRS.get_or_init(|| std::array::from_fn(|b| [NF4[b >> 4], NF4[b & 0x0f]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain reference of the scheme: each element's nearest NF4 level times its block maximum
    /// (exact f32 maxima), to compare the packed tensor against.
    fn reference(values: &[f32]) -> Vec<f32> {
        values
            .chunks(BLOCK)
            .flat_map(|b| {
                let m = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                b.iter().map(move |v| {
                    let x = if m > 0.0 { v / m } else { 0.0 };
                    let best =
                        NF4.iter().copied().min_by(|a, c| (a - x).abs().total_cmp(&(c - x).abs())).unwrap_or(0.0);
                    best * m
                })
            })
            .collect()
    }

    #[test]
    fn dynamic_map_is_bitsandbytes_table() {
        let m = dynamic_map();
        // Ends of create_dynamic_map(signed=True): minus the last midpoint of 65 points on [0.1, 1]; 1.
        assert!((m[0] + 0.992_968_75).abs() < 1e-6 && m[255] == 1.0, "{} {}", m[0], m[255]);
        assert!(m.windows(2).all(|w| w[0] < w[1]), "256 distinct sorted values");
        assert_eq!(m.iter().filter(|&&v| v == 0.0).count(), 1);
        // The smallest positive value: exponent 0 (10^-6) times the midpoint of 0.1 and 1.
        assert!((m[128] - 0.55e-6).abs() < 1e-12, "{}", m[128]);
    }

    #[test]
    fn tables_are_the_f32_values_bitsandbytes_uses() -> Result<()> {
        // scripts/fixtures/nf4.py stores bnb's QuantState.code and state2.code.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nf4/nf4.safetensors");
        let fx = candle_core::safetensors::load(path, &Device::Cpu)?;
        let bits =
            |k: &str| -> Result<Vec<u32>> { Ok(fx[k].to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect()) };
        assert_eq!(NF4.map(f32::to_bits).to_vec(), bits("nf4_code")?);
        assert_eq!(dynamic_map().map(f32::to_bits).to_vec(), bits("dynamic_map")?);
        Ok(())
    }

    #[test]
    fn round_trip_is_the_nf4_scheme_with_double_quantised_maxima() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, cols) = (40, 576); // 360 blocks: two 256-blocks of maxima
        let w = Tensor::randn(0f32, 0.02, (rows, cols), &dev)?;
        let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let q = Nf4Tensor::quantize(&w)?;
        assert_eq!(q.size_in_bytes(), rows * cols / 2 + rows * cols / BLOCK + 4 * 2 + 4);
        // Block maxima survive double quantisation to within the 8-bit map's resolution.
        for (b, block) in values.chunks(BLOCK).enumerate() {
            let m = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!((q.block_absmax(b) - m).abs() <= 0.01 * m, "block {b}: {} vs {m}", q.block_absmax(b));
        }
        // With exact maxima this is the reference; with the stored ones, the same levels.
        let got: Vec<f32> = q.dequantize(&dev)?.flatten_all()?.to_vec1()?;
        let want = reference(&values);
        for (i, ((g, r), v)) in got.iter().zip(&want).zip(&values).enumerate() {
            let scale = q.block_absmax(i / BLOCK);
            let m = values[i / BLOCK * BLOCK..(i / BLOCK + 1) * BLOCK].iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!((g / scale - r / m).abs() < 1e-6, "element {i}: level {} vs {}", g / scale, r / m);
            assert!((g - v).abs() <= 0.16 * m, "element {i}: {g} is too far from {v}");
        }
        // Mean absolute error of 4-bit NormalFloat on Gaussian weights: about 0.1 of a maximum.
        let mae: f32 = got.iter().zip(&values).map(|(g, v)| (g - v).abs()).sum::<f32>() / values.len() as f32;
        assert!(mae < 0.003 && mae > 0.0005, "mean |error| {mae} for σ = 0.02");
        // Row tiles dequantise to the same values.
        let mut buf = vec![0f32; 3 * cols];
        assert_eq!(q.rows(5, 3, &mut buf), &got[5 * cols..8 * cols]);
        Ok(())
    }

    #[test]
    fn any_range_dequantises_element_by_element() -> Result<()> {
        let w = Tensor::randn(0f32, 1.0, (3, 129), &Device::Cpu)?; // 387 elements: odd, a short last block
        let q = Nf4Tensor::quantize(&w)?;
        let element = |i: usize| {
            let byte = q.packed[i / 2];
            NF4[(if i.is_multiple_of(2) { byte >> 4 } else { byte & 0x0f }) as usize] * q.block_absmax(i / BLOCK)
        };
        for (start, len) in [(0, 387), (1, 1), (1, 64), (63, 2), (64, 63), (5, 200), (130, 257), (386, 1)] {
            let mut out = vec![f32::NAN; len];
            q.dequantize_range(start, &mut out);
            let want: Vec<f32> = (start..start + len).map(element).collect();
            assert_eq!(out, want, "range {start}..{}", start + len);
        }
        Ok(())
    }

    #[test]
    fn packs_the_first_element_in_the_high_nibble() -> Result<()> {
        let w = Tensor::new(&[[1.0f32, -1.0, 0.0, 0.5]], &Device::Cpu)?;
        let q = Nf4Tensor::quantize(&w)?;
        assert_eq!(q.packed, [0xf0, 0x7c], "levels 15, 0, 7, 12 (0.5 is nearest 0.4407)");
        assert!(Nf4Tensor::quantize(&Tensor::new(&[[f32::NAN, 1.0]], &Device::Cpu)?).is_err());
        Ok(())
    }
}

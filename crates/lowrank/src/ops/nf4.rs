//! NF4, QLoRA's 4-bit base format (bitsandbytes `quant_type="nf4"`, `compress_statistics=True`).
//!
//! The weight, flattened row-major, is cut into blocks of 64. Each block keeps its absolute
//! maximum and, per element, the index of the nearest of 16 NormalFloat levels to `w / absmax`,
//! two indices a byte (the first element in the high nibble). Double quantisation then stores
//! the block maxima themselves in 8 bits: their mean is subtracted, and they are quantised in
//! blocks of 256 to bitsandbytes' signed dynamic 8-bit map, each block with its own f32 maximum.
//! About 4.13 bits per weight; dequantisation is `NF4[q] · (DYN[c] · absmax₂ + mean)`.

use candle_core::{Device, Tensor};

use super::qmatmul::WeightRows;
use crate::{Error, Result};

/// Elements per NF4 block.
pub const BLOCK: usize = 64;
/// Block maxima per 8-bit block of the double quantisation.
pub const BLOCK2: usize = 256;

/// The 16 NormalFloat levels (QLoRA, Appendix E; bitsandbytes' table).
pub const NF4: [f32; 16] = [
    -1.0, -0.696_192_8, -0.525_073_1, -0.394_917_5, -0.284_441_4, -0.184_773_4, -0.091_050_0, 0.0,
    0.079_580_3, 0.160_930_2, 0.246_112_3, 0.337_915_2, 0.440_709_8, 0.562_617, 0.722_956_8, 1.0,
];

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
    /// Quantises a dense `[rows, cols]` f32 weight.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let values: Vec<f32> = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!("NF4: element {i} of a {rows}×{cols} weight is not finite")));
        }
        let absmax: Vec<f32> = values.chunks(BLOCK).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
        let mut packed = vec![0u8; values.len().div_ceil(2)];
        for (bi, block) in values.chunks(BLOCK).enumerate() {
            let inv = if absmax[bi] > 0.0 { 1.0 / absmax[bi] } else { 0.0 };
            for (j, v) in block.iter().enumerate() {
                let q = nearest(&NF4, v * inv);
                let i = bi * BLOCK + j;
                packed[i / 2] |= if i.is_multiple_of(2) { q << 4 } else { q };
            }
        }
        // Double quantisation of the block maxima.
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
        let map = dynamic_map();
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let absmax2: Vec<f32> = centred.chunks(BLOCK2).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
        let absmax_q = centred
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let s = absmax2[i / BLOCK2];
                nearest(map, if s > 0.0 { c / s } else { 0.0 })
            })
            .collect();
        Ok(Self { rows, cols, packed, absmax_q, absmax2, offset })
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

    /// Elements `start..start + out.len()` of the flattened weight, dequantised into `out`.
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        let mut block = usize::MAX;
        let mut scale = 0f32;
        for (j, o) in out.iter_mut().enumerate() {
            let i = start + j;
            if i / BLOCK != block {
                block = i / BLOCK;
                scale = self.block_absmax(block);
            }
            let byte = self.packed[i / 2];
            let q = if i.is_multiple_of(2) { byte >> 4 } else { byte & 0x0f };
            *o = NF4[q as usize] * scale;
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

/// Index of the level nearest to `x` in the sorted `levels` (ties to the lower one).
fn nearest(levels: &[f32], x: f32) -> u8 {
    let i = levels.partition_point(|&l| l < x);
    let best = match i {
        0 => 0,
        i if i == levels.len() => levels.len() - 1,
        i if x - levels[i - 1] <= levels[i] - x => i - 1,
        i => i,
    };
    best as u8
}

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`): for exponents
/// `e = 0..6`, the midpoints of `2^e + 1` points spaced evenly on `[0.1, 1]`, times `10^(e-6)`,
/// with both signs; then 0 and 1; sorted (256 values).
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        let mut v: Vec<f32> = Vec::with_capacity(256);
        for e in 0..7 {
            let n = (1usize << e) + 1;
            let bounds: Vec<f32> = (0..n).map(|j| 0.1 + 0.9 * j as f32 / (n - 1) as f32).collect();
            let scale = 10f32.powi(e - 6);
            for w in bounds.windows(2) {
                let mean = (w[0] + w[1]) / 2.0;
                v.push(scale * mean);
                v.push(-scale * mean);
            }
        }
        v.push(0.0);
        v.push(1.0);
        v.sort_by(f32::total_cmp);
        let mut map = [0f32; 256];
        map.copy_from_slice(&v);
        map
    })
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
                    let best = NF4.iter().copied().min_by(|a, c| (a - x).abs().total_cmp(&(c - x).abs())).unwrap_or(0.0);
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
    fn packs_the_first_element_in_the_high_nibble() -> Result<()> {
        let w = Tensor::new(&[[1.0f32, -1.0, 0.0, 0.5]], &Device::Cpu)?;
        let q = Nf4Tensor::quantize(&w)?;
        assert_eq!(q.packed, [0xf0, 0x7c], "levels 15, 0, 7, 12 (0.5 is nearest 0.4407)");
        assert!(Nf4Tensor::quantize(&Tensor::new(&[[f32::NAN, 1.0]], &Device::Cpu)?).is_err());
        Ok(())
    }
}

//! Rotary position embeddings in HF layout (rotate-half, not interleaved), from differentiable
//! primitives so gradients flow to the queries and keys.

use candle_core::{Device, Tensor, D};

use crate::{Error, Result};

/// How the rotary frequencies are rescaled (`rope_scaling` / `rope_parameters` in config.json).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// `linear`: positions divided by `factor`.
    Linear {
        /// Divisor.
        factor: f32,
    },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        /// Scale for low frequencies.
        factor: f32,
        /// Wavelength band edges, as fractions of the original context.
        low_freq_factor: f32,
        /// Upper band edge.
        high_freq_factor: f32,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f32,
    },
    /// Per-frequency divisors given explicitly (GGUF's `rope_freqs` tensor).
    Factors(Vec<f32>),
}

/// The inverse frequencies of one model; builds `cos`/`sin` for any positions.
#[derive(Clone, Debug)]
pub struct RopeTable {
    inv_freq: Vec<f32>,
}

impl RopeTable {
    /// Frequencies for `head_dim` (the rotated part) with base `theta`.
    pub fn new(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Result<Self> {
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::Config(format!("rotary dimension {head_dim} must be even and > 0")));
        }
        // As transformers computes it: base ** (arange(0, dim, 2) / dim) in f32.
        let mut inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Factors(factors) => {
                if factors.len() != inv_freq.len() {
                    return Err(Error::Config(format!(
                        "rope_freqs has {} factors, expected {}",
                        factors.len(),
                        inv_freq.len()
                    )));
                }
                inv_freq.iter_mut().zip(factors).for_each(|(f, d)| *f /= d);
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen { *f / factor } else { *f };
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    *f = if medium {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Ok(Self { inv_freq })
    }

    /// `cos, sin: [N, 1, D/2]` for the given absolute positions.
    pub fn cos_sin(&self, positions: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let shape = (positions.len(), 1, half);
        Ok((Tensor::from_vec(cos, shape, device)?, Tensor::from_vec(sin, shape, device)?))
    }
}

/// Rotate `x: [N, heads, D]` by `cos, sin: [N, 1, D/2]` (rotate-half convention).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[a, b], D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() -> Result<()> {
        let dev = Device::Cpu;
        let table = RopeTable::new(8, 10000.0, &RopeScaling::None)?;
        let x = Tensor::randn(0f32, 1.0, (3, 2, 8), &dev)?;
        let (cos, sin) = table.cos_sin(&[0, 5, 77], &dev)?;
        let y = apply_rope(&x, &cos, &sin)?;
        let n_x = x.sqr()?.sum(D::Minus1)?;
        let n_y = y.sqr()?.sum(D::Minus1)?;
        assert!((n_x - n_y)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4);
        let d0 = (x.get(0)? - y.get(0)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d0 < 1e-7);
        Ok(())
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() -> Result<()> {
        let plain = RopeTable::new(64, 500000.0, &RopeScaling::None)?;
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let scaled = RopeTable::new(64, 500000.0, &s)?;
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((plain.inv_freq[last] / 8.0 - scaled.inv_freq[last]).abs() < 1e-12);
        Ok(())
    }
}

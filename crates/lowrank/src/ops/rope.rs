//! Rotary position embeddings in HF layout (rotate-half, not interleaved), from differentiable
//! primitives so gradients flow to the queries and keys.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::kernels::{stored, values};
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
    /// LongRoPE (Phi-3 `longrope`, formerly `su`): per-frequency divisors `short_factor` while a
    /// sequence fits the original context, `long_factor` once it is longer, and `cos`/`sin`
    /// multiplied by `attention_factor`.
    LongRope {
        /// Divisors within the original context.
        short_factor: Vec<f32>,
        /// Divisors beyond it.
        long_factor: Vec<f32>,
        /// The context the model was pre-trained with.
        original_max_position_embeddings: usize,
        /// Multiplies `cos` and `sin`.
        attention_factor: f32,
    },
}

/// LongRoPE's default attention factor for a context extended `factor` times beyond `original`:
/// `√(1 + ln(factor) / ln(original))`, 1 when not extended (transformers and llama.cpp's converter).
pub fn longrope_attention_factor(factor: f64, original: usize) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        (1.0 + factor.ln() / (original as f64).ln()).sqrt()
    }
}

/// The inverse frequencies of one model; builds `cos`/`sin` for any positions.
#[derive(Clone, Debug)]
pub struct RopeTable {
    inv_freq: Vec<f32>,
    /// LongRoPE: the frequencies of sequences longer than the given length.
    long: Option<(Vec<f32>, usize)>,
    /// Multiplies `cos` and `sin` (LongRoPE's attention factor; 1 otherwise).
    attention_factor: f32,
}

impl RopeTable {
    /// Frequencies for `head_dim` (the rotated part) with base `theta`.
    pub fn new(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!("rotary dimension {head_dim} must be even and > 0")));
        }
        // As transformers computes it: base ** (arange(0, dim, 2) / dim) in f32.
        let powers: Vec<f32> = (0..head_dim / 2).map(|i| theta.powf((2 * i) as f32 / head_dim as f32)).collect();
        let mut inv_freq: Vec<f32> = powers.iter().map(|p| 1.0 / p).collect();
        let (mut long, mut attention_factor) = (None, 1.0);
        match scaling {
            RopeScaling::None => {}
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor: a,
            } => {
                if short_factor.len() != powers.len() || long_factor.len() != powers.len() {
                    return Err(Error::Config(format!(
                        "longrope: {} short and {} long factors for {} rotary frequencies",
                        short_factor.len(),
                        long_factor.len(),
                        powers.len()
                    )));
                }
                // As transformers: 1 / (factor · base^(2i/dim)) in f32.
                let freqs = |f: &[f32]| f.iter().zip(&powers).map(|(f, p)| 1.0 / (f * p)).collect::<Vec<f32>>();
                inv_freq = freqs(short_factor);
                long = Some((freqs(long_factor), *original_max_position_embeddings));
                attention_factor = *a;
            }
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
                    let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                    *f = if medium {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Ok(Self { inv_freq, long, attention_factor })
    }

    /// `cos, sin: [N, 1, D/2]` for the given absolute positions; `lengths[i]` is the length of
    /// row `i`'s sequence so far (cached plus new tokens), which picks LongRoPE's frequencies as
    /// transformers does for that sequence alone.
    pub fn cos_sin(&self, positions: &[usize], lengths: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        if lengths.len() != positions.len() {
            return Err(Error::Batch(format!("rope: {} positions but {} lengths", positions.len(), lengths.len())));
        }
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        let m = self.attention_factor;
        for (&p, &len) in positions.iter().zip(lengths) {
            let freqs = match &self.long {
                Some((long, original)) if len > *original => long,
                _ => &self.inv_freq,
            };
            for &f in freqs {
                let a = p as f32 * f;
                cos.push(a.cos() * m);
                sin.push(a.sin() * m);
            }
        }
        let shape = (positions.len(), 1, half);
        Ok((Tensor::from_vec(cos, shape, device)?, Tensor::from_vec(sin, shape, device)?))
    }
}

/// Rotate `x: [N, heads, D]` by `cos, sin: [N, 1, R/2]` (rotate-half convention): the first `R`
/// dimensions of each head, the rest passed through (Phi-3's `partial_rotary_factor`).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (n, heads, d) = x.dims3()?;
    let r = 2 * cos.dim(D::Minus1)?;
    if r < d && cos.dims3()? == (n, 1, r / 2) {
        let rotated = apply_rope(&x.narrow(2, 0, r)?.contiguous()?, cos, sin)?;
        let kept = x.narrow(2, r, d - r)?.contiguous()?;
        return Ok(Tensor::cat(&[rotated, kept], 2)?.reshape((n, heads, d))?);
    }
    if cos.dims3()? != (n, 1, d / 2) || sin.dims3()? != (n, 1, d / 2) || d % 2 != 0 {
        return Err(Error::Batch(format!("rope: x {:?} with cos {:?}, sin {:?}", x.dims(), cos.dims(), sin.dims())));
    }
    if x.device().is_cpu() && [x.dtype(), cos.dtype(), sin.dtype()].iter().all(|t| *t == DType::F32) {
        return Ok(x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)?);
    }
    rope_composed(x, cos, sin)
}

/// [`apply_rope`] from candle ops (other devices and dtypes; the reference in tests).
fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[a, b], D::Minus1)?)
}

/// The rotation as one op: its backward is the rotation by the opposite angle.
struct Rope;

/// Rotates every head of every row of `x: [N, heads, D]` by `(cos, sin): [N, D/2]`, with `sign`
/// 1 (forward) or -1 (the inverse rotation, for the gradient).
pub(super) fn rotate(x: &[f32], cos: &[f32], sin: &[f32], half: usize, sign: f32) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    if x.is_empty() || half == 0 {
        return y;
    }
    let row = x.len() / (cos.len() / half).max(1); // heads · D
    y.par_chunks_mut(row).zip(x.par_chunks(row)).enumerate().for_each(|(t, (y, x))| {
        let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
        for (y, x) in y.chunks_exact_mut(2 * half).zip(x.chunks_exact(2 * half)) {
            let (x1, x2) = x.split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            for i in 0..half {
                let si = sign * s[i];
                y1[i] = x1[i] * c[i] - x2[i] * si;
                y2[i] = x2[i] * c[i] + x1[i] * si;
            }
        }
    });
    y
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sc: &CpuStorage,
        lc: &Layout,
        ss: &CpuStorage,
        ls: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let half = lx.shape().dims3()?.2 / 2;
        let y = rotate(values(sx, lx)?, values(sc, lc)?, values(ss, ls)?, half, 1.0);
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let half = x.dims3()?.2 / 2;
        let ((sg, lg), (sc, lc), (ss, ls)) =
            (dy.storage_and_layout(), cos.storage_and_layout(), sin.storage_and_layout());
        let dx = rotate(stored(&sg, lg)?, stored(&sc, lc)?, stored(&ss, ls)?, half, -1.0);
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_equals_composed_rotation_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let table = RopeTable::new(8, 10000.0, &RopeScaling::None)?;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 3, 8), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (5, 3, 8), &dev)?;
        let (cos, sin) = table.cos_sin(&[0, 3, 9, 100, 4000], &[1; 5], &dev)?;
        let (y, want) = (apply_rope(&x, &cos, &sin)?, rope_composed(&x, &cos, &sin)?);
        assert!((&y - &want)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        let (g, g_ref) = ((y * &up)?.sum_all()?.backward()?, (want * &up)?.sum_all()?.backward()?);
        let (a, b) = (g.get(x.as_tensor()).expect("grad"), g_ref.get(x.as_tensor()).expect("grad"));
        assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        Ok(())
    }

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() -> Result<()> {
        let dev = Device::Cpu;
        let table = RopeTable::new(8, 10000.0, &RopeScaling::None)?;
        let x = Tensor::randn(0f32, 1.0, (3, 2, 8), &dev)?;
        let (cos, sin) = table.cos_sin(&[0, 5, 77], &[1; 3], &dev)?;
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

//! DoRA (PEFT `tuners/lora/dora.py`): the update split into a magnitude per output row and a
//! direction. With `g = m / ‖W + s·B A‖` (one norm per output row, over the input columns, and
//! treated as a constant: no gradient flows through it),
//!
//! ```text
//! y = bias + g ⊙ (x Wᵀ + s · x Aᵀ Bᵀ)
//! ```
//!
//! and the merged weight is `W' = g ⊙ (W + s·B A)`. As in PEFT, with dropout active the base
//! part is recomputed on the dropped input: `Δy = (g − 1) ⊙ x̃ Wᵀ + g ⊙ s · x̃ Aᵀ Bᵀ`.
//!
//! The norm is computed without forming `W + s·B A`:
//! `‖Wᵢ + s(BA)ᵢ‖² = ‖Wᵢ‖² + 2s·Σⱼ Bᵢⱼ (A Wᵀ)ⱼᵢ + s²·(B (A Aᵀ) ⊙ B)ᵢ`, where `‖Wᵢ‖²` is computed
//! once per frozen weight and `A Wᵀ` is the frozen layer applied to the rows of `A` — so a
//! quantized base is never dequantised whole. At inference the norm itself is cached.

use std::sync::Mutex;

use candle_core::{Device, Tensor, Var, D};
use rand::rngs::StdRng;

use super::config::LoraInit;
use super::dropout::Dropout;
use super::lora::LoraLayer;
use super::{AdapterLayer, MergeParts};
use crate::ops::{lora_linear, FrozenLinear};
use crate::weights::WeightKey;
use crate::{Error, Result};

/// A value derived from one frozen weight, and which weight.
type Cached = Mutex<Option<(WeightKey, Tensor)>>;

/// One DoRA layer for a `[M, K]` projection.
#[derive(Debug)]
pub struct DoraLayer {
    /// `A: [r, K]`, `B: [M, r]`, the scale and the dropout.
    pub lora: LoraLayer,
    /// `m: [M]`, PEFT's `lora_magnitude_vector`.
    pub magnitude: Tensor,
    /// Whether `A` and `B` change between calls (training): the norm is then recomputed each
    /// forward instead of cached.
    trainable: bool,
    /// `‖Wᵢ‖²: [M]` of the frozen weight.
    weight_sq: Cached,
    /// `‖W + s·B A‖: [M]`, when not trainable.
    norm: Cached,
    /// The norm used by the last merge, for the unmerge that undoes it (PEFT keeps it too).
    merged_norm: Mutex<Option<Tensor>>,
}

impl Clone for DoraLayer {
    fn clone(&self) -> Self {
        Self::new(self.lora.clone(), self.magnitude.clone(), self.trainable)
    }
}

impl DoraLayer {
    /// A layer from its factors and magnitude.
    pub fn new(lora: LoraLayer, magnitude: Tensor, trainable: bool) -> Self {
        Self {
            lora,
            magnitude,
            trainable,
            weight_sq: Mutex::new(None),
            norm: Mutex::new(None),
            merged_norm: Mutex::new(None),
        }
    }

    /// PEFT's init for `base`: LoRA's (`B = 0`), and `m = ‖W‖` per row, so the adapted layer
    /// equals the base at step 0.
    pub fn init(
        r: usize,
        base: &FrozenLinear,
        scale: f64,
        init: LoraInit,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let (m, k) = base.weight().dims()?;
        let lora = LoraLayer::init(r, k, m, scale, init, rng, device)?;
        let magnitude = weight_sq(base)?.sqrt()?;
        Ok(Self::new(lora, magnitude, false))
    }

    /// `‖W + s·B A‖: [M]` for the frozen layer `base`, no gradient.
    pub fn weight_norm(&self, base: &FrozenLinear) -> Result<Tensor> {
        let key = base.weight().key();
        if !self.trainable {
            if let Some(n) = cached(&self.norm, &key) {
                return Ok(n);
            }
        }
        let wsq = match cached(&self.weight_sq, &key) {
            Some(w) => w,
            None => {
                let w = weight_sq(base)?;
                store(&self.weight_sq, key.clone(), &w);
                w
            }
        };
        let (a, b, s) = (self.lora.a.detach(), self.lora.b.detach(), self.lora.scale);
        let aw = base.forward_no_bias(&a)?; // [r, K] -> [r, M] = A Wᵀ
        let cross = (&b * aw.t()?)?.sum(D::Minus1)?; // [M]
        let bg = b.matmul(&a.matmul(&a.t()?)?)?; // [M, r] x [r, r]
        let bb = (bg * &b)?.sum(D::Minus1)?; // [M]
        let sq = ((wsq + (cross * (2.0 * s))?)? + (bb * (s * s))?)?;
        let norm = sq.relu()?.sqrt()?;
        if !self.trainable {
            store(&self.norm, key, &norm);
        }
        Ok(norm)
    }

    /// `g = m / ‖W + s·B A‖: [M]`, the norm a constant.
    fn factor(&self, base: &FrozenLinear) -> Result<Tensor> {
        Ok((&self.magnitude / self.weight_norm(base)?)?)
    }
}

/// `‖Wᵢ‖²: [M]`.
fn weight_sq(base: &FrozenLinear) -> Result<Tensor> {
    Ok(base.weight().to_dense()?.sqr()?.sum(D::Minus1)?)
}

fn cached(c: &Cached, key: &WeightKey) -> Option<Tensor> {
    let g = c.lock().ok()?;
    g.as_ref().filter(|(k, _)| k.same(key)).map(|(_, t)| t.clone())
}

fn store(c: &Cached, key: WeightKey, t: &Tensor) {
    if let Ok(mut g) = c.lock() {
        *g = Some((key, t.clone()));
    }
}

impl AdapterLayer for DoraLayer {
    fn forward(&self, x: &Tensor, base_out: &Tensor, base: &FrozenLinear) -> Result<Tensor> {
        let g = self.factor(base)?; // [M]
        let dropped = self.lora.dropout.as_ref().filter(|d| d.active());
        let (x, base_part) = match dropped {
            // PEFT recomputes the base output on the dropped input.
            Some(d) => {
                let xd = d.apply(x)?;
                let y = base.forward_no_bias(&xd)?;
                (xd, y)
            }
            None => {
                let y = match base.bias() {
                    Some(bias) => base_out.broadcast_sub(bias)?,
                    None => base_out.clone(),
                };
                (x.clone(), y)
            }
        };
        // [N, K] x [K, r] -> [N, r]; x [r, M] -> [N, M]
        let lora = (x.matmul(&self.lora.a.t()?)? * self.lora.scale)?.matmul(&self.lora.b.t()?)?;
        Ok((base_part.broadcast_mul(&(&g - 1.0)?)? + lora.broadcast_mul(&g)?)?)
    }

    fn delta_weight(&self) -> Result<Tensor> {
        Err(Error::NewAdapter("a DoRA layer has no weight-independent update: merge it into its base".into()))
    }

    fn merge_parts(&self, w: Option<&Tensor>) -> Result<MergeParts> {
        let mut slot = self.merged_norm.lock().map_err(|_| Error::NewAdapter("DoRA merge state poisoned".into()))?;
        let norm = match w {
            // PEFT's get_weight_norm on the unmerged weight: ‖W + s·B A‖ formed densely.
            Some(w) => {
                let n = (w + self.lora.delta_weight()?.to_dtype(w.dtype())?)?.sqr()?.sum(D::Minus1)?.sqrt()?;
                *slot = Some(n.clone());
                n
            }
            None => slot
                .take()
                .ok_or_else(|| Error::NewAdapter("this DoRA adapter is not merged, so it cannot be unmerged".into()))?,
        };
        let g = (&self.magnitude / norm)?; // [M]
        Ok(MergeParts {
            row_factor: Some((&g - 1.0)?),
            add: self.lora.delta_weight()?.broadcast_mul(&g.unsqueeze(1)?)?,
        })
    }

    fn rank(&self) -> usize {
        self.lora.rank()
    }

    /// At weight 1 without dropout: `bias + g ⊙ lora_linear(x)` with `g = m / ‖W + sBA‖`, one
    /// `[N, M]` product more instead of the half-dozen the composed form keeps for the backward.
    fn fused(&self, x: &Tensor, base: &FrozenLinear, weight: f64) -> Result<Option<Tensor>> {
        if weight != 1.0 {
            return Ok(None);
        }
        let Some(lr) = self.lora.low_rank() else { return Ok(None) };
        let Some(z) = lora_linear(x, base.weight(), &lr)? else { return Ok(None) };
        let y = z.broadcast_mul(&self.factor(base)?)?;
        Ok(Some(match base.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }))
    }

    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut t = self.lora.tensors();
        t.push(("lora_magnitude_vector", &self.magnitude));
        t
    }

    fn to_trainable(&self, dropout: Option<Dropout>) -> Result<super::Trainable> {
        let a = Var::from_tensor(&self.lora.a.copy()?)?;
        let b = Var::from_tensor(&self.lora.b.copy()?)?;
        let m = Var::from_tensor(&self.magnitude.copy()?)?;
        let lora = LoraLayer { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale: self.lora.scale, dropout };
        let layer = DoraLayer::new(lora, m.as_tensor().clone(), true);
        Ok((Box::new(layer), vec![("lora_A.weight", a), ("lora_B.weight", b), ("lora_magnitude_vector", m)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::FrozenWeight;
    use candle_core::quantized::{GgmlDType, QTensor};
    use std::sync::Arc;

    /// The expanded norm equals `‖W + s·B A‖` formed densely, for a dense and a quantized `W`
    /// (whose dequantised values are what the norm must see), and is cached at inference.
    #[test]
    fn norm_without_forming_the_sum_equals_the_dense_one() -> Result<()> {
        let dev = Device::Cpu;
        let (m, k, r, s) = (24, 64, 4, 0.7);
        let w = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let q = FrozenWeight::Quant(Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?));
        for weight in [FrozenWeight::Dense(w.clone()), q] {
            let base = FrozenLinear::new(weight, None);
            let lora = LoraLayer {
                a: Tensor::randn(0f32, 1.0, (r, k), &dev)?,
                b: Tensor::randn(0f32, 0.3, (m, r), &dev)?,
                scale: s,
                dropout: None,
            };
            let want = (base.weight().to_dense()? + lora.delta_weight()?)?.sqr()?.sum(D::Minus1)?.sqrt()?;
            let layer = DoraLayer::new(lora, Tensor::ones(m, candle_core::DType::F32, &dev)?, false);
            let got = layer.weight_norm(&base)?;
            let d = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "norms differ by {d}");
            assert!(cached(&layer.norm, &base.weight().key()).is_some(), "an inference layer keeps its norm");
        }
        Ok(())
    }
}

//! Folding adapters into the frozen weights and taking them out again: `W' = W + Σ wᵢ·ΔWᵢ`
//! (DoRA also rescales the rows of `W`, see [`MergeParts`](crate::adapter::MergeParts)).
//!
//! A merged model runs at the base model's cost (no bypass). A quantized weight is dequantised
//! to f32 first (adding ΔW to packed blocks would re-quantise it and lose the update). `unmerge`
//! subtracts the same sum, so `merge` then `unmerge` returns `W` within f32 rounding.

use candle_core::{DType, Tensor};

use super::transformer::Model;
use crate::adapter::ActiveAdapter;
use crate::ops::FrozenLinear;
use crate::weights::FrozenWeight;
use crate::Result;

impl Model {
    /// Adds every adapter's weighted update into the projections it adapts.
    pub fn merge(&mut self, adapters: &[ActiveAdapter]) -> Result<()> {
        self.fold(adapters, 1.0)
    }

    /// Subtracts what [`Model::merge`] added (the same adapters and weights).
    pub fn unmerge(&mut self, adapters: &[ActiveAdapter]) -> Result<()> {
        self.fold(adapters, -1.0)
    }

    /// Replaces the merged adapters `from` by `to` (unmerge, then merge): how a merged model
    /// switches adapters without reloading the base.
    pub fn switch_merged(&mut self, from: &[ActiveAdapter], to: &[ActiveAdapter]) -> Result<()> {
        self.unmerge(from)?;
        self.merge(to)
    }

    /// For every projection some adapter touches, with `c = 1 + Σ wᵢ·rowᵢ` and `R = Σ wᵢ·addᵢ`
    /// (each adapter's [`MergeParts`]): merging sets `W ← c ⊙ W + R`, unmerging
    /// `W ← (W − R) / c`. For LoRA `c = 1` and this is `W ± Σ wᵢ·sᵢ·BᵢAᵢ`.
    fn fold(&mut self, adapters: &[ActiveAdapter], sign: f64) -> Result<()> {
        for block in self.blocks_mut() {
            for p in block.projections_mut() {
                let base = p.base();
                let mut w: Option<Tensor> = None; // [M, K], dense f32
                let mut factor: Option<Tensor> = None; // [M], c - 1
                let mut add: Option<Tensor> = None; // [M, K]
                for a in adapters {
                    let Some(layer) = a.adapter.layer(p.id()) else { continue };
                    let w = match &w {
                        Some(w) => w,
                        None => w.insert(base.weight().to_dense()?),
                    };
                    let parts = layer.merge_parts((sign > 0.0).then_some(w))?;
                    add = Some(sum(add, (parts.add.to_dtype(DType::F32)? * a.weight)?)?);
                    if let Some(r) = parts.row_factor {
                        factor = Some(sum(factor, (r.to_dtype(DType::F32)? * a.weight)?)?);
                    }
                }
                let (Some(w), Some(add)) = (w, add) else { continue };
                let c = factor.map(|f| (f + 1.0)?.unsqueeze(1)).transpose()?; // [M, 1]
                let merged = match (sign > 0.0, c) {
                    (true, Some(c)) => (w.broadcast_mul(&c)? + add)?,
                    (true, None) => (w + add)?,
                    (false, Some(c)) => (w - add)?.broadcast_div(&c)?,
                    (false, None) => (w - add)?,
                };
                // Kept in f32 whatever the base's storage: bf16 would round away most of a small
                // update (a LoRA delta is ~1e-3 of W, bf16's step ~4e-3 of it).
                let bias = base.bias().cloned();
                p.set_base(FrozenLinear::new(FrozenWeight::Dense(merged), bias));
            }
        }
        Ok(())
    }
}

/// `a + b`, or `b` when there is no `a` yet.
fn sum(a: Option<Tensor>, b: Tensor) -> Result<Tensor> {
    Ok(match a {
        Some(a) => (a + b)?,
        None => b,
    })
}

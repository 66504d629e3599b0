//! Folding adapters into the frozen weights and taking them out again: `W' = W + Σ wᵢ·ΔWᵢ`.
//!
//! A merged model runs at the base model's cost (no bypass). A quantized weight is dequantised
//! to f32 first (adding ΔW to packed blocks would re-quantise it and lose the update). `unmerge`
//! subtracts the same sum, so `merge` then `unmerge` returns `W` within f32 rounding.

use candle_core::Tensor;

use super::transformer::Model;
use crate::adapter::ActiveAdapter;
use crate::ops::{FrozenLinear, FrozenWeight};
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

    /// `W ← W + sign · Σ wᵢ·ΔWᵢ` for every projection some adapter touches.
    fn fold(&mut self, adapters: &[ActiveAdapter], sign: f64) -> Result<()> {
        for block in self.blocks_mut() {
            for p in block.projections_mut() {
                let mut delta: Option<Tensor> = None; // [M, K]
                for a in adapters {
                    let Some(layer) = a.adapter.layer(p.id()) else { continue };
                    let d = (layer.delta_weight()? * (sign * a.weight))?;
                    delta = Some(match delta {
                        Some(s) => (s + d)?,
                        None => d,
                    });
                }
                let Some(delta) = delta else { continue };
                let base = p.base();
                let w = base.weight().to_dense()?; // [M, K]
                let merged = (&w + delta.to_dtype(w.dtype())?)?;
                let bias = base.bias().cloned();
                p.set_base(FrozenLinear::new(FrozenWeight::Dense(merged), bias));
            }
        }
        Ok(())
    }
}

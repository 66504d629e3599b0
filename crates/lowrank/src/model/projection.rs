//! The one linear factory. Every projection of the model is built here and registered in the
//! [`ModuleTable`] under its HF module path; adapters attach to projections through that table,
//! so no model code knows about LoRA and no adapter code knows about Llama.

use std::ops::Range;

use candle_core::Tensor;

use super::weights::{dense_checked, matrix_checked, WeightSource};
use crate::adapter::ActiveAdapter;
use crate::module_table::{ModuleInfo, ModuleTable};
use crate::ops::FrozenLinear;
use crate::Result;

/// Rows `rows` of the flattened batch use `adapters` (empty: the base model alone).
#[derive(Clone, Debug)]
pub struct AdapterRun<'a> {
    /// Row range in the `[N, ·]` activations.
    pub rows: Range<usize>,
    /// Adapters applied to those rows, each with its weight.
    pub adapters: &'a [ActiveAdapter],
}

/// A frozen projection plus whatever adapters the batch asks for.
#[derive(Clone, Debug)]
pub struct Projection {
    id: usize,
    base: FrozenLinear,
}

impl Projection {
    /// The module id in the [`ModuleTable`].
    pub fn id(&self) -> usize {
        self.id
    }

    /// The frozen base layer.
    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }

    /// Replaces the frozen base layer (merging adapters into it).
    pub(crate) fn set_base(&mut self, base: FrozenLinear) {
        self.base = base;
    }

    /// `x: [N, K] -> [N, M]`: the base once for all rows, then each run's adapters on its rows.
    pub fn forward(&self, x: &Tensor, runs: &[AdapterRun]) -> Result<Tensor> {
        if let [run] = runs {
            if let Some(y) = self.fused(x, run.adapters)? {
                return Ok(y);
            }
        }
        let base = self.base.forward(x)?;
        if runs.iter().all(|r| !self.touched_by(r)) {
            return Ok(base);
        }
        if let [run] = runs {
            return Ok(match self.delta(x, &base, run.adapters)? {
                Some(d) => (base + d)?,
                None => base,
            });
        }
        let mut pieces = Vec::with_capacity(runs.len());
        for run in runs {
            let len = run.rows.len();
            let b = base.narrow(0, run.rows.start, len)?;
            let piece = match self.delta(&x.narrow(0, run.rows.start, len)?, &b, run.adapters)? {
                Some(d) => (b + d)?,
                None => b,
            };
            pieces.push(piece);
        }
        Ok(Tensor::cat(&pieces, 0)?)
    }

    /// Every row under one adapter layer: base and update as one op, if the layer has one.
    fn fused(&self, x: &Tensor, adapters: &[ActiveAdapter]) -> Result<Option<Tensor>> {
        let [active] = adapters else { return Ok(None) };
        let Some(layer) = active.adapter.layer(self.id) else { return Ok(None) };
        layer.fused(x, &self.base, active.weight)
    }

    fn touched_by(&self, run: &AdapterRun) -> bool {
        run.adapters.iter().any(|a| a.adapter.layer(self.id).is_some())
    }

    /// `Σ wᵢ · adapterᵢ(x)` over the adapters that adapt this module.
    fn delta(&self, x: &Tensor, base: &Tensor, adapters: &[ActiveAdapter]) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for a in adapters {
            let Some(layer) = a.adapter.layer(self.id) else { continue };
            let mut d = layer.forward(x, base, &self.base)?;
            if a.weight != 1.0 {
                d = (d * a.weight)?;
            }
            sum = Some(match sum {
                Some(s) => (s + d)?,
                None => d,
            });
        }
        Ok(sum)
    }
}

/// Builds every projection from a weight source and records it in the module table.
pub struct LinearFactory<'a> {
    src: &'a dyn WeightSource,
    table: ModuleTable,
}

impl<'a> LinearFactory<'a> {
    /// A factory reading from `src`.
    pub fn new(src: &'a dyn WeightSource) -> Self {
        Self { src, table: ModuleTable::default() }
    }

    /// The projection at `path` (`path.weight`, and `path.bias` when `bias`), `[out, in]`.
    pub fn linear(
        &mut self,
        path: &str,
        layer: Option<usize>,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Projection> {
        let w = matrix_checked(self.src, &format!("{path}.weight"), out_features, in_features)?;
        let b = if bias { Some(dense_checked(self.src, &format!("{path}.bias"), &[out_features])?) } else { None };
        let id = self.table.push(ModuleInfo { path: path.to_string(), layer, in_features, out_features });
        Ok(Projection { id, base: FrozenLinear::new(w, b) })
    }

    /// The finished table.
    pub fn finish(self) -> ModuleTable {
        self.table
    }
}

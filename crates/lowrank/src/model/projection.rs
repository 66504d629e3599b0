//! The one linear factory. Every projection of the model is built here and registered in the
//! [`ModuleTable`] under its HF module path; adapters attach to projections through that table,
//! so no model code knows about LoRA and no adapter code knows about Llama.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::Tensor;

use super::weights::{dense_checked, matrix_checked, WeightSource};
use crate::adapter::ActiveAdapter;
use crate::ops::{lora_linear, FrozenLinear, LowRank};
use crate::Result;

/// One adaptable projection of the model.
#[derive(Clone, Debug)]
pub struct ModuleInfo {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Block index, when inside a block.
    pub layer: Option<usize>,
    /// In-features `K`.
    pub in_features: usize,
    /// Out-features `M`.
    pub out_features: usize,
}

impl ModuleInfo {
    /// Last path component (`q_proj`).
    pub fn name(&self) -> &str {
        self.path.rsplit('.').next().unwrap_or(&self.path)
    }
}

/// Every adaptable projection, by id (the order of construction) and by path.
#[derive(Clone, Debug, Default)]
pub struct ModuleTable {
    modules: Vec<ModuleInfo>,
    by_path: HashMap<String, usize>,
}

impl ModuleTable {
    /// All modules in model order.
    pub fn modules(&self) -> &[ModuleInfo] {
        &self.modules
    }

    /// The id of a module path.
    pub fn id(&self, path: &str) -> Option<usize> {
        self.by_path.get(path).copied()
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}

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

    /// Every row under one LoRA layer (or a DoRA layer at weight 1): base and bypass as one
    /// fused op, if it applies. DoRA is then `bias + g ⊙ fused(x)`, one `[N, M]` product more
    /// instead of the half-dozen its composed form keeps for the backward.
    fn fused(&self, x: &Tensor, adapters: &[ActiveAdapter]) -> Result<Option<Tensor>> {
        let [active] = adapters else { return Ok(None) };
        let Some(layer) = active.adapter.layer(self.id) else { return Ok(None) };
        if let Some(lr) = layer.low_rank() {
            return self.base.forward_low_rank(x, &LowRank { scale: lr.scale * active.weight, ..lr });
        }
        if active.weight != 1.0 {
            return Ok(None);
        }
        let Some((lr, g)) = layer.scaled_low_rank(&self.base)? else { return Ok(None) };
        let Some(z) = lora_linear(x, self.base.weight(), &lr)? else { return Ok(None) };
        let y = z.broadcast_mul(&g)?;
        Ok(Some(match self.base.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }))
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
        let id = self.table.modules.len();
        self.table.by_path.insert(path.to_string(), id);
        self.table.modules.push(ModuleInfo { path: path.to_string(), layer, in_features, out_features });
        Ok(Projection { id, base: FrozenLinear::new(w, b) })
    }

    /// The finished table.
    pub fn finish(self) -> ModuleTable {
        self.table
    }
}

//! Adapters: PEFT's config schema, targeting by module path, LoRA layers, PEFT directory IO.
//!
//! An [`Adapter`] lives outside the model: it holds one layer per adapted module id of the
//! model's [`ModuleTable`], so one base model can serve any number of adapters and a batch can mix
//! them row by row ([`ActiveAdapter`]). This module depends on the module table, the ops and the
//! file formats, never on the model: the model applies adapters through [`AdapterLayer`], and a
//! new adapter sees the model only as a [`Base`].

mod combine;
mod config;
mod dora;
mod dropout;
mod gguf;
mod io;
mod lora;
mod residual;
mod save;
mod target;

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Tensor, Var};

pub use combine::{combine, CombineMethod, MajoritySign};
pub use config::{AdapterConfig, LayerSelector, LoraInit, LoraSpec, ModuleSelector, StringOrList, MAX_ALPHA};
pub use dora::DoraLayer;
pub use dropout::{Dropout, DropoutControl};
pub use io::PEFT_PREFIX;
pub use lora::LoraLayer;
pub use save::{json_dumps_sorted, peft_config_json, PEFT_VERSION};
pub use target::{plan, ModulePlan};

use crate::module_table::ModuleTable;
use crate::ops::{FrozenLinear, LowRank};
use crate::weights::FrozenWeight;
use crate::Result;

/// What a new adapter is initialised against: the model's adaptable modules and their frozen
/// layers (DoRA's magnitudes and PiSSA's factors start from the weights). The model implements
/// it; adapters know nothing else of it.
pub trait Base {
    /// The adaptable modules.
    fn modules(&self) -> &ModuleTable;
    /// The frozen layer of module `id`.
    fn frozen(&self, id: usize) -> Option<&FrozenLinear>;
    /// Where the weights live.
    fn device(&self) -> &candle_core::Device;
}

/// A trainable copy of a layer and its variables by PEFT tensor name.
pub type Trainable = (Box<dyn AdapterLayer>, Vec<(&'static str, Var)>);

/// What an adapter does to one projection.
pub trait AdapterLayer: Send + Sync + Debug {
    /// The change to the projection output: `x: [N, K]`, the frozen layer `base` and its
    /// output `base_out: [N, M]` → `[N, M]`.
    fn forward(&self, x: &Tensor, base_out: &Tensor, base: &FrozenLinear) -> Result<Tensor>;
    /// The change to the weight that does not depend on it, `ΔW: [M, K]` (LoRA's `s·B A`; an
    /// error for DoRA, whose update scales the weight).
    fn delta_weight(&self) -> Result<Tensor>;
    /// How merging changes a weight: `W' = (1 + row_factor) ⊙ W + add`. `w` is the unmerged
    /// weight `[M, K]` when merging; `None` when unmerging (a layer that needs `W` then uses
    /// what it kept from the merge).
    fn merge_parts(&self, _w: Option<&Tensor>) -> Result<MergeParts> {
        Ok(MergeParts { row_factor: None, add: self.delta_weight()? })
    }
    /// Rank of the update.
    fn rank(&self) -> usize;
    /// Named tensors as PEFT stores them (`lora_A.weight`, ...).
    fn tensors(&self) -> Vec<(&'static str, &Tensor)>;
    /// A copy whose tensors are trainable variables (with `dropout` on its input while
    /// training), and those variables by name.
    fn to_trainable(&self, dropout: Option<Dropout>) -> Result<Trainable>;
    /// The factors when the layer is exactly `s · x Aᵀ Bᵀ` (LoRA without dropout), so the
    /// projection can run it fused with its base; `None` otherwise.
    fn low_rank(&self) -> Option<LowRank<'_>> {
        None
    }
    /// The whole adapted projection, base included, applied with `weight`, when this layer can
    /// run fused with its frozen `base` (`x: [N, K]` → `[N, M]`); `None` when it cannot, and the
    /// projection adds [`AdapterLayer::forward`] to the base output instead.
    fn fused(&self, _x: &Tensor, _base: &FrozenLinear, _weight: f64) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// What merging a layer does to a weight `W: [M, K]`: `W' = (1 + row_factor) ⊙ W + add`.
#[derive(Debug)]
pub struct MergeParts {
    /// `[M]`, per output row; `None` for zero.
    pub row_factor: Option<Tensor>,
    /// `[M, K]`.
    pub add: Tensor,
}

/// A loaded adapter: its config and a layer for each module it adapts.
#[derive(Debug)]
pub struct Adapter {
    /// Display name (directory name by default).
    pub name: String,
    /// Where it was loaded from.
    pub path: Option<PathBuf>,
    /// The PEFT config.
    pub config: AdapterConfig,
    /// Tensors of the file for a multimodal model's vision tower or projector, not loaded
    /// (lowrank runs the text model): they are in no merge lowrank writes.
    pub vision_tensors_skipped: usize,
    layers: Vec<Option<Box<dyn AdapterLayer>>>,
}

impl Adapter {
    /// An adapter from per-module layers (indexed by module id).
    pub fn new(name: String, config: AdapterConfig, layers: Vec<Option<Box<dyn AdapterLayer>>>) -> Self {
        Self { name, path: None, config, vision_tensors_skipped: 0, layers }
    }

    /// A freshly initialised adapter for `model` (PEFT's init: `B = 0`, and for DoRA
    /// `m = ‖W‖`, so the model is unchanged until trained).
    pub fn init(name: &str, config: AdapterConfig, model: &dyn Base, seed: u64) -> Result<Self> {
        let table = model.modules();
        let plans = plan(&config, table, std::path::Path::new(name))?;
        if plans.iter().all(Option::is_none) {
            let kind = if config.use_dora { "DoRA" } else { "LoRA" };
            let names: Vec<&str> = table
                .modules()
                .iter()
                .map(|m| m.name())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            return Err(crate::Error::NewAdapter(format!(
                "target_modules matches none of the model's linear projections ({}); {kind} on embeddings or the LM head is not supported",
                names.join(", ")
            )));
        }
        let mut rng = LoraLayer::rng(seed);
        let init = LoraInit::from_config(&config)?;
        let device = model.device();
        let mut layers: Vec<Option<Box<dyn AdapterLayer>>> = Vec::with_capacity(table.len());
        for (id, (m, p)) in table.modules().iter().zip(plans).enumerate() {
            let Some(p) = p else {
                layers.push(None);
                continue;
            };
            let base = || {
                model
                    .frozen(id)
                    .ok_or_else(|| crate::Error::NewAdapter(format!("no projection for module `{}`", m.path)))
            };
            layers.push(Some(if matches!(init, LoraInit::Pissa | LoraInit::Olora) {
                if config.use_dora {
                    return Err(crate::Error::NewAdapter("pissa and olora inits are for LoRA, not DoRA".into()));
                }
                let w = match base()?.weight() {
                    FrozenWeight::Dense(w) => w.to_dtype(candle_core::DType::F32)?,
                    other => {
                        return Err(crate::Error::NewAdapter(format!(
                            "`{}` is stored as {}: pissa and olora write the residual W − s·B A back into the base, which a quantized base cannot hold exactly (use a full-precision base)",
                            m.path,
                            other.dtype_name()
                        )))
                    }
                };
                Box::new(LoraLayer::from_weight(&w, p.r, p.scale, init)?)
            } else if config.use_dora {
                Box::new(DoraLayer::init(p.r, base()?, p.scale, init, &mut rng, device)?)
            } else {
                Box::new(LoraLayer::init(p.r, m.in_features, m.out_features, p.scale, init, &mut rng, device)?)
            }));
        }
        Ok(Self::new(name.to_string(), config, layers))
    }

    /// A copy with trainable variables, and those variables under their PEFT keys
    /// (`base_model.model.<module>.lora_A.weight`), in module order.
    /// Dropout (`lora_dropout` of the config) is driven by `dropout`.
    pub fn to_trainable(
        &self,
        table: &ModuleTable,
        dropout: Option<&Arc<DropoutControl>>,
    ) -> Result<(Adapter, Vec<(String, Var)>)> {
        let mut vars = Vec::new();
        let mut layers = Vec::with_capacity(self.layers.len());
        for (id, (m, l)) in table.modules().iter().zip(&self.layers).enumerate() {
            layers.push(match l {
                Some(l) => {
                    let (layer, named) = l.to_trainable(dropout.map(|c| Dropout::new(c.clone(), id)))?;
                    vars.extend(named.into_iter().map(|(n, v)| (format!("{}{}.{n}", io::PEFT_PREFIX, m.path), v)));
                    Some(layer)
                }
                None => None,
            });
        }
        let mut a = Adapter::new(self.name.clone(), self.config.clone(), layers);
        a.path = self.path.clone();
        Ok((a, vars))
    }

    /// The layer for module `id`, if this adapter adapts it.
    pub fn layer(&self, id: usize) -> Option<&dyn AdapterLayer> {
        self.layers.get(id).and_then(|l| l.as_deref())
    }

    /// Number of adapted modules.
    pub fn num_layers(&self) -> usize {
        self.layers.iter().flatten().count()
    }

    /// Trainable parameter count.
    pub fn num_parameters(&self) -> usize {
        self.layers.iter().flatten().flat_map(|l| l.tensors()).map(|(_, t)| t.elem_count()).sum()
    }
}

/// An adapter applied with a weight (`1.0` = as trained).
#[derive(Clone, Debug)]
pub struct ActiveAdapter {
    /// The adapter.
    pub adapter: Arc<Adapter>,
    /// Multiplier on its update.
    pub weight: f64,
}

impl ActiveAdapter {
    /// Whether two adapter lists are the same adapters with the same weights.
    pub fn same_set(a: &[ActiveAdapter], b: &[ActiveAdapter]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(&x.adapter, &y.adapter) && x.weight == y.weight)
    }
}

//! Adapters: PEFT's config schema, targeting by module path, LoRA layers, PEFT directory IO.
//!
//! An [`Adapter`] lives outside the model: it holds one layer per adapted module id of the
//! model's [`ModuleTable`](crate::model::ModuleTable), so one base model can serve any number of
//! adapters and a batch can mix them row by row ([`ActiveAdapter`]).

mod combine;
mod config;
mod dropout;
mod gguf;
mod io;
mod lora;
mod save;
mod target;

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};

pub use combine::{combine, CombineMethod, MajoritySign};
pub use config::{AdapterConfig, LayerSelector, ModuleSelector, StringOrList};
pub use dropout::{Dropout, DropoutControl};
pub use io::PEFT_PREFIX;
pub use lora::LoraLayer;
pub use save::{json_dumps_sorted, peft_config_json, PEFT_VERSION};
pub use target::{plan, ModulePlan};

use crate::model::ModuleTable;
use crate::ops::LowRank;
use crate::Result;

/// What an adapter does to one projection.
pub trait AdapterLayer: Send + Sync + Debug {
    /// The change to the projection output: `x: [N, K]`, frozen output `base: [N, M]` → `[N, M]`.
    fn forward(&self, x: &Tensor, base: &Tensor) -> Result<Tensor>;
    /// The change to the weight, `ΔW: [M, K]` (for merging).
    fn delta_weight(&self) -> Result<Tensor>;
    /// Rank of the update.
    fn rank(&self) -> usize;
    /// Named tensors as PEFT stores them (`lora_A.weight`, ...).
    fn tensors(&self) -> Vec<(&'static str, &Tensor)>;
    /// A copy whose tensors are trainable variables (with `dropout` on its input while
    /// training), and those variables by name.
    fn to_trainable(&self, dropout: Option<Dropout>) -> Result<(Box<dyn AdapterLayer>, Vec<(&'static str, Var)>)>;
    /// The factors when the layer is exactly `s · x Aᵀ Bᵀ` (LoRA without dropout), so the
    /// projection can run it fused with its base; `None` otherwise.
    fn low_rank(&self) -> Option<LowRank<'_>> {
        None
    }
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
    layers: Vec<Option<Box<dyn AdapterLayer>>>,
}

impl Adapter {
    /// An adapter from per-module layers (indexed by module id).
    pub fn new(name: String, config: AdapterConfig, layers: Vec<Option<Box<dyn AdapterLayer>>>) -> Self {
        Self { name, path: None, config, layers }
    }

    /// A freshly initialised LoRA adapter for `table` (PEFT's init: `B = 0`, so the model is
    /// unchanged until trained).
    pub fn init(name: &str, config: AdapterConfig, table: &ModuleTable, seed: u64, device: &Device) -> Result<Self> {
        let plans = plan(&config, table, std::path::Path::new(name))?;
        let mut rng = LoraLayer::rng(seed);
        let layers = table
            .modules()
            .iter()
            .zip(plans)
            .map(|(m, p)| {
                p.map(|p| LoraLayer::init(p.r, m.in_features, m.out_features, p.scale, &mut rng, device).map(|l| Box::new(l) as Box<dyn AdapterLayer>))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::new(name.to_string(), config, layers))
    }

    /// A copy with trainable variables, and those variables under their PEFT keys
    /// (`base_model.model.<module>.lora_A.weight`), in module order.
    /// Dropout (`lora_dropout` of the config) is driven by `dropout`.
    pub fn to_trainable(&self, table: &ModuleTable, dropout: Option<&Arc<DropoutControl>>) -> Result<(Adapter, Vec<(String, Var)>)> {
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

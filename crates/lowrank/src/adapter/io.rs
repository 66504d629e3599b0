//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, checked key by
//! key against the model's modules. Nothing is skipped silently, but for one rule: on the text
//! model of a multimodal model, the layers PEFT put in the vision tower and its projector are
//! not loaded (text generation does not run them).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::config::AdapterConfig;
use super::dora::DoraLayer;
use super::lora::LoraLayer;
use super::target::plan;
use super::{Adapter, AdapterLayer};
use crate::formats::SafetensorsDir;
use crate::module_table::{check_shape, ModuleTable};
use crate::{Error, Result};

/// Prefix PEFT puts before every module path on disk.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// Module paths of a multimodal model's image side (transformers ≥ 4.52 and before).
const VISION: [&str; 4] =
    ["model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector."];
/// The config file of a PEFT adapter directory.
pub(crate) const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file of a PEFT adapter directory.
pub(crate) const WEIGHTS_FILE: &str = "adapter_model.safetensors";

impl Adapter {
    /// Loads a PEFT LoRA (or DoRA, `use_dora`) adapter directory for a model with modules `table`.
    pub fn load_peft(dir: &Path, table: &ModuleTable, device: &Device) -> Result<Self> {
        let err = |m: String| Error::Adapter { path: dir.into(), message: m };
        if !dir.is_dir() {
            return Err(err(
                "not a directory (expected adapter_config.json and adapter_model.safetensors inside)".into()
            ));
        }
        let config = AdapterConfig::from_file(&dir.join(CONFIG_FILE))?;
        let plans = plan(&config, table, dir)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.exists() {
            let hint = if dir.join("adapter_model.bin").exists() {
                " (found adapter_model.bin: pickled PyTorch files are not read; re-save with safe_serialization=True)"
            } else {
                ""
            };
            return Err(err(format!("adapter_model.safetensors is missing{hint}")));
        }
        let st = SafetensorsDir::open_files(&[weights_path], device)?;

        // module id -> (A, B, DoRA magnitude) as found in the file
        let mut found: BTreeMap<usize, [Option<Tensor>; 3]> = BTreeMap::new();
        let mut vision = 0;
        for key in st.names() {
            let path = key
                .strip_prefix(PEFT_PREFIX)
                .ok_or_else(|| err(format!("tensor `{key}` does not start with `{PEFT_PREFIX}`")))?;
            let (module, slot) = if let Some(m) = path.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = path.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else if let Some(m) = path.strip_suffix(".lora_magnitude_vector").filter(|_| config.use_dora) {
                (m, 2)
            } else {
                let what = if path.ends_with(".lora_magnitude_vector") {
                    " (a DoRA magnitude, but adapter_config.json has use_dora false)"
                } else {
                    " (embedding LoRA, biases and modules_to_save are not supported yet)"
                };
                return Err(err(format!("tensor `{key}` is not a LoRA A/B weight{what}")));
            };
            if table.is_language_model() && VISION.iter().any(|v| module.starts_with(v)) {
                vision += 1;
                continue;
            }
            let id = table.lookup(module).ok_or_else(|| {
                err(format!("tensor `{key}`: the model has no module `{module}` (is this adapter for another model?)"))
            })?;
            if plans[id].is_none() {
                return Err(err(format!(
                    "tensor `{key}` adapts `{module}`, which adapter_config.json does not target"
                )));
            }
            found.entry(id).or_default()[slot] = Some(st.load(&key)?);
        }

        let mut layers: Vec<Option<Box<dyn AdapterLayer>>> = Vec::with_capacity(table.len());
        for (id, (m, p)) in table.modules().iter().zip(&plans).enumerate() {
            let Some(p) = p else {
                layers.push(None);
                continue;
            };
            let [a, b, magnitude] = found.remove(&id).unwrap_or_default();
            let key = |s: &str| format!("{PEFT_PREFIX}{}.{s}", m.path);
            let missing = |s: &str| {
                err(format!(
                    "adapter_config.json targets `{}` but adapter_model.safetensors has no `{}`",
                    m.path,
                    key(s)
                ))
            };
            let a = a.ok_or_else(|| missing("lora_A.weight"))?;
            let b = b.ok_or_else(|| missing("lora_B.weight"))?;
            check_shape(&key("lora_A.weight"), &[p.r, m.in_features], a.dims())?;
            check_shape(&key("lora_B.weight"), &[m.out_features, p.r], b.dims())?;
            let lora = LoraLayer { a, b, scale: p.scale, dropout: None };
            if !config.use_dora {
                layers.push(Some(Box::new(lora)));
                continue;
            }
            let magnitude = magnitude.ok_or_else(|| missing("lora_magnitude_vector"))?;
            check_shape(&key("lora_magnitude_vector"), &[m.out_features], magnitude.dims())?;
            layers.push(Some(Box::new(DoraLayer::new(lora, magnitude, false))));
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
        let mut adapter = Adapter::new(name, config, layers);
        adapter.path = Some(dir.into());
        adapter.vision_tensors_skipped = vision;
        Ok(adapter)
    }
}

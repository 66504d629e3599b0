//! llama.cpp LoRA adapters (GGUF with `general.type = adapter`), written and read.
//!
//! llama.cpp applies `B A x · alpha / r` with one `adapter.lora.alpha` for the file and `r` read
//! from each `lora_b`. A PEFT adapter's per-module scale (`alpha_pattern`, rsLoRA's `alpha/√r`)
//! is folded into `lora_b` so that every module gets exactly its PEFT scale; `lora_b` rows of
//! q/k are put in llama.cpp's row order for architectures whose converter permutes them.
//! Tensors: `<llama.cpp weight name>.lora_a` (`[r, K]`) and `.lora_b` (`[M, r]`), f32.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use super::config::AdapterConfig;
use super::lora::LoraLayer;
use super::{Adapter, AdapterLayer};
use crate::export::write_gguf_file;
use crate::formats::gguf_names::{permute_rows, permutes_qk, to_gguf, to_hf, unpermute_rows, Heads};
use crate::module_table::{check_shape, ModuleTable};
use crate::staging::{Existing, Staged};
use crate::{Error, Result};

impl Adapter {
    /// Writes the adapter as a llama.cpp LoRA GGUF for a model of architecture `arch` (its
    /// `general.architecture`) with attention heads `heads`. DoRA and `modules_to_save` adapters are
    /// refused: llama.cpp has no way to represent them.
    pub fn save_gguf(
        &self,
        path: &Path,
        table: &ModuleTable,
        heads: Heads,
        arch: &str,
        existing: Existing,
    ) -> Result<()> {
        let refuse = |what: &str| {
            Err(Error::Export(format!(
                "{}: {what}, which a llama.cpp LoRA adapter cannot represent; `lowrank merge` can fold it into the model instead",
                self.name
            )))
        };
        if self.config.use_dora {
            return refuse("it is a DoRA adapter (a magnitude vector per output row)");
        }
        if self.config.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("it trains whole modules (modules_to_save)");
        }
        // One alpha for the file; each module's own scale is folded into its lora_b.
        let alpha = if self.config.lora_alpha > 0.0 { self.config.lora_alpha } else { 1.0 };
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        for (id, m) in table.modules().iter().enumerate() {
            let Some(layer) = self.layer(id) else { continue };
            let Some(lr) = layer.low_rank() else { return refuse(&format!("`{}` is not a plain LoRA layer", m.path)) };
            let weight = format!("{}.weight", m.path);
            let (name, qk) = to_gguf(&weight, arch)
                .ok_or_else(|| Error::Export(format!("llama.cpp has no tensor name for `{weight}`")))?;
            let r = lr.a.dim(0)?;
            let fold = lr.scale * r as f64 / alpha; // llama.cpp's alpha/r times this = our scale
            let mut b = if (fold - 1.0).abs() > 1e-12 { (lr.b * fold)? } else { lr.b.clone() };
            if let Some(qk) = qk.filter(|_| permutes_qk(arch)) {
                b = permute_rows(&b, qk.heads(heads))?;
            }
            tensors.push((
                format!("{name}.lora_a"),
                QTensor::quantize(&lr.a.to_dtype(DType::F32)?, candle_core::quantized::GgmlDType::F32)?,
            ));
            tensors.push((
                format!("{name}.lora_b"),
                QTensor::quantize(&b.to_dtype(DType::F32)?, candle_core::quantized::GgmlDType::F32)?,
            ));
        }
        if tensors.is_empty() {
            return Err(Error::Export(format!("{}: the adapter has no layers for this model", self.name)));
        }
        let metadata = [
            ("general.architecture", Value::String(arch.into())),
            ("general.type", Value::String("adapter".into())),
            ("general.name", Value::String(self.name.clone())),
            ("adapter.type", Value::String("lora".into())),
            ("adapter.lora.alpha", Value::F32(alpha as f32)),
        ];
        let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let staged = Staged::file(path, existing)?;
        write_gguf_file(staged.path(), &meta, &refs)?;
        staged.commit()
    }

    /// Reads a llama.cpp LoRA GGUF for a model with modules `table` and attention heads `heads`,
    /// as a PEFT adapter (per-module ranks in `rank_pattern`, the scale as `lora_alpha`).
    pub fn load_gguf(path: &Path, table: &ModuleTable, heads: Heads, device: &Device) -> Result<Self> {
        let err = |m: String| Error::Gguf { path: path.into(), message: m };
        let (content, mut f) = crate::formats::read_gguf(path)?;
        let meta_str = |k: &str| match content.metadata.get(k) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        if meta_str("general.type").as_deref() != Some("adapter") || meta_str("adapter.type").as_deref() != Some("lora")
        {
            return Err(err(
                "not a llama.cpp LoRA adapter (general.type must be `adapter`, adapter.type `lora`)".into()
            ));
        }
        let arch = meta_str("general.architecture").ok_or_else(|| err("general.architecture is missing".into()))?;
        let alpha = match content.metadata.get("adapter.lora.alpha") {
            Some(v) => v.to_f32().map_err(|_| err("adapter.lora.alpha is not an f32".into()))? as f64,
            None => 0.0,
        };
        let mut pairs: BTreeMap<usize, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for name in content.tensor_infos.keys() {
            let (base, is_a) = match (name.strip_suffix(".lora_a"), name.strip_suffix(".lora_b")) {
                (Some(b), _) => (b, true),
                (_, Some(b)) => (b, false),
                _ => return Err(err(format!("tensor `{name}` is not a lora_a/lora_b tensor"))),
            };
            let (hf, qk) =
                to_hf(base, &arch).ok_or_else(|| err(format!("tensor `{name}`: no HF module for `{base}`")))?;
            let module = hf.strip_suffix(".weight").unwrap_or(&hf);
            let id = table.lookup(module).ok_or_else(|| {
                err(format!("tensor `{name}`: the model has no module `{module}` (an adapter for another model?)"))
            })?;
            let mut t = content
                .tensor(&mut f, name, device)
                .and_then(|q| q.dequantize(device))
                .map_err(|e| err(format!("reading `{name}`: {e}")))?;
            t = t.to_dtype(DType::F32)?;
            if let Some(qk) = qk.filter(|_| !is_a && permutes_qk(&arch)) {
                t = unpermute_rows(&t, qk.heads(heads))?;
            }
            let slot = pairs.entry(id).or_default();
            if is_a {
                slot.0 = Some(t);
            } else {
                slot.1 = Some(t);
            }
        }
        let mut layers: Vec<Option<Box<dyn AdapterLayer>>> = (0..table.len()).map(|_| None).collect();
        let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
        for (id, (a, b)) in pairs {
            let m = &table.modules()[id];
            let (Some(a), Some(b)) = (a, b) else {
                return Err(err(format!("`{}`: lora_a or lora_b is missing", m.path)));
            };
            let r = a.dim(0)?;
            check_shape(&format!("{}.lora_a", m.path), &[r, m.in_features], a.dims())?;
            check_shape(&format!("{}.lora_b", m.path), &[m.out_features, r], b.dims())?;
            let scale = if alpha != 0.0 { alpha / r as f64 } else { 1.0 };
            ranks.insert(m.path.clone(), r);
            layers[id] = Some(Box::new(LoraLayer { a, b, scale, dropout: None }));
        }
        let config = peft_config(&ranks, alpha)?;
        let name = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
        Ok(Adapter::new(name, config, layers))
    }
}

/// A PEFT config for modules of these ranks with llama.cpp's scale `alpha / r` (or 1 when
/// alpha is 0): the most common rank as `r`, the others in `rank_pattern` (full module paths).
fn peft_config(ranks: &BTreeMap<String, usize>, alpha: f64) -> Result<AdapterConfig> {
    let mut count: HashMap<usize, usize> = HashMap::new();
    ranks.values().for_each(|&r| *count.entry(r).or_default() += 1);
    let r = count.iter().max_by_key(|(r, n)| (**n, std::cmp::Reverse(**r))).map_or(8, |(r, _)| *r);
    let lora_alpha = if alpha != 0.0 { alpha } else { r as f64 };
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    for (path, &rm) in ranks.iter().filter(|(_, &rm)| rm != r) {
        // PEFT matches pattern keys against the end of the module path.
        rank_pattern.insert(path.clone(), rm.into());
        if alpha == 0.0 {
            alpha_pattern.insert(path.clone(), (rm as f64).into());
        }
    }
    let json = serde_json::json!({
        "peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": ranks.keys().collect::<Vec<_>>(),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
    });
    let cfg = AdapterConfig::from_json(&json.to_string(), Path::new("adapter_config.json"))?;
    Ok(cfg)
}

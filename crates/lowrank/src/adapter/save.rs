//! Writing PEFT adapter directories that PEFT's `PeftModel.from_pretrained` loads unchanged.
//!
//! * `adapter_config.json`: every key PEFT 0.21 writes for a `LoraConfig` (its defaults for the
//!   ones lowrank does not model), then every key read from an existing file
//!   ([`AdapterConfig::raw`], so unknown keys survive a round trip), then the typed fields of
//!   [`AdapterConfig`] on top. Serialised as PEFT does, `json.dumps(d, indent=2, sort_keys=True)`
//!   with no trailing newline ([`json_dumps_sorted`]). A config loaded from a PEFT file and saved
//!   again is byte-identical to it (a typed value that means the same as the one read, e.g. the
//!   same `target_modules` set in another order, keeps the text read).
//! * `adapter_model.safetensors`: `base_model.model.<module path>.<tensor>` for every tensor of
//!   [`AdapterLayer::tensors`], f32, with metadata `{"format": "pt"}`.
//!
//! The directory is written atomically: both files go into a hidden temporary directory beside
//! `dir`, are synced, and the temporary directory is renamed to `dir`. `dir` must not exist, or be
//! an empty directory; lowrank never overwrites or merges into an existing adapter.

use std::path::Path;

use candle_core::DType;
use serde_json::{Map, Value};

use super::config::{AdapterConfig, LayerSelector, ModuleSelector, StringOrList};
use super::io::{CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE};
use super::target::plan;
use super::Adapter;
use crate::export::write_safetensors;
use crate::module_table::ModuleTable;
use crate::staging::{write_atomic, write_synced, Existing, Staged};
use crate::{Error, Result};

/// The PEFT version whose `LoraConfig` key set and defaults [`peft_config_json`] writes. It goes
/// into `peft_version` when the config read had none; PEFT only consults that key for OFT, so
/// older and newer PEFT releases load the file without a warning.
pub const PEFT_VERSION: &str = "0.21.2";

/// `LoraConfig(task_type="CAUSAL_LM").to_dict()` of PEFT 0.21.2 minus the keys that
/// [`peft_config_json`] always sets from the typed config, as `save_pretrained` writes it
/// (`inference_mode` forced to `true`).
const PEFT_DEFAULTS: &str = r#"{
  "alora_invocation_tokens": null,
  "arrow_config": null,
  "auto_mapping": null,
  "corda_config": null,
  "ensure_weight_tying": false,
  "eva_config": null,
  "inference_mode": true,
  "init_lora_weights": true,
  "kasa_config": null,
  "layer_replication": null,
  "loftq_config": {},
  "lora_bias": false,
  "lora_ga_config": null,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "monteclora_config": null,
  "qalora_group_size": 16,
  "revision": null,
  "target_parameters": null,
  "task_type": "CAUSAL_LM",
  "trainable_token_indices": null,
  "use_bdlora": null,
  "use_qalora": false,
  "velora_config": null
}"#;

/// The `adapter_config.json` object for `cfg`: PEFT 0.21's defaults for every key it writes, the
/// keys of `cfg.raw` over them, the typed fields over those, `peft_type = "LORA"` and
/// `inference_mode = true` (as PEFT's `save_pretrained`). `task_type` is `"CAUSAL_LM"` unless the
/// file read said otherwise; `peft_version` is the one read, else [`PEFT_VERSION`].
///
/// `target_modules = "all-linear"` is kept literally here (PEFT reads it); [`Adapter::save_peft`]
/// replaces it with the resolved module paths, as PEFT's own `save_pretrained` does.
pub fn peft_config_json(cfg: &AdapterConfig) -> Value {
    let Value::Object(mut out) = serde_json::from_str::<Value>(PEFT_DEFAULTS).expect("PEFT_DEFAULTS is valid JSON")
    else {
        unreachable!("PEFT_DEFAULTS is an object")
    };
    out.insert("peft_version".into(), Value::String(PEFT_VERSION.into()));
    for (k, v) in &cfg.raw {
        out.insert(k.clone(), v.clone());
    }
    let typed: [(&str, Value); 16] = [
        ("peft_type", Value::String("LORA".into())),
        ("r", cfg.r.into()),
        ("lora_alpha", number(cfg.lora_alpha)),
        ("use_rslora", cfg.use_rslora.into()),
        ("use_dora", cfg.use_dora.into()),
        ("target_modules", cfg.target_modules.as_ref().map_or(Value::Null, selector)),
        ("exclude_modules", cfg.exclude_modules.as_ref().map_or(Value::Null, selector)),
        ("rank_pattern", Value::Object(cfg.rank_pattern.iter().map(|(k, &r)| (k.clone(), r.into())).collect())),
        ("alpha_pattern", Value::Object(cfg.alpha_pattern.iter().map(|(k, &a)| (k.clone(), number(a))).collect())),
        (
            "layers_to_transform",
            match &cfg.layers_to_transform {
                None => Value::Null,
                Some(LayerSelector::One(i)) => (*i).into(),
                Some(LayerSelector::Many(v)) => v.clone().into(),
            },
        ),
        (
            "layers_pattern",
            match &cfg.layers_pattern {
                None => Value::Null,
                Some(StringOrList::One(s)) => s.clone().into(),
                Some(StringOrList::Many(v)) => v.clone().into(),
            },
        ),
        ("lora_dropout", Value::from(cfg.lora_dropout)),
        ("fan_in_fan_out", cfg.fan_in_fan_out.into()),
        ("bias", cfg.bias.clone().into()),
        ("modules_to_save", cfg.modules_to_save.clone().map_or(Value::Null, Value::from)),
        ("base_model_name_or_path", cfg.base_model_name_or_path.clone().map_or(Value::Null, Value::from)),
    ];
    for (k, v) in typed {
        set_keeping_equivalent(&mut out, k, v);
    }
    out.insert("inference_mode".into(), Value::Bool(true));
    Value::Object(out)
}

/// Sets `key` to `v` unless the value already there means the same (kept as read).
fn set_keeping_equivalent(out: &mut Map<String, Value>, key: &str, v: Value) {
    if out.get(key).is_some_and(|old| equivalent(old, &v)) {
        return;
    }
    out.insert(key.to_string(), v);
}

/// Same meaning: numbers by value (`8` and `8.0`), lists of strings as sets (PEFT keeps
/// `target_modules` as a set), objects key by key, everything else exactly.
fn equivalent(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) if x.iter().chain(y).all(Value::is_string) => {
            let mut x: Vec<&str> = x.iter().filter_map(Value::as_str).collect();
            let mut y: Vec<&str> = y.iter().filter_map(Value::as_str).collect();
            x.sort_unstable();
            y.sort_unstable();
            x.dedup();
            y.dedup();
            x == y
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| equivalent(v, w)))
        }
        _ => a == b,
    }
}

/// An integral float as an integer (PEFT's `lora_alpha: int = 8`), anything else as a float.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

fn selector(s: &ModuleSelector) -> Value {
    match s {
        ModuleSelector::Pattern(p) => Value::String(p.clone()),
        ModuleSelector::List(l) => {
            let mut l = l.clone();
            l.sort();
            l.dedup();
            l.into()
        }
    }
}

/// `json.dumps(v, indent=2, sort_keys=True)` byte for byte, as PEFT writes `adapter_config.json`
/// (see [`crate::pyjson`]).
pub fn json_dumps_sorted(v: &Value) -> String {
    crate::pyjson::Style::peft().dumps(v)
}

impl Adapter {
    /// Writes this adapter as a PEFT directory `dir` (`adapter_config.json` +
    /// `adapter_model.safetensors`) for a model whose modules are `table` (the table the adapter
    /// was built or loaded for).
    ///
    /// `target_modules = "all-linear"` is written as PEFT 0.21 writes it: the resolved list of
    /// every linear module path of the model (the lm_head is never part of it). The config as
    /// written must select exactly the modules this adapter holds, with the ranks its tensors
    /// have; otherwise nothing is written and the mismatch is reported.
    ///
    /// Atomic: everything is written into a temporary directory beside `dir` and renamed into
    /// place. `dir` must not exist or must be an empty directory; an existing non-empty
    /// directory (a previous adapter included) is an error, never overwritten.
    pub fn save_peft(&self, dir: &Path, table: &ModuleTable) -> Result<()> {
        self.save_peft_with(dir, table, Existing::ReplaceEmptyDir)
    }

    /// [`Adapter::save_peft`], with [`Existing::Replace`] allowed to replace an existing
    /// directory (only once the new one is complete).
    pub fn save_peft_with(&self, dir: &Path, table: &ModuleTable, existing: Existing) -> Result<()> {
        let (config_text, tensors) = self.peft_files(dir, table)?;
        if dir.exists() && existing != Existing::Replace {
            let empty =
                dir.is_dir() && std::fs::read_dir(dir).map_err(|e| Error::io("reading", dir, e))?.next().is_none();
            if !empty {
                let message =
                    "already exists and is not an empty directory; choose a new path (adapters are never overwritten)";
                return Err(Error::Adapter { path: dir.into(), message: message.into() });
            }
        }
        let staged = Staged::dir(dir, existing)?;
        write_synced(&staged.path().join(CONFIG_FILE), config_text.as_bytes())?;
        write_safetensors(&staged.path().join(WEIGHTS_FILE), &tensors.iter().collect::<Vec<_>>())?;
        staged.commit()
    }

    /// Writes the two PEFT files into the existing directory `dir` (a training run's output,
    /// which holds other files too), each whole or not at all, replacing earlier ones.
    pub fn save_peft_into(&self, dir: &Path, table: &ModuleTable) -> Result<()> {
        let (config_text, tensors) = self.peft_files(dir, table)?;
        let weights = Staged::file(&dir.join(WEIGHTS_FILE), Existing::Replace)?;
        write_safetensors(weights.path(), &tensors.iter().collect::<Vec<_>>())?;
        weights.commit()?;
        write_atomic(&dir.join(CONFIG_FILE), config_text.as_bytes())
    }

    /// The text of `adapter_config.json` and the tensors of `adapter_model.safetensors`, checked
    /// against `table`; `dir` names the output in errors.
    fn peft_files(&self, dir: &Path, table: &ModuleTable) -> Result<(String, Vec<(String, candle_core::Tensor)>)> {
        let err = |m: String| Error::Adapter { path: dir.into(), message: m };
        if self.layers.len() != table.len() {
            return Err(err(format!(
                "the adapter has {} module slots but the model table has {} modules (saved with another model's table?)",
                self.layers.len(),
                table.len()
            )));
        }

        // The config as it will be written (all-linear resolved, as PEFT saves it).
        let mut cfg = self.config.clone();
        if matches!(&cfg.target_modules, Some(ModuleSelector::Pattern(p)) if p.eq_ignore_ascii_case("all-linear")) {
            let paths = table.modules().iter().map(|m| m.path.clone()).filter(|p| p != "lm_head").collect();
            cfg.target_modules = Some(ModuleSelector::List(paths));
        }
        // On a multimodal model PEFT would match module names in the vision tower too (and give
        // them untrained factors): the text model's list names exactly the modules held.
        if table.is_language_model() && matches!(cfg.target_modules, Some(ModuleSelector::List(_))) {
            let held = table.modules().iter().zip(&self.layers).filter(|(_, l)| l.is_some());
            cfg.target_modules = Some(ModuleSelector::List(held.map(|(m, _)| m.path.clone()).collect()));
        }
        cfg.validate(dir)?;
        // It must select exactly the modules we hold, at the ranks we hold.
        let plans = plan(&cfg, table, dir)?;
        for ((m, p), l) in table.modules().iter().zip(&plans).zip(&self.layers) {
            match (p, l) {
                (None, None) => {}
                (Some(p), Some(l)) if p.r == l.rank() => {}
                (Some(p), Some(l)) => {
                    return Err(err(format!(
                        "`{}`: the config gives rank {} but the layer has rank {}",
                        m.path,
                        p.r,
                        l.rank()
                    )))
                }
                (Some(_), None) => {
                    return Err(err(format!("the config targets `{}` but the adapter has no layer for it", m.path)))
                }
                (None, Some(_)) => {
                    return Err(err(format!(
                        "the adapter has a layer for `{}` but the config does not target it",
                        m.path
                    )))
                }
            }
        }
        let config_text = json_dumps_sorted(&peft_config_json(&cfg));

        // Tensors, f32.
        let mut tensors: Vec<(String, candle_core::Tensor)> = Vec::new();
        for (m, l) in table.modules().iter().zip(&self.layers) {
            let Some(l) = l else { continue };
            for (name, t) in l.tensors() {
                tensors.push((format!("{PEFT_PREFIX}{}.{name}", m.path), t.to_dtype(DType::F32)?));
            }
        }

        Ok((config_text, tensors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_config_has_peft_defaults() {
        let cfg = AdapterConfig::from_json(
            r#"{"r":4,"lora_alpha":8.0,"target_modules":["v_proj","q_proj"]}"#,
            Path::new("x"),
        )
        .unwrap();
        let mut cfg2 = cfg.clone();
        cfg2.raw.clear();
        let v = peft_config_json(&cfg2);
        assert_eq!(v["task_type"], "CAUSAL_LM");
        assert_eq!(v["peft_type"], "LORA");
        assert_eq!(v["inference_mode"], true);
        assert_eq!(v["peft_version"], PEFT_VERSION);
        assert_eq!(v["lora_alpha"], 8);
        assert_eq!(v["lora_dropout"], 0.0);
        assert_eq!(v["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
        assert_eq!(v.as_object().unwrap().len(), 41);
        // read values that mean the same are kept as read
        let v = peft_config_json(&cfg);
        assert_eq!(v["lora_alpha"], 8.0);
        assert_eq!(v["target_modules"], serde_json::json!(["v_proj", "q_proj"]));
    }
}

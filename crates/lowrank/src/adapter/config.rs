//! `adapter_config.json`: PEFT's `LoraConfig`, the keys that change the math typed, every other
//! key kept as it was read so that a round trip loses nothing.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// `target_modules` / `exclude_modules`: a list of names (suffix match), a regex (full match),
/// or PEFT's `all-linear` shorthand.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSelector {
    /// Module names; a path matches if it equals a name or ends with `.name`.
    List(Vec<String>),
    /// A regular expression that must match the whole module path (or `all-linear`).
    Pattern(String),
}

/// `layers_to_transform`: one index or a list.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum LayerSelector {
    /// One layer.
    One(usize),
    /// Several layers.
    Many(Vec<usize>),
}

/// `layers_pattern`: one name or several.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// One name.
    One(String),
    /// Several names.
    Many(Vec<String>),
}

/// The typed part of a PEFT LoRA config. Defaults are PEFT's.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct AdapterConfig {
    /// `"LORA"`.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// Default rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Default alpha.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Weight-decomposed LoRA.
    #[serde(default)]
    pub use_dora: bool,
    /// Which modules are adapted.
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    /// Which modules are never adapted.
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    /// Per-module rank overrides (key matched as regex `(.*\.)?(key)$`).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Only these block indices.
    #[serde(default)]
    pub layers_to_transform: Option<LayerSelector>,
    /// Name of the layer list in module paths (`layers`).
    #[serde(default)]
    pub layers_pattern: Option<StringOrList>,
    /// Dropout on the adapter input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Whether the base weight is stored transposed (GPT-2 Conv1D); PEFT resets it for Linear.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// `"none"`, `"all"` or `"lora_only"`.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Modules trained and saved in full.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Every key as read, for writing back unchanged.
    #[serde(skip)]
    pub raw: serde_json::Map<String, Value>,
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}

/// Keys whose non-default value changes the math in ways lowrank does not implement yet.
/// Each entry: key, and whether a value counts as "off".
/// A new adapter, typed: what `lowrank train` (or a library user) asks for. Serialised with
/// PEFT's key names, so a run's settings file reads like the `adapter_config.json` it makes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// Rank `r`.
    pub r: usize,
    /// `lora_alpha`: the update is scaled by `alpha / r` (`alpha / √r` with rsLoRA).
    pub lora_alpha: f64,
    /// Dropout on the adapter's input while training.
    pub lora_dropout: f64,
    /// The modules to adapt: names, a regex, or `"all-linear"`.
    pub target_modules: ModuleSelector,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output row.
    pub use_dora: bool,
    /// How `A` (and `B`) start.
    pub init_lora_weights: LoraInit,
    /// The base model, as a note for whoever loads the adapter.
    pub base_model_name_or_path: Option<String>,
}

/// How `A` starts (PEFT's `init_lora_weights`); `B` starts at zero either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "serde_json::Value", into = "serde_json::Value")]
pub enum LoraInit {
    /// `true` (the default): kaiming-uniform with a = √5, i.e. uniform on ±1/√K.
    Kaiming,
    /// `"gaussian"`: normal with standard deviation 1/r.
    Gaussian,
    /// `"pissa"`: `A`, `B` from the top `r` singular triplets of `W` (`s·B A` is its best
    /// rank-`r` part), the base then holding the residual.
    Pissa,
    /// `"olora"`: `B`, `A` the first `r` columns of `W`'s QR and rows of `R`, the base then
    /// holding the residual.
    Olora,
}

impl LoraInit {
    /// The init an adapter config asks for; an error for those lowrank cannot make.
    pub fn from_config(cfg: &AdapterConfig) -> Result<Self> {
        match cfg.raw.get("init_lora_weights") {
            None => Ok(LoraInit::Kaiming),
            Some(v) => LoraInit::try_from(v.clone()).map_err(crate::Error::NewAdapter),
        }
    }
}

/// PEFT's `init_lora_weights` value.
impl TryFrom<serde_json::Value> for LoraInit {
    type Error = String;

    fn try_from(v: serde_json::Value) -> std::result::Result<Self, String> {
        match v {
            serde_json::Value::Bool(true) => Ok(LoraInit::Kaiming),
            serde_json::Value::String(s) if s == "gaussian" => Ok(LoraInit::Gaussian),
            serde_json::Value::String(s) if s == "pissa" => Ok(LoraInit::Pissa),
            serde_json::Value::String(s) if s == "olora" => Ok(LoraInit::Olora),
            v => Err(format!(
                "init_lora_weights = {v}: a new adapter can start from true (kaiming-uniform), \"gaussian\", \"pissa\" or \"olora\" (pissa_niter_*, loftq, corda, eva, ... are not supported)"
            )),
        }
    }
}

impl From<LoraInit> for serde_json::Value {
    fn from(init: LoraInit) -> Self {
        match init {
            LoraInit::Kaiming => true.into(),
            LoraInit::Gaussian => "gaussian".into(),
            LoraInit::Pissa => "pissa".into(),
            LoraInit::Olora => "olora".into(),
        }
    }
}

/// Largest `lora_alpha` (in size) an adapter config may give.
pub const MAX_ALPHA: f64 = 1e6;

impl AdapterConfig {
    /// The config of a new adapter for `spec` (a causal LM, no bias), checked as a read one is.
    pub fn new_lora(spec: &LoraSpec) -> Result<Self> {
        let path = Path::new("adapter_config.json");
        let value = serde_json::to_value(spec).map_err(|e| Error::Json { path: path.into(), source: e })?;
        let mut raw = value.as_object().cloned().unwrap_or_default();
        raw.insert("peft_type".into(), "LORA".into());
        raw.insert("task_type".into(), "CAUSAL_LM".into());
        raw.insert("bias".into(), "none".into());
        let cfg = AdapterConfig {
            peft_type: default_peft_type(),
            r: spec.r,
            lora_alpha: spec.lora_alpha,
            use_rslora: spec.use_rslora,
            use_dora: spec.use_dora,
            target_modules: Some(spec.target_modules.clone()),
            exclude_modules: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            layers_pattern: None,
            lora_dropout: spec.lora_dropout,
            fan_in_fan_out: false,
            bias: default_bias(),
            modules_to_save: None,
            base_model_name_or_path: spec.base_model_name_or_path.clone(),
            raw,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

const UNSUPPORTED: &[(&str, &str)] = &[
    ("use_qalora", "QA-LoRA"),
    ("lora_bias", "a bias on lora_B"),
    ("layer_replication", "layer replication"),
    ("target_parameters", "LoRA on nn.Parameter targets"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
    ("trainable_token_indices", "trainable tokens"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("arrow_config", "Arrow routing"),
];

fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

impl AdapterConfig {
    /// Parses `adapter_config.json` text; `path` names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: serde_json::Map<String, Value> =
            serde_json::from_str(text).map_err(|e| Error::Json { path: path.into(), source: e })?;
        let mut cfg: AdapterConfig = serde_json::from_value(Value::Object(raw.clone()))
            .map_err(|e| Error::Json { path: path.into(), source: e })?;
        cfg.raw = raw;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        Self::from_json(&text, path)
    }

    /// Rejects options whose meaning lowrank does not implement, rather than dropping them.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::Adapter { path: path.into(), message: m });
        if self.peft_type != "LORA" {
            return bad(format!("peft_type `{}` is not supported (only LORA)", self.peft_type));
        }
        if self.r == 0 {
            return bad("r must be positive".into());
        }
        if let Some(k) = self.rank_pattern.iter().find(|(_, &r)| r == 0).map(|(k, _)| k) {
            return bad(format!("rank_pattern `{k}` is 0"));
        }
        // A finite scale that stays finite through a forward: |alpha| beyond this is a typo or an
        // attack, and would only show up as NaN at the first step.
        let alphas = std::iter::once(("lora_alpha".to_string(), self.lora_alpha))
            .chain(self.alpha_pattern.iter().map(|(k, &a)| (format!("alpha_pattern `{k}`"), a)));
        for (what, a) in alphas {
            if !a.is_finite() || a.abs() > MAX_ALPHA {
                return bad(format!("{what} = {a} must be finite and at most {MAX_ALPHA:e} in size"));
            }
        }
        if self.bias != "none" {
            return bad(format!("bias = `{}`: trained base biases are not supported yet (only \"none\")", self.bias));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return bad("modules_to_save: fully trained modules are not supported yet".into());
        }
        if self.target_modules.is_none() {
            return bad("target_modules is missing".into());
        }
        if matches!(self.target_modules, Some(ModuleSelector::Pattern(_))) && self.layers_to_transform.is_some() {
            return bad("layers_to_transform cannot be used when target_modules is a string (regex or all-linear); PEFT refuses it too".into());
        }
        for (key, what) in UNSUPPORTED {
            if let Some(v) = self.raw.get(*key) {
                if !is_off(v) {
                    return bad(format!("`{key}` = {v}: {what} is not supported"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_list_regex_and_rejects_unsupported() {
        let p = Path::new("adapter_config.json");
        let c = AdapterConfig::from_json(
            r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"new_key":1}"#,
            p,
        )
        .unwrap();
        assert_eq!(c.target_modules, Some(ModuleSelector::List(vec!["q_proj".into()])));
        assert!(c.raw.contains_key("new_key"), "unknown keys are kept");
        let c = AdapterConfig::from_json(r#"{"r":4,"target_modules":".*q_proj"}"#, p).unwrap();
        assert_eq!(c.target_modules, Some(ModuleSelector::Pattern(".*q_proj".into())));
        let e = AdapterConfig::from_json(r#"{"r":4,"target_modules":["q"],"use_qalora":true}"#, p).unwrap_err();
        assert!(e.to_string().contains("use_qalora"), "{e}");
        let e = AdapterConfig::from_json(r#"{"r":4,"target_modules":["q"],"peft_type":"IA3"}"#, p).unwrap_err();
        assert!(e.to_string().contains("IA3"), "{e}");
    }

    fn spec() -> LoraSpec {
        LoraSpec {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.05,
            target_modules: ModuleSelector::List(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
            use_dora: true,
            init_lora_weights: LoraInit::Gaussian,
            base_model_name_or_path: Some("m".into()),
        }
    }

    /// The typed spec gives the config reading its JSON gives, PEFT's key names and all.
    #[test]
    fn a_spec_makes_the_config_its_json_reads_as() {
        let cfg = AdapterConfig::new_lora(&spec()).unwrap();
        let text = serde_json::to_string(&cfg.raw).unwrap();
        let read = AdapterConfig::from_json(&text, Path::new("x")).unwrap();
        assert_eq!(cfg, read);
        assert_eq!(LoraInit::from_config(&cfg).unwrap(), LoraInit::Gaussian);
        assert_eq!(
            (cfg.raw["peft_type"].as_str(), cfg.raw["init_lora_weights"].as_str()),
            (Some("LORA"), Some("gaussian"))
        );
        let spec_back: LoraSpec = serde_json::from_str(&serde_json::to_string(&spec()).unwrap()).unwrap();
        assert_eq!(spec_back, spec());
    }

    #[test]
    fn a_spec_is_checked_as_a_file_is() {
        let error = AdapterConfig::new_lora(&LoraSpec { r: 0, ..spec() }).unwrap_err().to_string();
        assert!(error.contains("r must be positive"), "{error}");
    }
}

//! An HF `config.json` → [`ModelConfig`]: transformers' own defaults for the keys a file leaves
//! out (they differ by family), and an error naming the key and value of anything lowrank does not
//! implement, rather than a model that runs with wrong numbers.

use std::path::Path;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::config::{Family, ModelConfig};
use crate::ops::{longrope_attention_factor, Activation, RopeScaling};
use crate::{Error, Result};

/// Mirror of the fields of `config.json` that we read; unknown fields are ignored.
#[derive(Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    /// Gemma's name for the MLP activation.
    hidden_activation: Option<String>,
    rope_theta: Option<f32>,
    rope_scaling: Option<Value>,
    /// transformers ≥ 5 folds `rope_theta` and `rope_scaling` into this object (per layer type
    /// for Gemma 3).
    rope_parameters: Option<Value>,
    /// Gemma 3's RoPE base of the sliding-window layers, before transformers 5.
    rope_local_base_freq: Option<f32>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    /// Gemma 3 before `layer_types`: every `n`-th layer is global.
    sliding_window_pattern: Option<usize>,
    query_pre_attn_scalar: Option<f64>,
    /// `None`: absent (the family's default); `Some(None)`: `null` (off).
    #[serde(default, deserialize_with = "present")]
    attn_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    final_logit_softcapping: Option<Option<f64>>,
    use_bidirectional_attention: Option<bool>,
    /// Phi-3: the pre-training context LongRoPE scales from.
    original_max_position_embeddings: Option<usize>,
    /// Phi: the share of each head RoPE rotates (also inside `rope_parameters`).
    partial_rotary_factor: Option<f64>,
}

/// Keeps `null` apart from absent: `Some(None)` for `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Option<f64>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

/// Keys of features lowrank does not implement, refused when set (mixture-of-experts routing, a
/// vision or audio tower).
const REFUSED: &[&str] =
    &["num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "vision_config", "audio_config"];

impl ModelConfig {
    /// Reads and validates an HF `config.json`. Gemma 3 with its vision tower (`model_type`
    /// `gemma3`) gives the configuration of its text model (`text_config`), marked
    /// [`ModelConfig::language_model`].
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::Json { path: path.into(), source: e })?;
        let fail = |m: String| Error::Config(format!("{}: {m}", path.display()));
        let multimodal = value.get("model_type").and_then(Value::as_str) == Some("gemma3");
        let value = if multimodal { gemma3_text_config(&value).map_err(fail)? } else { value };
        for key in REFUSED {
            match value.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::Number(n)) if n.as_f64() == Some(0.0) => {}
                Some(v) => {
                    return Err(fail(format!("`{key}` = {v} is not supported (lowrank runs dense text models)")))
                }
            }
        }
        let raw: HfConfig = serde_json::from_value(value).map_err(|e| Error::Json { path: path.into(), source: e })?;
        let mut cfg = raw.into_config().map_err(fail)?;
        cfg.language_model = multimodal;
        Ok(cfg)
    }
}

/// `Gemma3TextConfig`'s sizes (transformers 5), for the keys a `text_config` leaves out.
const GEMMA3_TEXT_SIZES: [(&str, u64); 6] = [
    ("vocab_size", 262_208),
    ("hidden_size", 2304),
    ("intermediate_size", 9216),
    ("num_hidden_layers", 26),
    ("num_attention_heads", 8),
    ("num_key_value_heads", 4),
];

/// The `text_config` of a `gemma3` (`Gemma3ForConditionalGeneration`) config as a `gemma3_text`
/// config: what transformers runs for a prompt without images. Published configs list only what
/// differs from `Gemma3TextConfig`'s defaults (gemma-3-4b gives no head counts or vocabulary), so
/// those defaults fill the sizes it leaves out; the top level's `tie_word_embeddings` applies
/// when the text config does not say.
fn gemma3_text_config(value: &Value) -> std::result::Result<Value, String> {
    let Some(Value::Object(text)) = value.get("text_config") else {
        return Err("model_type `gemma3` without a `text_config` object".into());
    };
    let mut text = text.clone();
    match text.get("model_type").and_then(Value::as_str) {
        None | Some("gemma3_text") => {}
        Some(other) => return Err(format!("text_config.model_type `{other}` is not gemma3_text")),
    }
    text.insert("model_type".into(), "gemma3_text".into());
    for (key, default) in GEMMA3_TEXT_SIZES {
        text.entry(key).or_insert(default.into());
    }
    if let Some(tie) = value.get("tie_word_embeddings").filter(|_| !text.contains_key("tie_word_embeddings")) {
        text.insert("tie_word_embeddings".into(), tie.clone());
    }
    Ok(Value::Object(text))
}

impl HfConfig {
    fn into_config(self) -> std::result::Result<ModelConfig, String> {
        let family = match self.model_type.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            other => {
                return Err(format!(
                "model_type `{other}` is not supported (supported: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3)"
            ))
            }
        };
        if self.use_bidirectional_attention == Some(true) {
            return Err("`use_bidirectional_attention` = true (an embedding model) is not supported".into());
        }
        let gemma = family.is_gemma();
        let activation = match (gemma, &self.hidden_activation, &self.hidden_act) {
            (true, Some(a), _) | (false, _, Some(a)) => Activation::from_hf(a)
                .ok_or_else(|| format!("activation `{a}` is not supported (silu, gelu_pytorch_tanh)"))?,
            (true, None, _) => Activation::GeluTanh,
            (false, _, None) => Activation::Silu,
        };
        let head_dim =
            self.head_dim.unwrap_or(if gemma { 256 } else { self.hidden_size / self.num_attention_heads.max(1) });
        let (global, sliding_rope) = self.ropes(family)?;
        let partial = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .or(self.partial_rotary_factor)
            .unwrap_or(1.0);
        // transformers: int(head_dim * partial_rotary_factor).
        let rotary_dim = (head_dim as f64 * partial) as usize;
        let (sliding_window, sliding_layers) = self.sliding_layers(family)?;
        let cap = |given: Option<Option<f64>>, default: Option<f64>| given.unwrap_or(default);
        let (attn_softcap, final_softcap) = match family {
            Family::Gemma2 => {
                (cap(self.attn_logit_softcapping, Some(50.0)), cap(self.final_logit_softcapping, Some(30.0)))
            }
            // transformers' Gemma 3 never passes `attn_logit_softcapping` to its attention.
            Family::Gemma3 => (None, cap(self.final_logit_softcapping, None)),
            _ => (None, None),
        };
        let attention_bias = self.attention_bias.unwrap_or(false);
        let cfg = ModelConfig {
            family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(if family == Family::Phi3 { 1e-5 } else { 1e-6 }),
            rope_theta: global.0,
            rope_scaling: global.1,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(match family {
                Family::Gemma2 => 8192,
                Family::Gemma3 => 131_072,
                _ => 4096,
            }),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family != Family::Qwen2 && attention_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            sliding_window,
            sliding_layers,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            activation,
            attn_scale: match family {
                Family::Gemma2 | Family::Gemma3 => self.query_pre_attn_scalar.unwrap_or(256.0).powf(-0.5),
                _ => (head_dim as f64).powf(-0.5),
            },
            attn_softcap,
            final_softcap,
            sliding_rope,
            rotary_dim,
            fused_projections: family == Family::Phi3,
            language_model: false,
        };
        cfg.validate().map_err(|e| match e {
            Error::Config(m) => m,
            other => other.to_string(),
        })?;
        Ok(cfg)
    }

    /// The global RoPE `(base, scaling)` and, for Gemma 3, the sliding layers' own.
    #[allow(clippy::type_complexity)]
    fn ropes(&self, family: Family) -> std::result::Result<((f32, RopeScaling), Option<(f32, RopeScaling)>), String> {
        let params = self.rope_parameters.as_ref().filter(|p| !p.is_null());
        let theta_of =
            |v: Option<&Value>| v.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).map(|t| t as f32);
        if family == Family::Gemma3 {
            // transformers 5: {"full_attention": {...}, "sliding_attention": {...}}; before: the
            // global rope in rope_theta / rope_scaling and the local base in rope_local_base_freq.
            let (full, local) = match params {
                Some(p) if p.get("full_attention").is_some() => (p.get("full_attention"), p.get("sliding_attention")),
                _ => (None, None),
            };
            let global_theta = theta_of(full).or(self.rope_theta).unwrap_or(1_000_000.0);
            let global_scaling = match full.or(self.rope_scaling.as_ref()) {
                Some(v) if !v.is_null() => parse_rope_scaling(v)?,
                _ => RopeScaling::None,
            };
            let local_theta = theta_of(local).or(self.rope_local_base_freq).unwrap_or(10_000.0);
            let local_scaling = match local {
                Some(v) if !v.is_null() => parse_rope_scaling(v)?,
                _ => RopeScaling::None,
            };
            return Ok(((global_theta, global_scaling), Some((local_theta, local_scaling))));
        }
        let theta = self.rope_theta.or_else(|| theta_of(params)).unwrap_or(10_000.0);
        let scaling = match self.rope_scaling.as_ref().or(params) {
            Some(v) if family == Family::Phi3 && is_longrope(v) => self.longrope(v)?,
            Some(v) if !v.is_null() => parse_rope_scaling(v)?,
            _ => RopeScaling::None,
        };
        Ok(((theta, scaling), None))
    }

    /// Phi-3's LongRoPE as transformers computes it: `factor` (else `max_position_embeddings /
    /// original_max_position_embeddings`) gives the default attention factor
    /// `√(1 + ln(factor) / ln(original))` (1 when `factor ≤ 1`).
    fn longrope(&self, v: &Value) -> std::result::Result<RopeScaling, String> {
        let factors = |key: &str| -> std::result::Result<Vec<f32>, String> {
            v.get(key)
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect::<Option<Vec<f32>>>())
                .ok_or_else(|| format!("longrope needs a list of numbers `{key}`"))
        };
        let original = v
            .get("original_max_position_embeddings")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .or(self.original_max_position_embeddings)
            .unwrap_or(4096);
        let max = self.max_position_embeddings.unwrap_or(4096);
        let factor = v.get("factor").and_then(Value::as_f64).unwrap_or(max as f64 / original as f64);
        let attention_factor = v
            .get("attention_factor")
            .and_then(Value::as_f64)
            .unwrap_or_else(|| longrope_attention_factor(factor, original));
        Ok(RopeScaling::LongRope {
            short_factor: factors("short_factor")?,
            long_factor: factors("long_factor")?,
            original_max_position_embeddings: original,
            attention_factor: attention_factor as f32,
        })
    }

    /// The sliding window and which blocks use it, as transformers decides: Mistral windows every
    /// layer when `sliding_window` is set (its `layer_types` are ignored); Qwen2/Qwen3 only with
    /// `use_sliding_window`, on the `layer_types` marked `sliding_attention` or else on the layers
    /// from `max_window_layers` on; Gemma 2 on every other layer from the first, Gemma 3 on all
    /// but every `sliding_window_pattern`-th (6), unless `layer_types` says; Llama never.
    fn sliding_layers(&self, family: Family) -> std::result::Result<(Option<usize>, Vec<bool>), String> {
        let n = self.num_hidden_layers;
        let window = match family {
            Family::Llama => None,
            Family::Mistral | Family::Phi3 => self.sliding_window,
            Family::Qwen2 | Family::Qwen3 => self.sliding_window.filter(|_| self.use_sliding_window == Some(true)),
            Family::Gemma2 | Family::Gemma3 => Some(self.sliding_window.unwrap_or(4096)),
        };
        let Some(window) = window else { return Ok((None, vec![false; n])) };
        let layers = match (&self.layer_types, family) {
            (_, Family::Mistral | Family::Phi3) => vec![true; n],
            (Some(types), _) => {
                if types.len() != n {
                    return Err(format!("layer_types has {} entries for {n} layers", types.len()));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "full_attention" => Ok(false),
                        "sliding_attention" => Ok(true),
                        other => Err(format!(
                            "layer_types entry `{other}` is not supported (supported: full_attention, sliding_attention)"
                        )),
                    })
                    .collect::<std::result::Result<_, _>>()?
            }
            (None, Family::Gemma2) => (0..n).map(|l| (l + 1) % 2 != 0).collect(),
            (None, Family::Gemma3) => {
                let pattern = self.sliding_window_pattern.unwrap_or(6).max(1);
                (0..n).map(|l| (l + 1) % pattern != 0).collect()
            }
            (None, _) => (0..n).map(|l| l >= self.max_window_layers.unwrap_or(28)).collect(),
        };
        Ok((Some(window).filter(|_| layers.contains(&true)), layers))
    }
}

/// Phi-3's `rope_scaling` types that transformers runs as LongRoPE (`su` and `yarn` are its old
/// names there).
fn is_longrope(v: &Value) -> bool {
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str);
    matches!(kind, Some("longrope" | "su" | "yarn"))
}

fn parse_rope_scaling(v: &Value) -> std::result::Result<RopeScaling, String> {
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let num = |key: &str| -> std::result::Result<f32, String> {
        v.get(key)
            .and_then(|x| x.as_f64())
            .map(|x| x as f32)
            .ok_or_else(|| format!("rope scaling `{kind}` needs a numeric `{key}`"))
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(format!("rope scaling type `{other}` is not supported (supported: default, linear, llama3)"))
        }
    })
}

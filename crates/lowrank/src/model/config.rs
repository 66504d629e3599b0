//! The model configuration: one struct for every supported family, read from an HF
//! `config.json` or from GGUF metadata.

use std::path::Path;

use serde::Deserialize;

use crate::formats::gguf_names::Heads;
use crate::ops::RopeScaling;
use crate::{Error, Result};

/// Architecture family. One block implementation serves all; the family only picks switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Llama 1/2/3, SmolLM, TinyLlama.
    Llama,
    /// Mistral (Llama block, optional sliding window).
    Mistral,
    /// Qwen2 / Qwen2.5 (q/k/v bias).
    Qwen2,
    /// Qwen3 dense (RMSNorm of q and k per head before RoPE, `head_dim` of its own).
    Qwen3,
}

impl Family {
    /// The `model_type` string of HF configs.
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// The `general.architecture` llama.cpp uses for the family (its converter writes Mistral as
    /// `llama`).
    pub fn gguf_architecture(self) -> &'static str {
        match self {
            Family::Llama | Family::Mistral => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }
}

impl ModelConfig {
    /// The attention head counts.
    pub fn heads(&self) -> Heads {
        Heads { query: self.num_heads, kv: self.num_kv_heads }
    }

    /// The attention window of block `layer`: `None` for full causal attention.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.sliding_layers.get(layer).copied().unwrap_or(false))
    }
}

/// Everything the transformer needs to know about its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Family (for display and defaults).
    pub family: Family,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Hidden size `H`.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Per-head dimension `D`.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Longest position the model was trained for.
    pub max_position_embeddings: usize,
    /// Output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// Attention window of the sliding-window layers; `None` when no layer has one.
    pub sliding_window: Option<usize>,
    /// Per block: whether it attends within [`ModelConfig::sliding_window`] (transformers'
    /// `layer_types`, `"sliding_attention"` against `"full_attention"`). Use [`ModelConfig::window`].
    pub sliding_layers: Vec<bool>,
    /// RMSNorm of each query and key head before RoPE (`self_attn.q_norm` / `k_norm`, Qwen3).
    pub qk_norm: bool,
}

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
    rope_theta: Option<f32>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 folds `rope_theta` and `rope_scaling` into this object.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
}

impl ModelConfig {
    /// Reads and validates an HF `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|e| Error::Json { path: path.into(), source: e })?;
        let family = match raw.model_type.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            other => {
                return Err(Error::Config(format!(
                    "{}: model_type `{other}` is not supported (supported: llama, mistral, qwen2, qwen3)",
                    path.display()
                )))
            }
        };
        let params = raw.rope_parameters.as_ref();
        let rope_theta = raw
            .rope_theta
            .or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()).map(|v| v as f32))
            .unwrap_or(10000.0);
        let scaling_obj = raw.rope_scaling.as_ref().or(params);
        let rope_scaling = match scaling_obj {
            Some(v) if !v.is_null() => parse_rope_scaling(v)?,
            _ => RopeScaling::None,
        };
        let (sliding_window, sliding_layers) =
            sliding_layers(&raw, family).map_err(|m| Error::Config(format!("{}: {m}", path.display())))?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let cfg = ModelConfig {
            family,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family != Family::Qwen2 && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_window,
            sliding_layers,
            qk_norm: family == Family::Qwen3,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the dimensions fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 || self.hidden_size == 0 {
            return bad("heads, layers and hidden size must be positive".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even and positive", self.head_dim));
        }
        if self.sliding_layers.len() != self.num_layers {
            return bad(format!("{} layer types for {} layers", self.sliding_layers.len(), self.num_layers));
        }
        if self.sliding_layers.contains(&true) && self.sliding_window.is_none_or(|w| w == 0) {
            return bad("sliding-window layers need a positive sliding_window".into());
        }
        Ok(())
    }

    /// Parameter count of the base model (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, d) = (self.hidden_size, self.head_dim);
        let q = h * self.num_heads * d;
        let kv = 2 * h * self.num_kv_heads * d;
        let bias = if self.qkv_bias { (self.num_heads + 2 * self.num_kv_heads) * d } else { 0 };
        let o = self.num_heads * d * h;
        let mlp = 3 * h * self.intermediate_size;
        let qk_norm = if self.qk_norm { 2 * d } else { 0 };
        let block = q + kv + bias + o + mlp + 2 * h + qk_norm;
        let emb = self.vocab_size * h;
        emb * if self.tie_word_embeddings { 1 } else { 2 } + self.num_layers * block + h
    }
}

/// The sliding window and which blocks use it, as transformers decides: Mistral windows every
/// layer when `sliding_window` is set (its `layer_types` are ignored); Qwen2/Qwen3 only with
/// `use_sliding_window`, on the `layer_types` marked `sliding_attention` or else on the layers
/// from `max_window_layers` on; Llama never.
fn sliding_layers(raw: &HfConfig, family: Family) -> std::result::Result<(Option<usize>, Vec<bool>), String> {
    let n = raw.num_hidden_layers;
    let window = match family {
        Family::Llama => None,
        Family::Mistral => raw.sliding_window,
        Family::Qwen2 | Family::Qwen3 => raw.sliding_window.filter(|_| raw.use_sliding_window == Some(true)),
    };
    let Some(window) = window else { return Ok((None, vec![false; n])) };
    let layers = match (&raw.layer_types, family) {
        (_, Family::Mistral) => vec![true; n],
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
        (None, _) => (0..n).map(|l| l >= raw.max_window_layers.unwrap_or(28)).collect(),
    };
    Ok((Some(window).filter(|_| layers.contains(&true)), layers))
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<RopeScaling> {
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let num = |key: &str| -> Result<f32> {
        v.get(key)
            .and_then(|x| x.as_f64())
            .map(|x| x as f32)
            .ok_or_else(|| Error::Config(format!("rope scaling `{kind}` needs a numeric `{key}`")))
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
            return Err(Error::Config(format!(
                "rope scaling type `{other}` is not supported (supported: default, linear, llama3)"
            )))
        }
    })
}

//! The model configuration: one struct for every supported family, read from an HF
//! `config.json` (`hf_config.rs`) or from GGUF metadata (`gguf.rs`).

use crate::formats::gguf_names::Heads;
use crate::ops::{Activation, RopeScaling, Scores};
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
    /// Gemma 2 (GeGLU, `1 + w` norms, four per block, soft-capped attention and logits,
    /// alternating sliding-window layers).
    Gemma2,
    /// Gemma 3 text (Gemma 2's block with q/k norms instead of attention capping, five sliding
    /// layers to a global one, each kind with its own RoPE).
    Gemma3,
    /// Phi-3, Phi-3.5, Phi-4-mini (fused `qkv_proj` and `gate_up_proj`, LongRoPE, partial rotary).
    Phi3,
}

impl Family {
    /// The `model_type` string of HF configs.
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
            Family::Phi3 => "phi3",
        }
    }

    /// The `general.architecture` llama.cpp uses for the family (its converter writes Mistral as
    /// `llama`).
    pub fn gguf_architecture(self) -> &'static str {
        match self {
            Family::Llama | Family::Mistral => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Phi3 => "phi3",
        }
    }

    /// Gemma's conventions: embeddings times √hidden, RMSNorm as `x·(1 + w)`, a norm after
    /// attention and around the MLP.
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }
}

impl ModelConfig {
    /// The attention head counts.
    pub fn heads(&self) -> Heads {
        Heads { query: self.num_heads, kv: self.num_kv_heads }
    }

    /// The attention window of block `layer`: `None` for full causal attention.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.is_sliding(layer))
    }

    /// Whether block `layer` is a sliding-window layer.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_layers.get(layer).copied().unwrap_or(false)
    }

    /// How block `layer` scores its keys.
    pub fn scores(&self, layer: usize) -> Scores {
        Scores {
            scale: self.attn_scale as f32,
            softcap: self.attn_softcap.map(|c| c as f32),
            window: self.window(layer),
        }
    }

    /// The RoPE `(base, scaling)` of block `layer`.
    pub fn rope(&self, layer: usize) -> (f32, &RopeScaling) {
        match &self.sliding_rope {
            Some((theta, scaling)) if self.is_sliding(layer) => (*theta, scaling),
            _ => (self.rope_theta, &self.rope_scaling),
        }
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
    /// RMSNorm of each query and key head before RoPE (`self_attn.q_norm` / `k_norm`, Qwen3,
    /// Gemma 3).
    pub qk_norm: bool,
    /// The gate projection's activation (`hidden_act`, Gemma's `hidden_activation`).
    pub activation: Activation,
    /// The attention score scale: `1/√head_dim`, or `query_pre_attn_scalar^-1/2` (Gemma).
    pub attn_scale: f64,
    /// Gemma 2's `attn_logit_softcapping`: scores become `c · tanh(scores / c)`.
    pub attn_softcap: Option<f64>,
    /// `final_logit_softcapping`: logits become `c · tanh(logits / c)`, in the loss too.
    pub final_softcap: Option<f64>,
    /// RoPE `(base, scaling)` of the sliding-window layers where it is not the global one
    /// (Gemma 3's `rope_parameters.sliding_attention`, or `rope_local_base_freq`).
    pub sliding_rope: Option<(f32, RopeScaling)>,
    /// Leading dimensions of each head that RoPE rotates (`head_dim`, or Phi's
    /// `partial_rotary_factor · head_dim`).
    pub rotary_dim: usize,
    /// One `qkv_proj` and one `gate_up_proj` instead of three and two projections (Phi-3).
    pub fused_projections: bool,
    /// The text model inside a multimodal checkpoint (Gemma 3's `Gemma3ForConditionalGeneration`,
    /// whose vision tower is not run): modules under `model.language_model.` as PEFT names them.
    pub language_model: bool,
}

impl ModelConfig {
    /// The module path the blocks, embeddings and final norm hang under, as PEFT and transformers
    /// name them in memory: `model`, or `model.language_model` for the text of a multimodal model.
    pub fn module_root(&self) -> &'static str {
        if self.language_model {
            "model.language_model"
        } else {
            "model"
        }
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
        if self.rotary_dim == 0 || !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > self.head_dim {
            return bad(format!("rotary dimension {} must be even, positive and at most head_dim", self.rotary_dim));
        }
        if self.sliding_layers.len() != self.num_layers {
            return bad(format!("{} layer types for {} layers", self.sliding_layers.len(), self.num_layers));
        }
        if self.sliding_layers.contains(&true) && self.sliding_window.is_none_or(|w| w == 0) {
            return bad("sliding-window layers need a positive sliding_window".into());
        }
        if !(self.attn_scale.is_finite() && self.attn_scale > 0.0) {
            return bad(format!("attention scale {} must be positive (query_pre_attn_scalar)", self.attn_scale));
        }
        for (key, cap) in
            [("attn_logit_softcapping", self.attn_softcap), ("final_logit_softcapping", self.final_softcap)]
        {
            if cap.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
                return bad(format!("{key} must be positive, not {cap:?}"));
            }
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
        let norms = if self.family.is_gemma() { 4 * h } else { 2 * h };
        let block = q + kv + bias + o + mlp + norms + qk_norm;
        let emb = self.vocab_size * h;
        emb * if self.tie_word_embeddings { 1 } else { 2 } + self.num_layers * block + h
    }
}

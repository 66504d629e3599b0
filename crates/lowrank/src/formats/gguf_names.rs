//! llama.cpp's tensor names and q/k row order, both ways.
//!
//! llama.cpp's converter renames HF tensors (`model.layers.3.self_attn.q_proj.weight` →
//! `blk.3.attn_q.weight`) and, for the `llama` architecture, permutes the rows of `attn_q` and
//! `attn_k` within each head for its interleaved RoPE (`[2, D/2]` → `[D/2, 2]`). The same rules
//! apply to adapter tensors: a LoRA update's rows are `lora_b`'s rows.

use candle_core::Tensor;

use crate::Result;

/// Which rows-permuted projection a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qk {
    /// `attn_q`, permuted over the query heads.
    Q,
    /// `attn_k`, permuted over the key/value heads.
    K,
}

impl Qk {
    /// The number of heads the rows are permuted over.
    pub fn heads(self, heads: Heads) -> usize {
        match self {
            Qk::Q => heads.query,
            Qk::K => heads.kv,
        }
    }
}

/// A model's attention head counts, which the q/k row order depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    /// Query heads.
    pub query: usize,
    /// Key/value heads.
    pub kv: usize,
}

const BLOCK: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.qkv_proj", "attn_qkv"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Gemma 2/3's norms where their names or meanings differ: HF's `post_attention_layernorm` is the
/// norm on the attention output there, not the one before the MLP.
const GEMMA_NORMS: &[(&str, &str)] = &[
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
];

/// Phi-3's fused gate and up projection, which llama.cpp keeps fused under `ffn_up`.
const PHI3_MLP: &[(&str, &str)] = &[("mlp.gate_up_proj", "ffn_up")];

/// The block table of an architecture: its own entries first.
fn block_names(arch: &str) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    let own: &[(&str, &str)] = match arch {
        "gemma2" | "gemma3" => GEMMA_NORMS,
        "phi3" => PHI3_MLP,
        _ => &[],
    };
    own.iter().chain(BLOCK.iter().filter(move |(h, g)| !own.iter().any(|(oh, og)| oh == h || og == g)))
}

/// RoPE tensors that are not model weights: per-frequency divisors (Llama 3's scaling, written out
/// by the converter) and Phi-3's LongRoPE factors within and beyond the original context.
pub const ROPE_FREQS: &str = "rope_freqs.weight";
/// Phi-3's LongRoPE divisors within the original context.
pub const SHORT_FACTORS: &str = "rope_factors_short.weight";
/// Phi-3's LongRoPE divisors beyond it.
pub const LONG_FACTORS: &str = "rope_factors_long.weight";

const TOP: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// The llama.cpp name of an HF tensor name in a model of architecture `arch` (llama.cpp's
/// `general.architecture`), and whether it is q or k.
pub fn to_gguf(hf: &str, arch: &str) -> Option<(String, Option<Qk>)> {
    // The text model of a multimodal model is llama.cpp's model.
    let hf = hf.strip_prefix("model.language_model.").map_or(hf.to_string(), |rest| format!("model.{rest}"));
    if let Some((_, g)) = TOP.iter().find(|(h, _)| *h == hf) {
        return Some((g.to_string(), None));
    }
    let (layer, module) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let (module, suffix) = module.rsplit_once('.')?;
    layer.parse::<usize>().ok()?;
    let (_, g) = block_names(arch).find(|(h, _)| *h == module)?;
    Some((format!("blk.{layer}.{g}.{suffix}"), qk(g)))
}

/// The HF name of a llama.cpp tensor name in a model of architecture `arch`, and whether it is
/// q or k.
pub fn to_hf(gguf: &str, arch: &str) -> Option<(String, Option<Qk>)> {
    if let Some((h, _)) = TOP.iter().find(|(_, g)| *g == gguf) {
        return Some((h.to_string(), None));
    }
    let (layer, module) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let (module, suffix) = module.rsplit_once('.')?;
    layer.parse::<usize>().ok()?;
    let (h, g) = block_names(arch).find(|(_, g)| *g == module)?;
    Some((format!("model.layers.{layer}.{h}.{suffix}"), qk(g)))
}

fn qk(gguf_module: &str) -> Option<Qk> {
    match gguf_module {
        "attn_q" => Some(Qk::Q),
        "attn_k" => Some(Qk::K),
        _ => None,
    }
}

/// Whether llama.cpp's converter permutes q/k rows for this architecture.
pub fn permutes_qk(arch: &str) -> bool {
    arch == "llama"
}

/// HF row order → GGUF row order on a `[heads·D, …]` tensor (what the converter does).
pub fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let cols: usize = dims[1..].iter().product();
    let half = dims[0] / heads / 2;
    // HF rows are [heads, 2, D/2]; GGUF rows are [heads, D/2, 2].
    Ok(t.reshape((heads, 2, half, cols))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// GGUF row order → HF row order (inverse of [`permute_rows`]).
pub fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    if heads == 0 || dims.first().is_none_or(|r| r % (2 * heads) != 0) {
        return Err(crate::Error::Config(format!("cannot un-permute a tensor of shape {dims:?} over {heads} heads")));
    }
    let cols: usize = dims[1..].iter().product();
    let half = dims[0] / heads / 2;
    Ok(t.reshape((heads, half, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names_and_row_order_round_trip() -> Result<()> {
        for hf in [
            "model.layers.12.self_attn.k_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "lm_head.weight",
            "model.layers.3.input_layernorm.weight",
        ] {
            let (g, _) = to_gguf(hf, "llama").expect("mapped");
            assert_eq!(to_hf(&g, "llama").map(|(h, _)| h).as_deref(), Some(hf));
        }
        assert_eq!(
            to_gguf("model.layers.1.self_attn.q_proj.weight", "llama"),
            Some(("blk.1.attn_q.weight".into(), Some(Qk::Q)))
        );
        assert!(
            to_gguf("model.layers.x.self_attn.q_proj.weight", "llama").is_none()
                && to_hf("blk.0.attn_qkvx.weight", "llama").is_none()
        );
        // The text model of a multimodal Gemma 3 is llama.cpp's gemma3 model.
        assert_eq!(
            to_gguf("model.language_model.layers.4.self_attn.v_proj.weight", "gemma3").map(|(g, _)| g).as_deref(),
            Some("blk.4.attn_v.weight")
        );
        assert_eq!(
            to_gguf("model.language_model.norm.weight", "gemma3").map(|(g, _)| g).as_deref(),
            Some("output_norm.weight")
        );
        // Gemma: post_attention_layernorm is the attention output's norm, ffn_norm the MLP's input.
        let gemma = |hf: &str| to_gguf(&format!("model.layers.2.{hf}.weight"), "gemma3").map(|(g, _)| g);
        assert_eq!(gemma("post_attention_layernorm").as_deref(), Some("blk.2.post_attention_norm.weight"));
        assert_eq!(gemma("pre_feedforward_layernorm").as_deref(), Some("blk.2.ffn_norm.weight"));
        assert_eq!(gemma("post_feedforward_layernorm").as_deref(), Some("blk.2.post_ffw_norm.weight"));
        assert_eq!(gemma("self_attn.q_norm").as_deref(), Some("blk.2.attn_q_norm.weight"));
        assert_eq!(
            to_hf("blk.2.ffn_norm.weight", "gemma2").map(|(h, _)| h).as_deref(),
            Some("model.layers.2.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            to_hf("blk.2.ffn_norm.weight", "qwen3").map(|(h, _)| h).as_deref(),
            Some("model.layers.2.post_attention_layernorm.weight")
        );
        // Phi-3 keeps its fused projections fused.
        assert_eq!(
            to_gguf("model.layers.0.mlp.gate_up_proj.weight", "phi3").map(|(g, _)| g).as_deref(),
            Some("blk.0.ffn_up.weight")
        );
        assert_eq!(
            to_hf("blk.0.attn_qkv.weight", "phi3").map(|(h, _)| h).as_deref(),
            Some("model.layers.0.self_attn.qkv_proj.weight")
        );
        let t = Tensor::arange(0f32, 48.0, &Device::Cpu)?.reshape((16, 3))?;
        let back = unpermute_rows(&permute_rows(&t, 2)?, 2)?;
        assert_eq!(back.to_vec2::<f32>()?, t.to_vec2::<f32>()?);
        Ok(())
    }
}

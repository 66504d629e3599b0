//! A merged model as a llama.cpp GGUF model file: metadata (architecture hyperparameters,
//! tokenizer, chat template) from the source GGUF, or built from an HF directory's config and
//! tokenizer; llama.cpp's tensor names, q/k rows in its order, norms in f32 and matrices in the
//! chosen type.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::hf::check_finite;
use crate::chat::ChatTemplate;
use crate::formats::gguf_names::{permute_rows, permutes_qk, to_gguf, LONG_FACTORS, ROPE_FREQS, SHORT_FACTORS};
use crate::model::{Family, Model, ModelConfig};
use crate::ops::RopeScaling;
use crate::staging::{Existing, Staged};
use crate::tokenizer::gguf_tokenizer_metadata;
use crate::{Error, Result};

/// Writes `model` (merge adapters first) as a GGUF file at `out`, matrices in `dtype` (F32, F16,
/// BF16, Q8_0 or Q4_0), with `metadata` (the source GGUF's, or [`gguf_metadata_for_hf`]).
pub fn write_gguf_model(
    model: &Model,
    metadata: &HashMap<String, Value>,
    out: &Path,
    dtype: GgmlDType,
    check: bool,
    existing: Existing,
) -> Result<()> {
    let file_type = match dtype {
        GgmlDType::F32 => 0u32,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q8_0 => 7,
        GgmlDType::BF16 => 32,
        other => return Err(Error::Export(format!("GGUF export writes f32, f16, bf16, q8_0 or q4_0, not {other:?}"))),
    };
    let arch = match metadata.get("general.architecture") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(Error::Export("the metadata has no general.architecture".into())),
    };
    let staged = Staged::file(out, existing)?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    // llama.cpp's converter stores Gemma's norms as the multiplier 1 + w, which the model holds.
    for (hf, t) in model.named_weights_in(true)? {
        let (name, qk) =
            to_gguf(&hf, &arch).ok_or_else(|| Error::Export(format!("llama.cpp has no tensor name for `{hf}`")))?;
        let t = match qk.filter(|_| permutes_qk(&arch)) {
            Some(qk) => permute_rows(&t, qk.heads(model.config().heads()))?,
            None => t,
        };
        // Vectors (norms, biases) stay f32, as llama.cpp's converter keeps them; so does a matrix
        // whose rows do not split into the type's blocks.
        let ty = if t.rank() == 1 || t.dim(1)? % dtype.block_size() != 0 { GgmlDType::F32 } else { dtype };
        let q = QTensor::quantize(&t, ty)?;
        if check {
            check_finite(&hf, &q.dequantize(&candle_core::Device::Cpu)?)?;
        }
        tensors.push((name, q));
    }
    tensors.extend(rope_tensors(&model.config().rope_scaling)?);
    let mut metadata = metadata.clone();
    metadata.insert("general.file_type".into(), Value::U32(file_type));
    let mut keys: Vec<&String> = metadata.keys().collect();
    keys.sort();
    let meta: Vec<(&str, &Value)> = keys.iter().map(|k| (k.as_str(), &metadata[*k])).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_gguf_file(staged.path(), &meta, &refs)?;
    staged.commit()
}

/// The RoPE tensors llama.cpp reads beside the weights: the divisors a GGUF source gave
/// (`rope_freqs`), Phi-3's LongRoPE factors.
fn rope_tensors(scaling: &RopeScaling) -> Result<Vec<(String, QTensor)>> {
    let vector = |name: &str, v: &[f32]| -> Result<(String, QTensor)> {
        Ok((name.to_string(), QTensor::quantize(&Tensor::new(v, &Device::Cpu)?, GgmlDType::F32)?))
    };
    Ok(match scaling {
        RopeScaling::Factors(f) => vec![vector(ROPE_FREQS, f)?],
        RopeScaling::LongRope { short_factor, long_factor, .. } => {
            vec![vector(SHORT_FACTORS, short_factor)?, vector(LONG_FACTORS, long_factor)?]
        }
        _ => Vec::new(),
    })
}

/// llama.cpp metadata for a model loaded from the HF directory `dir` with configuration `cfg`:
/// the converter's `<arch>.*` hyperparameters, the tokenizer (byte-level BPE) and chat template.
pub fn gguf_metadata_for_hf(cfg: &ModelConfig, dir: &Path) -> Result<HashMap<String, Value>> {
    let arch = cfg.family.gguf_architecture();
    let mut m: HashMap<String, Value> = HashMap::new();
    let mut put = |k: &str, v: Value| {
        m.insert(
            if k.starts_with("general.") || k.starts_with("tokenizer.") {
                k.to_string()
            } else {
                format!("{arch}.{k}")
            },
            v,
        );
    };
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    put("general.architecture", Value::String(arch.into()));
    put("general.name", Value::String(name));
    let u = |x: usize| Value::U32(x as u32);
    put("context_length", u(cfg.max_position_embeddings));
    put("embedding_length", u(cfg.hidden_size));
    put("block_count", u(cfg.num_layers));
    put("feed_forward_length", u(cfg.intermediate_size));
    put("attention.head_count", u(cfg.num_heads));
    put("attention.head_count_kv", u(cfg.num_kv_heads));
    put("attention.key_length", u(cfg.head_dim));
    put("attention.value_length", u(cfg.head_dim));
    put("attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_norm_eps as f32));
    put("rope.freq_base", Value::F32(cfg.rope_theta));
    put("rope.dimension_count", u(cfg.rotary_dim));
    put("vocab_size", u(cfg.vocab_size));
    match &cfg.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            put("rope.scaling.type", Value::String("linear".into()));
            put("rope.scaling.factor", Value::F32(*factor));
        }
        // The factors are tensors (rope_tensors); llama.cpp picks them by its context size.
        RopeScaling::LongRope { original_max_position_embeddings, attention_factor, .. } => {
            put("rope.scaling.original_context_length", u(*original_max_position_embeddings));
            put("rope.scaling.attn_factor", Value::F32(*attention_factor));
        }
        other => {
            return Err(Error::Export(format!(
                "RoPE scaling {other:?} is not written to GGUF yet; write --format hf and convert that with llama.cpp"
            )))
        }
    }
    if cfg.family.is_gemma() {
        put_gemma(cfg, &mut put)?;
    }
    if cfg.family == Family::Phi3 {
        // 0 says no window (Phi-4-mini); llama.cpp then windows no layer.
        put("attention.sliding_window", u(cfg.sliding_window.unwrap_or(0)));
    }
    if !dir.join("tokenizer.json").is_file() {
        return Err(Error::Export(format!(
            "{} has no tokenizer.json, and llama.cpp needs the tokenizer in the GGUF",
            dir.display()
        )));
    }
    let chat = ChatTemplate::from_hf_dir(dir)?;
    for (k, v) in gguf_tokenizer_metadata(dir, cfg.vocab_size, chat.as_ref().map(|c| c.source()))? {
        put(&k, v);
    }
    Ok(m)
}

/// Gemma's `<arch>.*` keys as llama.cpp reads them; what llama.cpp cannot represent is refused.
fn put_gemma(cfg: &ModelConfig, put: &mut impl FnMut(&str, Value)) -> Result<()> {
    // llama.cpp scales scores by 1/√head_dim (1/√(hidden/heads) for the 27B models); the file
    // cannot say query_pre_attn_scalar.
    let big = matches!((cfg.family, cfg.num_layers), (Family::Gemma2, 46) | (Family::Gemma3, 62));
    let dim = if big { cfg.hidden_size / cfg.num_heads } else { cfg.head_dim };
    if (cfg.attn_scale - (dim as f64).powf(-0.5)).abs() > 1e-9 * cfg.attn_scale {
        return Err(Error::Export(format!(
            "query_pre_attn_scalar {:.0} is not what llama.cpp assumes for this model ({dim})",
            cfg.attn_scale.powi(-2)
        )));
    }
    if let Some(w) = cfg.sliding_window {
        put("attention.sliding_window", Value::U32(w as u32));
        let flags = cfg.sliding_layers.iter().map(|&b| Value::Bool(b)).collect();
        put("attention.sliding_window_pattern", Value::Array(flags));
    }
    if let Some(c) = cfg.attn_softcap {
        put("attn_logit_softcapping", Value::F32(c as f32));
    }
    if let Some(c) = cfg.final_softcap {
        put("final_logit_softcapping", Value::F32(c as f32));
    }
    match &cfg.sliding_rope {
        Some((base, RopeScaling::None)) => put("rope.freq_base_swa", Value::F32(*base)),
        Some((_, scaling)) => {
            return Err(Error::Export(format!("llama.cpp does not scale the sliding layers' RoPE ({scaling:?})")))
        }
        None => {}
    }
    Ok(())
}

/// Writes a GGUF file (candle's writer) at `path` and syncs it.
pub(crate) fn write_gguf_file(path: &Path, metadata: &[(&str, &Value)], tensors: &[(&str, &QTensor)]) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io("creating", path, e))?;
    let mut w = std::io::BufWriter::new(file);
    candle_core::quantized::gguf_file::write(&mut w, metadata, tensors)
        .map_err(|e| Error::io("writing", path, std::io::Error::other(e.to_string())))?;
    let file = w.into_inner().map_err(|e| Error::io("writing", path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io("syncing", path, e))
}

//! A complete HF model directory: `config.json`, safetensors (sharded past a size, with
//! `model.safetensors.index.json`), and the tokenizer files, as transformers'
//! `save_pretrained` lays them out. Written through [`Staged`], so a failure leaves nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::json;

use super::tokenizer_files::TokenizerFiles;
use crate::formats::SafetensorsDir;
use crate::model::{Family, Model, ModelConfig};
use crate::ops::RopeScaling;
use crate::staging::{write_synced, Existing, Staged};
use crate::{Error, Result};

/// How to write.
#[derive(Clone, Debug)]
pub struct HfOptions {
    /// Tensor dtype on disk: F32, F16 or BF16.
    pub dtype: DType,
    /// A shard is closed before it would pass this many bytes (transformers' `max_shard_size`).
    pub max_shard_bytes: u64,
    /// Check every tensor, after conversion to `dtype`, for NaN/inf before writing anything.
    pub check_finite: bool,
    /// The HF directory the model was loaded from, for what the model does not hold: the vision
    /// tower, projector and config of a multimodal model (needed when the model is the text
    /// model of one, [`crate::model::ModelConfig::language_model`]).
    pub source: Option<PathBuf>,
}

impl Default for HfOptions {
    fn default() -> Self {
        Self { dtype: DType::F32, max_shard_bytes: 5_000_000_000, check_finite: false, source: None }
    }
}

/// What was written.
#[derive(Clone, Debug)]
pub struct HfWritten {
    /// File names inside the directory.
    pub files: Vec<String>,
    /// Number of tensors.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

/// Writes `model` (its weights as they are now: merge adapters first) and `tokenizer` as an HF
/// directory at `out`.
pub fn write_hf_model(
    model: &Model,
    tokenizer: &TokenizerFiles,
    out: &Path,
    opts: &HfOptions,
    existing: Existing,
) -> Result<HfWritten> {
    let dtype_name = match opts.dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        other => return Err(Error::Export(format!("HF export writes f32, f16 or bf16, not {other:?}"))),
    };
    if let RopeScaling::Factors(_) = model.config().rope_scaling {
        return Err(Error::Export(
            "the model's RoPE divisors come from the GGUF's `rope_freqs` tensor, which config.json cannot \
             state (Llama 3's rope_scaling parameters are not in the file): write --format gguf"
                .into(),
        ));
    }
    let staged = Staged::dir(out, existing)?;
    let dir = staged.path();

    // Convert (and check) every tensor before the first byte is written.
    let multimodal = multimodal_source(model, opts)?;
    let mut tensors = Vec::new();
    for (name, t) in model.named_weights()? {
        let t = t.to_dtype(opts.dtype)?;
        if opts.check_finite {
            check_finite(&name, &t)?;
        }
        // A multimodal checkpoint holds its text model under `language_model.`.
        let name = match (&multimodal, name.strip_prefix("model.")) {
            (Some(_), Some(rest)) => format!("language_model.model.{rest}"),
            _ => name,
        };
        tensors.push((name, t));
    }
    if let Some((st, _)) = &multimodal {
        for name in st.names().into_iter().filter(|n| !n.starts_with("language_model.")) {
            let t = st.load(&name)?.to_dtype(opts.dtype)?;
            tensors.push((name, t));
        }
    }
    let shards = plan_shards(&tensors, opts.max_shard_bytes);
    let mut files = Vec::new();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = if shards.len() == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len())
        };
        let chunk: Vec<&(String, Tensor)> = shard.iter().map(|&j| &tensors[j]).collect();
        total += write_safetensors(&dir.join(&file), &chunk)?;
        for (name, _) in &chunk {
            weight_map.insert(name.clone(), file.clone());
        }
        files.push(file);
    }
    if shards.len() > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
        files.push("model.safetensors.index.json".into());
    }
    let mut config = match &multimodal {
        Some((_, config)) => config.clone(),
        None => hf_config_json(model.config()),
    };
    config["torch_dtype"] = json!(dtype_name);
    if config.get("dtype").is_some() {
        config["dtype"] = json!(dtype_name); // transformers 5's name for it
    }
    if multimodal.is_none() {
        for (key, value) in tokenizer.special_token_ids() {
            config[key] = value;
        }
    }
    write_json(&dir.join("config.json"), &config)?;
    files.push("config.json".into());
    files.extend(tokenizer.write_into(dir)?);
    staged.commit()?;
    Ok(HfWritten { files, tensors: tensors.len(), bytes: total })
}

/// For the text model of a multimodal model, the source directory's other tensors (vision tower,
/// projector) and its config, which the output carries unchanged beside the merged text weights.
fn multimodal_source(model: &Model, opts: &HfOptions) -> Result<Option<(SafetensorsDir, serde_json::Value)>> {
    if !model.config().language_model {
        return Ok(None);
    }
    let dir = opts.source.as_deref().ok_or_else(|| {
        Error::Export("the model is the text of a multimodal model: its HF directory must be given (HfOptions::source) for the vision tower".into())
    })?;
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("reading", &path, e))?;
    let config = serde_json::from_str(&text).map_err(|e| Error::Json { path: path.clone(), source: e })?;
    Ok(Some((SafetensorsDir::open(dir, &candle_core::Device::Cpu)?, config)))
}

/// Groups tensors (in order) into shards of at most `max` bytes; a tensor larger than `max` gets
/// a shard of its own.
fn plan_shards(tensors: &[(String, Tensor)], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut size = 0u64;
    for (i, (_, t)) in tensors.iter().enumerate() {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        if size + bytes > max && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(i);
        size += bytes;
    }
    shards.push(current);
    shards
}

/// An [`Error::Export`] naming the tensor if any value is NaN or infinite.
pub fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        let first = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(Error::Export(format!(
            "tensor `{name}` has {bad} non-finite values (first at flat index {first}) after conversion to {:?}; nothing was written",
            t.dtype()
        )));
    }
    Ok(())
}

/// Writes one safetensors file with metadata `{"format": "pt"}`, streamed to disk and synced;
/// returns its tensor bytes.
pub(crate) fn write_safetensors(path: &Path, tensors: &[&(String, Tensor)]) -> Result<u64> {
    let data: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), t.dims().to_vec(), st_dtype(t.dtype())?, le_bytes(t)?)))
        .collect::<Result<_>>()?;
    let views = data
        .iter()
        .map(|(name, shape, dt, bytes)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
                .map_err(|e| Error::Export(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(metadata), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => Error::io("writing", path, io),
        other => Error::Export(format!("serialising {}: {other}", path.display())),
    })?;
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io("syncing", path, e))?;
    Ok(data.iter().map(|d| d.3.len() as u64).sum())
}

fn st_dtype(dt: DType) -> Result<safetensors::Dtype> {
    Ok(match dt {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        other => return Err(Error::Export(format!("no safetensors writer for {other:?}"))),
    })
}

/// The tensor's values as little-endian bytes in its own dtype.
fn le_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => return Err(Error::Export(format!("no byte writer for {other:?}"))),
    })
}

/// Pretty JSON into a new synced file.
fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Json { path: PathBuf::from(path), source: e })?;
    write_synced(path, format!("{text}\n").as_bytes())
}

/// `rope_scaling` as config.json writes it (`null` for none).
fn rope_scaling_json(scaling: &RopeScaling) -> serde_json::Value {
    match scaling {
        // Factors: refused by write_hf_model.
        RopeScaling::None | RopeScaling::Factors(_) => serde_json::Value::Null,
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": *original_max_position_embeddings as usize,
        }),
        RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, attention_factor } => {
            json!({
                "rope_type": "longrope", "short_factor": short_factor, "long_factor": long_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
                "attention_factor": attention_factor,
            })
        }
    }
}

/// The HF `config.json` for a configuration.
pub fn hf_config_json(cfg: &ModelConfig) -> serde_json::Value {
    let arch = match cfg.family {
        Family::Llama => "LlamaForCausalLM",
        Family::Mistral => "MistralForCausalLM",
        Family::Qwen2 => "Qwen2ForCausalLM",
        Family::Qwen3 => "Qwen3ForCausalLM",
        Family::Gemma2 => "Gemma2ForCausalLM",
        Family::Gemma3 => "Gemma3ForCausalLM",
        Family::Phi3 => "Phi3ForCausalLM",
    };
    let rope_scaling = rope_scaling_json(&cfg.rope_scaling);
    let mut v = json!({
        "architectures": [arch],
        "model_type": cfg.family.name(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.activation.hf_name(),
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
    });
    if cfg.family != Family::Qwen2 {
        v["attention_bias"] = json!(cfg.qkv_bias);
        v["mlp_bias"] = json!(cfg.mlp_bias);
    }
    let kind = |&s: &bool| if s { "sliding_attention" } else { "full_attention" };
    let layer_types = json!(cfg.sliding_layers.iter().map(kind).collect::<Vec<_>>());
    match cfg.family {
        Family::Mistral => v["sliding_window"] = json!(cfg.sliding_window),
        Family::Qwen2 | Family::Qwen3 => {
            v["use_sliding_window"] = json!(cfg.sliding_window.is_some());
            v["sliding_window"] = json!(cfg.sliding_window);
            v["layer_types"] = layer_types;
        }
        Family::Gemma2 | Family::Gemma3 => {
            v["hidden_activation"] = json!(cfg.activation.hf_name());
            // q from the scale q^-1/2; configs carry integers (transformers types it `int`).
            let q = cfg.attn_scale.powi(-2);
            v["query_pre_attn_scalar"] = if (q - q.round()).abs() < 1e-6 { json!(q.round() as i64) } else { json!(q) };
            v["sliding_window"] = json!(cfg.sliding_window);
            v["layer_types"] = layer_types;
            v["final_logit_softcapping"] = json!(cfg.final_softcap);
            if cfg.family == Family::Gemma2 {
                v["attn_logit_softcapping"] = json!(cfg.attn_softcap);
            } else {
                let rope = |theta: f32, scaling: &RopeScaling| {
                    let mut r = rope_scaling_json(scaling);
                    if r.is_null() {
                        r = json!({"rope_type": "default"});
                    }
                    r["rope_theta"] = json!(theta);
                    r
                };
                let (local_theta, local_scaling) =
                    cfg.sliding_rope.clone().unwrap_or((cfg.rope_theta, cfg.rope_scaling.clone()));
                v["rope_parameters"] = json!({
                    "full_attention": rope(cfg.rope_theta, &cfg.rope_scaling),
                    "sliding_attention": rope(local_theta, &local_scaling),
                });
                if let Some(m) = v.as_object_mut() {
                    m.remove("rope_theta");
                    m.remove("rope_scaling");
                }
            }
        }
        Family::Phi3 => {
            v["sliding_window"] = json!(cfg.sliding_window);
            v["partial_rotary_factor"] = json!(cfg.rotary_dim as f64 / cfg.head_dim as f64);
            if let RopeScaling::LongRope { original_max_position_embeddings, .. } = &cfg.rope_scaling {
                v["original_max_position_embeddings"] = json!(original_max_position_embeddings);
            }
        }
        Family::Llama => {}
    }
    v
}

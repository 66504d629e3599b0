//! Writing a model back out as an HF directory (`config.json` + `model.safetensors`), in HF
//! layout and f32. Written to a temporary directory beside the target and renamed into place.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::json;

use super::config::ModelConfig;
use super::transformer::Model;
use crate::ops::RopeScaling;
use crate::{Error, Result};

impl Model {
    /// Every weight under its HF name, dense f32 (quantized weights dequantised).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_weight().to_dense()?)];
        for (l, b) in self.blocks().iter().enumerate() {
            let p = format!("model.layers.{l}");
            let (n1, n2) = b.norms();
            out.push((format!("{p}.input_layernorm.weight"), n1.clone()));
            out.push((format!("{p}.post_attention_layernorm.weight"), n2.clone()));
            for (name, proj) in b.named_projections() {
                out.push((format!("{p}.{name}.weight"), proj.base().weight().to_dense()?));
                if let Some(bias) = proj.base().bias() {
                    out.push((format!("{p}.{name}.bias"), bias.clone()));
                }
            }
        }
        out.push(("model.norm.weight".into(), self.final_norm().clone()));
        if !self.config().tie_word_embeddings {
            out.push(("lm_head.weight".into(), self.head_weight().to_dense()?));
        }
        Ok(out)
    }
}

/// The HF `config.json` for a configuration.
pub fn hf_config_json(cfg: &ModelConfig) -> serde_json::Value {
    let arch = match cfg.family {
        super::Family::Llama => "LlamaForCausalLM",
        super::Family::Mistral => "MistralForCausalLM",
        super::Family::Qwen2 => "Qwen2ForCausalLM",
    };
    let rope_scaling = match &cfg.rope_scaling {
        RopeScaling::None | RopeScaling::Factors(_) => serde_json::Value::Null,
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": *original_max_position_embeddings as usize,
        }),
    };
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
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
    });
    let o = v.as_object_mut().expect("json! object");
    if cfg.family != super::Family::Qwen2 {
        o.insert("attention_bias".into(), json!(cfg.qkv_bias));
        o.insert("mlp_bias".into(), json!(cfg.mlp_bias));
    }
    if cfg.family == super::Family::Mistral {
        o.insert("sliding_window".into(), json!(cfg.sliding_window));
    }
    v
}

/// Writes `config.json` and `model.safetensors` for `model` into the new directory `out`.
pub fn write_hf_dir(model: &Model, out: &Path) -> Result<()> {
    if out.exists() {
        return Err(Error::io("creating", out, std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists")));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempdir_in(parent)?;
    let written = write_files(model, &tmp).and_then(|_| std::fs::rename(&tmp, out).map_err(|e| Error::io("renaming into", out, e)));
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

fn write_files(model: &Model, dir: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = model.named_weights()?.into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let path = dir.join("config.json");
    let cfg = serde_json::to_string_pretty(&hf_config_json(model.config())).map_err(|e| Error::Json { path: path.clone(), source: e })?;
    std::fs::write(&path, cfg).map_err(|e| Error::io("writing", &path, e))
}

fn tempdir_in(parent: &Path) -> Result<std::path::PathBuf> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let p = parent.join(format!(".lowrank-tmp-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&p).map_err(|e| Error::io("creating", &p, e))?;
    Ok(p)
}

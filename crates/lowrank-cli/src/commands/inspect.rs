//! `lowrank inspect`: what a model or adapter holds, without loading the weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{quantized::gguf_file::Value, Device};
use clap::Args;
use lowrank::adapter::{AdapterConfig, ModuleSelector};
use lowrank::formats::SafetensorsDir;
use lowrank::model::{detect_format, GgufFile, ModelConfig, ModelFormat};

use super::common::model_path;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// HF model directory, .gguf file or PEFT adapter directory [default: the default model]
    path: Option<PathBuf>,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let path = model_path(args.path.as_deref())?;
    if path.join("adapter_config.json").exists() {
        return adapter(&path).with_context(|| format!("inspecting adapter {}", path.display()));
    }
    match detect_format(&path)? {
        ModelFormat::HfDir => hf_model(&path),
        ModelFormat::Gguf => gguf(&path),
    }
    .with_context(|| format!("inspecting {}", path.display()))
}

fn print_config(cfg: &ModelConfig) {
    if cfg.language_model {
        println!(
            "family: {} (the text model of a multimodal checkpoint; its vision tower is not run)",
            cfg.family.name()
        );
    } else {
        println!("family: {}", cfg.family.name());
    }
    println!("layers: {}", cfg.num_layers);
    println!("hidden size: {}", cfg.hidden_size);
    println!("intermediate size: {}", cfg.intermediate_size);
    println!("attention heads: {} (kv heads {}, head dim {})", cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    println!("vocab size: {}", cfg.vocab_size);
    println!("context length: {}", cfg.max_position_embeddings);
    println!("rope: theta {} scaling {:?}", cfg.rope_theta, cfg.rope_scaling);
    println!("tied embeddings: {}", cfg.tie_word_embeddings);
    println!("biases: qkv {} o {} mlp {}", cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias);
    if let Some(w) = cfg.sliding_window {
        println!("sliding window: {w}");
    }
}

fn print_dtypes(counts: &BTreeMap<String, (usize, usize)>) {
    let total: usize = counts.values().map(|(_, n)| n).sum();
    println!("parameters: {total} ({:.1} M)", total as f64 / 1e6);
    for (dtype, (tensors, params)) in counts {
        println!("  {dtype}: {tensors} tensors, {params} parameters");
    }
}

fn hf_model(dir: &Path) -> Result<()> {
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let st = SafetensorsDir::open(dir, &Device::Cpu)?;
    println!("format: HF safetensors directory");
    print_config(&cfg);
    let mut counts = BTreeMap::<String, (usize, usize)>::new();
    for name in st.names() {
        if let Some((dtype, shape)) = st.info(&name) {
            let c = counts.entry(dtype).or_default();
            c.0 += 1;
            c.1 += shape.iter().product::<usize>();
        }
    }
    print_dtypes(&counts);
    println!("tokenizer.json: {}", dir.join("tokenizer.json").exists());
    let template = dir.join("chat_template.jinja").exists()
        || std::fs::read_to_string(dir.join("tokenizer_config.json")).is_ok_and(|t| t.contains("\"chat_template\""));
    println!("chat template: {template}");
    Ok(())
}

fn gguf(path: &Path) -> Result<()> {
    let mut g = GgufFile::open(path, &Device::Cpu, false)?;
    let md = g.metadata();
    let text = |k: &str| match md.get(k) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    println!("format: GGUF");
    if let Some(name) = text("general.name") {
        println!("name: {name}");
    }
    let is_adapter = text("general.type").as_deref() == Some("adapter");
    if is_adapter {
        println!("type: adapter ({})", text("adapter.type").unwrap_or_default());
        if let Some(a) = md.get("adapter.lora.alpha").and_then(|v| v.to_f32().ok()) {
            println!("lora alpha: {a}");
        }
    } else {
        println!("tokenizer: {}", text("tokenizer.ggml.model").unwrap_or_else(|| "none".into()));
        println!("chat template: {}", md.contains_key("tokenizer.chat_template"));
        print_config(&g.config()?);
    }
    let mut counts = BTreeMap::<String, (usize, usize)>::new();
    for (_, dtype, shape) in g.tensor_infos() {
        let c = counts.entry(format!("{dtype:?}").to_lowercase()).or_default();
        c.0 += 1;
        c.1 += shape.iter().product::<usize>();
    }
    print_dtypes(&counts);
    Ok(())
}

fn adapter(dir: &Path) -> Result<()> {
    let cfg = AdapterConfig::from_file(&dir.join("adapter_config.json"))?;
    println!("format: PEFT adapter directory");
    println!("peft type: {}", cfg.peft_type);
    println!("rank: {}  alpha: {}  rslora: {}  dora: {}", cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.use_dora);
    let targets = match &cfg.target_modules {
        Some(ModuleSelector::List(l)) => l.join(", "),
        Some(ModuleSelector::Pattern(p)) => p.clone(),
        None => "-".into(),
    };
    println!("target modules: {targets}");
    if !cfg.rank_pattern.is_empty() {
        println!("rank pattern: {:?}", cfg.rank_pattern);
    }
    if !cfg.alpha_pattern.is_empty() {
        println!("alpha pattern: {:?}", cfg.alpha_pattern);
    }
    if let Some(base) = &cfg.base_model_name_or_path {
        println!("base model: {base}");
    }
    let st = SafetensorsDir::open_files(&[dir.join("adapter_model.safetensors")], &Device::Cpu)?;
    let mut counts = BTreeMap::<String, (usize, usize)>::new();
    let mut modules = 0;
    for name in st.names() {
        if name.ends_with("lora_A.weight") {
            modules += 1;
        }
        if let Some((dtype, shape)) = st.info(&name) {
            let c = counts.entry(dtype).or_default();
            c.0 += 1;
            c.1 += shape.iter().product::<usize>();
        }
    }
    println!("adapted modules: {modules}");
    print_dtypes(&counts);
    Ok(())
}

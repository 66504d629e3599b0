//! `lowrank merge`: fold adapters into the base weights and write a plain model.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use candle_core::DType;
use clap::{Args, ValueEnum};
use lowrank::chat::ChatTemplate;
use lowrank::export::{gguf_metadata_for_hf, write_gguf_model, write_hf_model, HfOptions, TokenizerFiles};
use lowrank::model::{detect_format, GgufFile, LoadOptions, Model, ModelFormat};
use lowrank::staging::Existing;
use lowrank::tokenizer::Tokenizer;

use super::common::{load_adapters, mib, model_path, AdapterSpec};

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base model: an HF directory or a .gguf file [default: SmolLM2-135M-Instruct, fetched once]
    #[arg(long)]
    model: Option<PathBuf>,
    /// PEFT adapter directory, `DIR` or `DIR:WEIGHT`; repeat to merge several (none: a plain
    /// conversion of the base)
    #[arg(long = "adapter", value_name = "DIR[:WEIGHT]")]
    adapters: Vec<AdapterSpec>,
    /// The HF model directory (or, with --format gguf, the .gguf file) to write
    #[arg(long)]
    output: PathBuf,
    /// hf: a transformers model directory; gguf: a llama.cpp model file
    #[arg(long, value_enum, default_value_t = Format::Hf)]
    format: Format,
    /// Tensor type on disk (hf: f32, f16, bf16; gguf: also q8_0, q4_0 for the matrices)
    #[arg(long, value_enum, default_value_t = OutDType::F32)]
    dtype: OutDType,
    /// Largest safetensors shard (hf), e.g. `5GB`, `500MB`, `2GiB` or bytes
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    max_shard_size: u64,
    /// Check every merged tensor for NaN/inf (after conversion to --dtype) before writing
    #[arg(long)]
    safe: bool,
    /// Replace OUTPUT if it exists (the old one goes only once the new one is complete)
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Format {
    Hf,
    Gguf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OutDType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

pub fn run(args: MergeArgs) -> Result<()> {
    let MergeArgs { model, adapters, output, format, dtype, max_shard_size, safe, force } = args;
    let path = model_path(model.as_deref())?;
    let existing = if force { Existing::Replace } else { Existing::Refuse };
    if output.exists() && !force {
        bail!("{} already exists; choose a new path or pass --force to replace it", output.display());
    }
    // Settle the output type before any loading.
    let out = match (format, dtype) {
        (Format::Gguf, d) => Out::Gguf(match d {
            OutDType::F32 => GgmlDType::F32,
            OutDType::F16 => GgmlDType::F16,
            OutDType::Bf16 => GgmlDType::BF16,
            OutDType::Q8_0 => GgmlDType::Q8_0,
            OutDType::Q4_0 => GgmlDType::Q4_0,
        }),
        (Format::Hf, OutDType::F32) => Out::Hf(DType::F32),
        (Format::Hf, OutDType::F16) => Out::Hf(DType::F16),
        (Format::Hf, OutDType::Bf16) => Out::Hf(DType::BF16),
        (Format::Hf, other) => bail!("--dtype {other:?} is for --format gguf; an HF directory holds f32, f16 or bf16"),
    };
    let opts = LoadOptions { dequantize: true, ..Default::default() };
    let loading = || format!("loading model {}", path.display());
    // A GGUF base is opened once: its weights, and its metadata for the tokenizer or the output.
    let (mut model, gguf) = match detect_format(&path)? {
        ModelFormat::HfDir => (Model::from_path(&path, &opts).with_context(loading)?, None),
        ModelFormat::Gguf => {
            let mut g = GgufFile::open(&path, &opts.device, true).with_context(loading)?;
            let cfg = g.config().with_context(loading)?;
            (Model::load(cfg, &g, &opts.device).with_context(loading)?, Some(g))
        }
    };
    let active = load_adapters(&adapters, model.modules(), &opts.device)?;
    model.merge(&active).context("merging the adapters")?;
    for a in &active {
        eprintln!("merged {} (weight {}): {} modules", a.adapter.name, a.weight, a.adapter.num_layers());
        if a.adapter.vision_tensors_skipped > 0 {
            eprintln!(
                "note: {} also has {} tensors for the vision tower, which are not merged (lowrank runs the text \
                 model); the tower is written as in the base",
                a.adapter.name, a.adapter.vision_tensors_skipped
            );
        }
    }
    match out {
        Out::Gguf(ty) => {
            let metadata = match &gguf {
                Some(g) => g.metadata().clone(),
                None => gguf_metadata_for_hf(model.config(), &path)
                    .context("building GGUF metadata from the HF directory")?,
            };
            write_gguf_model(&model, &metadata, &output, ty, safe, existing)
                .with_context(|| format!("writing {}", output.display()))?;
            let size = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
            eprintln!("wrote {}: {:.1} MiB, matrices {ty:?}", output.display(), mib(size));
        }
        Out::Hf(dtype) => {
            let tokenizer = match &gguf {
                None => TokenizerFiles::from_hf_dir(&path)?,
                Some(g) => {
                    let tok = Tokenizer::from_gguf(g.metadata(), &path)?;
                    let chat = ChatTemplate::from_gguf(g.metadata(), &tok)?;
                    TokenizerFiles::from_tokenizer(&tok, chat.as_ref(), model.config().max_position_embeddings)?
                }
            };
            let source = gguf.is_none().then(|| path.clone());
            let hf = HfOptions { dtype, max_shard_bytes: max_shard_size, check_finite: safe, source };
            let written = write_hf_model(&model, &tokenizer, &output, &hf, existing)
                .with_context(|| format!("writing {}", output.display()))?;
            if !written.files.iter().any(|f| f == "tokenizer.json" || f == "tokenizer.model") {
                eprintln!("note: the base has no tokenizer files; {} holds weights and config only", output.display());
            }
            eprintln!(
                "wrote {}: {} tensors, {:.1} MiB of {dtype:?} weights; {}",
                output.display(),
                written.tensors,
                mib(written.bytes),
                written.files.join(", ")
            );
        }
    }
    Ok(())
}

/// The output, its form and tensor type settled.
enum Out {
    Hf(DType),
    Gguf(GgmlDType),
}

/// `5GB` (10⁹), `500MB`, `2GiB` (2³⁰), `100KB`, or a number of bytes.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a size like 5GB, 500MB or 2GiB"))?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit `{other}` (use B, KB, MB, GB, KiB, MiB or GiB)")),
    };
    let bytes = n * mult;
    if !(bytes >= 1.0 && bytes.is_finite()) {
        return Err(format!("`{s}` is not a positive size"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert!(parse_size("5XB").is_err() && parse_size("0").is_err() && parse_size("GB").is_err());
    }
}

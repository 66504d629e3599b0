//! `lowrank export`: a PEFT adapter as a llama.cpp LoRA GGUF, or a llama.cpp LoRA GGUF back as a
//! PEFT adapter directory.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use lowrank::adapter::Adapter;
use lowrank::model::{detect_format, GgufFile, LoadOptions, Model, ModelFormat};
use lowrank::staging::Existing;

use super::common::model_path;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The PEFT adapter directory to export
    #[arg(long, required_unless_present = "from_gguf", conflicts_with = "from_gguf")]
    adapter: Option<PathBuf>,
    /// Import instead: a llama.cpp LoRA GGUF to write out as a PEFT adapter directory
    #[arg(long, value_name = "FILE.gguf")]
    from_gguf: Option<PathBuf>,
    /// The base model the adapter belongs to (module shapes, heads, architecture)
    /// [default: SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output format of an export
    #[arg(long, value_enum, default_value_t = Format::Gguf)]
    format: Format,
    /// The file (export) or directory (import) to write
    #[arg(long)]
    output: PathBuf,
    /// Replace OUTPUT if it exists (only once the new one is complete)
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    /// A llama.cpp LoRA adapter (`llama-cli --lora FILE.gguf`)
    Gguf,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let ExportArgs { adapter, from_gguf, model, format: Format::Gguf, output, force } = args;
    if output.exists() && !force {
        bail!("{} already exists; choose a new path or pass --force to replace it", output.display());
    }
    let existing = if force { Existing::Replace } else { Existing::Refuse };
    let path = model_path(model.as_deref())?;
    let base = Model::from_path(&path, &LoadOptions::default())
        .with_context(|| format!("loading model {}", path.display()))?;
    match (adapter, from_gguf) {
        (Some(dir), None) => {
            // The architecture llama.cpp will see: the GGUF's own, or the converter's for the family.
            let arch = match detect_format(&path)? {
                ModelFormat::Gguf => GgufFile::open(&path, base.device(), false)?.architecture()?,
                ModelFormat::HfDir => base.config().family.gguf_architecture().to_string(),
            };
            let a = Adapter::load_peft(&super::common::local_or_hub(&dir)?, base.modules(), base.device())
                .with_context(|| format!("loading adapter {}", dir.display()))?;
            a.save_gguf(&output, base.modules(), base.config().heads(), &arch, existing)
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!("wrote {} ({arch}, {} modules, alpha {})", output.display(), a.num_layers(), a.config.lora_alpha);
        }
        (None, Some(file)) => {
            let a = Adapter::load_gguf(&file, base.modules(), base.config().heads(), base.device())
                .with_context(|| format!("reading {}", file.display()))?;
            a.save_peft_with(&output, base.modules(), existing)
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!("wrote {} (PEFT, r {}, {} modules)", output.display(), a.config.r, a.num_layers());
        }
        _ => bail!("give exactly one of --adapter (export) and --from-gguf (import)"),
    }
    Ok(())
}

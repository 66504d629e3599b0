//! `lowrank combine`: several weighted LoRA adapters into one (PEFT's `add_weighted_adapter`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use lowrank::adapter::{combine, CombineMethod};
use lowrank::model::{LoadOptions, Model};
use lowrank::staging::Existing;

use super::common::{load_adapters, model_path, AdapterSpec};

#[derive(Args, Debug)]
pub struct CombineArgs {
    /// The base model the adapters belong to (for module shapes) [default: SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// PEFT adapter directory, `DIR` or `DIR:WEIGHT`; repeat for each adapter
    #[arg(long = "adapter", value_name = "DIR[:WEIGHT]", required = true)]
    adapters: Vec<AdapterSpec>,
    /// linear: weighted sum of the factors (same ranks; approximate); cat: factors stacked (exact,
    /// rank = sum of ranks); svd: truncated SVD of the weighted sum of updates
    #[arg(long, value_enum, default_value_t = Method::Cat)]
    method: Method,
    /// Rank of the result for --method svd [default: the largest input rank]
    #[arg(long)]
    rank: Option<usize>,
    /// The PEFT adapter directory to write
    #[arg(long)]
    output: PathBuf,
    /// Replace OUTPUT if it exists (only once the new adapter is complete)
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Method {
    Linear,
    Cat,
    Svd,
}

pub fn run(args: CombineArgs) -> Result<()> {
    let CombineArgs { model, adapters, method, rank, output, force } = args;
    if rank.is_some() && !matches!(method, Method::Svd) {
        anyhow::bail!("--rank applies to --method svd only (linear keeps the common rank; cat adds the ranks)");
    }
    if output.exists() && !force {
        anyhow::bail!("{} already exists; choose a new path or pass --force to replace it", output.display());
    }
    let path = model_path(model.as_deref())?;
    let model = Model::from_path(&path, &LoadOptions::default()).with_context(|| format!("loading model {}", path.display()))?;
    let active = load_adapters(&adapters, model.modules(), model.device())?;
    let inputs: Vec<_> = active.iter().map(|a| (a.adapter.as_ref(), a.weight)).collect();
    let label = format!("{method:?}").to_lowercase();
    let method = match method {
        Method::Linear => CombineMethod::Linear,
        Method::Cat => CombineMethod::Cat,
        Method::Svd => CombineMethod::Svd(rank),
    };
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "combined".into());
    let combined = combine(&inputs, method, model.modules(), &name)?;
    let existing = if force { Existing::Replace } else { Existing::Refuse };
    combined.save_peft_with(&output, model.modules(), existing).with_context(|| format!("writing {}", output.display()))?;
    eprintln!(
        "combined {} adapters ({label}) into {}: rank {}, {} modules, {} parameters",
        active.len(),
        output.display(),
        combined.config.r,
        combined.num_layers(),
        combined.num_parameters()
    );
    Ok(())
}

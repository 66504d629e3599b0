//! `lowrank combine`: several weighted LoRA adapters into one (PEFT's `add_weighted_adapter`:
//! linear, cat, svd, ties, magnitude_prune).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use lowrank::adapter::{combine, CombineMethod, MajoritySign};
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
    /// rank = sum of ranks); svd: truncated SVD of the weighted sum of updates; ties and
    /// magnitude-prune: pruned factors merged (same ranks; --density)
    #[arg(long, value_enum, default_value_t = Method::Cat)]
    method: Method,
    /// Rank of the result for --method svd [default: the largest input rank]
    #[arg(long)]
    rank: Option<usize>,
    /// Fraction of each factor's entries kept by ties and magnitude-prune, in [0, 1]
    #[arg(long)]
    density: Option<f64>,
    /// How ties elects each entry's sign: from the sum of the values, or the count of signs
    #[arg(long, value_enum, default_value_t = Sign::Total)]
    majority_sign: Sign,
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
    Ties,
    MagnitudePrune,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Sign {
    Total,
    Frequency,
}

pub fn run(args: CombineArgs) -> Result<()> {
    let CombineArgs { model, adapters, method, rank, density, majority_sign, output, force } = args;
    if rank.is_some() && !matches!(method, Method::Svd) {
        anyhow::bail!("--rank applies to --method svd only (linear keeps the common rank; cat adds the ranks)");
    }
    let pruning = matches!(method, Method::Ties | Method::MagnitudePrune);
    let density = match (pruning, density) {
        (true, Some(d)) => d,
        (true, None) => {
            anyhow::bail!("--method ties and magnitude-prune need --density (the fraction of entries kept, e.g. 0.5)")
        }
        (false, Some(_)) => anyhow::bail!("--density applies to --method ties and magnitude-prune only"),
        (false, None) => 1.0,
    };
    if output.exists() && !force {
        anyhow::bail!("{} already exists; choose a new path or pass --force to replace it", output.display());
    }
    let path = model_path(model.as_deref())?;
    let model = Model::from_path(&path, &LoadOptions::default())
        .with_context(|| format!("loading model {}", path.display()))?;
    let active = load_adapters(&adapters, model.modules(), model.device())?;
    let inputs: Vec<_> = active.iter().map(|a| (a.adapter.as_ref(), a.weight)).collect();
    let sign = match majority_sign {
        Sign::Total => MajoritySign::Total,
        Sign::Frequency => MajoritySign::Frequency,
    };
    let method = match method {
        Method::Linear => CombineMethod::Linear,
        Method::Cat => CombineMethod::Cat,
        Method::Svd => CombineMethod::Svd(rank),
        Method::Ties => CombineMethod::Ties { density, sign },
        Method::MagnitudePrune => CombineMethod::MagnitudePrune { density },
    };
    let label = method.name();
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "combined".into());
    let combined = combine(&inputs, method, model.modules(), &name)?;
    let existing = if force { Existing::Replace } else { Existing::Refuse };
    combined
        .save_peft_with(&output, model.modules(), existing)
        .with_context(|| format!("writing {}", output.display()))?;
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

//! One file per subcommand; shared argument types in `common.rs`.

mod combine;
mod common;
mod example;
mod export;
mod generate;
mod inspect;
mod merge;
mod progress;
mod serve;
mod train;

use clap::{Parser, Subcommand};

/// LoRA adapters for transformer language models: generate, train, inspect, merge, combine, export, serve.
#[derive(Parser, Debug)]
#[command(name = "lowrank", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text with a model and optional adapters; only the text goes to stdout.
    Generate(generate::GenerateArgs),
    /// Train a LoRA adapter (with no --data: the shipped example task).
    Train(Box<train::TrainArgs>),
    /// Print what a model (HF dir or GGUF) or a PEFT adapter directory holds.
    Inspect(inspect::InspectArgs),
    /// Combine weighted LoRA adapters into one (linear, cat or svd, as PEFT's add_weighted_adapter).
    Combine(combine::CombineArgs),
    /// Serve the model and its adapters behind an OpenAI-compatible API, batching requests.
    Serve(Box<serve::ServeArgs>),
    /// A PEFT adapter as a llama.cpp LoRA GGUF (or, with --from-gguf, back).
    Export(export::ExportArgs),
    /// Fold adapters into the base weights and write a plain model (HF directory or GGUF file).
    Merge(merge::MergeArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Train(args) => train::run(*args),
        Command::Merge(args) => merge::run(args),
        Command::Combine(args) => combine::run(args),
        Command::Export(args) => export::run(args),
        Command::Serve(args) => serve::run(*args),
    }
}

/// A known fix for an error, if we have one.
pub fn hint(e: &anyhow::Error) -> Option<String> {
    e.chain().find_map(|c| {
        if let Some(lowrank_home::Error::Fetch(_)) = c.downcast_ref::<lowrank_home::Error>() {
            return Some("pass --model PATH to use a model you already have".into());
        }
        hint_for(c.downcast_ref::<lowrank::Error>()?)
    })
}

/// A known fix for a library error, if we have one.
fn hint_for(e: &lowrank::Error) -> Option<String> {
    use lowrank::Error;
    match e {
        Error::ShapeMismatch { .. } => {
            Some("the adapter was trained for a model of another size; check `lowrank inspect` on both".into())
        }
        Error::Adapter { message, .. } if message.contains("has no module") => {
            Some("the adapter targets modules this model does not have; was it trained on another architecture?".into())
        }
        Error::Safetensors { .. } => {
            Some("the file may be truncated or not safetensors; re-download or re-save it".into())
        }
        _ => None,
    }
}

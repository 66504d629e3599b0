//! The library in a few lines: load the default model and a PEFT adapter, and answer one chat
//! question with it, streamed as `lowrank generate --chat` does.
//!
//!   cargo run --release -p lowrank --example chat -- ADAPTER_DIR "Write May 11, 1980 as YYYY-MM-DD."

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use lowrank::adapter::{ActiveAdapter, Adapter};
use lowrank::bundle::ModelBundle;
use lowrank::chat::Message;
use lowrank::generate::{generate, GenerateOptions, SamplingParams};
use lowrank::model::LoadOptions;
use lowrank::Error;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(adapter_dir), Some(question)) = (args.next().map(PathBuf::from), args.next()) else {
        eprintln!("usage: chat ADAPTER_DIR QUESTION");
        std::process::exit(2);
    };
    // The model, its tokenizer and chat template (the default one, fetched once into
    // ~/.cache/lowrank by lowrank-home; any HF directory or GGUF file works).
    let bundle = ModelBundle::open(&lowrank_home::default_model_gguf()?, &LoadOptions::default())?;
    // The adapter, checked against the model's modules; it stays outside the model.
    let adapter = Adapter::load_peft(&adapter_dir, bundle.model.modules(), bundle.model.device())?;
    let active = [ActiveAdapter { adapter: Arc::new(adapter), weight: 1.0 }];
    // The ids generation starts from: the conversation rendered for the assistant's turn.
    let template = bundle.chat_template.as_ref().ok_or(Error::ChatTemplate("the model has no chat template".into()))?;
    let prompt = lowrank::prompt::chat_ids(&bundle.tokenizer, template, &[Message::new("user", question)])?;
    let options = GenerateOptions { max_new_tokens: 64, sampling: SamplingParams::greedy(), stop: Vec::new() };
    let mut out = std::io::stdout();
    generate(&bundle.model, &bundle.tokenizer, &active, &prompt, &options, |text| {
        out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| Error::io("writing", "stdout", e))
    })?;
    println!();
    Ok(())
}

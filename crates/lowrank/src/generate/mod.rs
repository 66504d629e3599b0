//! Text generation: prefill, then one token at a time through the KV cache, sampling, stop at
//! EOS / stop strings / length, text streamed as it becomes final.
//!
//! Layout: `sequence.rs` is the per-sequence state and its rules ([`Sequence`]), which [`generate`]
//! (one sequence, streamed), `batch.rs` ([`greedy_batch`]) and the serving engine drive;
//! `sampling.rs` picks a token from logits; `stop.rs` finds stop strings in streamed text.

mod batch;
pub mod sampling;
mod sequence;
pub mod stop;

use std::time::Instant;

pub use batch::greedy_batch;
pub use sampling::{Sampler, SamplingParams};
pub use sequence::{forward, Sequence, Step};
pub use stop::{StopResult, StopStrings};

use crate::adapter::ActiveAdapter;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::Result;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Upper bound on new tokens.
    pub max_new_tokens: usize,
    /// Sampling parameters (temperature 0 = greedy).
    pub sampling: SamplingParams,
    /// Generation ends when any of these strings appears (the string itself is not emitted).
    pub stop: Vec<String>,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop string.
    Stop,
    /// `max_new_tokens` or the model's context length.
    Length,
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// New token ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// The text emitted (stop string excluded).
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Seconds spent on the prompt (prefill, first token's logits).
    pub prefill_secs: f64,
    /// Seconds spent on the following tokens.
    pub decode_secs: f64,
}

/// Generates a continuation of `prompt` with `adapters` on `model`, calling `on_text` with each
/// piece of final text as soon as it is known.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    adapters: &[ActiveAdapter],
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    let mut seq = Sequence::new(model, tokenizer, adapters, prompt, opts)?;
    let mut text = String::new();
    let t0 = Instant::now();
    let mut prefill_secs = None;
    let finish = loop {
        if let Some(finish) = seq.finish() {
            break finish;
        }
        let logits = forward(model, &mut [&mut seq])?;
        prefill_secs.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        let step = seq.step(&logits[0])?;
        if !step.text.is_empty() {
            on_text(&step.text)?;
            text.push_str(&step.text);
        }
    };
    let prefill_secs = prefill_secs.unwrap_or(0.0);
    Ok(Generation {
        tokens: seq.tokens().to_vec(),
        text,
        finish,
        prompt_tokens: prompt.len(),
        prefill_secs,
        decode_secs: t0.elapsed().as_secs_f64() - prefill_secs,
    })
}

//! Text generation: prefill, then one token at a time through the KV cache, sampling, stop at
//! EOS / stop strings / length, text streamed as it becomes final.

mod batch;
pub mod sampling;
pub mod stop;

use std::time::Instant;

pub use batch::greedy_batch;
pub use sampling::{Sampler, SamplingParams};
pub use stop::{StopResult, StopStrings};

use crate::adapter::ActiveAdapter;
use crate::model::{Model, SeqInput};
use crate::tokenizer::{TextStream, Tokenizer};
use crate::{Error, Result};

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
    let ctx = model.config().max_position_embeddings;
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("the prompt is empty".into()));
    }
    if prompt.len() >= ctx {
        return Err(Error::InvalidArgument(format!(
            "the prompt has {} tokens; the model's context is {ctx}",
            prompt.len()
        )));
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let mut stops = StopStrings::new(opts.stop.clone());
    let mut stream = TextStream::new(tokenizer);
    let mut cache = [model.new_cache()];
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut emit = |piece: &str, text: &mut String| -> Result<()> {
        if !piece.is_empty() {
            text.push_str(piece);
            on_text(piece)?;
        }
        Ok(())
    };

    let t0 = Instant::now();
    let mut input: Vec<u32> = prompt.to_vec();
    let mut prefill_secs = 0.0;
    let finish = loop {
        if tokens.len() >= opts.max_new_tokens || cache[0].len() + input.len() > ctx {
            break FinishReason::Length;
        }
        let logits = model.forward_last(&[SeqInput { tokens: &input, adapters }], Some(&mut cache))?;
        let logits = logits.squeeze(0)?.to_vec1::<f32>()?;
        if tokens.is_empty() {
            prefill_secs = t0.elapsed().as_secs_f64();
        }
        let next = sampler.sample(&logits)?;
        if tokenizer.eos_token_ids().contains(&next) {
            break FinishReason::Eos;
        }
        tokens.push(next);
        let piece = stream.push(next)?;
        let r = stops.push(&piece);
        emit(&r.text, &mut text)?;
        if r.stopped {
            break FinishReason::Stop;
        }
        input = vec![next];
    };
    if finish != FinishReason::Stop {
        let tail = stream.finish()?;
        let r = stops.push(&tail);
        emit(&r.text, &mut text)?;
        if !r.stopped {
            emit(&stops.flush(), &mut text)?;
        }
    }
    Ok(Generation {
        tokens,
        text,
        finish,
        prompt_tokens: prompt.len(),
        prefill_secs,
        decode_secs: t0.elapsed().as_secs_f64() - prefill_secs,
    })
}

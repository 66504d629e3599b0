//! Greedy decoding of many prompts at once: one forward per step for every unfinished sequence,
//! each with its own KV cache (and, through its [`Sequence`], its own adapters).

use crate::adapter::ActiveAdapter;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::Result;

use super::{forward, GenerateOptions, SamplingParams, Sequence};

/// Greedy continuations of `prompts` (token ids), at most `max_new_tokens` each, each row stopping
/// at the tokenizer's eos or the model's context as [`Sequence`] does. Returns the new ids of each
/// row, eos excluded; an empty prompt gives an empty row.
pub fn greedy_batch(
    model: &Model,
    tokenizer: &Tokenizer,
    adapters: &[ActiveAdapter],
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    let options = GenerateOptions { max_new_tokens, sampling: SamplingParams::greedy(), stop: Vec::new() };
    let mut seqs: Vec<Option<Sequence>> = prompts
        .iter()
        .map(|p| (!p.is_empty()).then(|| Sequence::new(model, tokenizer, adapters, p, &options)).transpose())
        .collect::<Result<_>>()?;
    loop {
        let mut live: Vec<&mut Sequence> = seqs.iter_mut().flatten().filter(|s| s.finish().is_none()).collect();
        if live.is_empty() {
            break;
        }
        let logits = forward(model, &mut live)?;
        for (seq, row) in live.into_iter().zip(&logits) {
            seq.step(row)?;
        }
    }
    Ok(seqs.into_iter().map(|s| s.map(|s| s.tokens().to_vec()).unwrap_or_default()).collect())
}

//! Greedy decoding of many prompts at once: one forward per step for every unfinished sequence,
//! each with its own KV cache (and, through [`SeqInput`], its own adapters).

use crate::adapter::ActiveAdapter;
use crate::model::{Model, SeqInput};
use crate::Result;

/// Greedy continuations of `prompts` (token ids), at most `max_new_tokens` each, stopping a row
/// at any of `eos`. Returns the new ids of each row, EOS excluded.
pub fn greedy_batch(
    model: &Model,
    adapters: &[ActiveAdapter],
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos: &[u32],
) -> Result<Vec<Vec<u32>>> {
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
    let mut live: Vec<usize> = (0..prompts.len()).filter(|&i| !prompts[i].is_empty()).collect();
    for _ in 0..max_new_tokens {
        if live.is_empty() {
            break;
        }
        let seqs: Vec<SeqInput> = live.iter().map(|&i| SeqInput { tokens: &inputs[i], adapters }).collect();
        let mut live_caches: Vec<_> = live.iter().map(|&i| std::mem::take(&mut caches[i])).collect();
        let logits = model.forward_last(&seqs, Some(&mut live_caches))?; // [B, V]
        for (&i, c) in live.iter().zip(live_caches) {
            caches[i] = c;
        }
        let next = logits.argmax(1)?.to_vec1::<u32>()?;
        let mut still = Vec::with_capacity(live.len());
        for (&i, &t) in live.iter().zip(&next) {
            if eos.contains(&t) {
                continue;
            }
            out[i].push(t);
            inputs[i] = vec![t];
            if out[i].len() < max_new_tokens && caches[i].len() + 1 < model.config().max_position_embeddings {
                still.push(i);
            }
        }
        live = still;
    }
    Ok(out)
}

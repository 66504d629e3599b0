//! One forward and backward pass over a micro-batch of sequences.

use candle_core::backprop::GradStore;
use candle_core::Var;

use super::loss::chunked_cross_entropy;
use crate::adapter::ActiveAdapter;
use crate::model::{GradSink, Model, SeqInput};
use crate::Result;

/// A training sequence: token ids and, per token, whether it is a loss target (predicted from
/// the position before it).
#[derive(Clone, Copy, Debug)]
pub struct TrainSeq<'a> {
    /// Token ids.
    pub ids: &'a [u32],
    /// `targets[t]`: token `t` is predicted and scored.
    pub targets: &'a [bool],
}

/// Loss (mean over the micro-batch's target tokens, times `scale`), target count, gradients.
pub struct StepOutput {
    /// Scaled mean loss.
    pub loss: f64,
    /// Target tokens in the micro-batch.
    pub targets: usize,
    /// Tokens processed.
    pub tokens: usize,
    /// Gradients of every variable that took part.
    pub grads: GradStore,
}

/// Next-token targets of the flattened rows: row `t` of a sequence predicts `ids[t + 1]`.
pub fn row_targets(seqs: &[TrainSeq]) -> Vec<Option<u32>> {
    let mut out = Vec::new();
    for s in seqs {
        for t in 0..s.ids.len() {
            out.push((t + 1 < s.ids.len() && s.targets[t + 1]).then(|| s.ids[t + 1]));
        }
    }
    out
}

/// Forward through `model` with `adapters`, chunked cross-entropy, backward. With
/// `checkpoint_every = k > 0`, every k-th block's activations are recomputed in the backward
/// instead of kept (1: all blocks).
pub fn forward_backward(
    model: &Model,
    adapters: &[ActiveAdapter],
    seqs: &[TrainSeq],
    loss_chunk: usize,
    scale: f64,
    checkpoint_every: usize,
) -> Result<StepOutput> {
    let inputs: Vec<SeqInput> = seqs.iter().map(|s| SeqInput { tokens: s.ids, adapters }).collect();
    let sink = (checkpoint_every > 0).then(GradSink::new);
    let hidden = match &sink {
        Some(sink) => model.forward_checkpointed(&inputs, sink, checkpoint_every)?,
        None => model.forward(&inputs, None)?,
    }; // [N, H]
    let targets = row_targets(seqs);
    let out = chunked_cross_entropy(&hidden, model.output_head(), &targets, loss_chunk, scale)?;
    let mut grads = out.surrogate.backward()?;
    if let Some(sink) = sink {
        sink.merge_into(&mut grads)?;
    }
    Ok(StepOutput { loss: out.loss, targets: out.targets, tokens: targets.len(), grads })
}

/// The gradients of `vars` (zeros for a variable the graph did not reach).
pub fn collect_grads(grads: &GradStore, vars: &[Var]) -> Result<Vec<candle_core::Tensor>> {
    vars.iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => Ok(v.zeros_like()?),
        })
        .collect()
}

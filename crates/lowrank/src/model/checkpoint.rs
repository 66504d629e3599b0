//! Gradient checkpointing per block: the forward keeps only each block's input, and the backward
//! runs the block again (same dropout masks: they are a function of the micro-step and module)
//! to get its activations, one block at a time.
//!
//! A checkpointed block is one graph node whose backward differentiates the recomputed block.
//! A node can hand back only the gradient of its input, so the gradients of the block's adapter
//! variables go to a [`GradSink`] that the training step merges into the outer gradients.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, TensorId, Var};

use super::block::{Block, BlockCtx, SeqSpan};
use super::projection::AdapterRun;
use crate::adapter::ActiveAdapter;
use crate::Result;

/// Adapter gradients computed inside checkpointed blocks during one backward pass.
#[derive(Default)]
pub struct GradSink(Mutex<Option<GradStore>>);

impl GradSink {
    /// A new, empty sink.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn absorb(&self, grads: GradStore) -> candle_core::Result<()> {
        let mut g = self.0.lock().map_err(|_| candle_core::Error::Msg("gradient sink poisoned".into()))?;
        match g.as_mut() {
            Some(all) => all.extend(grads)?,
            None => *g = Some(grads),
        }
        Ok(())
    }

    /// Adds what the sink collected into `grads` (and empties the sink).
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        let taken = self.0.lock().map_err(|_| crate::Error::Training("gradient sink poisoned".into()))?.take();
        if let Some(inner) = taken {
            grads.extend(inner)?;
        }
        Ok(())
    }
}

/// `x: [N, H] -> [N, H]` through `block` as one checkpointed node.
pub fn checkpointed(block: &Block, x: &Tensor, ctx: &BlockCtx, sink: &Arc<GradSink>) -> Result<Tensor> {
    let runs: Vec<(Range<usize>, Vec<ActiveAdapter>)> =
        ctx.runs.iter().map(|r| (r.rows.clone(), r.adapters.to_vec())).collect();
    // The adapter variables of this block: the only inner gradients worth keeping.
    let mut vars = Vec::new();
    for p in block.projections() {
        for (_, adapters) in &runs {
            for a in adapters {
                if let Some(layer) = a.adapter.layer(p.id()) {
                    vars.extend(layer.tensors().into_iter().filter(|(_, t)| t.is_variable()).map(|(_, t)| t.id()));
                }
            }
        }
    }
    let op = Checkpoint {
        block: block.clone(),
        cos: ctx.cos.clone(),
        sin: ctx.sin.clone(),
        sliding: ctx.sliding.clone(),
        spans: ctx.spans.to_vec(),
        runs,
        vars,
        sink: sink.clone(),
    };
    // The node must be on the gradient path even when its input is not (the embeddings): a
    // variable input makes it so.
    let x = if x.is_variable() || x.track_op() {
        x.contiguous()?
    } else {
        Var::from_tensor(&x.contiguous()?)?.as_tensor().clone()
    };
    Ok(x.apply_op1_arc(Arc::new(Box::new(op)))?)
}

struct Checkpoint {
    block: Block,
    cos: Tensor,
    sin: Tensor,
    sliding: Option<(Tensor, Tensor)>,
    spans: Vec<SeqSpan>,
    runs: Vec<(Range<usize>, Vec<ActiveAdapter>)>,
    vars: Vec<TensorId>,
    sink: Arc<GradSink>,
}

impl Checkpoint {
    fn run(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let runs: Vec<AdapterRun> =
            self.runs.iter().map(|(rows, adapters)| AdapterRun { rows: rows.clone(), adapters }).collect();
        let ctx = BlockCtx {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            sliding: self.sliding.clone(),
            spans: &self.spans,
            runs: &runs,
        };
        self.block.forward(x, &ctx, None).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((o, e)) = l.contiguous_offsets() else {
            candle_core::bail!("checkpointed block: the input is not contiguous")
        };
        let x = Tensor::from_slice(&s.as_slice::<f32>()?[o..e], l.shape(), &candle_core::Device::Cpu)?;
        // The graph built by this forward is dropped with `y`: nothing but the input is kept.
        let y = self.run(&x)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let xv = Var::from_tensor(&x.detach())?;
        let y = self.run(xv.as_tensor())?;
        let mut grads = (y * dy.detach())?.sum_all()?.backward()?;
        let dx = grads.remove(xv.as_tensor());
        let mut kept = GradStore::default();
        for id in &self.vars {
            if let Some(g) = grads.get_id(*id) {
                kept.insert_id(*id, g.clone());
            }
        }
        self.sink.absorb(kept)?;
        Ok(dx)
    }
}

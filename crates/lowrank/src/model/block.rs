//! The one transformer block shared by every family: pre-norm attention and a gated MLP, with the
//! family's switches from [`ModelConfig`] (q/k norms, Gemma's norms after attention and around
//! the MLP, the activation, how scores are scaled, capped and windowed, which RoPE).

use candle_core::Tensor;

use super::cache::KvCache;
use super::config::ModelConfig;
use super::projection::{AdapterRun, LinearFactory, Projection};
use super::weights::{norm_checked, WeightSource};
use crate::ops::{apply_rope, causal_attention, glu, rms_norm, rotary_causal_attention, Activation, Scores, Segment};
use crate::Result;

/// Where each sequence sits in the flattened batch.
#[derive(Clone, Copy, Debug)]
pub struct SeqSpan {
    /// First row in `[N, ·]`.
    pub start: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Tokens already in the cache (position of the first new token).
    pub past: usize,
}

/// What every block needs besides its input: rotary tables, sequence layout, adapter runs.
pub struct BlockCtx<'a> {
    /// `[N, 1, D/2]` cosines of each row's position.
    pub cos: Tensor,
    /// `[N, 1, D/2]` sines.
    pub sin: Tensor,
    /// The sliding-window layers' own `(cos, sin)` where their RoPE differs (Gemma 3).
    pub sliding: Option<(Tensor, Tensor)>,
    /// Each sequence's rows.
    pub spans: &'a [SeqSpan],
    /// Adapter selection by rows.
    pub runs: &'a [AdapterRun<'a>],
}

/// A block's RMSNorm multipliers. For Gemma they are `1 + w` of the HF weight `w` (as llama.cpp's
/// converter stores them), so every family normalises as `x / rms(x) ⊙ weight`.
#[derive(Clone, Debug)]
struct Norms {
    /// `input_layernorm: [H]`, before attention.
    input: Tensor,
    /// Before the MLP: `post_attention_layernorm` (Gemma: `pre_feedforward_layernorm`).
    pre_mlp: Tensor,
    /// Gemma: `post_attention_layernorm` on the attention output and `post_feedforward_layernorm`
    /// on the MLP output, each before its residual add.
    sandwich: Option<(Tensor, Tensor)>,
    /// `self_attn.q_norm` and `self_attn.k_norm: [D]`, on each head before RoPE (Qwen3, Gemma 3).
    qk: Option<(Tensor, Tensor)>,
}

/// The projections into attention: three, or one fused `qkv_proj` whose output rows are q, then
/// k, then v (Phi-3; PEFT adapts it as one module).
#[derive(Clone, Debug)]
enum QkvProj {
    Split { q: Projection, k: Projection, v: Projection },
    Fused(Projection),
}

/// The projections into the MLP: two, or one fused `gate_up_proj` whose output rows are the gate,
/// then up (Phi-3).
#[derive(Clone, Debug)]
enum GateUpProj {
    Split { gate: Projection, up: Projection },
    Fused(Projection),
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct Block {
    layer: usize,
    norms: Norms,
    qkv: QkvProj,
    o: Projection,
    gate_up: GateUpProj,
    down: Projection,
    eps: f64,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    activation: Activation,
    scores: Scores,
    /// Uses [`BlockCtx::sliding`]'s rotary tables.
    sliding_rope: bool,
}

impl Block {
    /// Loads block `layer` through the factory.
    pub fn load(cfg: &ModelConfig, layer: usize, src: &dyn WeightSource, f: &mut LinearFactory) -> Result<Self> {
        let p = format!("{}.layers.{layer}", cfg.module_root());
        let (h, d, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        let l = Some(layer);
        let norm =
            |name: &str, len: usize| norm_checked(src, &format!("{p}.{name}.weight"), len, cfg.family.is_gemma());
        let gemma = cfg.family.is_gemma();
        let norms = Norms {
            input: norm("input_layernorm", h)?,
            pre_mlp: norm(if gemma { "pre_feedforward_layernorm" } else { "post_attention_layernorm" }, h)?,
            sandwich: if gemma {
                Some((norm("post_attention_layernorm", h)?, norm("post_feedforward_layernorm", h)?))
            } else {
                None
            },
            qk: if cfg.qk_norm { Some((norm("self_attn.q_norm", d)?, norm("self_attn.k_norm", d)?)) } else { None },
        };
        let qkv = if cfg.fused_projections {
            QkvProj::Fused(f.linear(&format!("{p}.self_attn.qkv_proj"), l, h, qd + 2 * kvd, cfg.qkv_bias)?)
        } else {
            QkvProj::Split {
                q: f.linear(&format!("{p}.self_attn.q_proj"), l, h, qd, cfg.qkv_bias)?,
                k: f.linear(&format!("{p}.self_attn.k_proj"), l, h, kvd, cfg.qkv_bias)?,
                v: f.linear(&format!("{p}.self_attn.v_proj"), l, h, kvd, cfg.qkv_bias)?,
            }
        };
        let o = f.linear(&format!("{p}.self_attn.o_proj"), l, qd, h, cfg.o_bias)?;
        let gate_up = if cfg.fused_projections {
            GateUpProj::Fused(f.linear(&format!("{p}.mlp.gate_up_proj"), l, h, 2 * i, cfg.mlp_bias)?)
        } else {
            GateUpProj::Split {
                gate: f.linear(&format!("{p}.mlp.gate_proj"), l, h, i, cfg.mlp_bias)?,
                up: f.linear(&format!("{p}.mlp.up_proj"), l, h, i, cfg.mlp_bias)?,
            }
        };
        Ok(Self {
            layer,
            norms,
            qkv,
            o,
            gate_up,
            down: f.linear(&format!("{p}.mlp.down_proj"), l, i, h, cfg.mlp_bias)?,
            eps: cfg.rms_norm_eps,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: d,
            activation: cfg.activation,
            scores: cfg.scores(layer),
            sliding_rope: cfg.sliding_rope.is_some() && cfg.is_sliding(layer),
        })
    }

    /// `(HF module path suffix, projection)` for every projection of the block, in load order.
    pub fn named_projections(&self) -> Vec<(&'static str, &Projection)> {
        let mut out = match &self.qkv {
            QkvProj::Split { q, k, v } => {
                vec![("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v)]
            }
            QkvProj::Fused(qkv) => vec![("self_attn.qkv_proj", qkv)],
        };
        out.push(("self_attn.o_proj", &self.o));
        match &self.gate_up {
            GateUpProj::Split { gate, up } => out.extend([("mlp.gate_proj", gate), ("mlp.up_proj", up)]),
            GateUpProj::Fused(gate_up) => out.push(("mlp.gate_up_proj", gate_up)),
        }
        out.push(("mlp.down_proj", &self.down));
        out
    }

    /// Every projection of the block.
    pub fn projections(&self) -> Vec<&Projection> {
        self.named_projections().into_iter().map(|(_, p)| p).collect()
    }

    /// Every projection of the block, to change its frozen weight.
    pub(crate) fn projections_mut(&mut self) -> Vec<&mut Projection> {
        let mut out: Vec<&mut Projection> = match &mut self.qkv {
            QkvProj::Split { q, k, v } => vec![q, k, v],
            QkvProj::Fused(qkv) => vec![qkv],
        };
        out.push(&mut self.o);
        match &mut self.gate_up {
            GateUpProj::Split { gate, up } => out.extend([gate, up]),
            GateUpProj::Fused(gate_up) => out.push(gate_up),
        }
        out.push(&mut self.down);
        out
    }

    /// `(HF name suffix, multiplier)` for every norm of the block, e.g. `("input_layernorm", [H])`
    /// (for Gemma the multiplier is `1 + w` of the HF weight `w`).
    pub fn named_norms(&self) -> Vec<(&'static str, &Tensor)> {
        let n = &self.norms;
        let mut out = vec![("input_layernorm", &n.input)];
        match &n.sandwich {
            Some((post_attn, post_mlp)) => out.extend([
                ("post_attention_layernorm", post_attn),
                ("pre_feedforward_layernorm", &n.pre_mlp),
                ("post_feedforward_layernorm", post_mlp),
            ]),
            None => out.push(("post_attention_layernorm", &n.pre_mlp)),
        }
        if let Some((q, k)) = &n.qk {
            out.extend([("self_attn.q_norm", q), ("self_attn.k_norm", k)]);
        }
        out
    }

    /// `x: [N, H] -> [N, H]`.
    pub fn forward(&self, x: &Tensor, ctx: &BlockCtx, caches: Option<&mut [KvCache]>) -> Result<Tensor> {
        let post = |t: Tensor, which: fn(&(Tensor, Tensor)) -> &Tensor| match &self.norms.sandwich {
            Some(pair) => rms_norm(&t, which(pair), self.eps),
            None => Ok(t),
        };
        let h = rms_norm(x, &self.norms.input, self.eps)?;
        let attn = self.o.forward(&self.attention(&h, ctx, caches)?, ctx.runs)?;
        let x = (x + post(attn, |p| &p.0)?)?;
        let h = rms_norm(&x, &self.norms.pre_mlp, self.eps)?;
        let (gate, up) = match &self.gate_up {
            GateUpProj::Split { gate, up } => (gate.forward(&h, ctx.runs)?, up.forward(&h, ctx.runs)?),
            GateUpProj::Fused(gate_up) => {
                let y = gate_up.forward(&h, ctx.runs)?; // [N, 2I]
                let i = y.dim(1)? / 2;
                (y.narrow(1, 0, i)?.contiguous()?, y.narrow(1, i, i)?.contiguous()?)
            }
        };
        let mlp = self.down.forward(&glu(&gate, &up, self.activation)?, ctx.runs)?;
        Ok((x + post(mlp, |p| &p.1)?)?)
    }

    /// `h: [N, H] -> [N, heads·D]`, causal attention within each sequence.
    fn attention(&self, h: &Tensor, ctx: &BlockCtx, caches: Option<&mut [KvCache]>) -> Result<Tensor> {
        let n = h.dim(0)?;
        let d = self.head_dim;
        let (qd, kvd) = (self.heads * d, self.kv_heads * d);
        let (q, k, v) = match &self.qkv {
            QkvProj::Split { q, k, v } => (q.forward(h, ctx.runs)?, k.forward(h, ctx.runs)?, v.forward(h, ctx.runs)?),
            QkvProj::Fused(qkv) => {
                let y = qkv.forward(h, ctx.runs)?; // [N, qd + 2·kvd]
                (y.narrow(1, 0, qd)?, y.narrow(1, qd, kvd)?, y.narrow(1, qd + kvd, kvd)?)
            }
        };
        let q = q.contiguous()?.reshape((n, self.heads, d))?;
        let k = k.contiguous()?.reshape((n, self.kv_heads, d))?;
        let v = v.contiguous()?.reshape((n, self.kv_heads, d))?;
        let (q, k) = match &self.norms.qk {
            Some((qn, kn)) => (rms_norm(&q, qn, self.eps)?, rms_norm(&k, kn, self.eps)?),
            None => (q, k),
        };
        let (cos, sin) = match &ctx.sliding {
            Some((cos, sin)) if self.sliding_rope => (cos, sin),
            _ => (&ctx.cos, &ctx.sin),
        };
        let o = match caches {
            // Every sequence attends to its own new rows: one call for the whole batch, which
            // rotates q and k itself (the graph keeps them once).
            None => {
                let segs: Vec<Segment> = ctx
                    .spans
                    .iter()
                    .map(|s| Segment { q_start: s.start, q_len: s.len, k_start: s.start, k_len: s.len })
                    .collect();
                rotary_causal_attention(&q, &k, &v, (cos, sin), &segs, self.scores)?
                // [N, heads, D]
            }
            // Each sequence's keys are its cache (rotated) plus its new rows.
            Some(caches) => {
                let (q, k) = (apply_rope(&q, cos, sin)?, apply_rope(&k, cos, sin)?);
                let mut outs = Vec::with_capacity(ctx.spans.len());
                for (span, cache) in ctx.spans.iter().zip(caches.iter_mut()) {
                    let rows = |t: &Tensor| t.narrow(0, span.start, span.len);
                    let (ks, vs) = cache.append(self.layer, &rows(&k)?, &rows(&v)?)?; // [S, kv, D]
                    let seg = Segment { q_start: 0, q_len: span.len, k_start: 0, k_len: ks.dim(0)? };
                    outs.push(causal_attention(&rows(&q)?, &ks, &vs, &[seg], self.scores)?);
                    // [T, heads, D]
                }
                Tensor::cat(&outs, 0)?
            }
        };
        Ok(o.reshape((n, self.heads * d))?)
    }
}

//! The one transformer block (pre-norm attention + SwiGLU MLP) shared by every family.

use candle_core::Tensor;

use super::cache::KvCache;
use super::config::ModelConfig;
use super::projection::{AdapterRun, LinearFactory, Projection};
use super::weights::{dense_checked, WeightSource};
use crate::ops::{apply_rope, rms_norm, softmax_last_dim};
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
    /// Each sequence's rows.
    pub spans: &'a [SeqSpan],
    /// Adapter selection by rows.
    pub runs: &'a [AdapterRun<'a>],
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct Block {
    layer: usize,
    input_norm: Tensor,
    post_norm: Tensor,
    q: Projection,
    k: Projection,
    v: Projection,
    o: Projection,
    gate: Projection,
    up: Projection,
    down: Projection,
    eps: f64,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
}

impl Block {
    /// Loads block `layer` through the factory.
    pub fn load(cfg: &ModelConfig, layer: usize, src: &dyn WeightSource, f: &mut LinearFactory) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        let (h, d, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        let l = Some(layer);
        Ok(Self {
            layer,
            input_norm: dense_checked(src, &format!("{p}.input_layernorm.weight"), &[h])?,
            post_norm: dense_checked(src, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
            q: f.linear(&format!("{p}.self_attn.q_proj"), l, h, qd, cfg.qkv_bias)?,
            k: f.linear(&format!("{p}.self_attn.k_proj"), l, h, kvd, cfg.qkv_bias)?,
            v: f.linear(&format!("{p}.self_attn.v_proj"), l, h, kvd, cfg.qkv_bias)?,
            o: f.linear(&format!("{p}.self_attn.o_proj"), l, qd, h, cfg.o_bias)?,
            gate: f.linear(&format!("{p}.mlp.gate_proj"), l, h, i, cfg.mlp_bias)?,
            up: f.linear(&format!("{p}.mlp.up_proj"), l, h, i, cfg.mlp_bias)?,
            down: f.linear(&format!("{p}.mlp.down_proj"), l, i, h, cfg.mlp_bias)?,
            eps: cfg.rms_norm_eps,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: d,
            sliding_window: cfg.sliding_window,
        })
    }

    /// `(HF module path suffix, projection)` for every projection of the block.
    pub fn named_projections(&self) -> [(&'static str, &Projection); 7] {
        [
            ("self_attn.q_proj", &self.q),
            ("self_attn.k_proj", &self.k),
            ("self_attn.v_proj", &self.v),
            ("self_attn.o_proj", &self.o),
            ("mlp.gate_proj", &self.gate),
            ("mlp.up_proj", &self.up),
            ("mlp.down_proj", &self.down),
        ]
    }

    /// The two norm weights: `(input_layernorm, post_attention_layernorm)`.
    pub fn norms(&self) -> (&Tensor, &Tensor) {
        (&self.input_norm, &self.post_norm)
    }

    /// Every projection of the block.
    pub fn projections(&self) -> [&Projection; 7] {
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down]
    }

    /// `x: [N, H] -> [N, H]`.
    pub fn forward(&self, x: &Tensor, ctx: &BlockCtx, caches: Option<&mut [KvCache]>) -> Result<Tensor> {
        let h = rms_norm(x, &self.input_norm, self.eps)?;
        let attn = self.attention(&h, ctx, caches)?;
        let x = (x + self.o.forward(&attn, ctx.runs)?)?;
        let h = rms_norm(&x, &self.post_norm, self.eps)?;
        let gate = self.gate.forward(&h, ctx.runs)?.silu()?;
        let up = self.up.forward(&h, ctx.runs)?;
        let mlp = self.down.forward(&(gate * up)?, ctx.runs)?;
        Ok((x + mlp)?)
    }

    /// `h: [N, H] -> [N, heads·D]`, causal attention within each sequence.
    fn attention(&self, h: &Tensor, ctx: &BlockCtx, mut caches: Option<&mut [KvCache]>) -> Result<Tensor> {
        let n = h.dim(0)?;
        let d = self.head_dim;
        let q = self.q.forward(h, ctx.runs)?.reshape((n, self.heads, d))?;
        let k = self.k.forward(h, ctx.runs)?.reshape((n, self.kv_heads, d))?;
        let v = self.v.forward(h, ctx.runs)?.reshape((n, self.kv_heads, d))?;
        let q = apply_rope(&q, &ctx.cos, &ctx.sin)?;
        let k = apply_rope(&k, &ctx.cos, &ctx.sin)?;
        let mut outs = Vec::with_capacity(ctx.spans.len());
        for (i, span) in ctx.spans.iter().enumerate() {
            let rows = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, span.start, span.len)?.transpose(0, 1)?.contiguous()?) };
            let (qs, ks, vs) = (rows(&q)?, rows(&k)?, rows(&v)?); // [heads, T, D], [kv, T, D]
            let (ks, vs) = match caches.as_deref_mut() {
                Some(c) => c[i].append(self.layer, &ks, &vs)?, // [kv, S, D]
                None => (ks, vs),
            };
            let o = self.attend(&qs, &ks, &vs, span.past)?; // [heads, T, D]
            outs.push(o.transpose(0, 1)?.reshape((span.len, self.heads * d))?);
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// `q: [heads, T, D]`, `k, v: [kv, S, D]` -> `[heads, T, D]`; query `t` sits at `past + t`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, past: usize) -> Result<Tensor> {
        let (t, d) = (q.dim(1)?, self.head_dim);
        let s = k.dim(1)?;
        let groups = self.heads / self.kv_heads;
        // Query heads sharing a kv head sit next to each other: [kv, groups·T, D].
        let q = q.reshape((self.kv_heads, groups * t, d))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?; // [kv, groups·T, S]
        let scores = match self.mask(t, s, past, q.device())? {
            Some(m) => scores.reshape((self.kv_heads, groups, t, s))?.broadcast_add(&m)?.reshape((self.kv_heads, groups * t, s))?,
            None => scores,
        };
        let p = softmax_last_dim(&scores)?;
        Ok(p.matmul(v)?.reshape((self.heads, t, d))?)
    }

    /// `[T, S]` additive mask (0 or -inf), `None` when every key is visible.
    fn mask(&self, t: usize, s: usize, past: usize, dev: &candle_core::Device) -> Result<Option<Tensor>> {
        let window = self.sliding_window.unwrap_or(usize::MAX);
        if t == 1 && s <= window {
            return Ok(None);
        }
        let mut m = vec![0f32; t * s];
        for i in 0..t {
            let pos = past + i;
            for j in 0..s {
                if j > pos || pos - j >= window {
                    m[i * s + j] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (t, s), dev)?))
    }
}


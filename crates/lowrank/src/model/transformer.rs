//! The decoder-only transformer: embeddings, blocks, final norm, output head.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::block::{Block, BlockCtx, SeqSpan};
use super::cache::KvCache;
use super::checkpoint::{checkpointed, GradSink};
use super::config::ModelConfig;
use super::projection::{AdapterRun, LinearFactory, Projection};
use super::weights::{matrix_checked, norm_checked, WeightSource};
use crate::adapter::ActiveAdapter;
use crate::module_table::ModuleTable;
use crate::ops::{rms_norm, FrozenLinear, RopeTable};
use crate::weights::FrozenWeight;
use crate::{Error, Result};

/// One sequence of a batch: its new tokens and the adapters its rows use.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    /// Token ids to process (the continuation of whatever its cache holds).
    pub tokens: &'a [u32],
    /// Adapters with weights (empty: the base model).
    pub adapters: &'a [ActiveAdapter],
}

/// A loaded model in HF layout.
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    embed: FrozenWeight,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: FrozenLinear,
    rope: RopeTable,
    /// The sliding-window layers' RoPE where it is not `rope` (Gemma 3).
    sliding_rope: Option<RopeTable>,
    modules: ModuleTable,
    device: Device,
}

impl Model {
    /// Builds the model from a weight source (HF names and layout).
    pub fn load(config: ModelConfig, src: &dyn WeightSource, device: &Device) -> Result<Self> {
        let (v, h) = (config.vocab_size, config.hidden_size);
        let root = config.module_root();
        let embed = matrix_checked(src, &format!("{root}.embed_tokens.weight"), v, h)?;
        let mut factory = LinearFactory::new(src);
        let blocks =
            (0..config.num_layers).map(|l| Block::load(&config, l, src, &mut factory)).collect::<Result<Vec<_>>>()?;
        let norm = norm_checked(src, &format!("{root}.norm.weight"), h, config.family.is_gemma())?;
        let head = if config.tie_word_embeddings {
            embed.clone()
        } else if src.contains("lm_head.weight") {
            matrix_checked(src, "lm_head.weight", v, h)?
        } else {
            return Err(Error::MissingWeight {
                name: "lm_head.weight".into(),
                source_desc: format!("{} (config says the embeddings are not tied)", src.describe()),
            });
        };
        let rope = RopeTable::new(config.rotary_dim, config.rope_theta, &config.rope_scaling)?;
        let sliding_rope = match &config.sliding_rope {
            Some((theta, scaling)) => Some(RopeTable::new(config.rotary_dim, *theta, scaling)?),
            None => None,
        };
        Ok(Self {
            embed,
            blocks,
            norm,
            lm_head: FrozenLinear::new(head, None),
            rope,
            sliding_rope,
            modules: factory.finish(),
            device: device.clone(),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Every adaptable projection.
    pub fn modules(&self) -> &ModuleTable {
        &self.modules
    }

    /// The blocks.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// The projection with module id `id` (see [`Model::modules`]).
    pub fn projection(&self, id: usize) -> Option<&Projection> {
        self.blocks.iter().flat_map(|b| b.projections()).find(|p| p.id() == id)
    }

    /// The blocks, to change their frozen weights (merging).
    pub(crate) fn blocks_mut(&mut self) -> &mut [Block] {
        &mut self.blocks
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The embedding matrix `[V, H]`.
    pub fn embed_weight(&self) -> &FrozenWeight {
        &self.embed
    }

    /// The output head matrix `[V, H]` (the embedding when tied).
    pub fn head_weight(&self) -> &FrozenWeight {
        self.lm_head.weight()
    }

    /// The output head (frozen).
    pub fn head(&self) -> &FrozenLinear {
        &self.lm_head
    }

    /// The final norm weight `[H]`.
    pub fn final_norm(&self) -> &Tensor {
        &self.norm
    }

    /// A fresh cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers)
    }

    /// Bytes held by the weights.
    pub fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut n = self.embed.size_in_bytes() + t(&self.norm);
        if !self.config.tie_word_embeddings {
            n += self.lm_head.weight().size_in_bytes();
        }
        for b in &self.blocks {
            for p in b.projections() {
                n += p.base().weight().size_in_bytes() + p.base().bias().map_or(0, t);
            }
        }
        n + self.blocks.iter().flat_map(|b| b.named_norms()).map(|(_, w)| t(w)).sum::<usize>()
    }

    /// Runs `seqs` (flattened into `N` rows) through the blocks and the final norm.
    /// With `caches` (one per sequence) positions continue from each cache and the new keys and
    /// values are appended; without, every sequence starts at position 0.
    /// Returns the hidden states `[N, H]`.
    pub fn forward(&self, seqs: &[SeqInput], caches: Option<&mut [KvCache]>) -> Result<Tensor> {
        self.forward_inner(seqs, caches, None)
    }

    /// [`Model::forward`] for training with gradient checkpointing: every `every`-th block (the
    /// first included) is one graph node that keeps only its input and recomputes itself in the
    /// backward pass; the adapter gradients computed there go to `sink` (see
    /// [`GradSink::merge_into`]).
    pub fn forward_checkpointed(&self, seqs: &[SeqInput], sink: &Arc<GradSink>, every: usize) -> Result<Tensor> {
        self.forward_inner(seqs, None, Some((sink, every.max(1))))
    }

    fn forward_inner(
        &self,
        seqs: &[SeqInput],
        mut caches: Option<&mut [KvCache]>,
        checkpoint: Option<(&Arc<GradSink>, usize)>,
    ) -> Result<Tensor> {
        if let Some(c) = caches.as_deref() {
            if c.len() != seqs.len() {
                return Err(Error::Batch(format!("{} sequences but {} caches", seqs.len(), c.len())));
            }
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(Error::Batch(format!("sequence {i} has no tokens")));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                return Err(Error::Batch(format!(
                    "token id {bad} is outside the vocabulary ({})",
                    self.config.vocab_size
                )));
            }
            let past = caches.as_deref().map_or(0, |c| c[i].len());
            spans.push(SeqSpan { start: ids.len(), len: s.tokens.len(), past });
            positions.extend(past..past + s.tokens.len());
            ids.extend_from_slice(s.tokens);
        }
        let runs = adapter_runs(seqs, &spans);
        let n = ids.len();
        let ids = Tensor::from_vec(ids, n, &self.device)?;
        let mut x = match &self.embed {
            FrozenWeight::Dense(w) => w.embedding(&ids)?.to_dtype(DType::F32)?,
            FrozenWeight::Quant(q) => q.embedding(&ids)?.to_dtype(DType::F32)?,
            FrozenWeight::Nf4(q) => q.dequantize(&self.device)?.embedding(&ids)?,
        }; // [N, H]
        if self.config.family.is_gemma() {
            // transformers: the embedding times √H, the factor rounded to the embedding's dtype.
            x = (x * (self.config.hidden_size as f64).sqrt() as f32 as f64)?;
        }
        // Each row's sequence length so far: LongRoPE picks its frequencies by it.
        let lengths: Vec<usize> = spans.iter().flat_map(|s| std::iter::repeat_n(s.past + s.len, s.len)).collect();
        let (cos, sin) = self.rope.cos_sin(&positions, &lengths, &self.device)?;
        let sliding = self.sliding_rope.as_ref().map(|r| r.cos_sin(&positions, &lengths, &self.device)).transpose()?;
        let ctx = BlockCtx { cos, sin, sliding, spans: &spans, runs: &runs };
        for (i, block) in self.blocks.iter().enumerate() {
            x = match checkpoint {
                Some((sink, every)) if i % every == 0 => checkpointed(block, &x, &ctx, sink)?,
                _ => block.forward(&x, &ctx, caches.as_deref_mut())?,
            };
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// `hidden: [N, H] -> logits [N, V]` (soft-capped where the model caps them).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.output_head().logits(hidden)
    }

    /// The output head with its soft cap, as the loss uses it.
    pub fn output_head(&self) -> OutputHead<'_> {
        OutputHead { linear: &self.lm_head, softcap: self.config.final_softcap }
    }

    /// Logits of the last token of each sequence: `[B, V]`.
    pub fn forward_last(&self, seqs: &[SeqInput], caches: Option<&mut [KvCache]>) -> Result<Tensor> {
        let hidden = self.forward(seqs, caches)?;
        let mut last = Vec::with_capacity(seqs.len());
        let mut end = 0u32;
        for s in seqs {
            end += s.tokens.len() as u32;
            last.push(end - 1);
        }
        let idx = Tensor::from_vec(last, seqs.len(), &self.device)?;
        self.logits(&hidden.index_select(&idx, 0)?)
    }
}

/// The frozen output projection `[V, H]` and the cap `c` of `c · tanh(z / c)` on its logits
/// (Gemma's `final_logit_softcapping`).
#[derive(Clone, Copy, Debug)]
pub struct OutputHead<'a> {
    /// The projection (the embedding matrix when tied).
    pub linear: &'a FrozenLinear,
    /// The soft cap, if any.
    pub softcap: Option<f64>,
}

impl OutputHead<'_> {
    /// `hidden: [N, H] -> logits [N, V]`, capped.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let z = self.linear.forward(hidden)?;
        match self.softcap {
            Some(c) => Ok(((z / c)?.tanh()? * c)?),
            None => Ok(z),
        }
    }
}

/// Groups consecutive sequences with the same adapters into row runs.
fn adapter_runs<'a>(seqs: &[SeqInput<'a>], spans: &[SeqSpan]) -> Vec<AdapterRun<'a>> {
    let mut runs: Vec<AdapterRun<'a>> = Vec::new();
    for (s, span) in seqs.iter().zip(spans) {
        let rows = span.start..span.start + span.len;
        match runs.last_mut() {
            Some(r) if ActiveAdapter::same_set(r.adapters, s.adapters) => r.rows.end = rows.end,
            _ => runs.push(AdapterRun { rows, adapters: s.adapters }),
        }
    }
    runs
}

impl crate::adapter::Base for Model {
    fn modules(&self) -> &ModuleTable {
        Model::modules(self)
    }

    fn frozen(&self, id: usize) -> Option<&crate::ops::FrozenLinear> {
        self.projection(id).map(Projection::base)
    }

    fn device(&self) -> &Device {
        Model::device(self)
    }
}

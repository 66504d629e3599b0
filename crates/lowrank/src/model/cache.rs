//! Per-sequence key/value cache.

use candle_core::Tensor;

use crate::Result;

/// Keys and values of one sequence for every layer: `[S, kv_heads, D]` each.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for `num_layers` blocks.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], len: 0 }
    }

    /// Tokens already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k, v: [T, kv_heads, D]` to `layer` and returns the full `[S, kv_heads, D]`.
    /// The sequence length advances when the last layer is appended. The cache is for inference:
    /// it keeps values, never the autograd graph that made them (a trainable adapter would
    /// otherwise chain every decoding step's graph to the next).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = (k.detach(), v.detach());
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 0)?, Tensor::cat(&[&pv, &v], 0)?),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        if layer + 1 == self.layers.len() {
            self.len = k.dim(0)?;
        }
        Ok((k, v))
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.layers.iter().flatten().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum()
    }
}

//! Per-sequence key/value cache.

use candle_core::Tensor;

use crate::Result;

/// Tokens by which a layer's buffers grow at the least; they grow by a quarter when longer.
const GROW: usize = 64;

/// Keys and values of one sequence for every layer: `[S, kv_heads, D]` each.
///
/// Each layer keeps `[capacity, kv_heads, D]` buffers whose first `len` rows are filled; a step
/// writes its rows in place and hands out the filled rows as a view, so decoding a token copies
/// one row, not the whole cache (growing copies what is there, a quarter or 64 rows ahead).
/// Not `Clone`: two caches sharing buffers would write each other's rows.
#[derive(Debug, Default)]
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
        let (k, v) = (k.detach().contiguous()?, v.detach().contiguous()?);
        let (t, filled) = (k.dim(0)?, self.len);
        let need = filled + t;
        let buffers = match self.layers[layer].take() {
            Some((kb, vb)) if kb.dim(0)? >= need => (kb, vb),
            old => {
                let capacity = need.max(filled + filled / 4).next_multiple_of(GROW);
                let grown = |new: &Tensor, old: Option<&Tensor>| -> Result<Tensor> {
                    let mut dims = new.dims().to_vec();
                    dims[0] = capacity;
                    let buffer = Tensor::zeros(dims, new.dtype(), new.device())?;
                    if let Some(old) = old {
                        buffer.slice_set(&old.narrow(0, 0, filled)?, 0, 0)?;
                    }
                    Ok(buffer)
                };
                (grown(&k, old.as_ref().map(|o| &o.0))?, grown(&v, old.as_ref().map(|o| &o.1))?)
            }
        };
        buffers.0.slice_set(&k, 0, filled)?;
        buffers.1.slice_set(&v, 0, filled)?;
        let out = (buffers.0.narrow(0, 0, need)?, buffers.1.narrow(0, 0, need)?);
        self.layers[layer] = Some(buffers);
        if layer + 1 == self.layers.len() {
            self.len = need;
        }
        Ok(out)
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Bytes held, the unfilled capacity included.
    pub fn size_in_bytes(&self) -> usize {
        self.layers.iter().flatten().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Appends of every size, across growths, give what concatenating would, and a view handed
    /// out earlier keeps its values.
    #[test]
    fn appends_equal_concatenation_across_growths() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(2);
        let mut all: Option<Tensor> = None;
        let mut first_view = None;
        for (step, t) in [5, 1, 60, 1, 1, 100, 3].into_iter().enumerate() {
            let k = Tensor::randn(0f32, 1.0, (t, 2, 4), &dev)?;
            let v = (&k * 2.0)?;
            let mut got = None;
            for layer in 0..2 {
                got = Some(cache.append(layer, &k, &v)?);
            }
            let (ks, vs) = got.expect("two layers");
            let want = match all.take() {
                Some(a) => Tensor::cat(&[&a, &k], 0)?,
                None => k.clone(),
            };
            assert_eq!(cache.len(), want.dim(0)?, "step {step}");
            let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?) };
            assert_eq!(diff(&ks, &want)?, 0.0, "keys at step {step}");
            assert_eq!(diff(&vs, &(&want * 2.0)?)?, 0.0, "values at step {step}");
            let (view, at) = first_view.get_or_insert_with(|| (ks.clone(), ks.copy().expect("copy")));
            assert_eq!(diff(view, at)?, 0.0, "an earlier view changed at step {step}");
            all = Some(want);
        }
        assert!(cache.size_in_bytes() >= 2 * 2 * cache.len() * 8 * 4);
        cache.clear();
        assert!(cache.is_empty() && cache.size_in_bytes() == 0);
        Ok(())
    }
}

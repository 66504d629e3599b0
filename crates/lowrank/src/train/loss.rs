//! Next-token cross-entropy over the vocabulary in chunks of rows, so the `[tokens, V]` logits
//! matrix is never held whole.
//!
//! The loss and its gradient with respect to the hidden states are computed together, chunk by
//! chunk, outside the autograd graph (each chunk's logits are used once for the loss and once for
//! `dL/dh`, then dropped). The graph gets a surrogate `Σ h ⊙ stop_grad(dL/dh)` whose gradient
//! is exactly `dL/dh`, so one `backward()` carries it through the model to the adapters.

use candle_core::{DType, Tensor, D};

use crate::kernels::{exp, exp_shifted_into};
use crate::model::OutputHead;
use crate::{Error, Result};

/// At most this many bytes of f32 logits a chunk (fewer rows than asked when the vocabulary is
/// large): under glibc's 32 MiB ceiling for serving an allocation from the heap, so each chunk's
/// logits and their gradient reuse freed memory. 512 rows of the default model's 49k vocabulary
/// (96 MiB) were fresh mapped pages every chunk: ~125k page faults a step (most of the ~10% of
/// its CPU time spent in the kernel) and ~200 MiB more at the peak.
const LOGITS_BYTES: usize = 24 << 20;

/// Loss value and the tensor to call `backward()` on.
pub struct LossAndSurrogate {
    /// Mean cross-entropy over the target rows (scaled by `scale`).
    pub loss: f64,
    /// Number of target rows.
    pub targets: usize,
    /// Scalar whose gradient w.r.t. the hidden states is `d(loss)/dh`.
    pub surrogate: Tensor,
}

/// `hidden: [N, H]`, `targets[i]`: the token row `i` must predict (`None`: no loss there).
/// Returns `scale · mean_i CE(head(hidden_i), targets_i)` and its surrogate; `chunk` rows of
/// logits are materialised at a time.
pub fn chunked_cross_entropy(
    hidden: &Tensor,
    head: OutputHead,
    targets: &[Option<u32>],
    chunk: usize,
    scale: f64,
) -> Result<LossAndSurrogate> {
    chunked(hidden, head, targets, chunk, scale, true)
}

/// Sum of the cross-entropy over the target rows and their count, no gradient (evaluation).
pub fn cross_entropy_sum(
    hidden: &Tensor,
    head: OutputHead,
    targets: &[Option<u32>],
    chunk: usize,
) -> Result<(f64, usize)> {
    let out = chunked(hidden, head, targets, chunk, 1.0, false)?;
    Ok((out.loss * out.targets as f64, out.targets))
}

fn chunked(
    hidden: &Tensor,
    head: OutputHead,
    targets: &[Option<u32>],
    chunk: usize,
    scale: f64,
    with_grad: bool,
) -> Result<LossAndSurrogate> {
    let (n, _h) = hidden.dims2()?;
    if targets.len() != n {
        return Err(Error::Batch(format!("{} targets for {n} rows", targets.len())));
    }
    let rows: Vec<u32> = (0..n as u32).filter(|&i| targets[i as usize].is_some()).collect();
    let labels: Vec<u32> = targets.iter().flatten().copied().collect();
    let count = rows.len();
    if count == 0 {
        return Err(Error::Batch("the batch has no target tokens".into()));
    }
    let dev = hidden.device();
    let h = hidden.detach();
    let (vocab, _) = head.linear.weight().dims()?;
    let chunk = chunk.min(LOGITS_BYTES / (4 * vocab.max(1))).max(1);
    let mut loss = 0f64;
    let mut grads = Vec::new();
    for (rows_c, labels_c) in rows.chunks(chunk).zip(labels.chunks(chunk)) {
        let idx = Tensor::from_slice(rows_c, rows_c.len(), dev)?;
        let hc = h.index_select(&idx, 0)?; // [c, H]
        let z = head.logits(&hc)?; // [c, V]
        let (ce, gz) = ce_rows(&z, labels_c, (scale / count as f64) as f32, with_grad)?;
        loss += ce;
        if let Some(gz) = gz {
            // Through the cap z = c·tanh(u/c): du = dz ⊙ (1 − (z/c)²).
            let unscaled = match head.softcap {
                Some(c) => (gz.unscaled * (z / c)?.sqr()?.affine(-1.0, 1.0)?)?,
                None => gz.unscaled,
            };
            // [c, V] x [V, H] -> [c, H], each row scaled afterwards (H columns, not V).
            grads.push(head.linear.weight().input_grad(&unscaled)?.broadcast_mul(&gz.row_scale)?);
        }
    }
    if !with_grad {
        let surrogate = Tensor::zeros((), DType::F32, dev)?;
        return Ok(LossAndSurrogate { loss: scale * loss / count as f64, targets: count, surrogate });
    }
    let g_rows = Tensor::cat(&grads, 0)?; // [count, H]
    let all = Tensor::from_vec(rows, count, dev)?;
    let g = Tensor::zeros(hidden.shape(), DType::F32, dev)?.index_add(&all, &g_rows, 0)?; // [N, H]
    let surrogate = (hidden * g)?.sum_all()?;
    Ok(LossAndSurrogate { loss: scale * loss / count as f64, targets: count, surrogate })
}

/// The gradient of the loss with respect to a chunk's logits, `row_scale ⊙ unscaled`: the
/// per-row factor is applied after the `[c, V] x [V, H]` product, on `H` columns instead of `V`.
struct LogitGrad {
    /// `[c, V]`: `exp(z - max) - Σ exp(z - max) · onehot(label)`.
    unscaled: Tensor,
    /// `[c, 1]`: `gscale / Σ exp(z - max)`.
    row_scale: Tensor,
}

/// `z: [c, V]` logits, `labels: [c]`: `Σ CE(z_i, label_i)` and, with `with_grad`, its gradient
/// `gscale · (softmax(z) − onehot(labels))` as a [`LogitGrad`].
fn ce_rows(z: &Tensor, labels: &[u32], gscale: f32, with_grad: bool) -> Result<(f64, Option<LogitGrad>)> {
    let (c, v) = z.dims2()?;
    if labels.len() != c {
        return Err(Error::Batch(format!("{} labels for {c} rows of logits", labels.len())));
    }
    if labels.iter().any(|&l| l as usize >= v) {
        return Err(Error::Batch(format!("a target id is outside the vocabulary of {v}")));
    }
    if z.device().is_cpu() && z.dtype() == DType::F32 {
        return ce_rows_cpu(&z.contiguous()?, labels, gscale, with_grad);
    }
    ce_rows_tensor(z, labels, gscale, with_grad)
}

/// [`ce_rows`] from candle ops, for devices and dtypes without the CPU kernel.
fn ce_rows_tensor(z: &Tensor, labels: &[u32], gscale: f32, with_grad: bool) -> Result<(f64, Option<LogitGrad>)> {
    let (c, v) = z.dims2()?;
    let dev = z.device();
    let max = z.max_keepdim(D::Minus1)?;
    let e = z.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?; // [c, 1]
    let lab = Tensor::from_slice(labels, c, dev)?.unsqueeze(1)?;
    // CE = log Σ exp(z) - z_t
    let ce = ((sum.log()? + &max)? - z.gather(&lab, 1)?)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    if !with_grad {
        return Ok((ce, None));
    }
    let onehot =
        Tensor::zeros((c, v), DType::F32, dev)?.scatter_add(&lab, &Tensor::ones((c, 1), DType::F32, dev)?, 1)?;
    let unscaled = (e - onehot.broadcast_mul(&sum)?)?;
    let row_scale = (sum.recip()? * gscale as f64)?;
    Ok((ce, Some(LogitGrad { unscaled, row_scale })))
}

/// [`ce_rows`] with rows in parallel, two passes over each row of logits (max, then the
/// exponentials written straight into the gradient buffer, which is never zero-filled).
fn ce_rows_cpu(z: &Tensor, labels: &[u32], gscale: f32, with_grad: bool) -> Result<(f64, Option<LogitGrad>)> {
    use rayon::prelude::*;
    let (c, v) = z.dims2()?;
    let dev = z.device().clone();
    let (storage, layout) = z.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        return Err(Error::Batch("logits are not a contiguous CPU tensor".into()));
    };
    let z = &cpu.as_slice::<f32>()?[a..b];
    let row_max = |row: &[f32]| row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Per row: CE = log Σ exp(z - max) + max - z_t.
    if !with_grad {
        let ce: f64 = z
            .par_chunks_exact(v)
            .zip(labels.par_iter())
            .map_init(
                || Vec::with_capacity(v),
                |buf: &mut Vec<f32>, (row, &t)| {
                    let max = row_max(row);
                    let sum = exp_shifted_into(row, &mut buf.spare_capacity_mut()[..v], max);
                    (sum.ln() + max - row[t as usize]) as f64
                },
            )
            .collect::<Vec<_>>()
            .iter()
            .sum();
        return Ok((ce, None));
    }
    let mut g: Vec<f32> = Vec::with_capacity(c * v);
    let (ce, sums): (Vec<f64>, Vec<f32>) = g.spare_capacity_mut()[..c * v]
        .par_chunks_exact_mut(v)
        .zip(z.par_chunks_exact(v))
        .zip(labels.par_iter())
        .map(|((g, row), &t)| {
            let max = row_max(row);
            let sum = exp_shifted_into(row, g, max);
            let e_t = exp(row[t as usize] - max);
            g[t as usize].write(e_t - sum);
            ((sum.ln() + max - row[t as usize]) as f64, sum)
        })
        .unzip();
    // SAFETY: every row of the c·v elements was written by exp_shifted_into above.
    unsafe { g.set_len(c * v) };
    drop(storage);
    let row_scale: Vec<f32> = sums.iter().map(|s| gscale / s).collect();
    let grad = LogitGrad {
        unscaled: Tensor::from_vec(g, (c, v), &dev)?,
        row_scale: Tensor::from_vec(row_scale, (c, 1), &dev)?,
    };
    Ok((ce.iter().sum(), Some(grad))) // summed in row order: the same loss every run
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::FrozenLinear;
    use crate::weights::FrozenWeight;
    use candle_core::{Device, Var};

    #[test]
    fn matches_full_cross_entropy_and_its_gradient_with_and_without_a_soft_cap() -> Result<()> {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 8), &dev)?)?;
        let w = (Tensor::randn(0f32, 1.0, (11, 8), &dev)? * 3.0)?;
        let linear = FrozenLinear::new(FrozenWeight::Dense(w.clone()), None);
        let targets = [Some(3), None, Some(10), Some(0), None, Some(5), Some(5)];
        for softcap in [None, Some(4.0)] {
            let out = chunked_cross_entropy(h.as_tensor(), OutputHead { linear: &linear, softcap }, &targets, 2, 1.0)?;
            // Reference: full logits, capped by candle ops, candle's log_softmax, autograd.
            let rows: Vec<u32> = vec![0, 2, 3, 5, 6];
            let labels = Tensor::new(&[3u32, 10, 0, 5, 5], &dev)?;
            let mut z = h.as_tensor().index_select(&Tensor::new(rows.as_slice(), &dev)?, 0)?.matmul(&w.t()?)?;
            if let Some(c) = softcap {
                z = ((z / c)?.tanh()? * c)?;
            }
            let want = candle_nn::loss::cross_entropy(&z, &labels)?;
            let want_loss = want.to_scalar::<f32>()? as f64;
            assert!((out.loss - want_loss).abs() < 1e-5, "cap {softcap:?}: {} vs {want_loss}", out.loss);
            let g = out.surrogate.backward()?;
            let g_ref = want.backward()?;
            let d = (g.get(h.as_tensor()).unwrap() - g_ref.get(h.as_tensor()).unwrap())?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d < 1e-5, "cap {softcap:?}: grad differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn cpu_kernel_equals_composed_ops() -> Result<()> {
        let z = Tensor::randn(0f32, 4.0, (5, 300), &Device::Cpu)?;
        let labels = [0, 299, 17, 17, 150];
        let (ce, g) = ce_rows_cpu(&z, &labels, 0.3, true)?;
        let (ce_ref, g_ref) = ce_rows_tensor(&z, &labels, 0.3, true)?;
        assert!((ce - ce_ref).abs() < 1e-4, "{ce} vs {ce_ref}");
        let full = |g: LogitGrad| g.unscaled.broadcast_mul(&g.row_scale);
        let (g, g_ref) = (full(g.expect("gradient"))?, full(g_ref.expect("gradient"))?);
        let d = (g - g_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "gradients differ by {d}");
        assert!(matches!(ce_rows(&z, &[300], 1.0, false), Err(Error::Batch(_))), "label outside the vocabulary");
        Ok(())
    }
}

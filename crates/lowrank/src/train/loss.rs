//! Next-token cross-entropy over the vocabulary in chunks of rows, so the `[tokens, V]` logits
//! matrix is never held whole.
//!
//! The loss and its gradient with respect to the hidden states are computed together, chunk by
//! chunk, outside the autograd graph (each chunk's logits are used once for the loss and once for
//! `dL/dh`, then dropped). The graph gets a surrogate `Σ h ⊙ stop_grad(dL/dh)` whose gradient
//! is exactly `dL/dh`, so one `backward()` carries it through the model to the adapters.

use candle_core::{DType, Tensor, D};

use crate::ops::{exp_shifted, FrozenLinear};
use crate::{Error, Result};

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
pub fn chunked_cross_entropy(hidden: &Tensor, head: &FrozenLinear, targets: &[Option<u32>], chunk: usize, scale: f64) -> Result<LossAndSurrogate> {
    chunked(hidden, head, targets, chunk, scale, true)
}

/// Sum of the cross-entropy over the target rows and their count, no gradient (evaluation).
pub fn cross_entropy_sum(hidden: &Tensor, head: &FrozenLinear, targets: &[Option<u32>], chunk: usize) -> Result<(f64, usize)> {
    let out = chunked(hidden, head, targets, chunk, 1.0, false)?;
    Ok((out.loss * out.targets as f64, out.targets))
}

fn chunked(hidden: &Tensor, head: &FrozenLinear, targets: &[Option<u32>], chunk: usize, scale: f64, with_grad: bool) -> Result<LossAndSurrogate> {
    let (n, _h) = hidden.dims2()?;
    if targets.len() != n {
        return Err(Error::InvalidArgument(format!("{} targets for {n} rows", targets.len())));
    }
    let rows: Vec<u32> = (0..n as u32).filter(|&i| targets[i as usize].is_some()).collect();
    let labels: Vec<u32> = targets.iter().flatten().copied().collect();
    let count = rows.len();
    if count == 0 {
        return Err(Error::InvalidArgument("the batch has no target tokens".into()));
    }
    let dev = hidden.device();
    let h = hidden.detach();
    let mut loss = 0f64;
    let mut grads = Vec::new();
    for (rows_c, labels_c) in rows.chunks(chunk.max(1)).zip(labels.chunks(chunk.max(1))) {
        let idx = Tensor::from_slice(rows_c, rows_c.len(), dev)?;
        let hc = h.index_select(&idx, 0)?; // [c, H]
        let z = head.forward(&hc)?; // [c, V]
        let (ce, gz) = ce_rows(&z, labels_c, (scale / count as f64) as f32, with_grad)?;
        loss += ce;
        if let Some(gz) = gz {
            grads.push(head.weight().input_grad(&gz)?); // [c, V] x [V, H] -> [c, H]
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

/// `z: [c, V]` logits, `labels: [c]`: `Σ CE(z_i, label_i)` and, with `with_grad`,
/// `gscale · (softmax(z) − onehot(labels))`.
fn ce_rows(z: &Tensor, labels: &[u32], gscale: f32, with_grad: bool) -> Result<(f64, Option<Tensor>)> {
    let (c, v) = z.dims2()?;
    if labels.len() != c {
        return Err(Error::InvalidArgument(format!("{} labels for {c} rows of logits", labels.len())));
    }
    if labels.iter().any(|&l| l as usize >= v) {
        return Err(Error::InvalidArgument(format!("a target id is outside the vocabulary of {v}")));
    }
    if z.device().is_cpu() && z.dtype() == DType::F32 {
        return ce_rows_cpu(&z.contiguous()?, labels, gscale, with_grad);
    }
    ce_rows_tensor(z, labels, gscale, with_grad)
}

/// [`ce_rows`] from candle ops, for devices and dtypes without the CPU kernel.
fn ce_rows_tensor(z: &Tensor, labels: &[u32], gscale: f32, with_grad: bool) -> Result<(f64, Option<Tensor>)> {
    let (c, v) = z.dims2()?;
    let dev = z.device();
    let max = z.max_keepdim(D::Minus1)?;
    let e = z.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?; // [c, 1]
    let lab = Tensor::from_slice(labels, c, dev)?.unsqueeze(1)?;
    // CE = log Σ exp(z) - z_t
    let ce = ((sum.log()? + max)? - z.gather(&lab, 1)?)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    if !with_grad {
        return Ok((ce, None));
    }
    let onehot = Tensor::zeros((c, v), DType::F32, dev)?.scatter_add(&lab, &Tensor::ones((c, 1), DType::F32, dev)?, 1)?;
    Ok((ce, Some(((e.broadcast_div(&sum)? - onehot)? * gscale as f64)?)))
}

/// [`ce_rows`] in one pass over each row, rows in parallel: the `[c, V]` logits are read once
/// and the gradient is the only other `[c, V]` buffer.
fn ce_rows_cpu(z: &Tensor, labels: &[u32], gscale: f32, with_grad: bool) -> Result<(f64, Option<Tensor>)> {
    use rayon::prelude::*;
    let (c, v) = z.dims2()?;
    let dev = z.device().clone();
    let (storage, layout) = z.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        return Err(Error::InvalidArgument("logits are not a contiguous CPU tensor".into()));
    };
    let z = &cpu.as_slice::<f32>()?[a..b];
    let row_max = |row: &[f32]| row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Per row: CE = log Σ exp(z - max) + max - z_t, and the gradient
    // gscale · (exp(z - max) / Σ - onehot), the exponentials computed once, in the gradient row.
    if !with_grad {
        let ce: f64 = z.par_chunks_exact(v).zip(labels.par_iter()).map_init(|| vec![0f32; v], |buf, (row, &t)| {
            let max = row_max(row);
            buf.copy_from_slice(row);
            (exp_shifted(buf, max).ln() + max - row[t as usize]) as f64
        }).collect::<Vec<_>>().iter().sum();
        return Ok((ce, None));
    }
    let mut g = vec![0f32; c * v];
    let ce: f64 = g.par_chunks_exact_mut(v).zip(z.par_chunks_exact(v)).zip(labels.par_iter()).map(|((g, row), &t)| {
            let max = row_max(row);
            g.copy_from_slice(row);
            let sum = exp_shifted(g, max);
            let k = gscale / sum;
            g.iter_mut().for_each(|e| *e *= k);
            g[t as usize] -= gscale;
            (sum.ln() + max - row[t as usize]) as f64
        }).collect::<Vec<_>>().iter().sum(); // summed in row order: the same loss every run
    drop(storage);
    Ok((ce, Some(Tensor::from_vec(g, (c, v), &dev)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::FrozenWeight;
    use candle_core::{Device, Var};

    #[test]
    fn matches_full_cross_entropy_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 8), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (11, 8), &dev)?;
        let head = FrozenLinear::new(FrozenWeight::Dense(w.clone()), None);
        let targets = [Some(3), None, Some(10), Some(0), None, Some(5), Some(5)];
        let out = chunked_cross_entropy(h.as_tensor(), &head, &targets, 2, 1.0)?;
        // Reference: full logits, candle's log_softmax, autograd.
        let rows: Vec<u32> = vec![0, 2, 3, 5, 6];
        let labels = Tensor::new(&[3u32, 10, 0, 5, 5], &dev)?;
        let z = h.as_tensor().index_select(&Tensor::new(rows.as_slice(), &dev)?, 0)?.matmul(&w.t()?)?;
        let want = candle_nn::loss::cross_entropy(&z, &labels)?;
        let want_loss = want.to_scalar::<f32>()? as f64;
        assert!((out.loss - want_loss).abs() < 1e-5, "{} vs {want_loss}", out.loss);
        let g = out.surrogate.backward()?;
        let g_ref = want.backward()?;
        let d = (g.get(h.as_tensor()).unwrap() - g_ref.get(h.as_tensor()).unwrap())?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "grad differs by {d}");
        Ok(())
    }

    #[test]
    fn cpu_kernel_equals_composed_ops() -> Result<()> {
        let z = Tensor::randn(0f32, 4.0, (5, 300), &Device::Cpu)?;
        let labels = [0, 299, 17, 17, 150];
        let (ce, g) = ce_rows_cpu(&z, &labels, 0.3, true)?;
        let (ce_ref, g_ref) = ce_rows_tensor(&z, &labels, 0.3, true)?;
        assert!((ce - ce_ref).abs() < 1e-4, "{ce} vs {ce_ref}");
        let (g, g_ref) = (g.expect("gradient"), g_ref.expect("gradient"));
        let d = (g - g_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "gradients differ by {d}");
        assert!(matches!(ce_rows(&z, &[300], 1.0, false), Err(Error::InvalidArgument(_))), "label outside the vocabulary");
        Ok(())
    }
}

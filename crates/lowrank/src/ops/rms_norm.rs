//! RMSNorm with a backward: `y = x / sqrt(mean(x²) + eps) ⊙ w`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::kernels::stored;

use crate::Result;

/// `x: [N, H], w: [H] -> [N, H]`. The weight is frozen (no gradient); `x` gets one.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })?);
    }
    // Other devices: the same math from differentiable primitives.
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&r)?.broadcast_mul(w)?)
}

struct RmsNorm {
    eps: f64,
}

/// Rows per parallel task.
const ROWS: usize = 16;

/// `1 / sqrt(mean(x²) + eps)`.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((o1, e1)), Some((o2, e2))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("rms-norm: non-contiguous input")
        };
        let x = &s1.as_slice::<f32>()?[o1..e1];
        let w = &s2.as_slice::<f32>()?[o2..e2];
        let h = *l1.shape().dims().last().unwrap_or(&0);
        if h == 0 || w.len() != h {
            candle_core::bail!("rms-norm: hidden size {h} but weight has {}", w.len())
        }
        let eps = self.eps as f32;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h * ROWS).zip(x.par_chunks(h * ROWS)).for_each(|(dst, x)| {
            for (row, dst) in x.chunks_exact(h).zip(dst.chunks_exact_mut(h)) {
                let r = inv_rms(row, eps);
                for ((d, v), g) in dst.iter_mut().zip(row).zip(w) {
                    *d = v * r * g;
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Per row, r = 1/rms(x), x̂ = x r: dx = r (g⊙w − x̂ · mean(g⊙w⊙x̂)).
        let g = g.contiguous()?;
        let ((sx, lx), (sw, lw), (sg, lg)) = (x.storage_and_layout(), w.storage_and_layout(), g.storage_and_layout());
        let (xv, wv, gv) = (stored(&sx, lx)?, stored(&sw, lw)?, stored(&sg, lg)?);
        let h = wv.len();
        if h == 0 || xv.len() % h != 0 || gv.len() != xv.len() {
            candle_core::bail!("rms-norm backward: {} values, {} gradients, hidden size {h}", xv.len(), gv.len())
        }
        let eps = self.eps as f32;
        let mut dx = vec![0f32; xv.len()];
        dx.par_chunks_mut(h * ROWS).zip(xv.par_chunks(h * ROWS).zip(gv.par_chunks(h * ROWS))).for_each(
            |(dx, (x, g))| {
                for ((dx, x), g) in dx.chunks_exact_mut(h).zip(x.chunks_exact(h)).zip(g.chunks_exact(h)) {
                    let r = inv_rms(x, eps);
                    let proj = x.iter().zip(g).zip(wv).map(|((x, g), w)| g * w * x * r).sum::<f32>() / h as f32;
                    for (((d, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(wv) {
                        *d = r * (g * w - x * r * proj);
                    }
                }
            },
        );
        let dx = Tensor::from_vec(dx, lx.shape(), x.device())?;
        Ok((Some(dx), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn composed(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&r)?.broadcast_mul(w)
    }

    #[test]
    fn forward_and_backward_match_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (6, 16), &dev)?)?;
        let w = Tensor::randn(1f32, 0.3, 16, &dev)?;
        let up = Tensor::randn(0f32, 1.0, (6, 16), &dev)?;
        let y = rms_norm(x.as_tensor(), &w, 1e-5)?;
        let y_ref = composed(x.as_tensor(), &w, 1e-5)?;
        let d = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "forward differs by {d}");
        let g = (y * &up)?.sum_all()?.backward()?;
        let g_ref = (y_ref * &up)?.sum_all()?.backward()?;
        let (a, b) = (g.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap());
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "grad differs by {d}");
        Ok(())
    }
}

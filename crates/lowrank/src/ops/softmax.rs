//! Softmax over the last dimension with a backward.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};

use crate::Result;

/// `x: [..., S] -> [..., S]`, rows summing to 1. `-inf` entries get probability 0.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1(Softmax)?);
    }
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((o, e)) = l.contiguous_offsets() else { candle_core::bail!("softmax: non-contiguous input") };
        let x = &s.as_slice::<f32>()?[o..e];
        let n = *l.shape().dims().last().unwrap_or(&0);
        let mut out = vec![0f32; x.len()];
        if n > 0 {
            for (row, dst) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                dst.copy_from_slice(row);
                let inv = 1.0 / crate::kernels::exp_shifted(dst, max);
                dst.iter_mut().for_each(|d| *d *= inv);
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dx = y ⊙ (g - Σ g⊙y)
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * g.broadcast_sub(&dot)?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_composed_softmax_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (2, 3, 7), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (2, 3, 7), &dev)?;
        let y = softmax_last_dim(x.as_tensor())?;
        let y_ref = candle_nn::ops::softmax(x.as_tensor(), D::Minus1)?;
        let d = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "forward differs by {d}");
        let g = (y * &up)?.sum_all()?.backward()?;
        let g_ref = (y_ref * &up)?.sum_all()?.backward()?;
        let d = (g.get(x.as_tensor()).unwrap() - g_ref.get(x.as_tensor()).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "grad differs by {d}");
        Ok(())
    }
}

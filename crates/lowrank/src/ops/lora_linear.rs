//! A frozen linear with a low-rank bypass as one op: `y = x Wᵀ + s · (x Aᵀ) Bᵀ`.
//!
//! Composed from candle ops, a LoRA projection is six graph nodes (two matmuls, two transposes,
//! a scale, an add) whose backward allocates, zero-fills and sums an `[N, M]` gradient for each
//! side of the add. Here the bypass is accumulated into the base output buffer, and the backward
//! returns `dL/dx`, `dL/dA` and `dL/dB` directly — still none for `W`.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use crate::kernels::{gemm, Mat};
use crate::kernels::{stored, values};
use crate::weights::FrozenWeight;
use crate::{Error, Result};

/// The low-rank factors of a bypass: `A: [r, K]`, `B: [M, r]`, scale `s`.
#[derive(Clone, Copy, Debug)]
pub struct LowRank<'a> {
    /// `A: [r, K]`.
    pub a: &'a Tensor,
    /// `B: [M, r]`.
    pub b: &'a Tensor,
    /// `s`, the adapter's weight folded in.
    pub scale: f64,
}

/// `x: [N, K] -> [N, M]`: `x Wᵀ + s · x Aᵀ Bᵀ` (no bias). `None` when the fused kernel does not
/// apply (not CPU f32 dense or quantized-on-CPU); the caller composes it from ops then.
pub fn lora_linear(x: &Tensor, w: &FrozenWeight, lr: &LowRank) -> Result<Option<Tensor>> {
    let (m, k) = w.dims()?;
    let (n, kx) = x.dims2()?;
    let (r, ka) = lr.a.dims2()?;
    if kx != k || ka != k || lr.b.dims2()? != (m, r) {
        return Err(Error::Batch(format!(
            "low-rank linear: x {:?}, W [{m}, {k}], A {:?}, B {:?} do not fit",
            x.dims(),
            lr.a.dims(),
            lr.b.dims()
        )));
    }
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let dense_ok = match w {
        FrozenWeight::Dense(t) => cpu_f32(t) || (t.device().is_cpu() && t.dtype() == DType::BF16),
        FrozenWeight::Quant(q) => q.device().is_cpu(),
        FrozenWeight::Nf4(_) => true,
    };
    if !(dense_ok && cpu_f32(x) && cpu_f32(lr.a) && cpu_f32(lr.b)) || n == 0 {
        return Ok(None);
    }
    let op = LoraLinear { w: w.clone(), scale: lr.scale as f32 };
    Ok(Some(x.contiguous()?.apply_op3(&lr.a.contiguous()?, &lr.b.contiguous()?, op)?))
}

struct LoraLinear {
    w: FrozenWeight,
    scale: f32,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, a, b) = (values(sx, lx)?, values(sa, la)?, values(sb, lb)?);
        let (n, k) = lx.shape().dims2()?;
        let (m, r) = lb.shape().dims2()?;
        let mut y = self.w.xwt(x, n, crate::kernels::matmul_precision())?; // [n, m]
                                                                           // h[n, r] = s · x Aᵀ; y += h Bᵀ
        let mut h = vec![0f32; n * r];
        gemm(n, r, k, &mut h, r, false, Mat::rows(x, k), Mat::cols(a, k), self.scale, true);
        gemm(n, m, r, &mut y, m, true, Mat::rows(&h, r), Mat::cols(b, r), 1.0, true);
        Ok((CpuStorage::F32(y), Shape::from((n, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (n, k) = x.dims2()?;
        let (m, r) = b.dims2()?;
        let ((sx, lx), (sa, la)) = (x.storage_and_layout(), a.storage_and_layout());
        let ((sb, lb), (sg, lg)) = (b.storage_and_layout(), dy.storage_and_layout());
        let (xv, av, bv, g) = (stored(&sx, lx)?, stored(&sa, la)?, stored(&sb, lb)?, stored(&sg, lg)?);
        let s = self.scale;
        // h[n, r] = s · x Aᵀ (recomputed: cheaper than keeping it)
        let mut h = vec![0f32; n * r];
        gemm(n, r, k, &mut h, r, false, Mat::rows(xv, k), Mat::cols(av, k), s, true);
        // dB[m, r] = dyᵀ h
        let mut db = vec![0f32; m * r];
        gemm(m, r, n, &mut db, r, false, Mat::cols(g, m), Mat::rows(&h, r), 1.0, true);
        // dh[n, r] = s · dy B
        let mut dh = vec![0f32; n * r];
        gemm(n, r, m, &mut dh, r, false, Mat::rows(g, m), Mat::rows(bv, r), s, true);
        // dA[r, k] = dhᵀ x
        let mut da = vec![0f32; r * k];
        gemm(r, k, n, &mut da, k, false, Mat::cols(&dh, r), Mat::rows(xv, k), 1.0, true);
        // dx[n, k] = dy W + dh A
        let mut dx = self.w.dyw(g, n, crate::kernels::matmul_precision())?;
        gemm(n, k, r, &mut dx, k, true, Mat::rows(&dh, r), Mat::rows(av, k), 1.0, true);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (n, k), dev)?),
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (m, r), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Var};
    use std::sync::Arc;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()).unwrap_or(f32::INFINITY)
    }

    /// The fused op against `x Wᵀ + s (x Aᵀ) Bᵀ` from candle ops, forward and the gradients of
    /// x, A and B, for a dense and a quantized W.
    #[test]
    fn equals_composed_ops_and_their_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k, m, r) = (37, 64, 48, 4);
        let w = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        for weight in [FrozenWeight::Dense(w.clone()), FrozenWeight::Quant(Arc::new(q))] {
            let wd = weight.to_dense()?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, k), &dev)?)?;
            let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (r, k), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, r), &dev)?)?;
            let up = Tensor::randn(0f32, 1.0, (n, m), &dev)?;
            let lr = LowRank { a: a.as_tensor(), b: b.as_tensor(), scale: 0.5 };
            let got = lora_linear(x.as_tensor(), &weight, &lr)?.expect("CPU f32 takes the fused path");
            let want = (x.as_tensor().matmul(&wd.t()?)? + (x.as_tensor().matmul(&a.t()?)?.matmul(&b.t()?)? * 0.5)?)?;
            assert!(max_diff(&got, &want) < 1e-4, "forward differs by {}", max_diff(&got, &want));
            let g = (got * &up)?.sum_all()?.backward()?;
            let g_ref = (want * &up)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
                let (p, q) = (g.get(v.as_tensor()).expect("grad"), g_ref.get(v.as_tensor()).expect("grad"));
                assert!(max_diff(p, q) < 1e-3, "d{name} differs by {}", max_diff(p, q));
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_factors_of_the_wrong_shape() -> Result<()> {
        let dev = Device::Cpu;
        let w = FrozenWeight::Dense(Tensor::zeros((8, 6), DType::F32, &dev)?);
        let x = Tensor::zeros((2, 6), DType::F32, &dev)?;
        let (a, b) = (Tensor::zeros((2, 6), DType::F32, &dev)?, Tensor::zeros((7, 2), DType::F32, &dev)?);
        let lr = LowRank { a: &a, b: &b, scale: 1.0 };
        assert!(matches!(lora_linear(&x, &w, &lr), Err(Error::Batch(_))));
        Ok(())
    }
}

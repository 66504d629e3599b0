//! The frozen linear: `y = x Wᵀ (+ b)` where `W` never gets a gradient.
//!
//! candle's matmul backward computes both operands' gradients, so a frozen `W` would still cost a
//! weight-sized gradient and an extra matmul per layer. Here `W` is an argument of a custom op
//! whose backward returns only `dL/dx = dL/dy · W`. Quantized (GGUF) weights use candle's
//! quantized matmul forward and dequantise in the backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use crate::weights::FrozenWeight;
use crate::Result;

/// A projection whose weight and bias are constants of the graph.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    weight: FrozenWeight,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    /// A frozen linear from `W: [out, in]` and an optional `b: [out]`.
    pub fn new(weight: FrozenWeight, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight.
    pub fn weight(&self) -> &FrozenWeight {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x: [N, K] -> x Wᵀ: [N, M]`, without the bias.
    pub fn forward_no_bias(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(match &self.weight {
            FrozenWeight::Dense(w) if w.dtype() == DType::F32 => x.apply_op2(w, DenseMatmul)?,
            packed => x.apply_op1(PackedMatmul(packed.clone()))?,
        })
    }

    /// `x: [N, K] -> [N, M]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_no_bias(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `x: [N, K], W: [M, K] -> [N, M]`; backward returns only `dL/dx`.
struct DenseMatmul;

impl DenseMatmul {
    fn dims(l1: &Layout, l2: &Layout) -> candle_core::Result<((usize, usize, usize, usize), Layout)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen linear: input has {k} features, weight expects {k2}")
        }
        Ok(((1, m, n, k), l2.transpose(0, 1)?))
    }
}

impl CustomOp2 for DenseMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bmnk, wt) = Self::dims(l1, l2)?;
        let (_, n, m, k) = bmnk;
        // f32, both contiguous: W a tile of rows at a time (see `kernels::xwt`); else candle's matmul.
        if let (CpuStorage::F32(xs), CpuStorage::F32(ws), Some((xa, xb)), Some((wa, wb))) =
            (s1, s2, l1.contiguous_offsets(), l2.contiguous_offsets())
        {
            let (x, w) = (&xs[xa..xb], &ws[wa..wb]);
            let rows = crate::kernels::DenseRows { w, k };
            let y = crate::kernels::xwt(x, n, m, k, &rows, crate::kernels::matmul_precision());
            return Ok((CpuStorage::F32(y), Shape::from((n, m))));
        }
        Ok((s1.matmul(s2, bmnk, l1, &wt)?, Shape::from((n, m))))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (bmnk, wt) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, bmnk, l1, &wt)?, Shape::from((bmnk.1, bmnk.2))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // dL/dx: [N, M] x [M, K] -> [N, K]. No gradient for W, by construction.
        Ok((
            Some(
                FrozenWeight::Dense(w.clone())
                    .input_grad(grad_y)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
            ),
            None,
        ))
    }
}

/// `x: [N, K] -> [N, M]` for a `W` stored in less than f32 (GGUF blocks, NF4, bf16), widened or
/// dequantised a tile at a time; backward gives only `dL/dx`.
struct PackedMatmul(FrozenWeight);

impl CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        "frozen-packed-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((o, e)), Ok((n, k))) = (l.contiguous_offsets(), l.shape().dims2()) else {
            candle_core::bail!("frozen linear: expected a contiguous [N, K] input, got {:?}", l.shape())
        };
        let (m, kw) = self.0.dims().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if k != kw {
            candle_core::bail!("frozen linear: input has {k} features, weight expects {kw}")
        }
        let y = self.0.xwt(&s.as_slice::<f32>()?[o..e], n, crate::kernels::matmul_precision())?;
        Ok((CpuStorage::F32(y), Shape::from((n, m))))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        match &self.0 {
            FrozenWeight::Quant(q) => q.cuda_fwd(s, l),
            other => candle_core::bail!("frozen linear: a {} weight runs on the CPU only", other.dtype_name()),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = self.0.input_grad(grad_y).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Var};
    use std::sync::Arc;

    #[test]
    fn dense_matches_matmul_and_freezes_weight() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 8), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 3, &dev)?;
        let lin = FrozenLinear::new(FrozenWeight::Dense(w.clone()), Some(b.clone()));
        let y = lin.forward(x.as_tensor())?;
        let want = x.as_tensor().matmul(&w.t()?)?.broadcast_add(&b)?;
        let diff = (y.clone() - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");

        let grads = (y.sqr()?.sum_all()?).backward()?;
        let gx = grads.get(x.as_tensor()).expect("x must get a gradient");
        // d/dx sum((xWᵀ+b)²) = 2 (xWᵀ+b) W
        let want_gx = ((y * 2.0)?.matmul(&w))?;
        let diff = (gx - want_gx)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "grad differs by {diff}");
        assert!(grads.get(&w).is_none(), "frozen weight got a gradient");
        Ok(())
    }

    #[test]
    fn quantized_forward_and_backward_follow_dequantised_weight() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (4, 64), &dev)?;
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?);
        let wd = q.dequantize(&dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 64), &dev)?)?;
        let lin = FrozenLinear::new(FrozenWeight::Quant(q), None);
        let y = lin.forward(x.as_tensor())?;
        let want = x.as_tensor().matmul(&wd.t()?)?;
        let d = (&y - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4, "forward differs by {d}");
        let grads = y.sum_all()?.backward()?;
        let gx = grads.get(x.as_tensor()).expect("x must get a gradient");
        let want_gx = Tensor::ones((3, 4), DType::F32, &dev)?.matmul(&wd)?;
        let diff = (gx - want_gx)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "grad differs by {diff}");
        Ok(())
    }
}

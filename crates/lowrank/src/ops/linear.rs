//! The frozen linear: `y = x Wᵀ (+ b)` where `W` never gets a gradient.
//!
//! candle's matmul backward computes both operands' gradients, so a frozen `W` would still cost a
//! weight-sized gradient and an extra matmul per layer. Here `W` is an argument of a custom op
//! whose backward returns only `dL/dx = dL/dy · W`. Quantized (GGUF) weights use candle's
//! quantized matmul forward and dequantise in the backward.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use super::nf4::Nf4Tensor;
use super::qmatmul::{DenseRows, WeightRows};
use crate::Result;

/// A product with a GGUF-quantized weight: `(W, a, n) -> out`.
type QuantKernel = fn(&QTensor, &[f32], usize) -> candle_core::Result<Vec<f32>>;
/// A product over a weight's rows, a tile at a time: `(a, n, M, K, W) -> out`.
type TiledKernel = fn(&[f32], usize, usize, usize, &dyn WeightRows) -> Vec<f32>;

/// A frozen weight `[out, in]`, dense (f32) or quantized (GGUF block formats).
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    /// Dense `[out, in]` tensor.
    Dense(Tensor),
    /// Quantized `[out, in]`, rows stored as GGUF blocks.
    Quant(Arc<QTensor>),
    /// NF4 `[out, in]` (QLoRA's 4-bit format), on the CPU.
    Nf4(Arc<Nf4Tensor>),
}

/// The identity of a [`FrozenWeight`]: equal only for handles to the same stored weight (a
/// tensor id is never reused; a quantized weight is held weakly, so its address cannot be
/// reused while a key to it exists).
#[derive(Clone, Debug)]
pub enum WeightKey {
    /// A dense tensor, by id.
    Dense(candle_core::TensorId),
    /// A quantized tensor, by allocation.
    Quant(std::sync::Weak<QTensor>),
    /// An NF4 tensor, by allocation.
    Nf4(std::sync::Weak<Nf4Tensor>),
}

impl WeightKey {
    /// Whether `self` and `other` name the same stored weight.
    pub fn same(&self, other: &WeightKey) -> bool {
        match (self, other) {
            (WeightKey::Dense(a), WeightKey::Dense(b)) => a == b,
            (WeightKey::Quant(a), WeightKey::Quant(b)) => a.ptr_eq(b),
            (WeightKey::Nf4(a), WeightKey::Nf4(b)) => a.ptr_eq(b),
            _ => false,
        }
    }
}

impl FrozenWeight {
    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            FrozenWeight::Dense(w) => w.dims2()?,
            FrozenWeight::Quant(q) => q.shape().dims2()?,
            FrozenWeight::Nf4(q) => q.dims(),
        })
    }

    /// The weight as a dense f32 tensor `[out, in]` (dequantised when quantized).
    pub fn to_dense(&self) -> Result<Tensor> {
        Ok(match self {
            FrozenWeight::Dense(w) => w.clone(),
            FrozenWeight::Quant(q) => q.dequantize(&q.device())?,
            FrozenWeight::Nf4(q) => q.dequantize(&candle_core::Device::Cpu)?,
        })
    }

    /// What identifies this stored weight, for caches of values derived from it.
    pub fn key(&self) -> WeightKey {
        match self {
            FrozenWeight::Dense(w) => WeightKey::Dense(w.id()),
            FrozenWeight::Quant(q) => WeightKey::Quant(Arc::downgrade(q)),
            FrozenWeight::Nf4(q) => WeightKey::Nf4(Arc::downgrade(q)),
        }
    }

    /// Storage type name, for `inspect` and logs ("f32", "q4_1", ...).
    pub fn dtype_name(&self) -> String {
        match self {
            FrozenWeight::Dense(w) => format!("{:?}", w.dtype()).to_lowercase(),
            FrozenWeight::Quant(q) => format!("{:?}", q.dtype()).to_lowercase(),
            FrozenWeight::Nf4(_) => "nf4".into(),
        }
    }

    /// Bytes held by the weight.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            FrozenWeight::Quant(q) => q.storage_size_in_bytes(),
            FrozenWeight::Nf4(q) => q.size_in_bytes(),
        }
    }

    /// `dy: [N, M]` -> `dy W: [N, K]`, the input gradient of `x Wᵀ`. On the CPU in f32, `W` is
    /// taken a cache-resident tile of rows at a time (quantized tiles dequantised one by one);
    /// elsewhere `W` is made dense and multiplied.
    pub fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        let (m, k) = self.dims()?;
        let (n, m2) = dy.dims2()?;
        if m != m2 {
            return Err(crate::Error::InvalidArgument(format!(
                "input gradient: dy {:?} against W [{m}, {k}]",
                dy.dims()
            )));
        }
        if !(dy.device().is_cpu() && dy.dtype() == DType::F32) {
            return Ok(dy.matmul(&self.to_dense()?.to_dtype(dy.dtype())?)?);
        }
        let dy = dy.contiguous()?;
        let (sd, ld) = dy.storage_and_layout();
        let dx = self.dyw_f32(super::storage::stored(&sd, ld)?, n)?;
        Ok(Tensor::from_vec(dx, (n, k), dy.device())?)
    }

    /// `x Wᵀ: [n, M]` for a row-major f32 `x: [n, K]` on the CPU: `W` a cache-resident tile of
    /// rows at a time (packed tiles dequantised one by one; a few rows of a GGUF weight decoded in
    /// registers). The one CPU forward of every frozen-weight op.
    pub(crate) fn xwt_f32(&self, x: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
        use super::qmatmul::{qmatmul_f32, xwt_tiled};
        self.by_tiles(x, n, qmatmul_f32, |x, n, m, k, w| xwt_tiled(x, n, m, k, w))
    }

    /// `dy W: [n, K]` for a row-major f32 `dy: [n, M]` on the CPU, `W` a tile of rows at a time:
    /// the one CPU backward of every frozen-weight op.
    pub(crate) fn dyw_f32(&self, dy: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
        use super::qmatmul::{dyw_tiled, qmatmul_t_f32};
        self.by_tiles(dy, n, qmatmul_t_f32, |dy, n, m, k, w| dyw_tiled(dy, n, m, k, w))
    }

    /// Runs `quant` on a GGUF weight, or `tiled(a, n, M, K, rows)` over the rows of an NF4 or
    /// dense one.
    fn by_tiles(&self, a: &[f32], n: usize, quant: QuantKernel, tiled: TiledKernel) -> candle_core::Result<Vec<f32>> {
        match self {
            FrozenWeight::Quant(q) => quant(q, a, n),
            FrozenWeight::Nf4(q) => {
                let (m, k) = q.dims();
                Ok(tiled(a, n, m, k, q.as_ref()))
            }
            FrozenWeight::Dense(w) => {
                let (m, k) = w.dims2()?;
                let w = w.to_dtype(DType::F32)?.contiguous()?;
                let (s, l) = w.storage_and_layout();
                Ok(tiled(a, n, m, k, &DenseRows { w: super::storage::stored(&s, l)?, k }))
            }
        }
    }

    /// GGUF block type when quantized.
    pub fn ggml_dtype(&self) -> Option<GgmlDType> {
        match self {
            FrozenWeight::Dense(_) | FrozenWeight::Nf4(_) => None,
            FrozenWeight::Quant(q) => Some(q.dtype()),
        }
    }
}

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
            FrozenWeight::Dense(w) => x.apply_op2(w, DenseMatmul)?,
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
        // f32, both contiguous: W a tile of rows at a time (see `xwt_tiled`); else candle's matmul.
        if let (CpuStorage::F32(xs), CpuStorage::F32(ws), Some((xa, xb)), Some((wa, wb))) =
            (s1, s2, l1.contiguous_offsets(), l2.contiguous_offsets())
        {
            let (x, w) = (&xs[xa..xb], &ws[wa..wb]);
            let y = super::qmatmul::xwt_tiled(x, n, m, k, &DenseRows { w, k });
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

/// A packed (GGUF-quantized or NF4) `x: [N, K] -> [N, M]`, `W` dequantised a tile at a time;
/// backward gives only `dL/dx`.
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
        let y = self.0.xwt_f32(&s.as_slice::<f32>()?[o..e], n)?;
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
    use candle_core::{Device, Var};

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

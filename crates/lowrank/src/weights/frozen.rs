//! A frozen weight as it is stored — dense, GGUF-quantized blocks, or NF4 — and its two CPU
//! products, `x Wᵀ` (forward) and `dy W` (the input gradient), dispatched once over the storage
//! kinds to the kernels in [`crate::kernels`].

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use super::nf4::Nf4Tensor;
use crate::kernels::{DenseRows, WeightRows};
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
            return Err(crate::Error::Quantize(format!("input gradient: dy {:?} against W [{m}, {k}]", dy.dims())));
        }
        if !(dy.device().is_cpu() && dy.dtype() == DType::F32) {
            return Ok(dy.matmul(&self.to_dense()?.to_dtype(dy.dtype())?)?);
        }
        let dy = dy.contiguous()?;
        let (sd, ld) = dy.storage_and_layout();
        let dx = self.dyw_f32(crate::kernels::stored(&sd, ld)?, n)?;
        Ok(Tensor::from_vec(dx, (n, k), dy.device())?)
    }

    /// `x Wᵀ: [n, M]` for a row-major f32 `x: [n, K]` on the CPU: `W` a cache-resident tile of
    /// rows at a time (packed tiles dequantised one by one; a few rows of a GGUF weight decoded in
    /// registers). The one CPU forward of every frozen-weight op.
    pub(crate) fn xwt_f32(&self, x: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
        use crate::kernels::{qmatmul_f32, xwt_tiled};
        self.by_tiles(x, n, qmatmul_f32, |x, n, m, k, w| xwt_tiled(x, n, m, k, w))
    }

    /// `dy W: [n, K]` for a row-major f32 `dy: [n, M]` on the CPU, `W` a tile of rows at a time:
    /// the one CPU backward of every frozen-weight op.
    pub(crate) fn dyw_f32(&self, dy: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
        use crate::kernels::{dyw_tiled, qmatmul_t_f32};
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
                Ok(tiled(a, n, m, k, &DenseRows { w: crate::kernels::stored(&s, l)?, k }))
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

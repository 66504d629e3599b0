//! A frozen weight as it is stored — dense, GGUF-quantized blocks, or NF4 — and its two CPU
//! products, `x Wᵀ` (forward) and `dy W` (the input gradient), dispatched once over the storage
//! kinds to the kernels in [`crate::kernels`].

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use super::nf4::Nf4Tensor;
use crate::kernels::{DenseRows, Precision, WeightRows};
use crate::Result;

/// A frozen weight `[out, in]`, dense (f32, or bf16 as an HF checkpoint stores it) or quantized
/// (GGUF block formats, NF4).
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    /// Dense `[out, in]` tensor: f32, or bf16 on the CPU (widened a tile at a time).
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

    /// The weight as a dense f32 tensor `[out, in]` (widened or dequantised when stored in less).
    pub fn to_dense(&self) -> Result<Tensor> {
        Ok(match self {
            FrozenWeight::Dense(w) => w.to_dtype(DType::F32)?,
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

    /// `dy: [N, M]` -> `dy W: [N, K]`, the input gradient of `x Wᵀ`. On the CPU in f32 it is
    /// [`dyw`](Self::dyw) in the process's [matmul precision](crate::kernels::matmul_precision);
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
        let dx = self.dyw(crate::kernels::stored(&sd, ld)?, n, crate::kernels::matmul_precision())?;
        Ok(Tensor::from_vec(dx, (n, k), dy.device())?)
    }

    /// `x Wᵀ: [n, M]` for a row-major f32 `x: [n, K]` on the CPU, in `precision` (bf16 where it
    /// is [available](crate::kernels::bf16_available) and `n` is more than a decoding batch):
    /// `W` a cache-resident tile of rows at a time (packed tiles dequantised one by one; a few
    /// rows of a GGUF weight decoded in registers). The one CPU forward of every frozen-weight op.
    pub fn xwt(&self, x: &[f32], n: usize, precision: Precision) -> candle_core::Result<Vec<f32>> {
        let (_, k) = self.dims().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if x.len() != n * k {
            candle_core::bail!("frozen product: x has {} values, not {n}×{k}", x.len())
        }
        match self {
            // Its decoding-sized products decode blocks in registers.
            FrozenWeight::Quant(q) if !crate::kernels::runs_in_bf16(precision, n) => {
                crate::kernels::qmatmul_f32(q, x, n)
            }
            _ => self.with_rows(|m, k, w| crate::kernels::xwt(x, n, m, k, w, precision)),
        }
    }

    /// `dy W: [n, K]` for a row-major f32 `dy: [n, M]` on the CPU, in `precision` as
    /// [`xwt`](Self::xwt), `W` a tile of rows at a time: the one CPU backward of every
    /// frozen-weight op.
    pub fn dyw(&self, dy: &[f32], n: usize, precision: Precision) -> candle_core::Result<Vec<f32>> {
        let (m, _) = self.dims().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if dy.len() != n * m {
            candle_core::bail!("frozen product: dy has {} values, not {n}×{m}", dy.len())
        }
        self.with_rows(|m, k, w| crate::kernels::dyw(dy, n, m, k, w, precision))
    }

    /// `f(M, K, rows)` with the weight's rows as f32 tiles: borrowed when dense f32, widened
    /// (bf16) or dequantised (packed) a tile at a time.
    fn with_rows<T>(&self, f: impl FnOnce(usize, usize, &dyn WeightRows) -> T) -> candle_core::Result<T> {
        match self {
            FrozenWeight::Quant(q) => {
                let (m, k) = q.shape().dims2()?;
                let data = q.data()?;
                let rows = crate::kernels::quant_rows(q.dtype(), &data, m, k)?;
                Ok(f(m, k, rows.as_ref()))
            }
            FrozenWeight::Nf4(q) => {
                let (m, k) = q.dims();
                Ok(f(m, k, q.as_ref()))
            }
            FrozenWeight::Dense(w) if w.dtype() == DType::BF16 && w.device().is_cpu() => {
                let (m, k) = w.dims2()?;
                let w = w.contiguous()?;
                let (s, l) = w.storage_and_layout();
                Ok(f(m, k, &crate::kernels::Bf16Rows { w: crate::kernels::stored_bf16(&s, l)?, k }))
            }
            FrozenWeight::Dense(w) => {
                let (m, k) = w.dims2()?;
                let w = w.to_dtype(DType::F32)?.contiguous()?;
                let (s, l) = w.storage_and_layout();
                Ok(f(m, k, &DenseRows { w: crate::kernels::stored(&s, l)?, k }))
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

//! Where the weights come from. The model asks for tensors by their HF name and shape; each
//! format (HF safetensors, GGUF) answers in HF layout.

use candle_core::Tensor;

use crate::formats::SafetensorsDir;
use crate::module_table::check_shape;
use crate::weights::FrozenWeight;
use crate::Result;

/// A store of named tensors in HF naming and layout.
pub trait WeightSource {
    /// Human-readable origin, for error messages ("/path/model.safetensors").
    fn describe(&self) -> String;
    /// Whether a tensor of that HF name exists.
    fn contains(&self, name: &str) -> bool;
    /// A dense f32 tensor (norms, biases).
    fn dense(&self, name: &str) -> Result<Tensor>;
    /// A projection or embedding matrix `[rows, cols]`, kept quantized when stored quantized
    /// (unless the source was opened to dequantise).
    fn matrix(&self, name: &str) -> Result<FrozenWeight>;
    /// Whether Gemma's norm weights are stored as the multiplier `1 + w` (llama.cpp's converter
    /// writes them so) rather than as HF's `w`.
    fn norms_plus_one(&self) -> bool {
        false
    }
}

/// Loads `name` and checks its shape.
pub fn dense_checked(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = src.dense(name)?;
    check_shape(name, shape, t.dims())?;
    Ok(t)
}

/// Loads the RMSNorm weight `name: [len]` as the multiplier the model applies: for Gemma
/// (`plus_one`) `1 + w` of HF's `w`, unless the source already stores it so (llama.cpp's GGUF).
pub fn norm_checked(src: &dyn WeightSource, name: &str, len: usize, plus_one: bool) -> Result<Tensor> {
    let w = dense_checked(src, name, &[len])?;
    Ok(if plus_one && !src.norms_plus_one() { (w + 1.0)? } else { w })
}

/// Loads the matrix `name` and checks it is `[rows, cols]`.
pub fn matrix_checked(src: &dyn WeightSource, name: &str, rows: usize, cols: usize) -> Result<FrozenWeight> {
    let w = src.matrix(name)?;
    let (r, c) = w.dims()?;
    check_shape(name, &[rows, cols], &[r, c])?;
    Ok(w)
}

impl WeightSource for SafetensorsDir {
    fn describe(&self) -> String {
        SafetensorsDir::describe(self)
    }

    fn contains(&self, name: &str) -> bool {
        SafetensorsDir::contains(self, name)
    }

    fn dense(&self, name: &str) -> Result<Tensor> {
        self.load(name)
    }

    /// A bf16 matrix stays bf16 on the CPU (half the memory of f32; the CPU kernels widen it a
    /// tile at a time, exactly); anything else, and any matrix on another device, becomes f32.
    fn matrix(&self, name: &str) -> Result<FrozenWeight> {
        let t = self.load_stored(name)?;
        Ok(FrozenWeight::Dense(match t.dtype() {
            candle_core::DType::BF16 if t.device().is_cpu() => t,
            _ => t.to_dtype(candle_core::DType::F32)?,
        }))
    }
}

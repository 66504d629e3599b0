//! Where the weights come from. The model asks for tensors by their HF name and shape; each
//! format (HF safetensors, GGUF) answers in HF layout.

use candle_core::Tensor;

use crate::ops::FrozenWeight;
use crate::{Error, Result};

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
}

/// Loads `name` and checks its shape.
pub fn dense_checked(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = src.dense(name)?;
    check_shape(name, shape, t.dims())?;
    Ok(t)
}

/// Loads the matrix `name` and checks it is `[rows, cols]`.
pub fn matrix_checked(src: &dyn WeightSource, name: &str, rows: usize, cols: usize) -> Result<FrozenWeight> {
    let w = src.matrix(name)?;
    let (r, c) = w.dims()?;
    check_shape(name, &[rows, cols], &[r, c])?;
    Ok(w)
}

/// An [`Error::ShapeMismatch`] unless the shapes agree.
pub fn check_shape(name: &str, expected: &[usize], found: &[usize]) -> Result<()> {
    if expected != found {
        return Err(Error::ShapeMismatch { name: name.into(), expected: expected.into(), found: found.into() });
    }
    Ok(())
}

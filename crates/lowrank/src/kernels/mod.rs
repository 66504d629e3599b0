//! CPU kernels on plain slices, no autograd: the f32 gemm, products with GGUF-quantized and NF4
//! weights a tile at a time (`qmatmul.rs`) and the decode-time quantized gemv (`qgemv.rs`), a
//! vectorised `exp`, and the f64 SVD / QR of PiSSA, OLoRA and adapter combination on `faer`
//! (`linalg.rs`).
//! The differentiable ops of [`crate::ops`] and the weight formats of [`crate::weights`] call them.

pub mod bf16;
mod exp;
mod gemm;
mod linalg;
mod precision;
mod qgemv;
mod qmatmul;
mod storage;

pub use exp::{exp, exp_shifted, exp_shifted_into};
pub use gemm::{gemm, Mat};
pub use linalg::{leading_qr, orthonormal_columns, top_svd, truncated_svd_of_product};
pub(crate) use precision::runs_in_bf16;
pub use precision::{
    bf16_available, dyw, matmul_precision, set_matmul_precision, with_matmul_precision, xwt, Precision,
};
pub(crate) use qmatmul::quant_rows;
pub use qmatmul::{dyw_tiled, qmatmul_f32, qmatmul_t_f32, xwt_tiled, Bf16Rows, DenseRows, WeightRows};
pub(crate) use storage::{stored, stored_bf16, values};

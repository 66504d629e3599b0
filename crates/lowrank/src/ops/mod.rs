//! Tensor ops with a forward *and* a backward, so training differentiates through every one of
//! them. candle's fused `softmax_last_dim`, `rms_norm` and `rope` have no backward (the graph
//! would be cut silently), and its matmul backward computes a gradient for the frozen weight too;
//! these ops replace them.
//!
//! Shape legend: `N` tokens (all sequences of a batch, flattened), `K` in-features, `M`
//! out-features, `H` hidden size, `S` key length, `D` head dim.

mod attention;
mod exp;
mod gemm;
mod linalg;
mod linear;
mod lora_linear;
mod nf4;
mod qgemv;
mod qmatmul;
mod rms_norm;
mod rope;
mod softmax;
mod storage;
mod swiglu;

pub use attention::{causal_attention, Segment};
pub use exp::{exp, exp_shifted, exp_shifted_into};
pub use linalg::{leading_qr, orthonormal_columns, top_svd, truncated_svd_of_product};
pub use linear::{FrozenLinear, FrozenWeight, WeightKey};
pub use lora_linear::{lora_linear, LowRank};
pub use nf4::Nf4Tensor;
pub use rms_norm::rms_norm;
pub use rope::{apply_rope, RopeScaling, RopeTable};
pub use softmax::softmax_last_dim;
pub use swiglu::swiglu;

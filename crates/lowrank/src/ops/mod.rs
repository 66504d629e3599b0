//! Tensor ops with a forward *and* a backward, so training differentiates through every one of
//! them. candle's fused `softmax_last_dim`, `rms_norm` and `rope` have no backward (the graph
//! would be cut silently), and its matmul backward computes a gradient for the frozen weight too;
//! these ops replace them. The plain CPU kernels they call live in [`crate::kernels`], the
//! weights they read in [`crate::weights`].
//!
//! Shape legend: `N` tokens (all sequences of a batch, flattened), `K` in-features, `M`
//! out-features, `H` hidden size, `S` key length, `D` head dim.

mod attention;
mod glu;
mod linear;
mod lora_linear;
mod rms_norm;
mod rope;
mod softmax;

pub use attention::{causal_attention, rotary_causal_attention, Scores, Segment};
pub use glu::{glu, Activation};
pub use linear::FrozenLinear;
pub use lora_linear::{lora_linear, LowRank};
pub use rms_norm::rms_norm;
pub use rope::{apply_rope, longrope_attention_factor, RopeScaling, RopeTable};
pub use softmax::softmax_last_dim;

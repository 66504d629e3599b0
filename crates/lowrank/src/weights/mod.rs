//! Frozen weights in memory: the storage kinds a base projection can have ([`FrozenWeight`]:
//! dense, GGUF blocks, NF4) and the NF4 format itself ([`Nf4Tensor`], bitsandbytes' QLoRA
//! layout). The differentiable ops in [`crate::ops`] run on them; the products are the kernels of
//! [`crate::kernels`].

mod frozen;
mod nf4;

pub use frozen::{FrozenWeight, WeightKey};
pub use nf4::Nf4Tensor;

//! Models: configuration, weight sources (HF safetensors, GGUF), the transformer, KV cache.

mod block;
mod cache;
mod checkpoint;
mod config;
mod gguf;
mod hf_config;
mod load;
mod merge;
mod named;
mod projection;
mod transformer;
mod weights;

pub use crate::module_table::{check_shape, ModuleInfo, ModuleTable};
pub use block::{Block, SeqSpan};
pub use cache::KvCache;
pub use checkpoint::GradSink;
pub use config::{Family, ModelConfig};
pub use gguf::GgufFile;
pub use load::{detect_format, LoadOptions, ModelFormat, Quantize};
pub use projection::{AdapterRun, LinearFactory, Projection};
pub use transformer::{Model, OutputHead, SeqInput};
pub use weights::WeightSource;

//! Writing models in other forms: an HF directory transformers loads as a plain model, a GGUF
//! file llama.cpp loads.

mod gguf;
mod hf;
mod tokenizer_files;

pub(crate) use gguf::write_gguf_file;
pub use gguf::{gguf_metadata_for_hf, write_gguf_model};
pub(crate) use hf::write_safetensors;
pub use hf::{check_finite, hf_config_json, write_hf_model, HfOptions, HfWritten};
pub use tokenizer_files::TokenizerFiles;

//! Writing models in other forms: an HF directory transformers loads as a plain model.

mod hf;
mod tokenizer_files;

pub use hf::{check_finite, hf_config_json, write_hf_model, HfOptions, HfWritten};
pub use tokenizer_files::TokenizerFiles;

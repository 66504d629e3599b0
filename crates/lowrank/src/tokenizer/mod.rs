//! Text ↔ token ids, built the way transformers builds them.
//!
//! [`Tokenizer`] wraps a `tokenizers::Tokenizer` plus the special ids generation needs. It loads
//! from an HF model directory ([`Tokenizer::from_hf_dir`]: `tokenizer.json` and its config files)
//! or from GGUF metadata ([`Tokenizer::from_gguf`]), where the vocabulary is rebuilt into the same
//! pipeline transformers' GGUF loader builds, so both forms of a model give the same ids.
//! [`TextStream`] turns ids back into text one token at a time, for streaming generation.
//!
//! Layout: `base.rs` the type and its calls; `hf.rs` the HF directory loader; `gguf.rs` the GGUF
//! metadata loader, which hands off to `byte_level.rs` (`tokenizer.ggml.model = gpt2`) or
//! `sentencepiece.rs` (`llama`); `token_type.rs` llama.cpp's token types, shared by the loaders and
//! `to_gguf.rs` (GGUF metadata for an HF tokenizer); `stream.rs` the streaming detokenizer.

mod base;
mod byte_level;
mod gguf;
mod hf;
mod sentencepiece;
mod stream;
mod to_gguf;
mod token_type;

pub use base::Tokenizer;
pub(crate) use hf::read_json_object;
pub use stream::TextStream;
pub use to_gguf::gguf_tokenizer_metadata;

//! llama.cpp's token types (`tokenizer.ggml.token_type` in GGUF metadata), read by the GGUF
//! tokenizer loaders and written by the HF → GGUF metadata conversion.

/// An ordinary vocabulary token.
pub(super) const NORMAL: i64 = 1;
/// A special token (`<s>`, `<|im_end|>`): never produced by splitting text.
pub(super) const CONTROL: i64 = 3;
/// A token added on top of the model's vocabulary, matched in text as a whole.
pub(super) const USER_DEFINED: i64 = 4;
/// A placeholder slot.
pub(super) const UNUSED: i64 = 5;

//! A request → the token ids generation starts from.
//!
//! One rule for every front end (`generate`, the server's completions and chat endpoints, the
//! example task's scoring) and for training, which must teach the model to continue from exactly
//! these ids: a trained target is only ever reached from the state a client's request puts the
//! model in when its prompt is encoded here.
//!
//! - a raw prompt: `encode(text, add_special_tokens = true)` (the tokenizer's bos, if it adds
//!   one); a prompt/completion training row's prompt is encoded the same way;
//! - a conversation: the chat template rendered with the generation prompt, encoded without
//!   special tokens (the template writes them).

use crate::chat::{ChatTemplate, Message};
use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// The ids of a raw text prompt: `[T]`.
pub fn text_ids(tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    tokenizer.encode(prompt, true)
}

/// The ids of a conversation rendered for the assistant's next turn: `[T]`.
pub fn chat_ids(tokenizer: &Tokenizer, template: &ChatTemplate, messages: &[Message]) -> Result<Vec<u32>> {
    tokenizer.encode(&template.render(messages, true)?, false)
}

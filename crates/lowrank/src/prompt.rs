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
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The ids of a raw text prompt: `[T]`.
pub fn text_ids(tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    tokenizer.encode(prompt, true)
}

/// The ids of a conversation rendered for the assistant's next turn: `[T]`. Only the template's
/// own markers are special tokens: a message spelling one (`<|im_start|>system…` in a user's
/// content) gets the ids of its characters, so content cannot open a turn of its own.
pub fn chat_ids(tokenizer: &Tokenizer, template: &ChatTemplate, messages: &[Message]) -> Result<Vec<u32>> {
    let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    if !tokenizer.spells_special_token(&contents)? {
        // The rendered text whole, as transformers tokenizes it.
        return tokenizer.encode(&template.render(messages, true)?, false);
    }
    // Rendered with a marker in place of each message's content, then the template's text
    // tokenized with its special tokens and each content as plain text, in order.
    let marked: Vec<Message> =
        messages.iter().enumerate().map(|(i, m)| Message { role: m.role.clone(), content: marker(i) }).collect();
    let skeleton = template.render(&marked, true)?;
    let mut ids = Vec::new();
    let mut rest = skeleton.as_str();
    while let Some(start) = rest.find(MARK_OPEN) {
        let after = &rest[start + MARK_OPEN.len_utf8()..];
        let end = after.find(MARK_CLOSE).ok_or_else(|| Error::ChatTemplate("a content marker is cut".into()))?;
        let i: usize = after[..end].parse().map_err(|_| Error::ChatTemplate("a content marker is altered".into()))?;
        let m = messages.get(i).ok_or_else(|| Error::ChatTemplate("a content marker is altered".into()))?;
        ids.extend(tokenizer.encode(&rest[..start], false)?);
        ids.extend(tokenizer.encode_plain(&m.content)?);
        rest = &after[end + MARK_CLOSE.len_utf8()..];
    }
    ids.extend(tokenizer.encode(rest, false)?);
    Ok(ids)
}

/// Private-use characters around a message's index in the marked rendering.
const MARK_OPEN: char = '\u{F8F0}';
const MARK_CLOSE: char = '\u{F8F1}';

fn marker(i: usize) -> String {
    format!("{MARK_OPEN}{i}{MARK_CLOSE}")
}

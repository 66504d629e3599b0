//! [`TextStream`]: detokenize one id at a time, for streaming generation.

use super::base::Tokenizer;
use crate::error::Result;

/// Turns ids into text as they arrive, handing back only text that is final.
///
/// A token can end in the middle of a UTF-8 character (byte-level BPE, `<0xNN>` byte fallback),
/// and a decoder can treat the start of a text differently (SentencePiece drops one leading
/// space). So each [`push`](Self::push) decodes a small window of recent ids, compares it with
/// the same window without the new id, and returns the difference only once it is complete
/// (does not end in U+FFFD and extends what was shown). [`finish`](Self::finish) flushes the
/// rest; after it, [`text`](Self::text) equals `tokenizer.decode(all ids, skip_special_tokens)`.
///
/// Special tokens are skipped by default (a chat reply should not print `<|im_end|>`); see
/// [`skip_special_tokens`](Self::skip_special_tokens).
#[derive(Debug, Clone)]
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the decode window: the ids from here to `read` are context already shown.
    prefix: usize,
    /// Ids before this index are shown.
    read: usize,
    text: String,
}

impl<'a> TextStream<'a> {
    /// An empty stream over `tokenizer`, skipping special tokens.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        TextStream { tokenizer, skip_special_tokens: true, ids: Vec::new(), prefix: 0, read: 0, text: String::new() }
    }

    /// Whether special tokens are left out of the text (default `true`).
    pub fn skip_special_tokens(mut self, skip: bool) -> Self {
        self.skip_special_tokens = skip;
        self
    }

    /// Adds one id and returns the text that became final with it (often empty, e.g. while a
    /// character's bytes are still arriving).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let shown = self.decode(self.prefix, self.read)?;
        let window = self.decode(self.prefix, self.ids.len())?;
        if window.len() <= shown.len() || window.ends_with(char::REPLACEMENT_CHARACTER) || !window.starts_with(&shown) {
            return Ok(String::new());
        }
        let new = window[shown.len()..].to_string();
        // The ids just shown become the next window's context, unless they decode to nothing:
        // a window must start with visible text, or a decoder that strips the text's first
        // space would strip a space that is not first.
        if !self.decode(self.read, self.ids.len())?.is_empty() {
            self.prefix = self.read;
        }
        self.read = self.ids.len();
        self.text.push_str(&new);
        Ok(new)
    }

    /// Returns whatever is left: the ids not yet shown, decoded even if they end mid-character
    /// (as U+FFFD, exactly as a full decode renders them).
    pub fn finish(&mut self) -> Result<String> {
        let full = self.decode(0, self.ids.len())?;
        let rest = match full.strip_prefix(self.text.as_str()) {
            Some(rest) => rest.to_string(),
            // Not reachable with the decoders transformers builds; fall back to the window.
            None => {
                let shown = self.decode(self.prefix, self.read)?;
                let window = self.decode(self.prefix, self.ids.len())?;
                window.strip_prefix(shown.as_str()).unwrap_or_default().to_string()
            }
        };
        self.read = self.ids.len();
        self.prefix = self.read;
        self.text.push_str(&rest);
        Ok(rest)
    }

    /// All text handed out so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn decode(&self, start: usize, end: usize) -> Result<String> {
        match self.ids.get(start..end) {
            Some(ids) if !ids.is_empty() => self.tokenizer.decode(ids, self.skip_special_tokens),
            _ => Ok(String::new()),
        }
    }
}

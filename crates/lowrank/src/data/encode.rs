//! A row → token ids and the mask of ids the loss is taken on.
//!
//! - **text**: `encode(text, add_special_tokens = true)` (bos where the tokenizer adds one); every
//!   token is a target.
//! - **prompt + completion**: the prompt's ids are exactly those a client's raw prompt gets from
//!   `generate` or the server's completions endpoint ([`prompt::text_ids`]), and the completion's
//!   follow them, so the model learns to continue from the state generation starts in; no chat
//!   template is applied (a row meant for a chat model is written as `messages`). Where the
//!   concatenated string encodes to the prompt's ids followed by more, those are the ids; where it
//!   does not, BPE merged across the boundary (the prompt's trailing space with the completion's
//!   first letters: `"numerals: " + "CM"` → `" CM"`), and the ids are `encode(prompt, true) ++
//!   encode(completion, false)`. Encoding the concatenation alone (as TRL's `SFTTrainer` does)
//!   would never show the model a prompt ending in its own space token. Such rows are counted
//!   ([`DataStats::boundary_merges`](super::DataStats::boundary_merges)) so that the summary can
//!   say the prompts' trailing whitespace matters. One case keeps the joined encoding (with the
//!   completion from the first id where it departs from the prompt's): a SentencePiece tokenizer
//!   that puts a space before any text it encodes, where the completion encoded alone would gain
//!   a space it does not have (`"Say: " + "the"` would read `"Say:  the"`).
//! - **messages**: rendered with the chat template (`add_generation_prompt = false`) and encoded
//!   without special tokens (the template writes them). An assistant turn's tokens are those
//!   between the encoding of the conversation before it rendered *with* the generation prompt and
//!   the encoding through it (TRL's `assistant_only_loss` fallback). Both encodings must be
//!   prefixes of the conversation's, else the template is not prefix-stable and the row is
//!   rejected (with `train_on_prompt` no spans are needed and such templates work). A span stops
//!   after its last eos id (`<|im_end|>`): what follows it (the newline between turns) is layout
//!   the model never generates, since generation stops at the eos.
//!
//! Eos: text and prompt/completion examples get the tokenizer's eos (`eos_token_ids()[0]`)
//! appended as a target unless their ids already end with it. Messages examples get it only when
//! the template does not close the final assistant turn with an eos id itself; appending one after
//! the template's closing `<|im_end|>\n` would teach the model a token it must never produce.
//!
//! `targets[0]` is always false: nothing predicts the first token.

use crate::chat::{ChatTemplate, Message};
use crate::prompt;
use crate::tokenizer::Tokenizer;

use super::format::Row;

/// How rows become examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOptions {
    /// Examples longer than this many tokens are cut to it (the end is lost).
    pub max_seq_len: usize,
    /// Take the loss on prompt (and system/user) tokens too, not only on completions and
    /// assistant turns.
    pub train_on_prompt: bool,
}

/// One tokenized training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids, `[T]`.
    pub ids: Vec<u32>,
    /// `[T]`: `targets[t]` is true when token `t` is a loss target, i.e. the logits at position
    /// `t - 1` are scored against `ids[t]`. `targets[0]` is always false.
    pub targets: Vec<bool>,
}

impl Example {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when the example holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of loss targets.
    pub fn n_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t).count()
    }
}

/// Encodes rows for one tokenizer and template; errors are messages for the user, to which the
/// loader adds the file and line.
#[derive(Clone)]
pub(crate) struct Encoder<'a> {
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    train_on_prompt: bool,
    /// The id appended to examples (the tokenizer's eos).
    eos: u32,
}

impl<'a> Encoder<'a> {
    /// An encoder; fails when the tokenizer has no eos token.
    pub(crate) fn new(
        tokenizer: &'a Tokenizer,
        template: Option<&'a ChatTemplate>,
        train_on_prompt: bool,
    ) -> Result<Self, String> {
        let eos = *tokenizer
            .eos_token_ids()
            .first()
            .ok_or("the tokenizer has no eos token, which every example ends with")?;
        Ok(Encoder { tokenizer, template, train_on_prompt, eos })
    }

    /// The full (untruncated) example for `row`, and whether its encoding differs from that of
    /// the row's text encoded in one piece (a prompt/completion row whose boundary BPE merges).
    pub(crate) fn encode(&self, row: &Row) -> Result<(Example, bool), String> {
        let (mut example, merged) = match row {
            Row::Text(text) => (self.text(text)?, false),
            Row::PromptCompletion { prompt, completion } => self.prompt_completion(prompt, completion)?,
            Row::Messages(messages) => (self.messages(messages)?, false),
        };
        if let Some(first) = example.targets.first_mut() {
            *first = false;
        }
        Ok((example, merged))
    }

    fn text(&self, text: &str) -> Result<Example, String> {
        let ids = self.encode_text(text, true)?;
        let targets = vec![true; ids.len()];
        Ok(self.with_eos(Example { ids, targets }))
    }

    fn prompt_completion(&self, prompt: &str, completion: &str) -> Result<(Example, bool), String> {
        let prompt_ids = prompt::text_ids(self.tokenizer, prompt).map_err(|e| e.to_string())?;
        let joined = self.encode_text(&format!("{prompt}{completion}"), true)?;
        let (ids, boundary, merged) = if joined.starts_with(&prompt_ids) {
            (joined, prompt_ids.len(), false)
        } else {
            let mut apart = prompt_ids;
            let boundary = apart.len();
            apart.extend(self.encode_text(completion, false)?);
            if self.decode(&apart)? == self.decode(&joined)? {
                (apart, boundary, true)
            } else {
                // The completion alone gained a leading space (SentencePiece's dummy prefix).
                let common = joined.iter().zip(&apart).take_while(|(a, b)| a == b).count();
                (joined, common, true)
            }
        };
        let targets = (0..ids.len()).map(|t| t >= boundary || self.train_on_prompt).collect();
        Ok((self.with_eos(Example { ids, targets }), merged))
    }

    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, false).map_err(|e| e.to_string())
    }

    fn messages(&self, messages: &[Message]) -> Result<Example, String> {
        let template = self.template.ok_or(
            "a \"messages\" row needs a chat template, and the model has none; \
             write the rows as \"text\" or \"prompt\" + \"completion\"",
        )?;
        let render = |messages: &[Message], generation_prompt: bool| {
            template.render(messages, generation_prompt).map_err(|e| e.to_string())
        };
        let text = render(messages, false)?;
        let ids = self.encode_text(&text, false)?;
        let ends_with_assistant = messages.last().is_some_and(|m| m.role == "assistant");

        if self.train_on_prompt {
            let mut example = Example { targets: vec![true; ids.len()], ids };
            let template_has_eos = example.ids.iter().any(|id| self.is_eos(*id));
            if ends_with_assistant && !template_has_eos {
                example.ids.push(self.eos);
                example.targets.push(true);
            }
            return Ok(example);
        }

        let mut targets = vec![false; ids.len()];
        let mut last_turn_closed = false;
        for (i, _) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            let before = render(&messages[..i], true)?;
            let through = render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !text.starts_with(&through) {
                return Err(not_prefix_stable(i, "text"));
            }
            // Exactly the ids `generate --chat` and the server's chat endpoint start from.
            let before_ids = prompt::chat_ids(self.tokenizer, template, &messages[..i]).map_err(|e| e.to_string())?;
            let through_ids = self.encode_text(&through, false)?;
            if !through_ids.starts_with(&before_ids) || !ids.starts_with(&through_ids) {
                return Err(not_prefix_stable(i, "token ids"));
            }
            let span = before_ids.len()..through_ids.len();
            // Stop after the turn's last eos id; what follows is layout between turns.
            let end = span.clone().rev().find(|&t| self.is_eos(ids[t])).map_or(span.end, |t| t + 1);
            targets[span.start..end].fill(true);
            last_turn_closed = end > span.start && self.is_eos(ids[end - 1]);
        }
        let mut example = Example { ids, targets };
        if ends_with_assistant && !last_turn_closed {
            example.ids.push(self.eos);
            example.targets.push(true);
        }
        Ok(example)
    }

    /// `ids` plus a trailing eos target, unless they already end with the eos.
    fn with_eos(&self, mut example: Example) -> Example {
        if example.ids.last() != Some(&self.eos) {
            example.ids.push(self.eos);
            example.targets.push(true);
        }
        example
    }

    fn is_eos(&self, id: u32) -> bool {
        self.tokenizer.eos_token_ids().contains(&id)
    }

    fn encode_text(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.tokenizer.encode(text, add_special_tokens).map_err(|e| e.to_string())
    }
}

fn not_prefix_stable(index: usize, what: &str) -> String {
    format!(
        "the chat template is not prefix-stable: the {what} of the conversation before messages[{index}] \
         (with the generation prompt) are not a prefix of those through it, so the assistant turn's \
         tokens cannot be located (the template rewrites earlier turns, or messages[0] is an assistant \
         turn the template puts a system prompt before); train_on_prompt trains on every token and \
         needs no spans"
    )
}

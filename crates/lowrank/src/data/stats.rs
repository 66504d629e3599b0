//! What loading a data file counted, and the hints it gives.

use super::format::Format;

/// What [`load_jsonl`](super::load_jsonl) found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataStats {
    /// Rows read (blank lines are not rows), dropped ones included.
    pub rows: usize,
    /// Rows cut to `max_seq_len`.
    pub truncated: usize,
    /// Rows left out because no loss target survived truncation (or there was none, as in a
    /// conversation without an assistant turn).
    pub dropped_no_targets: usize,
    /// The rows' shape.
    pub format: Format,
    /// Tokens in the kept examples.
    pub tokens: usize,
    /// Loss targets in the kept examples.
    pub target_tokens: usize,
    /// Prompt/completion rows whose prompt and completion, encoded apart (as they are trained),
    /// give other ids than their concatenation encoded in one piece: BPE merged the prompt's end
    /// with the completion's start, typically a trailing space with the first word.
    pub boundary_merges: usize,
}

impl std::fmt::Display for DataStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows ({}), {} truncated, {} dropped without targets; {} tokens, {} targets",
            self.rows, self.format, self.truncated, self.dropped_no_targets, self.tokens, self.target_tokens
        )?;
        if self.boundary_merges > 0 {
            write!(
                f,
                "; {} rows encode differently apart than joined (the prompt's end merges with the \
                 completion's start), trained apart as generation sees them",
                self.boundary_merges
            )?;
        }
        Ok(())
    }
}

impl DataStats {
    /// A one-line hint when rows had a boundary merge: the prompts' trailing whitespace is part
    /// of what the model learns to continue from.
    pub fn boundary_hint(&self) -> Option<String> {
        (self.boundary_merges > 0).then(|| {
            format!(
                "{} of {} prompt/completion rows end their prompt where the tokenizer would merge \
                 it with the completion (usually a trailing space before a word); they are encoded \
                 as the prompt's own tokens followed by the completion's, the state generation \
                 starts from, so send prompts exactly as written in the data, trailing whitespace \
                 included",
                self.boundary_merges, self.rows
            )
        })
    }
}

impl DataStats {
    /// Nothing counted yet.
    pub(crate) fn empty(format: Format) -> Self {
        DataStats {
            rows: 0,
            truncated: 0,
            dropped_no_targets: 0,
            format,
            tokens: 0,
            target_tokens: 0,
            boundary_merges: 0,
        }
    }
}

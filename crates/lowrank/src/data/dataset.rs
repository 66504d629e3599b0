//! Loading a JSONL file into a [`Dataset`], and splitting one for evaluation.

use std::path::Path;

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

use super::encode::{DataOptions, Encoder, Example};
use super::format::{parse_row, Format};
use super::shuffle::permutation;

/// Tokenized examples and what loading them did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// The examples, in file order (rows dropped for want of targets left out).
    pub examples: Vec<Example>,
    /// Counts from loading.
    pub stats: DataStats,
}

/// What [`load_jsonl`] found and did.
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

/// Reads a JSONL file of `text`, `prompt`/`completion` or `messages` rows (one shape per file)
/// and tokenizes it as the [module docs](super) describe.
///
/// Blank lines are skipped. A malformed row, a row of another shape than the file's first, an
/// empty file, or a file whose every row lost its targets is an [`Error::Data`] naming the file
/// and, for a row, its 1-based line. `template` is needed for `messages` rows only.
pub fn load_jsonl(
    path: &Path,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    opts: &DataOptions,
) -> Result<Dataset> {
    if opts.max_seq_len < 2 {
        return Err(Error::Training(format!(
            "max_seq_len must be at least 2 (one token to predict from, one to predict); got {}",
            opts.max_seq_len
        )));
    }
    let error = |line: Option<usize>, message: String| Error::Data { path: path.to_path_buf(), line, message };
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut reader = std::io::BufReader::new(file);
    let encoder = Encoder::new(tokenizer, template, opts.train_on_prompt).map_err(|m| error(None, m))?;
    // Text past this many bytes cannot fit in max_seq_len tokens: rows are cut to it before they
    // are tokenised (and counted as truncated), so memory follows the sequence length, not the
    // longest line. The margin covers a chat template's markup.
    let max_bytes = opts.max_seq_len.saturating_add(64).saturating_mul(tokenizer.max_token_bytes());

    let mut examples = Vec::new();
    let mut first: Option<(Format, usize)> = None;
    let (mut rows, mut truncated, mut dropped, mut merges) = (0, 0, 0, 0);
    let mut raw = Vec::new();
    for index in 0.. {
        raw.clear();
        let n =
            std::io::BufRead::read_until(&mut reader, b'\n', &mut raw).map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        if raw.last() == Some(&b'\n') {
            raw.pop();
        }
        let line = index + 1;
        let text = std::str::from_utf8(&raw).map_err(|e| error(Some(line), format!("not UTF-8 text: {e}")))?;
        let text = if index == 0 { text.trim_start_matches('\u{feff}') } else { text };
        if text.trim().is_empty() {
            continue;
        }
        let row = parse_row(text).map_err(|m| error(Some(line), m))?;
        match first {
            None => first = Some((row.format(), line)),
            Some((format, first_line)) if format != row.format() => {
                return Err(error(
                    Some(line),
                    format!(
                        "a {} row ({}), but line {first_line} is a {} row ({}); every row of a file must have the same format",
                        row.format(),
                        row.format().keys(),
                        format,
                        format.keys()
                    ),
                ));
            }
            Some(_) => {}
        }
        rows += 1;
        let mut row = row;
        let cut = row.cut(max_bytes);
        let (mut example, merged) = encoder.encode(&row).map_err(|m| error(Some(line), m))?;
        merges += usize::from(merged);
        if cut || example.len() > opts.max_seq_len {
            example.ids.truncate(opts.max_seq_len);
            example.targets.truncate(opts.max_seq_len);
            truncated += 1;
        }
        if example.n_targets() == 0 {
            dropped += 1;
            continue;
        }
        examples.push(example);
    }

    let Some((format, _)) = first else {
        return Err(error(None, "no rows: the file is empty".into()));
    };
    if examples.is_empty() {
        let hint = if truncated > 0 {
            format!("; max_seq_len {} cuts off every target, raise it", opts.max_seq_len)
        } else if format == Format::Messages {
            "; is there an assistant turn?".into()
        } else {
            String::new()
        };
        return Err(error(None, format!("no row has a loss target left ({rows} rows, all dropped){hint}")));
    }
    let mut stats = DataStats::count(&examples, format);
    stats.rows = rows;
    stats.truncated = truncated;
    stats.dropped_no_targets = dropped;
    stats.boundary_merges = merges;
    Ok(Dataset { examples, stats })
}

impl DataStats {
    /// Stats for `examples` as they are: `rows` = their number, nothing truncated or dropped.
    fn count(examples: &[Example], format: Format) -> Self {
        DataStats {
            rows: examples.len(),
            truncated: 0,
            dropped_no_targets: 0,
            format,
            tokens: examples.iter().map(Example::len).sum(),
            target_tokens: examples.iter().map(Example::n_targets).sum(),
            boundary_merges: 0,
        }
    }
}

/// The shuffle stream [`Dataset::split`] draws from, apart from the epoch streams of
/// [`BatchPlan`](super::BatchPlan) so that one seed for both does not correlate them.
const SPLIT_STREAM: u64 = u64::MAX;

impl Dataset {
    /// Each example's number of tokens, in order (the input of
    /// [`pack_by_tokens`](super::pack_by_tokens)).
    pub fn lengths(&self) -> Vec<usize> {
        self.examples.iter().map(Example::len).collect()
    }

    /// Splits off `eval_fraction` of the examples (rounded, at least one) for evaluation, chosen
    /// by a shuffle fixed by `seed`; returns `(train, eval)`, each in the original order.
    ///
    /// Each part's stats count its own examples and tokens (`rows` = its examples); `truncated`,
    /// `dropped_no_targets` and `boundary_merges` describe loading, so they stay with the stats
    /// read before the split and are 0 in the parts. An error when either part would be empty or the fraction is
    /// not in (0, 1).
    pub fn split(self, eval_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(eval_fraction > 0.0 && eval_fraction < 1.0) {
            return Err(Error::Training(format!(
                "eval fraction must be between 0 and 1 (exclusive); got {eval_fraction}"
            )));
        }
        let n = self.examples.len();
        let n_eval = ((n as f64 * eval_fraction).round() as usize).max(1);
        if n_eval >= n {
            return Err(Error::Training(format!(
                "cannot split {n} examples with eval fraction {eval_fraction}: train and eval need at least one each"
            )));
        }
        let mut is_eval = vec![false; n];
        for &i in &permutation(n, seed, SPLIT_STREAM)[..n_eval] {
            is_eval[i] = true;
        }
        let (mut train, mut eval) = (Vec::with_capacity(n - n_eval), Vec::with_capacity(n_eval));
        for (example, eval_row) in self.examples.into_iter().zip(is_eval) {
            if eval_row { &mut eval } else { &mut train }.push(example);
        }
        let format = self.stats.format;
        Ok((
            Dataset { stats: DataStats::count(&train, format), examples: train },
            Dataset { stats: DataStats::count(&eval, format), examples: eval },
        ))
    }
}

//! A JSONL file as a [`Dataset`], and the [`Examples`] seam the trainer reads batches through.
//!
//! Loading reads the file once, line by line: every row is parsed, cut to what `max_seq_len`
//! can hold, tokenized, counted and checked, and then dropped, keeping only where the row starts
//! (an index of 32 bytes a row). A batch's rows are read and tokenized again when the batch is
//! trained, so memory follows the batch and the longest line, not the file. Tokenizing is
//! deterministic, so a row reads back as the ids it was counted with; a file changed under a run
//! is an error naming the row.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

use super::encode::{DataOptions, Encoder, Example};
use super::format::{parse_row, Format};
use super::shuffle::permutation;
use super::stats::DataStats;

/// Numbered examples the trainer draws batches from: a [`Dataset`] reading its file, or examples
/// already in memory (`[Example]`).
pub trait Examples {
    /// How many examples there are.
    fn len(&self) -> usize;

    /// True when there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples at `indices`, in that order; an index past [`len`](Self::len) is an error.
    fn fetch(&self, indices: &[usize]) -> Result<Vec<Example>>;
}

impl Examples for [Example] {
    fn len(&self) -> usize {
        <[Example]>::len(self)
    }

    fn fetch(&self, indices: &[usize]) -> Result<Vec<Example>> {
        indices.iter().map(|&i| self.get(i).cloned().ok_or_else(|| out_of_range(i, self.len()))).collect()
    }
}

fn out_of_range(index: usize, len: usize) -> Error {
    Error::Training(format!("example {index} asked for, but there are {len}"))
}

/// The kept rows of a JSONL file, read back from it on demand.
#[derive(Clone)]
pub struct Dataset<'a> {
    path: PathBuf,
    rows: RowEncoder<'a>,
    index: Vec<RowRef>,
    /// Counts from loading.
    pub stats: DataStats,
}

impl std::fmt::Debug for Dataset<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("path", &self.path)
            .field("examples", &self.index.len())
            .field("stats", &self.stats)
            .finish()
    }
}

/// Where a kept row is, and what it gave when it was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RowRef {
    /// Byte offset of the line in the file.
    offset: u64,
    /// 1-based line number, for errors.
    line: u64,
    /// FNV-1a hash of the line's bytes: a row that reads back otherwise means the file changed.
    hash: u64,
    /// Tokens after truncation.
    tokens: u32,
    /// Loss targets after truncation.
    targets: u32,
}

/// A line → the example it trains as.
#[derive(Clone)]
struct RowEncoder<'a> {
    encoder: Encoder<'a>,
    max_seq_len: usize,
    /// Texts are cut to this many bytes before tokenizing (see [`load_jsonl`]).
    max_bytes: usize,
}

/// What one row gave.
struct Encoded {
    format: Format,
    example: Example,
    truncated: bool,
    merged: bool,
}

impl RowEncoder<'_> {
    fn encode(&self, text: &str) -> std::result::Result<Encoded, String> {
        let mut row = parse_row(text)?;
        let cut = row.cut(self.max_bytes);
        let (mut example, merged) = self.encoder.encode(&row)?;
        let truncated = cut || example.len() > self.max_seq_len;
        example.ids.truncate(self.max_seq_len);
        example.targets.truncate(self.max_seq_len);
        Ok(Encoded { format: row.format(), example, truncated, merged })
    }
}

/// Reads one line into `raw` (without its `\n`); the bytes it took in the file, 0 at the end.
fn read_line(reader: &mut impl BufRead, raw: &mut Vec<u8>, path: &Path) -> Result<u64> {
    raw.clear();
    let n = reader.read_until(b'\n', raw).map_err(|e| Error::io("reading", path, e))?;
    if raw.last() == Some(&b'\n') {
        raw.pop();
    }
    Ok(n as u64)
}

/// A line's text: UTF-8, without the byte-order mark a file may start with.
fn line_text(raw: &[u8], offset: u64) -> std::result::Result<&str, String> {
    let text = std::str::from_utf8(raw).map_err(|e| format!("not UTF-8 text: {e}"))?;
    Ok(if offset == 0 { text.trim_start_matches('\u{feff}') } else { text })
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Reads a JSONL file of `text`, `prompt`/`completion` or `messages` rows (one shape per file)
/// and tokenizes it as the [module docs](super) describe, keeping an index of the rows that have
/// loss targets left.
///
/// Blank lines are skipped. A malformed row, a row of another shape than the file's first, an
/// empty file, or a file whose every row lost its targets is an [`Error::Data`] naming the file
/// and, for a row, its 1-based line. `template` is needed for `messages` rows only.
pub fn load_jsonl<'a>(
    path: &Path,
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    opts: &DataOptions,
) -> Result<Dataset<'a>> {
    if opts.max_seq_len < 2 || u32::try_from(opts.max_seq_len).is_err() {
        return Err(Error::Training(format!(
            "max_seq_len must be at least 2 (one token to predict from, one to predict) and below 2^32; got {}",
            opts.max_seq_len
        )));
    }
    let error = |line: Option<u64>, message: String| Error::Data {
        path: path.to_path_buf(),
        line: line.map(|l| l as usize),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut reader = BufReader::new(file);
    let encoder = Encoder::new(tokenizer, template, opts.train_on_prompt).map_err(|m| error(None, m))?;
    // Text past this many bytes cannot fit in max_seq_len tokens: rows are cut to it before they
    // are tokenized (and counted as truncated), so memory follows the sequence length, not the
    // longest text. The margin covers a chat template's markup.
    let max_bytes = opts.max_seq_len.saturating_add(64).saturating_mul(tokenizer.max_token_bytes());
    let rows = RowEncoder { encoder, max_seq_len: opts.max_seq_len, max_bytes };

    let mut index = Vec::new();
    let mut first: Option<(Format, u64)> = None;
    let mut stats = DataStats::empty(Format::Text);
    let (mut offset, mut line, mut raw) = (0u64, 0u64, Vec::new());
    loop {
        let start = offset;
        match read_line(&mut reader, &mut raw, path)? {
            0 => break,
            n => offset += n,
        }
        line += 1;
        let text = line_text(&raw, start).map_err(|m| error(Some(line), m))?;
        if text.trim().is_empty() {
            continue;
        }
        let row = rows.encode(text).map_err(|m| error(Some(line), m))?;
        match first {
            None => first = Some((row.format, line)),
            Some((format, first_line)) if format != row.format => {
                return Err(error(
                    Some(line),
                    format!(
                        "a {} row ({}), but line {first_line} is a {} row ({}); every row of a file must have the same format",
                        row.format,
                        row.format.keys(),
                        format,
                        format.keys()
                    ),
                ));
            }
            Some(_) => {}
        }
        stats.rows += 1;
        stats.truncated += usize::from(row.truncated);
        stats.boundary_merges += usize::from(row.merged);
        let targets = row.example.n_targets();
        if targets == 0 {
            stats.dropped_no_targets += 1;
            continue;
        }
        // Both fit: truncation keeps at most max_seq_len < 2^32 tokens.
        let (tokens, targets) = (row.example.len() as u32, targets as u32);
        index.push(RowRef { offset: start, line, hash: fnv1a(&raw), tokens, targets });
        stats.tokens += tokens as usize;
        stats.target_tokens += targets as usize;
    }

    let Some((format, _)) = first else {
        return Err(error(None, "no rows: the file is empty".into()));
    };
    stats.format = format;
    if index.is_empty() {
        let hint = if stats.truncated > 0 {
            format!("; max_seq_len {} cuts off every target, raise it", opts.max_seq_len)
        } else if format == Format::Messages {
            "; is there an assistant turn?".into()
        } else {
            String::new()
        };
        let n = stats.rows;
        return Err(error(None, format!("no row has a loss target left ({n} rows, all dropped){hint}")));
    }
    Ok(Dataset { path: path.to_path_buf(), rows, index, stats })
}

/// The shuffle stream [`Dataset::split`] draws from, apart from the epoch streams of
/// [`BatchPlan`](super::BatchPlan) so that one seed for both does not correlate them.
const SPLIT_STREAM: u64 = u64::MAX;

impl Dataset<'_> {
    /// Each example's number of tokens, in order (the input of
    /// [`pack_by_tokens`](super::pack_by_tokens)).
    pub fn lengths(&self) -> Vec<usize> {
        self.index.iter().map(|r| r.tokens as usize).collect()
    }

    /// Every example, read from the file (for small sets and tests; training reads by batch).
    pub fn examples(&self) -> Result<Vec<Example>> {
        self.fetch(&(0..self.index.len()).collect::<Vec<_>>())
    }

    /// Splits off `eval_fraction` of the examples (rounded, at least one) for evaluation, chosen
    /// by a shuffle fixed by `seed`; returns `(train, eval)`, each in the original order.
    ///
    /// Each part's stats count its own examples and tokens (`rows` = its examples); `truncated`,
    /// `dropped_no_targets` and `boundary_merges` describe loading, so they stay with the stats
    /// read before the split and are 0 in the parts. An error when either part would be empty or the fraction is
    /// not in (0, 1).
    pub fn split(self, eval_fraction: f64, seed: u64) -> Result<(Self, Self)> {
        if !(eval_fraction > 0.0 && eval_fraction < 1.0) {
            return Err(Error::Training(format!(
                "eval fraction must be between 0 and 1 (exclusive); got {eval_fraction}"
            )));
        }
        let n = self.index.len();
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
        for (row, eval_row) in self.index.iter().zip(is_eval) {
            if eval_row { &mut eval } else { &mut train }.push(*row);
        }
        let part = |index: Vec<RowRef>| {
            let mut stats = DataStats::empty(self.stats.format);
            stats.rows = index.len();
            stats.tokens = index.iter().map(|r| r.tokens as usize).sum();
            stats.target_tokens = index.iter().map(|r| r.targets as usize).sum();
            Dataset { path: self.path.clone(), rows: self.rows.clone(), index, stats }
        };
        Ok((part(train), part(eval)))
    }
}

impl Examples for Dataset<'_> {
    fn len(&self) -> usize {
        self.index.len()
    }

    fn fetch(&self, indices: &[usize]) -> Result<Vec<Example>> {
        let path = &self.path;
        let file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
        let mut reader = BufReader::new(file);
        let mut raw = Vec::new();
        let mut examples = Vec::with_capacity(indices.len());
        for &i in indices {
            let row = *self.index.get(i).ok_or_else(|| out_of_range(i, self.index.len()))?;
            let changed = |what: &str| Error::Data {
                path: path.clone(),
                line: Some(row.line as usize),
                message: format!("{what} since the file was loaded: the data file changed under the run"),
            };
            reader.seek(SeekFrom::Start(row.offset)).map_err(|e| Error::io("reading", path, e))?;
            if read_line(&mut reader, &mut raw, path)? == 0 || fnv1a(&raw) != row.hash {
                return Err(changed("the row reads otherwise"));
            }
            let text = line_text(&raw, row.offset).map_err(|_| changed("the row is no longer UTF-8"))?;
            let encoded = self.rows.encode(text).map_err(|m| changed(&format!("the row fails ({m})")))?;
            if encoded.example.len() != row.tokens as usize {
                return Err(changed("the row tokenizes otherwise"));
            }
            examples.push(encoded.example);
        }
        Ok(examples)
    }
}

//! Training data: JSONL rows → token ids with a loss mask → batches.
//!
//! A file holds rows of one of three shapes, told apart by their keys ([`Format`]):
//!
//! | shape | row | loss on |
//! |---|---|---|
//! | text | `{"text": "..."}` | every token |
//! | prompt + completion | `{"prompt": "...", "completion": "..."}` | the completion, after the prompt's own ids (no chat template) |
//! | messages | `{"messages": [{"role": "...", "content": "..."}, ...]}` | the `assistant` turns, via the chat template |
//!
//! [`load_jsonl`] reads and tokenizes a file into a [`Dataset`] of [`Example`]s (ids plus a target
//! mask), appending the eos, truncating to [`DataOptions::max_seq_len`] and dropping rows left
//! without targets; the dataset keeps where each row is and reads a batch's rows again when it is
//! trained ([`Examples`]), so memory does not grow with the file; [`Dataset::split`] holds out an evaluation set. [`BatchPlan`] orders the
//! examples into batches per epoch from a seed alone, so a step number is enough to resume;
//! [`pack_by_tokens`] fills batches up to a token budget instead.
//!
//! Layout: `format.rs` parses rows; `encode.rs` turns a row into ids and targets (the masking
//! rules are documented there); `dataset.rs` indexes, reads back and splits files; `stats.rs` counts; `batch.rs` plans batches;
//! `shuffle.rs` is the seeded permutation they share, fixed across builds.

mod batch;
mod dataset;
mod encode;
mod format;
mod shuffle;
mod stats;

pub use batch::{pack_by_tokens, BatchPlan};
pub use dataset::{load_jsonl, Dataset, Examples};
pub use encode::{DataOptions, Example};
pub use format::Format;
pub use stats::DataStats;

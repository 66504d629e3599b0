//! The library's one error type: a variant per failed operation, each naming what and where.

use std::path::PathBuf;

/// Everything that can go wrong in lowrank's library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{op} {path}")]
    Io {
        /// What we were doing ("reading", "writing", "opening").
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file did not parse or lacks a field.
    #[error("parsing {path}")]
    Json {
        /// The file.
        path: PathBuf,
        /// serde's message, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A safetensors file is malformed (truncated, bad header, ...).
    #[error("reading safetensors {path}: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A GGUF file is malformed or holds something we cannot run.
    #[error("reading GGUF {path}: {message}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model configuration is inconsistent or unsupported.
    #[error("model config: {0}")]
    Config(String),
    /// A weight the model needs is not in the files.
    #[error("missing weight `{name}` in {source_desc}")]
    MissingWeight {
        /// HF-style tensor name.
        name: String,
        /// Where we looked.
        source_desc: String,
    },
    /// A tensor has a different shape than the model or adapter expects.
    #[error("shape mismatch for `{name}`: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// Tensor or module name.
        name: String,
        /// Shape the model requires.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// An adapter is malformed, targets modules the model lacks, or uses an unsupported option.
    #[error("adapter {path}: {message}")]
    Adapter {
        /// The adapter directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Tokenizer construction or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A training data file has a malformed row, or nothing to train on.
    #[error("{}{}: {message}", .path.display(), .line.map(|l| format!(":{l}")).unwrap_or_default())]
    Data {
        /// The data file.
        path: PathBuf,
        /// 1-based line of the offending row; `None` for the file as a whole.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// A generation request with an empty prompt.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A prompt that leaves no room for a new token in the model's context.
    #[error("the prompt has {tokens} tokens; the model's context is {context}")]
    PromptTooLong {
        /// Prompt length in tokens.
        tokens: usize,
        /// The model's context (`max_position_embeddings`).
        context: usize,
    },
    /// A prompt token id past the model's embedding (a tokenizer with more tokens than the model).
    #[error("token id {id} at prompt position {position} is past the model's {vocab} embeddings")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Where in the prompt.
        position: usize,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// Sampling parameters out of range (temperature, top-p, top-k), or logits that cannot be
    /// sampled from.
    #[error("sampling: {0}")]
    Sampling(String),
    /// Tensors handed to a forward or loss computation that do not fit together (sequence and
    /// cache counts, target counts, shapes inside an op).
    #[error("{0}")]
    Batch(String),
    /// A new adapter that cannot be made for this model (no module matched, an init that the
    /// base's storage cannot support, a combination of adapters that does not fit).
    #[error("new adapter: {0}")]
    NewAdapter(String),
    /// A weight that cannot be quantised (non-finite values, a shape the format cannot hold).
    #[error("quantising: {0}")]
    Quantize(String),
    /// The serving engine's limits are not usable.
    #[error("engine: {0}")]
    Engine(String),
    /// Writing a model or adapter in another form failed (non-finite values, an adapter the
    /// target format cannot represent).
    #[error("export: {0}")]
    Export(String),
    /// Training cannot start or continue: settings or data that cannot train (an empty
    /// evaluation set, a bad split), a non-finite loss, a checkpoint that does not fit the run.
    #[error("training: {0}")]
    Training(String),
    /// An error from the tensor engine.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { op, path: path.into(), source }
    }
}

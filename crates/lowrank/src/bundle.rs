//! A model with everything needed to talk to it: weights, tokenizer, chat template.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::chat::ChatTemplate;
use crate::model::{detect_format, GgufFile, LoadOptions, Model, ModelFormat};
use crate::tokenizer::Tokenizer;
use crate::Result;

/// A loaded model, its tokenizer and its chat template.
pub struct ModelBundle {
    /// The transformer.
    pub model: Model,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template, when the model ships one.
    pub chat_template: Option<ChatTemplate>,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// The on-disk form.
    pub format: ModelFormat,
    /// Wall time of the load.
    pub load_secs: f64,
}

impl ModelBundle {
    /// Loads an HF model directory or a GGUF file with its tokenizer and chat template.
    pub fn open(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let t = Instant::now();
        let format = detect_format(path)?;
        let (model, tokenizer, chat_template) = match format {
            ModelFormat::HfDir => {
                let model = Model::from_path(path, opts)?;
                let tokenizer = Tokenizer::from_hf_dir(path)?;
                let chat = ChatTemplate::from_hf_dir(path)?;
                (model, tokenizer, chat)
            }
            ModelFormat::Gguf => {
                let mut g = GgufFile::open(path, &opts.device, opts.gguf_dequantize())?;
                let cfg = g.config()?;
                let model = Model::load_with(cfg, &g, opts)?;
                let tokenizer = Tokenizer::from_gguf(g.metadata(), path)?;
                let chat = ChatTemplate::from_gguf(g.metadata(), &tokenizer)?;
                (model, tokenizer, chat)
            }
        };
        Ok(Self { model, tokenizer, chat_template, path: path.into(), format, load_secs: t.elapsed().as_secs_f64() })
    }
}

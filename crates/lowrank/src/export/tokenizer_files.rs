//! The tokenizer side of an HF model directory: copied from an HF source, or written from a
//! tokenizer built out of GGUF metadata (`tokenizer.json`, `tokenizer_config.json` with the chat
//! template, `special_tokens_map.json`, `generation_config.json`).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::chat::ChatTemplate;
use crate::staging::write_synced;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Files transformers reads beside the weights.
const KNOWN: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
];

/// The tokenizer files to write, and the special-token ids `config.json` records.
#[derive(Clone, Debug)]
pub struct TokenizerFiles {
    files: Vec<(String, Source)>,
    ids: Vec<(&'static str, Value)>,
}

#[derive(Clone, Debug)]
enum Source {
    Copy(PathBuf),
    Text(String),
}

impl TokenizerFiles {
    /// No tokenizer (a bare checkpoint).
    pub fn none() -> Self {
        Self { files: Vec::new(), ids: Vec::new() }
    }

    /// Every tokenizer file of the HF directory `dir`, copied as it is.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let files = KNOWN
            .iter()
            .filter(|n| dir.join(n).is_file())
            .map(|n| (n.to_string(), Source::Copy(dir.join(n))))
            .collect();
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io("reading", &path, e))?;
        let cfg: Value = serde_json::from_str(&text).map_err(|e| Error::Json { path, source: e })?;
        let ids = ["bos_token_id", "eos_token_id", "pad_token_id"]
            .into_iter()
            .filter_map(|k| Some((k, cfg.get(k)?.clone())))
            .collect();
        Ok(Self { files, ids })
    }

    /// Files written out of `tokenizer` (built from GGUF metadata) and its chat template.
    pub fn from_tokenizer(tokenizer: &Tokenizer, chat: Option<&ChatTemplate>, model_max_length: usize) -> Result<Self> {
        let json = tokenizer
            .inner()
            .to_string(true)
            .map_err(|e| Error::Tokenizer(format!("serialising tokenizer.json: {e}")))?;
        let eos_ids = tokenizer.eos_token_ids();
        let eos_id = match eos_ids {
            [one] => json!(one),
            [] => Value::Null,
            many => json!(many),
        };
        let mut ids = vec![("eos_token_id", eos_id)];
        if let Some(b) = tokenizer.bos_token_id() {
            ids.insert(0, ("bos_token_id", json!(b)));
        }
        let mut special = serde_json::Map::new();
        for (key, token) in [("bos_token", tokenizer.bos_token()), ("eos_token", tokenizer.eos_token())] {
            if let Some(t) = token {
                special.insert(key.into(), json!(t));
            }
        }
        let mut config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": false,
        });
        for (k, v) in &special {
            config[k] = v.clone();
        }
        if let Some(c) = chat {
            config["chat_template"] = json!(c.source());
        }
        let generation: serde_json::Map<String, Value> = ids.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let pretty = |v: &Value| {
            serde_json::to_string_pretty(v).map(|s| s + "\n").map_err(|e| Error::Tokenizer(format!("serialising: {e}")))
        };
        let files = vec![
            ("tokenizer.json".to_string(), Source::Text(json)),
            ("tokenizer_config.json".to_string(), Source::Text(pretty(&config)?)),
            ("special_tokens_map.json".to_string(), Source::Text(pretty(&Value::Object(special))?)),
            ("generation_config.json".to_string(), Source::Text(pretty(&Value::Object(generation))?)),
        ];
        Ok(Self { files, ids })
    }

    /// `bos_token_id` / `eos_token_id` / `pad_token_id` for `config.json`.
    pub fn special_token_ids(&self) -> Vec<(&'static str, Value)> {
        self.ids.clone()
    }

    /// Writes (or copies) every file into `dir`; returns their names.
    pub fn write_into(&self, dir: &Path) -> Result<Vec<String>> {
        for (name, src) in &self.files {
            let to = dir.join(name);
            match src {
                Source::Text(t) => write_synced(&to, t.as_bytes())?,
                Source::Copy(from) => {
                    let bytes = std::fs::read(from).map_err(|e| Error::io("reading", from, e))?;
                    write_synced(&to, &bytes)?;
                }
            }
        }
        Ok(self.files.iter().map(|(n, _)| n.clone()).collect())
    }
}

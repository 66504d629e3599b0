//! [`Tokenizer::from_hf_dir`]: `tokenizer.json` plus the config files beside it.
//!
//! transformers loads `tokenizer.json` as is, then applies `tokenizer_config.json`: tokens listed
//! there (`added_tokens_decoder`, `bos_token`, ...) that `tokenizer.json` lacks are added. Its
//! `add_bos_token`/`add_eos_token` are ignored when a `tokenizer.json` exists (transformers 5
//! drops them; the post-processor in `tokenizer.json` decides). We do the same.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::ModelWrapper;
use tokenizers::AddedToken;

use super::base::{add_missing_tokens, SpecialToken, Tokenizer};
use crate::error::{Error, Result};

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`.
const NAMED_SPECIAL_TOKENS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

impl Tokenizer {
    /// Loads the tokenizer of an HF model directory: `tokenizer.json` (required), and when present
    /// `tokenizer_config.json` (special tokens, `clean_up_tokenization_spaces`),
    /// `generation_config.json` (more eos ids; `config.json` when it is absent).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&tokenizer_path).map_err(|e| Error::io("reading", &tokenizer_path, e))?;
        let mut inner: tokenizers::Tokenizer =
            serde_json::from_str(&text).map_err(|source| Error::Json { path: tokenizer_path.clone(), source })?;

        let config = read_json_object(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        add_missing_tokens(&mut inner, config_added_tokens(&config));

        let named_token = |name: &str| config.get(name).and_then(special_token_text);
        let generation = read_json_object(&dir.join("generation_config.json"))?;
        let model_config = match generation {
            Some(_) => None,
            None => read_json_object(&dir.join("config.json"))?,
        };
        let ids_config = generation.as_ref().or(model_config.as_ref());

        let resolve = |token_name: &str, id_name: &str| -> Option<SpecialToken> {
            if let Some(text) = named_token(token_name) {
                return inner.token_to_id(&text).map(|id| SpecialToken { text, id });
            }
            // No token named in tokenizer_config.json: fall back to the model's first id.
            let id = ids_config.and_then(|c| c.get(id_name)).and_then(ids_of).and_then(|ids| ids.first().copied())?;
            inner.id_to_token(id).map(|text| SpecialToken { text, id })
        };
        let bos = resolve("bos_token", "bos_token_id");
        let eos = resolve("eos_token", "eos_token_id");

        let is_bpe = matches!(inner.get_model(), ModelWrapper::BPE(_));
        let clean_up = !is_bpe && config.get("clean_up_tokenization_spaces").and_then(Value::as_bool).unwrap_or(false);
        let extra_eos = ids_config.and_then(|c| c.get("eos_token_id")).and_then(ids_of).unwrap_or_default();
        Ok(Tokenizer::assemble(inner, bos, eos, &extra_eos, clean_up))
    }
}

/// The tokens `tokenizer_config.json` declares, in transformers' order: `added_tokens_decoder`
/// by id, then the named special tokens, then the extra special tokens.
fn config_added_tokens(config: &serde_json::Map<String, Value>) -> Vec<AddedToken> {
    let mut tokens = Vec::new();
    if let Some(Value::Object(decoder)) = config.get("added_tokens_decoder") {
        let mut entries: Vec<(u64, &Value)> =
            decoder.iter().filter_map(|(id, v)| id.parse::<u64>().ok().map(|id| (id, v))).collect();
        entries.sort_by_key(|(id, _)| *id);
        tokens.extend(entries.into_iter().filter_map(|(_, v)| added_token(v, false)));
    }
    for name in NAMED_SPECIAL_TOKENS {
        // A named special token is special whatever its entry says.
        tokens.extend(config.get(name).and_then(|v| added_token(v, true)).map(|t| t.special(true)));
    }
    for name in ["additional_special_tokens", "extra_special_tokens"] {
        if let Some(Value::Array(list)) = config.get(name) {
            tokens.extend(list.iter().filter_map(|v| added_token(v, true)));
        }
    }
    tokens
}

/// A token written as `"<s>"` or as `{"content": "<s>", "special": true, "lstrip": false, ...}`.
fn added_token(value: &Value, special_by_default: bool) -> Option<AddedToken> {
    match value {
        Value::String(s) => Some(AddedToken::from(s.as_str(), special_by_default)),
        Value::Object(map) => {
            let content = map.get("content")?.as_str()?;
            let flag = |key: &str, default: bool| map.get(key).and_then(Value::as_bool).unwrap_or(default);
            let special = flag("special", special_by_default);
            Some(
                AddedToken::from(content, special)
                    .single_word(flag("single_word", false))
                    .lstrip(flag("lstrip", false))
                    .rstrip(flag("rstrip", false))
                    .normalized(flag("normalized", !special)),
            )
        }
        _ => None,
    }
}

/// The text of a named special token (`"<s>"` or `{"content": "<s>", ...}`).
fn special_token_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `2` or `[2, 7]` as ids; anything else (null, negative) as none.
fn ids_of(value: &Value) -> Option<Vec<u32>> {
    let one = |v: &Value| v.as_u64().and_then(|id| u32::try_from(id).ok());
    match value {
        Value::Array(list) => Some(list.iter().filter_map(one).collect()),
        other => one(other).map(|id| vec![id]),
    }
}

/// A JSON object from `path`; `None` when the file does not exist.
pub(crate) fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, Value>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", path, e)),
    };
    let to_json_error = |source| Error::Json { path: PathBuf::from(path), source };
    match serde_json::from_str(&text).map_err(to_json_error)? {
        Value::Object(map) => Ok(Some(map)),
        _ => Err(to_json_error(serde::de::Error::custom("expected a JSON object"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_int_and_list() {
        assert_eq!(ids_of(&serde_json::json!(2)), Some(vec![2]));
        assert_eq!(ids_of(&serde_json::json!([2, 7])), Some(vec![2, 7]));
        assert_eq!(ids_of(&serde_json::json!(null)), None);
    }

    #[test]
    fn added_token_from_object() {
        let token =
            added_token(&serde_json::json!({"content": "<x>", "special": false, "lstrip": true}), true).unwrap();
        assert_eq!(token.content, "<x>");
        assert!(!token.special && token.lstrip && token.normalized);
    }
}

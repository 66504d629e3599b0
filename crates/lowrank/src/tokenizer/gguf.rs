//! [`Tokenizer::from_gguf`]: the tokenizer a GGUF file describes in its metadata.
//!
//! The metadata holds llama.cpp's view (`tokenizer.ggml.*`): the tokens, their types, merges or
//! scores, and special ids. We rebuild from it the pipeline transformers' GGUF loader
//! (`integrations/gguf/gguf_tokenizer_mapping.py`) builds, so the ids agree with
//! `AutoTokenizer.from_pretrained(dir, gguf_file=...)`:
//!
//! 1. the model: byte-level BPE for `gpt2` ([`super::byte_level`]), SentencePiece-style BPE with
//!    byte fallback for `llama` ([`super::sentencepiece`]);
//! 2. tokens typed CONTROL become special added tokens, USER_DEFINED ones plain added tokens;
//! 3. the bos/eos/unk/pad tokens become special added tokens (under the ids the file gives);
//! 4. `add_bos_token` (default on for `llama`, off otherwise) and `add_eos_token` set the
//!    post-processor.
//!
//! Deliberate differences from transformers, each where transformers' result cannot be right for
//! the model: a byte-level CONTROL token spelled outside the byte alphabet (DeepSeek's
//! `<｜end▁of▁sentence｜>`) keeps its own id and is matched whole, as llama.cpp does (transformers
//! cuts it into bytes, and for a named special token appends a second copy past the vocabulary);
//! and `tokenizer.ggml.add_space_prefix = false` turns off the SentencePiece prefix space, which
//! transformers ignores.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::AddedToken;

use super::base::{add_missing_tokens, bos_eos_template, SpecialToken, Tokenizer};
use super::{byte_level, sentencepiece, token_type};
use crate::error::{Error, Result};

/// Ids that end generation besides the eos, as llama.cpp's vocabulary loader reads them.
const EOG_KEYS: [&str; 5] = [
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.fim_pad_token_id",
    "tokenizer.ggml.fim_rep_token_id",
    "tokenizer.ggml.fim_sep_token_id",
];
/// Tokens that end generation in llama.cpp by their spelling (llama-vocab.cpp of the llama.cpp
/// that llama-cpp-python 0.3.36 vendors).
const EOG_TEXTS: [&str; 22] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

impl Tokenizer {
    /// Builds the tokenizer described by GGUF metadata (`Content::metadata` of candle's
    /// `gguf_file`). `path` only names the file in errors.
    ///
    /// Supports `tokenizer.ggml.model` = `gpt2` (byte-level BPE; `tokenizer.ggml.pre` picks the
    /// split regex) and `llama` (SentencePiece BPE with byte fallback; `phi3` files get Phi-3's
    /// normalizer).
    pub fn from_gguf(metadata: &HashMap<String, Value>, path: &Path) -> Result<Self> {
        let meta = Metadata { map: metadata, path };
        let model = meta.string("tokenizer.ggml.model")?.ok_or_else(|| meta.error("no `tokenizer.ggml.model`"))?;
        let tokens = meta.strings("tokenizer.ggml.tokens")?.ok_or_else(|| meta.error("no `tokenizer.ggml.tokens`"))?;
        if tokens.is_empty() {
            return Err(meta.error("`tokenizer.ggml.tokens` is empty"));
        }
        let types = meta.integers("tokenizer.ggml.token_type")?.unwrap_or_default();
        let architecture = meta.string("general.architecture")?.unwrap_or_default();
        let merges = merges(&meta, &tokens)?;
        let tokenizer_error = |e: tokenizers::Error| meta.error(format!("building the `{model}` tokenizer: {e}"));

        let mut inner = match model {
            "gpt2" => {
                let pre = meta.string("tokenizer.ggml.pre")?;
                byte_level::build(&tokens, &types, merges, pre).map_err(tokenizer_error)?
            }
            "llama" => {
                // Gemma's (transformers' GemmaTokenizer: spaces become `▁`, no prefix, no split)
                // is the Llama flavor without the space prefix, which its files say.
                let gemma = matches!(architecture, "gemma" | "gemma2" | "gemma3");
                let flavor = match architecture {
                    "phi3" => sentencepiece::Flavor::Phi3,
                    _ => sentencepiece::Flavor::Llama {
                        add_space_prefix: meta.flag("tokenizer.ggml.add_space_prefix")?.unwrap_or(!gemma),
                    },
                };
                sentencepiece::build(&tokens, merges, flavor).map_err(tokenizer_error)?
            }
            other => {
                return Err(meta.error(format!("tokenizer model `{other}` is not supported (supported: gpt2, llama)")))
            }
        };
        add_typed_tokens(&mut inner, &tokens, &types);

        let special = |key: &str| -> Result<Option<SpecialToken>> {
            let Some(id) = meta.id(key)? else { return Ok(None) };
            let text = tokens
                .get(id as usize)
                .ok_or_else(|| meta.error(format!("`{key}` = {id} is past the {} tokens", tokens.len())))?;
            Ok(Some(SpecialToken { text: text.to_string(), id }))
        };
        let bos = special("tokenizer.ggml.bos_token_id")?;
        let eos = special("tokenizer.ggml.eos_token_id")?;
        let unk = special("tokenizer.ggml.unknown_token_id")?;
        let pad = special("tokenizer.ggml.padding_token_id")?;
        // Only under a spelling the vocabulary knows: a new id would be past the model's embedding.
        let named: Vec<AddedToken> = [&bos, &eos, &unk, &pad]
            .into_iter()
            .flatten()
            .filter(|t| inner.token_to_id(&t.text).is_some())
            .map(|t| AddedToken::from(t.text.as_str(), true))
            .collect();
        add_missing_tokens(&mut inner, named);

        let add_bos = meta.flag("tokenizer.ggml.add_bos_token")?.unwrap_or(model == "llama");
        let add_eos = meta.flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        if let Some(template) = bos_eos_template(bos.as_ref(), eos.as_ref(), add_bos, add_eos)? {
            inner.with_post_processor(Some(template));
        }

        // What ends generation in llama.cpp (its end-of-generation set): the end-of-turn/-message
        // and fill-in-the-middle ids the file names, and the tokens spelled as the turn ends of
        // known chat formats (transformers reads none of these; an id past the vocabulary here is
        // ignored rather than fatal).
        let mut extra_eos = Vec::new();
        for key in EOG_KEYS {
            extra_eos.extend(meta.id(key)?.filter(|&id| (id as usize) < tokens.len()));
        }
        extra_eos.extend(tokens.iter().enumerate().filter(|(_, t)| EOG_TEXTS.contains(t)).map(|(id, _)| id as u32));
        Ok(Tokenizer::assemble(inner, bos, eos, &extra_eos, false))
    }
}

/// The merges the file lists, or (SentencePiece files list none) the ones the scores imply.
fn merges(meta: &Metadata, tokens: &[&str]) -> Result<Vec<(String, String)>> {
    if let Some(list) = meta.strings("tokenizer.ggml.merges")? {
        return list
            .iter()
            .map(|merge| match merge.split_once(' ') {
                Some((left, right)) if !right.contains(' ') => Ok((left.to_string(), right.to_string())),
                _ => Err(meta.error(format!("merge `{merge}` is not two tokens separated by one space"))),
            })
            .collect();
    }
    let scores = meta
        .floats("tokenizer.ggml.scores")?
        .ok_or_else(|| meta.error("neither `tokenizer.ggml.merges` nor `tokenizer.ggml.scores`"))?;
    Ok(sentencepiece::generate_merges(tokens, &scores))
}

/// Adds CONTROL tokens as special tokens and USER_DEFINED ones that are in the vocabulary as
/// plain added tokens, so both are matched whole in text. In a byte-level vocabulary a CONTROL
/// token spelled outside the byte alphabet was kept under its own spelling (see the module doc).
fn add_typed_tokens(inner: &mut tokenizers::Tokenizer, tokens: &[&str], types: &[i64]) {
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &kind)| kind == token_type::CONTROL)
        .map(|(token, _)| AddedToken::from(*token, true).normalized(false))
        .collect();
    if !control.is_empty() {
        inner.add_special_tokens(&control);
    }
    let user_defined: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(token, &kind)| kind == token_type::USER_DEFINED && inner.token_to_id(token).is_some())
        .map(|(token, _)| AddedToken::from(*token, false).normalized(false))
        .collect();
    if !user_defined.is_empty() {
        inner.add_tokens(&user_defined);
    }
}

/// Typed access to GGUF metadata, with errors that name the file and the key.
struct Metadata<'a> {
    map: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl<'a> Metadata<'a> {
    fn error(&self, message: impl Into<String>) -> Error {
        Error::Gguf { path: self.path.to_path_buf(), message: message.into() }
    }

    fn wrong_type(&self, key: &str, expected: &str) -> Error {
        self.error(format!("`{key}` is not {expected}"))
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(self.wrong_type(key, "a string")),
        }
    }

    fn flag(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.wrong_type(key, "a bool")),
        }
    }

    /// A token id: any integer type that fits a u32. A negative id (llama.cpp writes -1 for
    /// "none" in some files) counts as absent.
    fn id(&self, key: &str) -> Result<Option<u32>> {
        let Some(value) = self.map.get(key) else {
            return Ok(None);
        };
        match integer(value) {
            Some(i) if i < 0 => Ok(None),
            Some(i) => u32::try_from(i).map(Some).map_err(|_| self.wrong_type(key, "a token id")),
            None => Err(self.wrong_type(key, "an integer")),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items.as_slice())),
            Some(_) => Err(self.wrong_type(key, "an array")),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        let strings = items.iter().map(|v| match v {
            Value::String(s) => Ok(s.as_str()),
            _ => Err(self.wrong_type(key, "an array of strings")),
        });
        strings.collect::<Result<_>>().map(Some)
    }

    fn integers(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        let ints = items.iter().map(|v| integer(v).ok_or_else(|| self.wrong_type(key, "an array of integers")));
        ints.collect::<Result<_>>().map(Some)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        let floats = items.iter().map(|v| match v {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            _ => Err(self.wrong_type(key, "an array of floats")),
        });
        floats.collect::<Result<_>>().map(Some)
    }
}

fn integer(value: &Value) -> Option<i64> {
    Some(match value {
        Value::U8(v) => *v as i64,
        Value::I8(v) => *v as i64,
        Value::U16(v) => *v as i64,
        Value::I16(v) => *v as i64,
        Value::U32(v) => *v as i64,
        Value::I32(v) => *v as i64,
        Value::U64(v) => i64::try_from(*v).ok()?,
        Value::I64(v) => *v,
        _ => return None,
    })
}

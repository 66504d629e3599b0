//! `tokenizer.ggml.*` metadata for the tokenizer of an HF directory, as llama.cpp's converter
//! writes it, for byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`).
//!
//! llama.cpp picks its split regex from `tokenizer.ggml.pre`, a name its converter chooses by
//! hashing the tokenizer's output on a probe text. Here each candidate name is tried the same
//! way: the metadata is read back through [`Tokenizer::from_gguf`] and the first name whose ids
//! equal the HF tokenizer's on the probe texts is kept.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use super::base::Tokenizer;
use super::token_type;
use crate::error::{Error, Result};

/// `tokenizer.ggml.pre` names to try, GPT-2's own regex first.
const PRE_CANDIDATES: &[&str] = &["gpt-2", "llama-bpe", "qwen2", "tekken", "qwen35", "gpt-4o"];

const PROBES: &[&str] = &[
    "Hello world! It's 2024-05-17, and   3.14159 is π. Ünïcödé ÀÉÎ 日本語のテキスト 🙂🙃",
    "  leading spaces\n\n\ttabs and\r\nnewlines    trailing   ",
    "def f(x):\n    return x**2 + 12345678 // 7  # comment\n",
    "I'm you're he'll we've they'd DON'T 1,000,000 $5.99 user@example.com",
];

/// The `tokenizer.ggml.*` entries (and `tokenizer.chat_template` when given) for the tokenizer of
/// the HF directory `dir`, its vocabulary padded to `vocab_size` entries as the converter does.
pub fn gguf_tokenizer_metadata(
    dir: &Path,
    vocab_size: usize,
    chat_template: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    let hf = Tokenizer::from_hf_dir(dir)?;
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("reading", &path, e))?;
    let json: Json = serde_json::from_str(&text).map_err(|e| Error::Json { path: path.clone(), source: e })?;
    let unsupported = |what: &str| {
        Error::Tokenizer(format!("{}: {what}; only byte-level BPE tokenizers convert to GGUF so far", path.display()))
    };
    if json["model"]["type"] != "BPE" {
        return Err(unsupported(&format!("the model is {}", json["model"]["type"])));
    }
    if json["decoder"]["type"] != "ByteLevel" {
        return Err(unsupported("the decoder is not ByteLevel (a SentencePiece-style vocabulary?)"));
    }

    // Tokens by id: the BPE vocabulary, then added tokens (special ones are CONTROL).
    let mut by_id: BTreeMap<usize, (String, i32)> = BTreeMap::new();
    for (token, id) in json["model"]["vocab"].as_object().into_iter().flatten() {
        let id = id.as_u64().ok_or_else(|| unsupported("a vocabulary id is not an integer"))? as usize;
        by_id.insert(id, (token.clone(), token_type::NORMAL as i32));
    }
    for t in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else { continue };
        let kind =
            if t["special"].as_bool().unwrap_or(false) { token_type::CONTROL } else { token_type::USER_DEFINED } as i32;
        by_id.insert(id as usize, (content.to_string(), kind));
    }
    let n = vocab_size.max(by_id.keys().next_back().map_or(0, |m| m + 1));
    let (tokens, types): (Vec<String>, Vec<i32>) =
        (0..n).map(|i| by_id.remove(&i).unwrap_or_else(|| (format!("[PAD{i}]"), token_type::UNUSED as i32))).unzip();
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 => {
                Ok(format!("{} {}", p[0].as_str().unwrap_or_default(), p[1].as_str().unwrap_or_default()))
            }
            _ => Err(unsupported("a merge is neither \"a b\" nor [a, b]")),
        })
        .collect::<Result<_>>()?;

    let mut meta: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges.into_iter().map(Value::String).collect())),
    ];
    if let Some(b) = hf.bos_token_id() {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(&e) = hf.eos_token_ids().first() {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    // The post-processor decides whether a bos is added (transformers 5 reads no flag).
    let (with, without) = (hf.encode("x", true)?, hf.encode("x", false)?);
    let add_bos = hf.bos_token_id().is_some_and(|b| with.first() == Some(&b) && without.first() != Some(&b));
    meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    if let Some(t) = chat_template {
        meta.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }

    let pre = pick_pre(&hf, &meta, &path)?;
    meta.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
    Ok(meta)
}

/// The first `tokenizer.ggml.pre` whose tokenizer, built back from `meta`, gives `hf`'s ids.
fn pick_pre(hf: &Tokenizer, meta: &[(String, Value)], path: &Path) -> Result<&'static str> {
    let want: Vec<Vec<u32>> = PROBES.iter().map(|p| hf.encode(p, false)).collect::<Result<_>>()?;
    for pre in PRE_CANDIDATES {
        let mut map: HashMap<String, Value> = meta.iter().cloned().collect();
        map.insert("tokenizer.ggml.pre".into(), Value::String(pre.to_string()));
        let Ok(t) = Tokenizer::from_gguf(&map, path) else { continue };
        let same = PROBES.iter().zip(&want).all(|(p, w)| t.encode(p, false).is_ok_and(|ids| &ids == w));
        if same {
            return Ok(pre);
        }
    }
    Err(Error::Tokenizer(format!(
        "{}: no llama.cpp pre-tokenizer ({}) reproduces this tokenizer's splits; llama.cpp would tokenize differently",
        path.display(),
        PRE_CANDIDATES.join(", ")
    )))
}

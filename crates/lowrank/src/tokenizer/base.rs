//! The [`Tokenizer`] type: encode, decode, and the special tokens generation and chat templates need.

use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

use crate::error::{Error, Result};

/// A tokenizer: a `tokenizers` pipeline plus the special tokens around it.
///
/// Build it with [`Tokenizer::from_hf_dir`] or [`Tokenizer::from_gguf`]. Both give the ids
/// transformers gives for the same files (`AutoTokenizer.from_pretrained(dir)` and
/// `AutoTokenizer.from_pretrained(dir, gguf_file=...)`).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    pub(super) inner: tokenizers::Tokenizer,
    /// `inner` with special tokens' spellings read as text ([`Tokenizer::encode_plain`]), made
    /// on first use.
    plain: std::sync::OnceLock<tokenizers::Tokenizer>,
    pub(super) bos: Option<SpecialToken>,
    pub(super) eos: Option<SpecialToken>,
    /// Every id that ends generation; the tokenizer's eos first.
    pub(super) eos_ids: Vec<u32>,
    /// transformers' `clean_up_tokenization_spaces`, applied on decode (never for BPE models).
    pub(super) clean_up_spaces: bool,
}

/// A special token's text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SpecialToken {
    pub text: String,
    pub id: u32,
}

impl Tokenizer {
    /// Assembles a tokenizer; `extra_eos` are more ids that end generation (generation config).
    pub(super) fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<SpecialToken>,
        eos: Option<SpecialToken>,
        extra_eos: &[u32],
        clean_up_spaces: bool,
    ) -> Self {
        let mut eos_ids = Vec::new();
        for id in eos.iter().map(|t| t.id).chain(extra_eos.iter().copied()) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        Tokenizer { inner, plain: std::sync::OnceLock::new(), bos, eos, eos_ids, clean_up_spaces }
    }

    /// Token ids for `text`. With `add_special_tokens`, the post-processor adds what the model's
    /// files ask for (a bos for Llama-2-style vocabularies, nothing for SmolLM2).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("encoding {} bytes of text: {e}", text.len())))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids for `text` read as plain text: the spelling of a special token (`<|im_start|>`)
    /// gives the ids of its characters, not the special token (for text a user wrote).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let plain = self.plain.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        let encoding = plain
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(format!("encoding {} bytes of text: {e}", text.len())))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The longest token's spelling in bytes (as the vocabulary stores it; at least as long as the
    /// text it stands for): `n` tokens never cover more than `n` times this of text.
    pub fn max_token_bytes(&self) -> usize {
        self.inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1)
    }

    /// Whether any of `texts`, encoded as [`Tokenizer::encode`] does, holds a special token.
    pub fn spells_special_token(&self, texts: &[&str]) -> Result<bool> {
        let special: std::collections::HashSet<u32> =
            self.inner.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect();
        if special.is_empty() {
            return Ok(false);
        }
        for text in texts {
            if self.encode(text, false)?.iter().any(|id| special.contains(id)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Text for `ids`; ids outside the vocabulary are skipped. With `skip_special_tokens`, special
    /// tokens (`<|im_end|>`, `<s>`, ...) are left out.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decoding {} ids: {e}", ids.len())))?;
        Ok(if self.clean_up_spaces { clean_up_tokenization(&text) } else { text })
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|t| t.id)
    }

    /// Every id that ends generation: the tokenizer's eos, then the ids of the generation config
    /// (HF directory) or `eot`/`eom` ids (GGUF), without repeats.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The beginning-of-sequence token's text (the `bos_token` of chat templates).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|t| t.text.as_str())
    }

    /// The end-of-sequence token's text (the `eos_token` of chat templates).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|t| t.text.as_str())
    }

    /// The id of a token, spelled as the vocabulary spells it (`Ġthe`, `▁the`, `<|im_end|>`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary's spelling of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included (transformers' `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` pipeline.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Adds `tokens` that are not yet added tokens, as transformers does for its named special tokens.
/// A text already in the vocabulary keeps its id; a new one gets the next id.
pub(super) fn add_missing_tokens(inner: &mut tokenizers::Tokenizer, tokens: Vec<AddedToken>) {
    let mut present: Vec<String> = inner.get_added_tokens_decoder().into_values().map(|t| t.content).collect();
    for token in tokens {
        if token.content.is_empty() || present.contains(&token.content) {
            continue;
        }
        present.push(token.content.clone());
        if token.special {
            inner.add_special_tokens(&[token]);
        } else {
            inner.add_tokens(&[token]);
        }
    }
}

/// transformers' `update_post_processor`: `[bos] $A [eos]` as the flags ask. `None` when neither
/// flag is on (nothing to add).
pub(super) fn bos_eos_template(
    bos: Option<&SpecialToken>,
    eos: Option<&SpecialToken>,
    add_bos: bool,
    add_eos: bool,
) -> Result<Option<TemplateProcessing>> {
    let bos = bos.filter(|_| add_bos);
    let eos = eos.filter(|_| add_eos);
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let special =
        |t: &SpecialToken, type_id: u32| serde_json::json!({"SpecialToken": {"id": t.text, "type_id": type_id}});
    let sequence = |name: &str, type_id: u32| serde_json::json!({"Sequence": {"id": name, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (seq, type_id, out) in [("A", 0, &mut single), ("B", 1, &mut pair)] {
        if let Some(t) = bos {
            out.push(special(t, type_id));
        }
        out.push(sequence(seq, type_id));
        if let Some(t) = eos {
            out.push(special(t, type_id));
        }
    }
    // `pair` is `single` followed by the B half.
    let pair: Vec<_> = single.iter().cloned().chain(pair).collect();
    let mut special_tokens = serde_json::Map::new();
    for t in bos.into_iter().chain(eos) {
        special_tokens.insert(t.text.clone(), serde_json::json!({"id": t.text, "ids": [t.id], "tokens": [t.text]}));
    }
    let value = serde_json::json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    });
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| Error::Tokenizer(format!("building the bos/eos post-processor: {e}")))
}

/// transformers' `clean_up_tokenization`: drops the space before punctuation and contractions.
fn clean_up_tokenization(text: &str) -> String {
    const PAIRS: [(&str, &str); 10] = [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    PAIRS.iter().fold(text.to_string(), |acc, (from, to)| acc.replace(from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_up_matches_transformers_rules() {
        assert_eq!(clean_up_tokenization("Hi , I 'm here . Are n't you ?"), "Hi, I'm here. Aren't you?");
    }

    #[test]
    fn template_is_none_without_flags() {
        let bos = SpecialToken { text: "<s>".into(), id: 1 };
        assert!(bos_eos_template(Some(&bos), None, false, true).unwrap().is_none());
        assert!(bos_eos_template(Some(&bos), None, true, false).unwrap().is_some());
    }
}

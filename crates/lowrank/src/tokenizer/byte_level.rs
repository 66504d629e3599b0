//! Byte-level BPE (`tokenizer.ggml.model = gpt2`): GPT-2's byte alphabet, the file's merges, and
//! the split regex `tokenizer.ggml.pre` names.

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use super::token_type;

/// Llama 3's split (also llama.cpp's `llama-bpe` family).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with single digits.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5's split: Qwen2's with combining marks kept inside words.
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's tekken split.
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);
/// GPT-4o's split (also Llama 4's).
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);

/// The split regex for a `tokenizer.ggml.pre` name, as transformers maps them. `None` (every
/// other name, `smollm` and `default` included) means GPT-2's own regex inside `ByteLevel`.
///
/// For `smollm` this follows transformers, not llama.cpp: llama.cpp (like SmolLM2's original
/// `tokenizer.json`) first isolates every digit, so spaces before a digit split differently
/// (`"  1"` is `Ġ Ġ 1` here and in transformers, `ĠĠ 1` in llama.cpp). SmolLM2's vocabulary has
/// no multi-digit tokens, so that is the only difference.
pub(super) fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// GPT-2's byte → printable character table (`bytes_to_unicode`).
pub(super) fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[byte as usize] = if printable {
            char::from(byte)
        } else {
            let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
            next += 1;
            c
        };
    }
    table
}

/// The byte-level BPE for `tokens` (in id order) and `merges`.
///
/// A token written outside the byte alphabet is respelled byte by byte, as transformers does,
/// except a CONTROL token, which keeps its spelling so it can be added whole under its own id.
pub(super) fn build(
    tokens: &[&str],
    types: &[i64],
    merges: Vec<(String, String)>,
    pre: Option<&str>,
) -> tokenizers::Result<tokenizers::Tokenizer> {
    let alphabet = byte_alphabet();
    // Every character of the alphabet is below U+0144; mark them for an O(1) test.
    let mut marked = [false; 0x144];
    for c in alphabet {
        if let Some(slot) = marked.get_mut(c as usize) {
            *slot = true;
        }
    }
    let in_alphabet = |c: char| marked.get(c as usize).copied().unwrap_or(false);
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| {
            let control = types.get(id) == Some(&token_type::CONTROL);
            let spelled = if control || token.chars().all(in_alphabet) {
                token.to_string()
            } else {
                token.bytes().map(|b| alphabet[b as usize]).collect()
            };
            (spelled, id as u32)
        })
        .collect();
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .fuse_unk(false)
        .build()?;

    let pre_tokenizer: PreTokenizerWrapper = match pre.and_then(split_regex) {
        Some(regex) => Sequence::new(vec![
            Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)?.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        None => ByteLevel::new(false, true, true).into(),
    };
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer)).with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_matches_gpt2() {
        let table = byte_alphabet();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'A' as usize], 'A');
        assert_eq!(table[0xAD], 'Ń');
        let mut distinct = table.to_vec();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn smollm_uses_gpt2_regex() {
        assert!(split_regex("smollm").is_none());
        assert!(split_regex("default").is_none());
        assert_eq!(split_regex("llama-bpe"), Some(LLAMA3_SPLIT));
        assert_eq!(split_regex("qwen2"), Some(QWEN2_SPLIT));
    }
}

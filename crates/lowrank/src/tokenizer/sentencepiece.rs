//! SentencePiece vocabularies (`tokenizer.ggml.model = llama`) as a BPE with byte fallback.
//!
//! llama.cpp stores the pieces, their scores and types, but no merges. Like transformers, we
//! recover the merges from the scores ([`generate_merges`]) and run a BPE over `▁`-for-space
//! text, falling back to the `<0xNN>` byte tokens for characters the pieces do not cover.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};

/// SentencePiece's stand-in for a space.
const SPACE: char = '▁';

/// How text is turned into `▁`-spelled text before the BPE runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flavor {
    /// transformers' `LlamaTokenizer`: spaces become `▁`, and one `▁` goes before the text
    /// (`add_space_prefix`), not after special tokens inside it.
    Llama {
        /// `tokenizer.ggml.add_space_prefix`.
        add_space_prefix: bool,
    },
    /// Phi-3: a normalizer prepends `▁` and replaces every space, with no pre-tokenizer, so
    /// `"  hi"` becomes `▁▁▁hi`.
    Phi3,
}

/// The tokenizer for `tokens` (in id order) and `merges`.
pub(super) fn build(
    tokens: &[&str],
    merges: Vec<(String, String)>,
    flavor: Flavor,
) -> tokenizers::Result<tokenizers::Tokenizer> {
    let vocab: Vocab = tokens.iter().enumerate().map(|(id, token)| (token.to_string(), id as u32)).collect();
    let model = BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(true).build()?;
    let mut tokenizer = tokenizers::Tokenizer::new(model);

    let space = SPACE.to_string();
    let mut decoders: Vec<DecoderWrapper> =
        vec![Replace::new(space.as_str(), " ")?.into(), ByteFallback::new().into(), Fuse::new().into()];
    match flavor {
        Flavor::Llama { add_space_prefix } => {
            let scheme = if add_space_prefix { PrependScheme::First } else { PrependScheme::Never };
            tokenizer.with_pre_tokenizer(Some(Metaspace::new(SPACE, scheme, false)));
            if add_space_prefix {
                decoders.push(Strip::new(' ', 1, 0).into());
            }
        }
        Flavor::Phi3 => {
            let normalizer = NormalizerSequence::new(vec![
                Prepend::new(space.clone()).into(),
                Replace::new(" ", space.as_str())?.into(),
            ]);
            tokenizer.with_normalizer(Some(normalizer));
            decoders.push(Strip::new(' ', 1, 0).into());
        }
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// The BPE merges a scored vocabulary implies (transformers' `generate_merges` with scores).
///
/// Every token that splits into two vocabulary tokens yields those pairs, each carrying the
/// token's score; pairs of one token are ordered by the ids of their halves. All pairs are then
/// sorted by score, then by the lengths of the halves (in characters), highest first, keeping
/// the earlier pair first on ties. As with a Python dict, a token listed twice takes its last id
/// and its last score but its first position.
pub(super) fn generate_merges(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(id, token)| (*token, id)).collect();
    let mut order: Vec<&str> = Vec::new();
    let mut score_of: HashMap<&str, f32> = HashMap::new();
    for (token, score) in tokens.iter().zip(scores) {
        if score_of.insert(*token, *score).is_none() {
            order.push(*token);
        }
    }

    // (left, right, score, chars in left, chars in right)
    let mut merges: Vec<(&str, &str, f32, usize, usize)> = Vec::new();
    for token in order {
        let score = score_of.get(token).copied().unwrap_or_default();
        let mut local: Vec<(&str, &str, f32, usize, usize)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(left, right)| ids.contains_key(left) && ids.contains_key(right))
            .map(|(left, right)| (left, right, score, left.chars().count(), right.chars().count()))
            .collect();
        local.sort_by_key(|(left, right, ..)| (ids.get(left).copied(), ids.get(right).copied()));
        merges.extend(local);
    }
    // A NaN score (a malformed file) ranks last: with NaN left in, the order would not be total,
    // and the sort may panic.
    let rank = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    merges.sort_by(|a, b| {
        let by_score = rank(b.2).partial_cmp(&rank(a.2)).unwrap_or(std::cmp::Ordering::Equal);
        by_score.then(b.3.cmp(&a.3)).then(b.4.cmp(&a.4))
    });
    merges.into_iter().map(|(left, right, ..)| (left.to_string(), right.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_follow_scores_then_lengths() {
        // "ab" (score -1) and "abc" (score -2, splits as a|bc and ab|c) over single letters.
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -1.0, -1.5, -2.0];
        let merges = generate_merges(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        // -1: a b; -1.5: b c; -2: ab|c (left 2 chars) before a|bc (left 1 char).
        assert_eq!(pairs, vec![("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }

    #[test]
    fn merges_split_on_characters_not_bytes() {
        let tokens = ["▁", "é", "▁é"];
        let merges = generate_merges(&tokens, &[0.0, 0.0, -1.0]);
        assert_eq!(merges, vec![("▁".to_string(), "é".to_string())]);
    }
}

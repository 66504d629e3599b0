//! Tokenizers and chat templates against transformers, from the fixtures that
//! `scripts/fixtures/tokenizer.py` writes to `tests/fixtures/tokenizer/`.
//!
//! The SmolLM2 GGUF test reads the default model: `$LOWRANK_DEFAULT_GGUF` if set, else
//! `lowrank_home::default_model_gguf()` (which fetches it once into the cache).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use lowrank::chat::{ChatTemplate, Message};
use lowrank::tokenizer::{TextStream, Tokenizer};
use lowrank::Error;
use serde::Deserialize;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn read_json<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn read_gguf(path: &Path) -> gguf_file::Content {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    gguf_file::Content::read(&mut file).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn default_gguf() -> PathBuf {
    match std::env::var_os("LOWRANK_DEFAULT_GGUF") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => lowrank_home::default_model_gguf().expect("fetching the default model"),
    }
}

/// transformers' answers for one tokenizer (see the fixture script).
#[derive(Deserialize)]
struct Reference {
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    vocab_size: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    ids_special: Vec<u32>,
    decode: String,
    decode_skip: String,
}

/// Every id list and decode equals transformers'; all mismatches are reported at once.
fn assert_matches(tokenizer: &Tokenizer, reference: &Reference, label: &str) {
    assert_eq!(tokenizer.bos_token_id(), reference.bos_token_id, "{label}: bos id");
    assert_eq!(tokenizer.eos_token_ids().first().copied(), reference.eos_token_id, "{label}: eos id");
    assert_eq!(tokenizer.bos_token(), reference.bos_token.as_deref(), "{label}: bos token");
    assert_eq!(tokenizer.eos_token(), reference.eos_token.as_deref(), "{label}: eos token");
    assert_eq!(tokenizer.vocab_size(), reference.vocab_size, "{label}: vocab size");
    let mut failures = Vec::new();
    for case in &reference.cases {
        let ids = tokenizer.encode(&case.text, false).unwrap();
        if ids != case.ids {
            failures.push(format!("encode {:?}\n   ours {ids:?}\n  theirs {:?}", case.text, case.ids));
        }
        let ids_special = tokenizer.encode(&case.text, true).unwrap();
        if ids_special != case.ids_special {
            failures.push(format!(
                "encode+special {:?}\n   ours {ids_special:?}\n  theirs {:?}",
                case.text, case.ids_special
            ));
        }
        let decoded = tokenizer.decode(&case.ids_special, false).unwrap();
        if decoded != case.decode {
            failures.push(format!("decode {:?}: ours {decoded:?}, theirs {:?}", case.text, case.decode));
        }
        let skipped = tokenizer.decode(&case.ids_special, true).unwrap();
        if skipped != case.decode_skip {
            failures.push(format!("decode skip {:?}: ours {skipped:?}, theirs {:?}", case.text, case.decode_skip));
        }
    }
    assert!(failures.is_empty(), "{label}: {} mismatches with transformers:\n{}", failures.len(), failures.join("\n"));
}

#[derive(Deserialize)]
struct Smollm2 {
    hf: Reference,
    gguf: Reference,
    chat: HashMap<String, ChatCase>,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<Message>,
    add_generation_prompt: bool,
    rendered: String,
    ids: Vec<u32>,
}

fn smollm2_hf_dir() -> PathBuf {
    fixtures().join("smollm2-hf")
}

#[test]
fn hf_dir_matches_transformers() {
    let reference: Smollm2 = read_json("smollm2.json");
    let tokenizer = Tokenizer::from_hf_dir(&smollm2_hf_dir()).unwrap();
    assert_matches(&tokenizer, &reference.hf, "smollm2 HF dir");
    // generation_config.json's eos (2) is the tokenizer's eos: listed once.
    assert_eq!(tokenizer.eos_token_ids(), &[2]);
    assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tokenizer.id_to_token(2).as_deref(), Some("<|im_end|>"));
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let reference: Smollm2 = read_json("smollm2.json");
    let path = default_gguf();
    let content = read_gguf(&path);
    let tokenizer = Tokenizer::from_gguf(&content.metadata, &path).unwrap();
    assert_matches(&tokenizer, &reference.gguf, "smollm2 GGUF");
    // The eos <|im_end|>, then <|endoftext|>, which also ends generation in llama.cpp.
    assert_eq!(tokenizer.eos_token_ids(), &[2, 0]);

    // The GGUF's chat template renders as the HF dir's does.
    let template = ChatTemplate::from_gguf(&content.metadata, &tokenizer).unwrap().expect("the GGUF has a template");
    for (name, case) in &reference.chat {
        let rendered = template.render(&case.messages, case.add_generation_prompt).unwrap();
        assert_eq!(rendered, case.rendered, "GGUF chat template, {name}");
    }
}

#[test]
fn smollm2_chat_template_matches_transformers() {
    let reference: Smollm2 = read_json("smollm2.json");
    let template = ChatTemplate::from_hf_dir(&smollm2_hf_dir()).unwrap().expect("the HF dir has a template");
    let tokenizer = Tokenizer::from_hf_dir(&smollm2_hf_dir()).unwrap();
    assert_eq!(template.bos_token(), Some("<|im_start|>"));
    assert!(!reference.chat.is_empty());
    for (name, case) in &reference.chat {
        let rendered = template.render(&case.messages, case.add_generation_prompt).unwrap();
        assert_eq!(rendered, case.rendered, "{name}");
        assert_eq!(tokenizer.encode(&rendered, false).unwrap(), case.ids, "{name}: ids of the rendered text");
    }
}

#[test]
fn sentencepiece_gguf_matches_transformers() {
    let reference: Reference = read_json("tiny-spm.json");
    let path = fixtures().join("tiny-spm.gguf");
    let content = read_gguf(&path);
    let tokenizer = Tokenizer::from_gguf(&content.metadata, &path).unwrap();
    assert_matches(&tokenizer, &reference, "tiny SentencePiece GGUF");
    // add_bos_token: the bos comes first with special tokens, not without.
    assert_eq!(tokenizer.encode("hi", true).unwrap().first().copied(), tokenizer.bos_token_id());
    assert_eq!(tokenizer.token_to_id("<0x41>").map(|id| tokenizer.id_to_token(id)), Some(Some("<0x41>".into())));
}

#[derive(Deserialize)]
struct TinySpmHf {
    #[serde(flatten)]
    reference: Reference,
    chat: TinyChat,
}

#[derive(Deserialize)]
struct TinyChat {
    messages: Vec<Message>,
    rendered: String,
}

/// The tiny SentencePiece tokenizer saved by transformers as an HF dir: same ids as the GGUF,
/// `add_bos_token: false` in tokenizer_config.json ignored (tokenizer.json's post-processor
/// decides), chat_template.jinja preferred to the config's template, eos list from
/// generation_config.json.
#[test]
fn sentencepiece_hf_dir_matches_transformers() {
    let fixture: TinySpmHf = read_json("tiny-spm-hf.json");
    let dir = fixtures().join("tiny-spm-hf");
    let tokenizer = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_matches(&tokenizer, &fixture.reference, "tiny SentencePiece HF dir");
    assert_eq!(tokenizer.eos_token_ids(), &[2, 4]);
    let template = ChatTemplate::from_hf_dir(&dir).unwrap().expect("chat_template.jinja");
    assert_eq!(template.render(&fixture.chat.messages, true).unwrap(), fixture.chat.rendered);
}

/// A Gemma file's SentencePiece vocabulary (llama.cpp writes Gemma's without a space prefix, and
/// transformers' GemmaTokenizer spells spaces as `▁` without one) loads, with no prefix even
/// when the file omits the key. The real gemma-3-270m GGUF is checked against transformers by
/// scripts/check/gemma3_270m.sh.
#[test]
fn gemma_sentencepiece_gguf_loads_without_a_space_prefix() {
    let path = fixtures().join("tiny-spm.gguf");
    let mut metadata = read_gguf(&path).metadata;
    metadata.insert("tokenizer.ggml.add_space_prefix".into(), gguf_file::Value::Bool(false));
    let llama_without = Tokenizer::from_gguf(&metadata, &path).unwrap();
    metadata.remove("tokenizer.ggml.add_space_prefix");
    for arch in ["gemma", "gemma2", "gemma3"] {
        metadata.insert("general.architecture".into(), gguf_file::Value::String(arch.into()));
        let gemma = Tokenizer::from_gguf(&metadata, &path).unwrap();
        for text in ["Hello world", " two  spaces", "line\nbreak"] {
            let ids = gemma.encode(text, false).unwrap();
            assert_eq!(ids, llama_without.encode(text, false).unwrap(), "{arch}: {text:?}");
            assert_eq!(gemma.decode(&ids, false).unwrap(), text, "{arch}: {text:?}");
        }
    }
}

/// `tokenizer.ggml.add_space_prefix = false` turns the SentencePiece prefix space off (llama.cpp's
/// meaning; transformers ignores the key, so there is no fixture for it).
#[test]
fn sentencepiece_gguf_honours_add_space_prefix() {
    let path = fixtures().join("tiny-spm.gguf");
    let mut metadata = read_gguf(&path).metadata;
    let with_prefix = Tokenizer::from_gguf(&metadata, &path).unwrap();
    metadata.insert("tokenizer.ggml.add_space_prefix".into(), gguf_file::Value::Bool(false));
    let without = Tokenizer::from_gguf(&metadata, &path).unwrap();
    let text = "Hello world";
    assert_eq!(
        with_prefix.encode(&format!(" {text}"), false).unwrap(),
        without.encode(&format!(" {text}"), false).unwrap()[..]
    );
    assert_ne!(with_prefix.encode(text, false).unwrap(), without.encode(text, false).unwrap());
    let ids = without.encode(text, false).unwrap();
    assert_eq!(without.decode(&ids, false).unwrap(), text);
}

#[test]
fn byte_level_gguf_matches_transformers_for_each_pre_tokenizer() {
    let references: HashMap<String, Reference> = read_json("tiny-bpe.json");
    let path = fixtures().join("tiny-bpe.gguf");
    let mut metadata = read_gguf(&path).metadata;
    // The fixture covers the names with their own regex and two that fall back to GPT-2's.
    for pre in ["llama-bpe", "qwen2", "smollm", "default"] {
        metadata.insert("tokenizer.ggml.pre".into(), gguf_file::Value::String(pre.into()));
        let tokenizer = Tokenizer::from_gguf(&metadata, &path).unwrap();
        assert_matches(&tokenizer, &references[pre], &format!("tiny byte-level GGUF, pre={pre}"));
    }
    // The pre-tokenizers differ where they should: Qwen2 splits digits one by one.
    let qwen2 = &references["qwen2"].cases;
    let llama3 = &references["llama-bpe"].cases;
    assert!(qwen2.iter().zip(llama3).any(|(a, b)| a.ids != b.ids));
}

#[derive(Deserialize)]
struct ChatFixture {
    templates: HashMap<String, String>,
    conversations: HashMap<String, Vec<Message>>,
    cases: Vec<TemplateCase>,
}

#[derive(Deserialize)]
struct TemplateCase {
    template: String,
    conversation: String,
    add_generation_prompt: bool,
    bos_token: String,
    eos_token: String,
    rendered: Option<String>,
    error: Option<String>,
}

#[test]
fn chat_templates_follow_transformers_conventions() {
    let fixture: ChatFixture = read_json("chat.json");
    for case in &fixture.cases {
        let label = format!("{} / {} / gen={}", case.template, case.conversation, case.add_generation_prompt);
        let template = ChatTemplate::new(
            fixture.templates[&case.template].clone(),
            Some(case.bos_token.clone()),
            Some(case.eos_token.clone()),
        )
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        let result = template.render(&fixture.conversations[&case.conversation], case.add_generation_prompt);
        match (&case.rendered, &case.error, result) {
            (Some(expected), _, Ok(rendered)) => assert_eq!(&rendered, expected, "{label}"),
            (_, Some(message), Err(Error::ChatTemplate(ours))) => {
                assert!(ours.contains(message.as_str()), "{label}: error {ours:?} lacks {message:?}")
            }
            (_, _, other) => panic!("{label}: expected {:?} / {:?}, got {other:?}", case.rendered, case.error),
        }
    }
}

/// Pushes `ids` one at a time; returns the chunks and checks the invariants on the way.
fn stream(tokenizer: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> Vec<String> {
    let full = tokenizer.decode(ids, skip_special_tokens).unwrap();
    let mut stream = TextStream::new(tokenizer).skip_special_tokens(skip_special_tokens);
    let mut chunks = Vec::new();
    for &id in ids {
        chunks.push(stream.push(id).unwrap());
        // Nothing shown is ever taken back.
        assert!(full.starts_with(stream.text()), "{:?} is not a prefix of {full:?}", stream.text());
    }
    chunks.push(stream.finish().unwrap());
    assert_eq!(chunks.concat(), full, "chunks of {ids:?}");
    assert_eq!(stream.text(), full);
    chunks
}

#[test]
fn text_stream_yields_exactly_the_full_decode() {
    let hf = Tokenizer::from_hf_dir(&smollm2_hf_dir()).unwrap();
    let spm_path = fixtures().join("tiny-spm.gguf");
    let spm = Tokenizer::from_gguf(&read_gguf(&spm_path).metadata, &spm_path).unwrap();
    let bpe_path = fixtures().join("tiny-bpe.gguf");
    let bpe = Tokenizer::from_gguf(&read_gguf(&bpe_path).metadata, &bpe_path).unwrap();
    let strings: Vec<String> = read_json("strings.json");
    for tokenizer in [&hf, &spm, &bpe] {
        for text in &strings {
            let ids = tokenizer.encode(text, true).unwrap();
            stream(tokenizer, &ids, true);
            stream(tokenizer, &ids, false);
        }
    }

    // A multibyte string: bytes of one character arrive over several ids, and nothing
    // half-made is shown before the character completes.
    let text = "日本語 🤗 café";
    let ids = hf.encode(text, false).unwrap();
    let chunks = stream(&hf, &ids, true);
    assert!(chunks.len() > ids.len() / 2 && chunks.iter().any(String::is_empty), "{chunks:?}");
    assert!(chunks.iter().all(|chunk| !chunk.contains(char::REPLACEMENT_CHARACTER)), "{chunks:?}");
    assert_eq!(chunks.concat(), text);

    // A cut-off character: finish() shows it as the full decode does.
    let truncated = &ids[..ids.len() - 1];
    let mut cut = &ids[..1];
    for end in 1..ids.len() {
        if hf.decode(&ids[..end], true).unwrap().ends_with(char::REPLACEMENT_CHARACTER) {
            cut = &ids[..end];
            break;
        }
    }
    stream(&hf, cut, true);
    stream(&hf, truncated, true);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    // No tokenizer.json.
    assert!(matches!(Tokenizer::from_hf_dir(dir.path()), Err(Error::Io { .. })));
    // tokenizer.json that is not JSON, or not a tokenizer.
    std::fs::write(dir.path().join("tokenizer.json"), "not json {").unwrap();
    assert!(matches!(Tokenizer::from_hf_dir(dir.path()), Err(Error::Json { .. })));
    std::fs::write(dir.path().join("tokenizer.json"), r#"{"model": 3}"#).unwrap();
    assert!(matches!(Tokenizer::from_hf_dir(dir.path()), Err(Error::Json { .. })));
    // A broken tokenizer_config.json next to a good tokenizer.json.
    std::fs::copy(smollm2_hf_dir().join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), "[1, 2").unwrap();
    assert!(matches!(Tokenizer::from_hf_dir(dir.path()), Err(Error::Json { .. })));
    assert!(matches!(ChatTemplate::from_hf_dir(dir.path()), Err(Error::Json { .. })));
    // Several templates, none named default.
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": [{"name": "a", "template": "x"}]}"#)
        .unwrap();
    assert!(matches!(ChatTemplate::from_hf_dir(dir.path()), Err(Error::ChatTemplate(_))));
    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
    assert!(ChatTemplate::from_hf_dir(dir.path()).unwrap().is_none());
    // A template that does not compile.
    assert!(matches!(ChatTemplate::new("{% if %}".into(), None, None), Err(Error::ChatTemplate(_))));

    // GGUF metadata: tokens missing, of the wrong type, ids out of range, unknown model.
    // Each case sets `key` to a value, or removes it (None).
    use gguf_file::Value as V;
    let path = fixtures().join("tiny-bpe.gguf");
    let good = read_gguf(&path).metadata;
    let strings = |list: &[&str]| V::Array(list.iter().map(|s| V::String(s.to_string())).collect());
    let cases = [
        ("no tokens", "tokenizer.ggml.tokens", None),
        ("no model", "tokenizer.ggml.model", None),
        ("empty tokens", "tokenizer.ggml.tokens", Some(V::Array(vec![]))),
        ("tokens not strings", "tokenizer.ggml.tokens", Some(V::Array(vec![V::U32(1)]))),
        ("tokens not an array", "tokenizer.ggml.tokens", Some(V::String("a".into()))),
        ("bos out of range", "tokenizer.ggml.bos_token_id", Some(V::U32(1 << 30))),
        ("bos not an int", "tokenizer.ggml.bos_token_id", Some(V::String("1".into()))),
        ("unknown model", "tokenizer.ggml.model", Some(V::String("rwkv".into()))),
        ("bad merge", "tokenizer.ggml.merges", Some(strings(&["abc"]))),
        ("merge of unknown tokens", "tokenizer.ggml.merges", Some(strings(&["☃ ☄"]))),
        ("no merges, no scores", "tokenizer.ggml.merges", None),
    ];
    for (label, key, value) in cases {
        let mut metadata = good.clone();
        match value {
            Some(value) => metadata.insert(key.to_string(), value),
            None => metadata.remove(key),
        };
        match Tokenizer::from_gguf(&metadata, &path) {
            Err(Error::Gguf { message, .. }) => assert!(!message.is_empty(), "{label}"),
            other => panic!("{label}: expected a GGUF error, got {other:?}"),
        }
    }
}

/// HF tokenizer files written from a byte-level GGUF, turned back into GGUF metadata (as
/// `lowrank merge --format gguf` does for an HF base), give a tokenizer with transformers' ids.
#[test]
fn hf_tokenizer_converts_back_to_gguf_metadata_with_the_same_ids() {
    use lowrank::export::TokenizerFiles;
    use lowrank::tokenizer::gguf_tokenizer_metadata;
    let references: HashMap<String, Reference> = read_json("tiny-bpe.json");
    let path = fixtures().join("tiny-bpe.gguf");
    let mut metadata = read_gguf(&path).metadata;
    for pre in ["llama-bpe", "qwen2", "default"] {
        metadata.insert("tokenizer.ggml.pre".into(), gguf_file::Value::String(pre.into()));
        let original = Tokenizer::from_gguf(&metadata, &path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        TokenizerFiles::from_tokenizer(&original, None, 256).unwrap().write_into(dir.path()).unwrap();
        let vocab = original.vocab_size();
        let back: HashMap<String, gguf_file::Value> =
            gguf_tokenizer_metadata(dir.path(), vocab, Some("{{ x }}")).unwrap().into_iter().collect();
        assert_eq!(back["tokenizer.ggml.model"].to_string().unwrap(), "gpt2");
        assert_eq!(back["tokenizer.chat_template"].to_string().unwrap(), "{{ x }}");
        let rebuilt = Tokenizer::from_gguf(&back, &path).unwrap();
        assert_matches(&rebuilt, &references[pre], &format!("GGUF → HF → GGUF, pre={pre}"));
    }
}

/// Gemma 2's GGUF as llama.cpp's converter writes it from a SentencePiece `tokenizer.model`
/// (scripts/fixtures/converted.py): the vocabulary padded to the model's size with unused
/// `[PAD]` pieces, no space prefix, the ids SentencePiece itself gives.
#[test]
fn converter_written_gemma2_sentencepiece_gguf_matches_sentencepiece() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let text = std::fs::read_to_string(models.join("converted.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let want = manifest["gemma2"]["sentencepiece_ids"].as_object().expect("gemma2 sentencepiece_ids");
    let path = models.join("gemma2/gguf/tiny-F32.gguf");
    let tokenizer = Tokenizer::from_gguf(&read_gguf(&path).metadata, &path).unwrap();
    assert!(!want.is_empty());
    for (text, ids) in want {
        let ids: Vec<u32> = ids.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
        assert_eq!(tokenizer.encode(text, false).unwrap(), ids, "{text:?}");
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), *text);
    }
    // SentencePiece's bos (llama.cpp adds it for a `llama` vocabulary unless the file says not).
    assert_eq!(tokenizer.encode("the", true).unwrap().first().copied(), Some(1));
}

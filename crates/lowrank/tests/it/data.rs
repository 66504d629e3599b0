//! `lowrank::data` with the SmolLM2 tokenizer and chat template committed under
//! `tests/fixtures/tokenizer/smollm2-hf/`: which tokens each row shape trains on, the errors a bad
//! file gets, and the batch plan's determinism. Also loads the shipped `examples/dates/` set.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lowrank::chat::{ChatTemplate, Message};
use lowrank::data::{
    load_jsonl, pack_by_tokens, BatchPlan, DataOptions, DataStats, Dataset, Example, Examples, Format,
};
use lowrank::tokenizer::Tokenizer;
use lowrank::Error;

const EOS: &str = "<|im_end|>";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/smollm2-hf")
}

/// The fixture tokenizer, parsed once for all tests.
fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_hf_dir(&fixture_dir()).expect("loading the SmolLM2 tokenizer fixture"))
}

fn template() -> &'static ChatTemplate {
    static TEMPLATE: OnceLock<ChatTemplate> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        ChatTemplate::from_hf_dir(&fixture_dir())
            .expect("loading the SmolLM2 chat template")
            .expect("the fixture has a chat template")
    })
}

fn opts(max_seq_len: usize) -> DataOptions {
    DataOptions { max_seq_len, train_on_prompt: false }
}

/// A temporary JSONL file holding `lines` (joined with `\n`).
struct Jsonl {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn jsonl(lines: &[&str]) -> Jsonl {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rows.jsonl");
    std::fs::write(&path, lines.join("\n")).expect("writing rows");
    Jsonl { _dir: dir, path }
}

/// A loaded file's examples, read back while the file exists, and its stats.
struct Loaded {
    examples: Vec<Example>,
    stats: DataStats,
}

fn loaded(data: Dataset) -> Loaded {
    Loaded { examples: data.examples().expect("reading the examples back"), stats: data.stats }
}

fn load(lines: &[&str], options: &DataOptions) -> lowrank::Result<Loaded> {
    let file = jsonl(lines);
    let (tok, tpl) = (tokenizer(), template());
    load_jsonl(&file.path, tok, Some(tpl), options).map(loaded)
}

/// The error of loading `lines`, with its display text (which names the temporary file).
fn load_error(lines: &[&str]) -> (Error, String) {
    let file = jsonl(lines);
    let (tok, tpl) = (tokenizer(), template());
    let error = load_jsonl(&file.path, tok, Some(tpl), &opts(256)).expect_err("loading should fail");
    let text = error.to_string();
    assert!(text.starts_with(&file.path.display().to_string()), "error does not name the file: {text}");
    (error, text)
}

/// The runs of consecutive target tokens, decoded.
fn target_spans(tok: &Tokenizer, example: &Example) -> Vec<String> {
    let mut spans = Vec::new();
    let mut run = Vec::new();
    for (&id, &target) in example.ids.iter().zip(&example.targets) {
        if target {
            run.push(id);
        } else if !run.is_empty() {
            spans.push(tok.decode(&run, false).unwrap());
            run.clear();
        }
    }
    if !run.is_empty() {
        spans.push(tok.decode(&run, false).unwrap());
    }
    spans
}

fn non_target_text(tok: &Tokenizer, example: &Example) -> String {
    let ids: Vec<u32> = example.ids.iter().zip(&example.targets).filter(|(_, &t)| !t).map(|(&id, _)| id).collect();
    tok.decode(&ids, false).unwrap()
}

fn only_example(dataset: &Loaded) -> &Example {
    assert_eq!(dataset.examples.len(), 1);
    let example = &dataset.examples[0];
    assert_eq!(example.ids.len(), example.targets.len());
    assert!(!example.targets[0], "targets[0] must be false");
    example
}

#[test]
fn text_rows_train_on_every_token_and_end_with_eos() {
    let tok = tokenizer();
    let text = "The quick brown fox jumps over the lazy dog.";
    let data = load(&[&format!(r#"{{"text": "{text}"}}"#)], &opts(256)).unwrap();
    let example = only_example(&data);
    let mut expected = tok.encode(text, true).unwrap();
    expected.push(tok.eos_token_ids()[0]);
    assert_eq!(example.ids, expected);
    assert!(example.targets[1..].iter().all(|&t| t));
    // Everything but the first token (nothing predicts it) is a target.
    let first = tok.decode(&example.ids[..1], false).unwrap();
    assert_eq!(target_spans(tok, example), [format!("{}{EOS}", &text[first.len()..])]);
    assert_eq!(data.stats.format, Format::Text);
    assert_eq!((data.stats.tokens, data.stats.target_tokens), (expected.len(), expected.len() - 1));
}

#[test]
fn text_already_ending_with_eos_gets_no_second_one() {
    let tok = tokenizer();
    let data = load(&[r#"{"text": "Done.<|im_end|>"}"#], &opts(256)).unwrap();
    let example = only_example(&data);
    assert_eq!(tok.decode(&example.ids, false).unwrap(), "Done.<|im_end|>");
}

#[test]
fn prompt_completion_trains_on_the_completion_only() {
    let tok = tokenizer();
    let row = r#"{"prompt": "Question: what is the capital of France?\nAnswer:", "completion": " Paris."}"#;
    let data = load(&[row], &opts(256)).unwrap();
    let example = only_example(&data);
    assert_eq!(target_spans(tok, example), [format!(" Paris.{EOS}")]);
    assert_eq!(non_target_text(tok, example), "Question: what is the capital of France?\nAnswer:");
    assert_eq!(data.stats.format, Format::PromptCompletion);
    // "Answer:" + " Paris." splits at the space in one piece too: nothing to report.
    assert_eq!(data.stats.boundary_merges, 0);
    assert_eq!(data.stats.boundary_hint(), None);
}

/// The ids of `example` that are loss targets.
fn target_ids(example: &Example) -> Vec<u32> {
    let pairs = example.ids.iter().zip(&example.targets);
    pairs.filter(|(_, &t)| t).map(|(&id, _)| id).collect()
}

/// Regression: rows like these were encoded as one string, where BPE merges the prompt's trailing
/// space with the completion (`" CC"`), so training never saw the prompt a client sends, which
/// ends in a space token; an adapter trained on them answered `Convert 327 to Roman numerals. `
/// with `327`. The prompt's ids come first, then the completion's, then the eos.
#[test]
fn a_prompt_ending_in_a_space_is_trained_on_its_own_ids_then_the_completion() {
    let tok = tokenizer();
    let (prompt, completion) = ("Convert 327 to Roman numerals: ", "CCCXXVII");
    let row = serde_json::json!({"prompt": prompt, "completion": completion}).to_string();
    let data = load(&[&row], &opts(256)).unwrap();
    let example = only_example(&data);

    let prompt_ids = lowrank::prompt::text_ids(tok, prompt).unwrap();
    let completion_ids = tok.encode(completion, false).unwrap();
    let eos = tok.eos_token_ids()[0];
    let joined = tok.encode(&format!("{prompt}{completion}"), true).unwrap();
    assert!(!joined.starts_with(&prompt_ids), "the case must merge across the boundary: {joined:?} vs {prompt_ids:?}");
    assert_eq!(example.ids, [prompt_ids.clone(), completion_ids.clone(), vec![eos]].concat());
    assert_eq!(target_ids(example), [completion_ids, vec![eos]].concat());
    assert!(example.targets[..prompt_ids.len()].iter().all(|&t| !t));

    assert_eq!(data.stats.boundary_merges, 1);
    let hint = data.stats.boundary_hint().expect("a merge gets a hint");
    assert!(hint.contains("trailing whitespace"), "{hint}");
    assert!(data.stats.to_string().contains("1 rows encode differently"));
}

/// A SentencePiece tokenizer puts a space before any text it encodes, so a completion encoded
/// alone would gain one (`"Say: " + "the"` would read `"Say:  the"`): a row that merges keeps the
/// joined encoding, and one that does not is the prompt's ids followed by the completion's.
#[test]
fn sentencepiece_completions_gain_no_space() {
    let tok = Tokenizer::from_hf_dir(&fixture_dir().join("../tiny-spm-hf")).unwrap();
    let eos = tok.eos_token_ids()[0];
    for (prompt, completion, merges) in [("Say: ", "hello", 0), ("Say: ", "the", 1)] {
        let row = serde_json::json!({"prompt": prompt, "completion": completion}).to_string();
        let file = jsonl(&[&row]);
        let data = loaded(load_jsonl(&file.path, &tok, None, &opts(64)).unwrap());
        let example = only_example(&data);
        let joined = tok.encode(&format!("{prompt}{completion}"), true).unwrap();
        assert_eq!(example.ids, [joined, vec![eos]].concat(), "{completion}");
        assert_eq!(tok.decode(&target_ids(example), true).unwrap().trim_start(), completion);
        assert_eq!(data.stats.boundary_merges, merges, "{completion}");
    }
}

/// Each assistant turn's targets are exactly the tokens a model has to produce after the ids that
/// `generate --chat` and the server's chat endpoint send for the conversation before it
/// ([`lowrank::prompt::chat_ids`]), token for token, through the template's end of turn, for each
/// chat template shipped with its tokenizer among the fixtures. SmolLM2's template closes a turn
/// with its eos (`<|im_end|>`), where generation stops; the tiny SentencePiece fixture's closes it
/// with text that is no token of its vocabulary (`<|eot_id|>`), so its last turn gets the eos
/// appended.
#[test]
fn assistant_targets_continue_the_ids_chat_generation_starts_from() {
    let messages = [
        Message::new("system", "You answer in one word."),
        Message::new("user", "Capital of France? "),
        Message::new("assistant", "Paris"),
        Message::new("user", "And of Italy?"),
        Message::new("assistant", "Rome"),
    ];
    let row = serde_json::json!({ "messages": messages }).to_string();
    let spm_dir = fixture_dir().join("../tiny-spm-hf");
    let spm = Tokenizer::from_hf_dir(&spm_dir).unwrap();
    let spm_template = ChatTemplate::from_hf_dir(&spm_dir).unwrap().unwrap();
    for (name, tok, tpl, ends) in [
        ("smollm2", tokenizer(), template(), [EOS, EOS]),
        ("tiny-spm", &spm, &spm_template, ["<|eot_id|>", "<|eot_id|></s>"]),
    ] {
        let file = jsonl(&[&row]);
        let data = loaded(load_jsonl(&file.path, tok, Some(tpl), &opts(512)).unwrap_or_else(|e| panic!("{name}: {e}")));
        let example = only_example(&data);
        let mut start = 0;
        let turns = messages.iter().enumerate().filter(|(_, m)| m.role == "assistant");
        for ((i, turn), end) in turns.zip(ends) {
            let prompt = lowrank::prompt::chat_ids(tok, tpl, &messages[..i]).unwrap();
            assert!(example.ids.starts_with(&prompt), "{name}: turn {i}'s prompt ids are not a prefix of the example");
            assert!(!example.targets[start..prompt.len()].iter().any(|&t| t), "{name}: turn {i}");
            let len = example.targets[prompt.len()..].iter().take_while(|&&t| t).count();
            let produced = &example.ids[prompt.len()..prompt.len() + len];
            // Generation stops at the first eos: the span holds one at most, at its end.
            let eos_at: Vec<usize> = (0..len).filter(|&t| tok.eos_token_ids().contains(&produced[t])).collect();
            assert!(eos_at.is_empty() || eos_at == [len - 1], "{name}: turn {i}: {produced:?}");
            assert_eq!(tok.decode(produced, false).unwrap(), format!("{}{end}", turn.content), "{name}: turn {i}");
            start = prompt.len() + len;
        }
    }
}

#[test]
fn train_on_prompt_marks_every_token_but_the_first() {
    let tok = tokenizer();
    let options = DataOptions { max_seq_len: 256, train_on_prompt: true };
    let pc = load(&[r#"{"prompt": "Q: 2+2?\nA:", "completion": " 4"}"#], &options).unwrap();
    let example = only_example(&pc);
    assert!(example.targets[1..].iter().all(|&t| t));
    assert_eq!(tok.decode(&example.ids, false).unwrap(), format!("Q: 2+2?\nA: 4{EOS}"));

    let chat = load(
        &[r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#],
        &options,
    )
    .unwrap();
    let example = only_example(&chat);
    assert!(example.targets[1..].iter().all(|&t| t));
    // The template closes the turn with <|im_end|>, so no eos is appended.
    let rendered =
        template().render(&[Message::new("user", "Hi"), Message::new("assistant", "Hello!")], false).unwrap();
    assert_eq!(example.ids, tok.encode(&rendered, false).unwrap());
}

#[test]
fn messages_train_on_the_assistant_turn_and_its_eos() {
    let tok = tokenizer();
    let messages = [
        Message::new("user", "What is the capital of France?"),
        Message::new("assistant", "The capital of France is Paris."),
    ];
    let row = r#"{"messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital of France is Paris."}]}"#;
    let data = load(&[row], &opts(256)).unwrap();
    let example = only_example(&data);
    // The ids are the template's text, encoded without special tokens, and nothing more.
    let rendered = template().render(&messages, false).unwrap();
    assert_eq!(example.ids, tok.encode(&rendered, false).unwrap());
    assert_eq!(target_spans(tok, example), [format!("The capital of France is Paris.{EOS}")]);
    assert_eq!(data.stats.format, Format::Messages);
}

#[test]
fn multi_turn_marks_every_assistant_turn_and_no_system_or_user_token() {
    let tok = tokenizer();
    let row = r#"{"messages": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome"}]}"#
        .replace('\n', "");
    let data = load(&[&row], &opts(256)).unwrap();
    let example = only_example(&data);
    assert_eq!(target_spans(tok, example), [format!("Paris{EOS}"), format!("Rome{EOS}"), format!("Welcome{EOS}")]);
    let prompt = non_target_text(tok, example);
    for text in ["You answer in one word.", "Capital of France?", "And of Italy?", "Thanks", "<|im_start|>assistant\n"]
    {
        assert!(prompt.contains(text), "{text:?} should not be a target: {prompt:?}");
    }
}

#[test]
fn truncation_is_counted_and_rows_without_targets_are_dropped() {
    let long_text = "word ".repeat(100);
    let long_prompt = format!(r#"{{"prompt": "{long_text}", "completion": " end"}}"#);
    let rows = [
        r#"{"prompt": "Say hi:", "completion": " hi"}"#,
        long_prompt.as_str(), // its completion lies past max_seq_len: dropped
        r#"{"prompt": "Count:", "completion": " one two three four five six seven eight nine ten eleven twelve"}"#,
    ];
    let data = load(&rows, &opts(12)).unwrap();
    assert_eq!(data.stats.rows, 3);
    assert_eq!(data.stats.truncated, 2);
    assert_eq!(data.stats.dropped_no_targets, 1);
    assert_eq!(data.examples.len(), 2);
    assert!(data.examples.iter().all(|e| e.len() <= 12));
    assert_eq!(data.examples[1].len(), 12);
    assert_eq!(data.stats.tokens, data.examples.iter().map(Example::len).sum::<usize>());

    // A conversation without an assistant turn has nothing to train on.
    let chat = load(
        &[
            r#"{"messages": [{"role": "user", "content": "hello?"}]}"#,
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}"#,
        ],
        &opts(256),
    )
    .unwrap();
    assert_eq!((chat.stats.rows, chat.stats.dropped_no_targets, chat.examples.len()), (2, 1, 1));
}

#[test]
fn every_row_dropped_is_an_error() {
    let long = format!(r#"{{"prompt": "{}", "completion": " x"}}"#, "word ".repeat(50));
    let file = jsonl(&[&long, &long]);
    let error = load_jsonl(&file.path, tokenizer(), None, &opts(16)).unwrap_err();
    assert!(matches!(error, Error::Data { line: None, .. }), "{error:?}");
    assert!(error.to_string().contains("max_seq_len 16"), "{error}");
}

#[test]
fn malformed_rows_name_file_and_line() {
    let good = r#"{"text": "fine"}"#;
    let cases: [(&[&str], usize, &str); 5] = [
        (&[good, "", r#"{"text": "unterminated}"#], 3, "invalid JSON"),
        (&[good, r#"{"txt": "typo"}"#], 2, "keys: \"txt\""),
        (&[good, good, good, r#"{"text": ["a"]}"#], 4, "\"text\" must be a string; found a list"),
        (&[r#"{"prompt": "only a prompt"}"#], 1, "without \"completion\""),
        (&[r#"{"messages": [{"role": "user", "content": 5}]}"#], 1, "messages[0].content must be a string"),
    ];
    for (lines, line, message) in cases {
        let (error, text) = load_error(lines);
        assert!(matches!(error, Error::Data { line: Some(l), .. } if l == line), "{text}");
        assert!(text.contains(&format!("rows.jsonl:{line}: ")), "{text}");
        assert!(text.contains(message), "{text}");
    }
}

#[test]
fn mixed_formats_are_an_error_at_the_odd_row() {
    let (error, text) = load_error(&[r#"{"text": "a"}"#, r#"{"text": "b"}"#, r#"{"prompt": "c", "completion": "d"}"#]);
    assert!(matches!(error, Error::Data { line: Some(3), .. }), "{text}");
    assert!(text.contains("prompt-completion") && text.contains("line 1 is a text row"), "{text}");
}

#[test]
fn empty_file_is_an_error() {
    for lines in [&[][..], &["", "  ", ""][..]] {
        let (error, text) = load_error(lines);
        assert!(matches!(error, Error::Data { line: None, .. }), "{text}");
        assert!(text.contains("empty"), "{text}");
    }
}

#[test]
fn byte_order_mark_and_crlf_are_accepted() {
    let data = load(&["\u{feff}{\"text\": \"a\"}\r", "{\"text\": \"b\"}\r", ""], &opts(256)).unwrap();
    assert_eq!(data.stats.rows, 2);
}

#[test]
fn messages_need_a_chat_template() {
    let file = jsonl(&[r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#]);
    let error = load_jsonl(&file.path, tokenizer(), None, &opts(256)).unwrap_err();
    assert!(matches!(error, Error::Data { line: Some(1), .. }), "{error}");
    assert!(error.to_string().contains("chat template"), "{error}");
}

#[test]
fn a_template_that_is_not_prefix_stable_is_reported() {
    // Renders the newest turn first, so an earlier render is never a prefix of a later one.
    let source = "{% for m in messages|reverse %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
                  {% if add_generation_prompt %}assistant: {% endif %}";
    let reversed = ChatTemplate::new(source.into(), None, Some(EOS.into())).unwrap();
    let file = jsonl(&[r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#]);
    let tok = tokenizer();
    let error = load_jsonl(&file.path, tok, Some(&reversed), &opts(256)).unwrap_err();
    assert!(matches!(error, Error::Data { line: Some(1), .. }), "{error}");
    assert!(error.to_string().contains("not prefix-stable"), "{error}");
    // Training on every token needs no spans, so it works with such a template.
    let options = DataOptions { max_seq_len: 256, train_on_prompt: true };
    assert!(load_jsonl(&file.path, tok, Some(&reversed), &options).is_ok());
}

fn numbered_texts(n: usize) -> (Jsonl, Dataset<'static>) {
    let rows: Vec<String> = (0..n).map(|i| format!(r#"{{"text": "row {i}"}}"#)).collect();
    let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
    let file = jsonl(&rows);
    let data = load_jsonl(&file.path, tokenizer(), Some(template()), &opts(256)).unwrap();
    (file, data)
}

#[test]
fn split_is_deterministic_and_keeps_every_example_once() {
    let (_file, data) = numbered_texts(50);
    let all = data.examples().unwrap();
    let (train, eval) = data.clone().split(0.2, 7).unwrap();
    assert_eq!((train.len(), eval.len()), (40, 10));
    assert_eq!(train.stats.rows + eval.stats.rows, 50);
    assert_eq!(train.stats.tokens + eval.stats.tokens, data.stats.tokens);
    assert_eq!(train.lengths().iter().sum::<usize>(), train.stats.tokens);
    let (train_examples, eval_examples) = (train.examples().unwrap(), eval.examples().unwrap());
    let mut union: Vec<Example> = train_examples.iter().chain(&eval_examples).cloned().collect();
    let mut expected = all.clone();
    union.sort_by(|a, b| a.ids.cmp(&b.ids));
    expected.sort_by(|a, b| a.ids.cmp(&b.ids));
    assert_eq!(union, expected);

    let (train_again, eval_again) = data.clone().split(0.2, 7).unwrap();
    assert_eq!(
        (train_again.examples().unwrap(), eval_again.examples().unwrap()),
        (train_examples, eval_examples.clone())
    );
    let (_, eval_other) = data.clone().split(0.2, 8).unwrap();
    assert_ne!(eval_other.examples().unwrap(), eval_examples);

    // Tiny fractions still hold out one example; impossible splits are errors.
    assert_eq!(data.clone().split(0.001, 1).unwrap().1.len(), 1);
    assert!(data.clone().split(0.0, 1).is_err());
    assert!(data.split(1.0, 1).is_err());
    assert!(numbered_texts(1).1.split(0.5, 1).is_err());
}

/// The dataset keeps where each row is, not its tokens: a batch reads its rows back from the
/// file, in any order, as they were counted; a file edited under the run is an error naming the
/// row, never other tokens trained silently.
#[test]
fn batches_are_read_back_from_the_file() {
    let (file, data) = numbered_texts(30);
    let all = data.examples().unwrap();
    for (i, example) in all.iter().enumerate() {
        let expected = tokenizer().encode(&format!("row {i}"), true).unwrap();
        assert_eq!(example.ids[..expected.len()], expected[..], "row {i}");
    }
    assert_eq!(data.fetch(&[29, 3, 3, 0]).unwrap(), [all[29].clone(), all[3].clone(), all[3].clone(), all[0].clone()]);
    assert!(data.fetch(&[30]).is_err());

    let text = std::fs::read_to_string(&file.path).unwrap().replace("row 7\"", "row 8\"");
    std::fs::write(&file.path, text).unwrap();
    assert_eq!(data.fetch(&[6]).unwrap()[0], all[6]);
    let error = data.fetch(&[7]).unwrap_err();
    assert!(matches!(error, Error::Data { line: Some(8), .. }), "{error:?}");
    assert!(error.to_string().contains("changed"), "{error}");
}

#[test]
fn batch_plan_covers_every_example_once_per_epoch() {
    let plan = BatchPlan::new(23, 4, 42);
    assert_eq!(plan.batches_per_epoch(), 6);
    let mut orders = Vec::new();
    for epoch in 0..4 {
        let order: Vec<usize> = (0..6).flat_map(|i| plan.batch(epoch * 6 + i)).collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..23).collect::<Vec<_>>(), "epoch {epoch}");
        orders.push(order);
    }
    assert_ne!(orders[0], orders[1], "each epoch is reshuffled");
}

#[test]
fn batch_plan_resumes_from_the_step_alone() {
    let run: Vec<Vec<usize>> = {
        let plan = BatchPlan::new(37, 5, 9);
        (0..100).map(|step| plan.batch(step)).collect()
    };
    // A run resumed from a checkpoint at step 61 rebuilds the plan from its arguments.
    let resumed = BatchPlan::new(37, 5, 9);
    for (step, batch) in run.iter().enumerate().skip(61) {
        assert_eq!(&resumed.batch(step), batch, "step {step}");
    }
    assert_ne!(BatchPlan::new(37, 5, 10).batch(0), run[0]);
}

#[test]
fn pack_by_tokens_respects_the_budget_and_places_every_example_once() {
    // Deterministic pseudo-random lengths in 1..=120.
    let mut state = 12345u64;
    let lengths: Vec<usize> = (0..200)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as usize % 120 + 1
        })
        .collect();
    let budget = 256;
    let batches = pack_by_tokens(&lengths, budget);
    for batch in &batches {
        assert!(batch.iter().map(|&i| lengths[i]).sum::<usize>() <= budget, "{batch:?}");
    }
    let mut placed: Vec<usize> = batches.iter().flatten().copied().collect();
    placed.sort_unstable();
    assert_eq!(placed, (0..lengths.len()).collect::<Vec<_>>());
    assert_eq!(pack_by_tokens(&lengths, budget), batches);
    // First-fit decreasing is near the bound here: total / budget, rounded up, plus a little.
    let lower = lengths.iter().sum::<usize>().div_ceil(budget);
    assert!(batches.len() <= lower + 2, "{} batches, bound {lower}", batches.len());
    // An example over the budget gets a batch of its own.
    assert_eq!(pack_by_tokens(&[300, 10, 20], budget), vec![vec![0], vec![2, 1]]);
}

/// The Roman-numeral example: every prompt ends in whitespace, the targets are the numeral and the
/// eos, and the rows whose boundary BPE merges are counted.
#[test]
fn shipped_roman_dataset_trains_on_the_numeral_after_the_prompt_ids() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/roman");
    let tok = tokenizer();
    let eos = tok.eos_token_ids()[0];
    for (name, rows) in [("train.jsonl", 800), ("eval.jsonl", 100)] {
        let path = dir.join(name);
        let data = load_jsonl(&path, tok, None, &opts(256)).unwrap();
        assert_eq!(data.stats.format, Format::PromptCompletion);
        assert_eq!((data.stats.rows, data.stats.dropped_no_targets), (rows, 0));
        let text = std::fs::read_to_string(&path).unwrap();
        let mut merged = 0;
        for (line, example) in text.lines().zip(&data.examples().unwrap()) {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let (prompt, completion) = (row["prompt"].as_str().unwrap(), row["completion"].as_str().unwrap());
            assert!(prompt.ends_with([' ', '\n']), "{prompt:?}");
            assert!(completion.chars().all(|c| "MDCLXVI".contains(c)), "{completion:?}");
            let prompt_ids = lowrank::prompt::text_ids(tok, prompt).unwrap();
            assert!(example.ids.starts_with(&prompt_ids));
            let targets = target_ids(example);
            assert_eq!(targets.last(), Some(&eos));
            assert_eq!(tok.decode(&targets, true).unwrap(), completion);
            let joined = tok.encode(&format!("{prompt}{completion}"), true).unwrap();
            merged += usize::from(joined != example.ids[..example.len() - 1]);
        }
        assert_eq!(data.stats.boundary_merges, merged, "{name}");
        assert!(merged > rows / 2, "{name}: only {merged} of {rows} rows merge");
    }
}

#[test]
fn shipped_example_dataset_loads_without_drops() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/dates");
    let (tok, tpl) = (tokenizer(), template());
    for (name, rows) in [("train.jsonl", 400), ("eval.jsonl", 100)] {
        let data = load_jsonl(&dir.join(name), tok, Some(tpl), &opts(256)).unwrap();
        assert_eq!(data.stats.format, Format::Messages);
        assert_eq!(data.stats.rows, rows, "{name}");
        assert_eq!((data.stats.truncated, data.stats.dropped_no_targets), (0, 0), "{name}");
        // The target of every row is the YYYY-MM-DD answer and the eos.
        for example in &data.examples().unwrap() {
            let spans = target_spans(tok, example);
            assert_eq!(spans.len(), 1);
            let answer = spans[0].strip_suffix(EOS).unwrap_or_else(|| panic!("{spans:?}"));
            assert!(answer.len() == 10 && answer.as_bytes()[4] == b'-' && answer.as_bytes()[7] == b'-', "{answer:?}");
            assert!(example.len() <= 128, "{} tokens", example.len());
        }
    }
}

/// A row far longer than a sequence is cut before it is tokenised (memory follows max_seq_len,
/// not the line) and comes out as the full text's first tokens, counted as truncated; rows of
/// every format are (a 1.8 MB line each).
#[test]
fn a_huge_row_is_cut_to_the_tokens_a_sequence_takes() {
    let long = "the quick brown fox jumps over the lazy dog. ".repeat(40_000);
    let full = tokenizer().encode(&long, true).unwrap();
    for (row, format) in [
        (serde_json::json!({"text": long}), Format::Text),
        (serde_json::json!({"prompt": "Q: ", "completion": long}), Format::PromptCompletion),
        (
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long}]}),
            Format::Messages,
        ),
    ] {
        let line = row.to_string();
        let data = load(&[&line], &opts(64)).unwrap();
        assert_eq!(data.stats.truncated, 1, "{format:?}");
        let ex = &data.examples[0];
        assert_eq!(ex.ids.len(), 64, "{format:?}");
        if format == Format::Text {
            assert_eq!(ex.ids, full[..64], "the cut text's first tokens are the full text's");
        }
    }
}

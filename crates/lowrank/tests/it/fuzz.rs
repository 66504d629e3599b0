//! Fuzzing on stable Rust: seed files mutated at random (bit flips, interesting numbers written
//! over length and count fields, cut, spliced, repeated) and fed to the real parsers — GGUF
//! models, tokenizers and LoRA adapters, safetensors headers, `adapter_config.json`, training
//! JSONL, chat templates. A panic is a failure (the input is kept under `target/fuzz-crashes/`);
//! an error is the expected answer. The budget is `LOWRANK_FUZZ_SECS` (default 12 s, what CI
//! runs), the seed `LOWRANK_FUZZ_SEED`; a long run:
//!
//!     LOWRANK_FUZZ_SECS=1800 cargo test --release -p lowrank --test it fuzz -- --nocapture
//!
//! `LOWRANK_FUZZ_REPLAY=target/fuzz-crashes/FILE` feeds one kept input again, panic and all.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use lowrank::adapter::Adapter;
use lowrank::chat::{ChatTemplate, Message};
use lowrank::data::{load_jsonl, DataOptions};
use lowrank::model::{LoadOptions, Model};
use lowrank::tokenizer::Tokenizer;

use crate::common::*;
use crate::mutate::{mutate, Rng};

/// What one input is fed to.
enum Target {
    Gguf,
    Safetensors(PathBuf),
    AdapterConfig(PathBuf),
    Jsonl,
    Template,
}

struct Seeds {
    target: Target,
    files: Vec<Vec<u8>>,
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn seeds() -> Vec<Seeds> {
    let m = models_dir();
    let tok = m.join("../tokenizer");
    let gguf = [
        "llama/gguf/tiny-Q8_0.gguf",
        "qwen3/gguf/tiny-F32.gguf",
        "gemma2/gguf/tiny-Q8_0.gguf",
        "phi3/gguf/tiny-F16.gguf",
    ]
    .iter()
    .map(|f| read(&m.join(f)))
    .chain([read(&tok.join("tiny-spm.gguf")), read(&tok.join("tiny-bpe.gguf"))])
    .collect();
    let jsonl = [
        r#"{"text": "the theme"}"#.as_bytes().to_vec(),
        br#"{"prompt": "Q: 2+2?", "completion": " 4"}"#.to_vec(),
        br#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#.to_vec(),
    ];
    let templates = [
        b"{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".to_vec(),
        b"{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content | trim }} [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}".to_vec(),
    ];
    vec![
        Seeds { target: Target::Gguf, files: gguf },
        Seeds {
            target: Target::Safetensors(m.join("llama/model")),
            files: vec![read(&m.join("llama/model/model.safetensors"))],
        },
        Seeds {
            target: Target::AdapterConfig(m.join("llama/adapters/patterns")),
            files: ["qv", "patterns", "rslora", "regex"]
                .iter()
                .map(|a| read(&m.join(format!("llama/adapters/{a}/adapter_config.json"))))
                .collect(),
        },
        Seeds { target: Target::Jsonl, files: jsonl.to_vec() },
        Seeds { target: Target::Template, files: templates.to_vec() },
    ]
}

/// Feeds `input` to `target`'s parsers; the error (if any) is dropped, a panic propagates.
fn feed(target: &Target, input: &[u8], dir: &Path, model: &Model, tokenizer: &Tokenizer) {
    match target {
        Target::Gguf => {
            let path = dir.join("x.gguf");
            std::fs::write(&path, input).unwrap();
            let opts = LoadOptions { dequantize: input.len().is_multiple_of(2), ..Default::default() };
            if let Ok(m) = Model::from_path(&path, &opts) {
                let _ = m.forward(&[lowrank::model::SeqInput { tokens: &[1, 2, 3], adapters: &[] }], None);
            }
            if let Ok((c, _)) = lowrank::formats::read_gguf(&path) {
                let _ = Tokenizer::from_gguf(&c.metadata, &path);
            }
            let heads = lowrank::formats::gguf_names::Heads { query: 4, kv: 2 };
            let _ = Adapter::load_gguf(&path, model.modules(), heads, &Device::Cpu);
        }
        Target::Safetensors(src) => {
            let d = dir.join("st");
            let _ = std::fs::create_dir_all(&d);
            std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
            std::fs::write(d.join("model.safetensors"), input).unwrap();
            let _ = Model::from_path(&d, &LoadOptions::default());
        }
        Target::AdapterConfig(src) => {
            let d = dir.join("adapter");
            let _ = std::fs::create_dir_all(&d);
            std::fs::copy(src.join("adapter_model.safetensors"), d.join("adapter_model.safetensors")).unwrap();
            std::fs::write(d.join("adapter_config.json"), input).unwrap();
            let _ = Adapter::load_peft(&d, model.modules(), &Device::Cpu);
        }
        Target::Jsonl => {
            let path = dir.join("x.jsonl");
            std::fs::write(&path, input).unwrap();
            let template = ChatTemplate::new(
                "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}".into(),
                None,
                None,
            )
            .unwrap();
            let opts =
                DataOptions { max_seq_len: 2 + input.len() % 64, train_on_prompt: input.len().is_multiple_of(3) };
            let _ = load_jsonl(&path, tokenizer, Some(&template), &opts);
        }
        Target::Template => {
            let Ok(source) = String::from_utf8(input.to_vec()) else { return };
            if let Ok(t) = ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into())) {
                let msgs =
                    [Message::new("system", "be brief"), Message::new("user", "hi"), Message::new("assistant", "yo")];
                let _ = t.render(&msgs, true);
            }
        }
    }
}

fn peak_rss_mib() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_maxrss as f64 / 1024.0
}

#[test]
fn parsers_survive_mutated_inputs() {
    if let Some(path) = std::env::var_os("LOWRANK_FUZZ_REPLAY") {
        let path = PathBuf::from(path);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let k: usize = name.split('-').next().unwrap().parse().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let tokenizer = Tokenizer::from_hf_dir(&models_dir().join("qwen3/model")).unwrap();
        feed(&seeds()[k].target, &read(&path), tmp.path(), &tiny_model("llama"), &tokenizer);
        return;
    }
    let secs: u64 = std::env::var("LOWRANK_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    let seed: u64 = std::env::var("LOWRANK_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_f00d);
    let mut rng = Rng(seed | 1);
    let model = tiny_model("llama");
    let tokenizer = Tokenizer::from_hf_dir(&models_dir().join("qwen3/model")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let crashes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-crashes");
    let all = seeds();
    let budget = Duration::from_secs(secs);
    let started = Instant::now();
    let (mut runs, mut panics) = (vec![0usize; all.len()], Vec::new());
    let mut distinct = HashSet::new();
    // A quiet hook: a caught panic is reported below with its input.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    while started.elapsed() < budget {
        let k = rng.below(all.len());
        let s = &all[k];
        let base = &s.files[rng.below(s.files.len())];
        let other = &s.files[rng.below(s.files.len())];
        let input = mutate(base, other, &mut rng);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        input.hash(&mut h);
        distinct.insert(h.finish());
        runs[k] += 1;
        if catch_unwind(AssertUnwindSafe(|| feed(&s.target, &input, tmp.path(), &model, &tokenizer))).is_err() {
            std::fs::create_dir_all(&crashes).unwrap();
            let path = crashes.join(format!("{k}-{:016x}", h.finish()));
            std::fs::write(&path, &input).unwrap();
            panics.push(path);
        }
    }
    std::panic::set_hook(hook);
    let total: usize = runs.iter().sum();
    eprintln!(
        "fuzz: {total} inputs in {:.0} s ({} distinct; per target gguf/safetensors/adapter_config/jsonl/template {runs:?}), \
         {} panics, peak RSS {:.0} MiB, seed {seed}",
        started.elapsed().as_secs_f64(),
        distinct.len(),
        panics.len(),
        peak_rss_mib()
    );
    assert!(runs.iter().all(|&n| n > 0), "every target ran: {runs:?}");
    assert!(panics.is_empty(), "panics on {} inputs, kept in {:?}", panics.len(), panics);
}

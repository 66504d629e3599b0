//! Every command on the tiny model of each family added after Llama/Qwen2/Mistral, as a user runs
//! them: the HF directory (which carries a tokenizer) and the GGUF files llama.cpp's own converter
//! wrote from it (scripts/fixtures/converted.py). Greedy answers must agree wherever the same
//! weights are reached by two routes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Fixture directory, and what `inspect` calls the family (`gemma3mm`: the text model of Gemma 3
/// with its vision tower).
const FAMILIES: [(&str, &str); 5] =
    [("qwen3", "qwen3"), ("gemma2", "gemma2"), ("gemma3", "gemma3"), ("phi3", "phi3"), ("gemma3mm", "gemma3")];

fn lowrank(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lowrank")).args(args).output().expect("running lowrank")
}

/// Runs `lowrank args`, asserting success; its stdout.
fn ok(args: &[&str]) -> String {
    let r = lowrank(args);
    assert!(r.status.success(), "lowrank {}: {}", args.join(" "), String::from_utf8_lossy(&r.stderr));
    String::from_utf8_lossy(&r.stdout).into_owned()
}

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lowrank/tests/fixtures/models").join(family)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The greedy continuation of a fixed prompt (16 tokens, never stopping early on eos).
fn answer(model: &Path, adapter: Option<&Path>) -> String {
    let mut args = vec!["generate", "--model", s(model), "--prompt", "the the", "--max-new-tokens", "16"];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    ok(&args)
}

fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "train",
        "--model",
        s(model),
        "--data",
        s(data),
        "--output",
        s(out),
        "--steps",
        "20",
        "--batch-size",
        "4",
        "--rank",
        "4",
        "--lr",
        "3e-2",
    ];
    args.extend(extra);
    ok(&args);
    assert!(out.join("adapter_model.safetensors").is_file());
}

#[test]
fn every_command_runs_on_each_family_and_the_routes_agree() {
    for (family, name) in FAMILIES {
        let tmp = tempfile::tempdir().unwrap();
        let model = fixture(family).join("model");
        let gguf = fixture(family).join("gguf/tiny-F32.gguf");
        let data = tmp.path().join("train.jsonl");
        let rows: String =
            (0..8).map(|i| format!("{{\"prompt\": \"the {i}\", \"completion\": \" he{i}\"}}\n")).collect();
        std::fs::write(&data, rows).unwrap();

        let info = ok(&["inspect", s(&model)]);
        assert!(info.contains(name), "{family}: inspect says\n{info}");

        // All seven projections, then merged into an HF model that answers as base + adapter.
        let run = tmp.path().join("run");
        train(&model, &data, &run, &[]);
        let want = answer(&model, Some(&run));
        assert_ne!(want, answer(&model, None), "{family}: the trained adapter changes nothing");
        let merged = tmp.path().join("merged");
        ok(&["merge", "--model", s(&model), "--adapter", s(&run), "--output", s(&merged)]);
        assert_eq!(answer(&merged, None), want, "{family}: merged HF model");

        if gguf.is_file() {
            gguf_routes(family, &model, &gguf, &run, tmp.path());
        }

        // Two adapters stacked into one (cat: exact) answer as one merged under the other.
        let other = tmp.path().join("other");
        let attention = if family == "phi3" { "qkv_proj" } else { "q_proj,v_proj" };
        train(&model, &data, &other, &["--target-modules", attention, "--seed", "7"]);
        let combined = tmp.path().join("combined");
        ok(&["combine", "--model", s(&model), "--adapter", s(&run), "--adapter", s(&other), "--output", s(&combined)]);
        assert_eq!(answer(&model, Some(&combined)), answer(&merged, Some(&other)), "{family}: combined adapter");

        serve_mixed(family, &model, &run, &other);

        // DoRA with NF4 and checkpointing on the HF model; plain LoRA on the Q8_0 GGUF base.
        let qlora = tmp.path().join("qlora");
        train(&model, &data, &qlora, &["--dora", "--quantize", "nf4", "--gradient-checkpointing"]);
        answer(&model, Some(&qlora));
        let q8 = fixture(family).join("gguf/tiny-Q8_0.gguf");
        if q8.is_file() {
            let on_q8 = tmp.path().join("on_q8");
            train(&q8, &data, &on_q8, &[]);
            answer(&model, Some(&on_q8));
        }
    }
}

/// `lowrank serve` with two adapters: the base and each adapter asked at once (one mixed batch)
/// answer as `lowrank generate` does alone.
fn serve_mixed(family: &str, model: &Path, a: &Path, b: &Path) {
    let (a_arg, b_arg) = (format!("a={}", a.display()), format!("b={}", b.display()));
    let server = crate::serve::start(&["--model", s(model), "--adapter", &a_arg, "--adapter", &b_arg]);
    let (_, models) = crate::serve::http(&server.addr, "GET", "/v1/models", "");
    let models: serde_json::Value = serde_json::from_str(&models).unwrap();
    let base = models["data"][0]["id"].as_str().unwrap().to_string();
    let cases = [(base, None), ("a".to_string(), Some(a)), ("b".to_string(), Some(b))];
    let threads: Vec<_> = cases
        .iter()
        .map(|(name, _)| {
            let (addr, name) = (server.addr.clone(), name.clone());
            let body = serde_json::json!({"model": name, "prompt": "the the", "max_tokens": 16, "temperature": 0});
            std::thread::spawn(move || crate::serve::post(&addr, "/v1/completions", &body))
        })
        .collect();
    for ((name, adapter), t) in cases.iter().zip(threads) {
        let (status, body) = t.join().unwrap();
        assert_eq!(status, 200, "{family} {name}: {body}");
        let want = answer(model, *adapter);
        assert_eq!(body["choices"][0]["text"].as_str(), Some(want.trim_end_matches('\n')), "{family}: served {name}");
    }
}

/// The routes through llama.cpp's formats, compared with each other on the converter's file: a
/// GGUF cannot say everything config.json does (Qwen3's sliding window, Gemma's
/// query_pre_attn_scalar and layer pattern, for these tiny models).
fn gguf_routes(family: &str, model: &Path, gguf: &Path, run: &Path, tmp: &Path) {
    let info = ok(&["inspect", s(gguf)]);
    assert!(info.contains(family), "{family}: inspect of the GGUF says\n{info}");
    let want = answer(gguf, Some(run));

    // Merged into a GGUF model, from the GGUF base.
    let merged = tmp.join("merged.gguf");
    ok(&["merge", "--model", s(gguf), "--adapter", s(run), "--format", "gguf", "--output", s(&merged)]);
    assert_eq!(answer(&merged, None), want, "{family}: merged GGUF model");
    // From the HF base: llama.cpp would run tiny Gemma's scores at another scale, so it is refused.
    let from_hf = tmp.join("from_hf.gguf");
    let r = lowrank(&["merge", "--model", s(model), "--adapter", s(run), "--format", "gguf", "--output", s(&from_hf)]);
    if family.starts_with("gemma") {
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && err.contains("query_pre_attn_scalar"), "{family}: {err}");
        assert!(!from_hf.exists());
    } else {
        assert!(r.status.success(), "{family}: {}", String::from_utf8_lossy(&r.stderr));
        assert_eq!(answer(&from_hf, None), want, "{family}: GGUF merged from the HF model");
    }

    // The adapter as a llama.cpp LoRA GGUF, read back, answers as the PEFT directory.
    let exported = tmp.join("adapter.gguf");
    ok(&["export", "--model", s(model), "--adapter", s(run), "--output", s(&exported)]);
    let back = tmp.join("back");
    ok(&["export", "--model", s(gguf), "--from-gguf", s(&exported), "--output", s(&back)]);
    assert_eq!(answer(gguf, Some(&back)), want, "{family}: exported adapter");
}

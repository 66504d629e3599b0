//! `lowrank train` as a user runs it, on the default model with a few rows of the example data.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lowrank(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lowrank")).args(args).output().expect("running lowrank")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn example_rows(n: usize) -> String {
    let all = include_str!("../../../../examples/dates/train.jsonl");
    all.lines().take(n).map(|l| format!("{l}\n")).collect()
}

fn default_gguf() -> PathBuf {
    lowrank_home::default_model_gguf().expect("default model")
}

#[test]
fn trains_writes_peft_outputs_and_the_adapter_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.jsonl");
    std::fs::write(&data, example_rows(6)).unwrap();
    let out = tmp.path().join("run");
    let model = default_gguf();
    let args = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--rank",
        "4",
        "--target-modules",
        "q_proj,v_proj",
        "--lr",
        "1e-3",
        "--save-every",
        "1",
        "--eval-split",
        "0.34",
    ];
    let r = lowrank(&args);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let err = text(&r.stderr);
    assert!(err.contains("step     2/2") && err.contains("training") && err.contains("parameters"), "{err}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lowrank_train.json",
        "metrics.jsonl",
        "loss.svg",
        "checkpoints/latest",
    ] {
        assert!(out.join(f).exists(), "missing {f}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2);

    // The same output directory again is refused; the adapter generates.
    let again = lowrank(&args);
    assert!(!again.status.success() && text(&again.stderr).contains("already exists"));
    let g = lowrank(&[
        "generate",
        "--adapter",
        out.to_str().unwrap(),
        "--chat",
        "Write May 11, 1980 as YYYY-MM-DD.",
        "--max-new-tokens",
        "8",
    ]);
    assert!(g.status.success(), "{}", text(&g.stderr));
    assert!(!text(&g.stdout).trim().is_empty());
}

#[test]
fn malformed_data_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, format!("{}{{\"messages\": [oops\n", example_rows(2))).unwrap();
    let out = tmp.path().join("run");
    let model = default_gguf();
    let r = lowrank(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--steps",
        "1",
    ]);
    assert!(!r.status.success());
    let err = text(&r.stderr);
    assert!(err.contains("bad.jsonl:3"), "{err}");
    assert!(!Path::new(&out).join("adapter_model.safetensors").exists());
}

/// QLoRA + DoRA + checkpointing + LoRA+ + gaussian init in one run, as a user types it: the
/// default model converted to an HF directory, quantised to NF4 at load, a DoRA adapter trained
/// with checkpointed blocks; the output says so, and loads back for generation. A quantized GGUF
/// with --quantize is refused before training.
#[test]
fn qlora_dora_with_checkpointing_trains_and_a_quantized_gguf_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.jsonl");
    std::fs::write(&data, example_rows(4)).unwrap();
    let gguf = default_gguf();
    let bad = lowrank(&[
        "train",
        "--model",
        gguf.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        tmp.path().join("x").to_str().unwrap(),
        "--steps",
        "1",
        "--quantize",
        "nf4",
    ]);
    assert!(!bad.status.success() && text(&bad.stderr).contains("already quantized"), "{}", text(&bad.stderr));
    assert!(!tmp.path().join("x/adapter_model.safetensors").exists());

    let hf = tmp.path().join("hf");
    let r = lowrank(&["merge", "--model", gguf.to_str().unwrap(), "--output", hf.to_str().unwrap(), "--dtype", "f32"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let out = tmp.path().join("run");
    let r = lowrank(&[
        "train",
        "--model",
        hf.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--rank",
        "4",
        "--target-modules",
        "q_proj,v_proj",
        "--lr",
        "1e-3",
        "--quantize",
        "nf4",
        "--dora",
        "--gradient-checkpointing",
        "--lora-plus-ratio",
        "4",
        "--init",
        "gaussian",
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["use_dora"], true);
    assert_eq!(cfg["init_lora_weights"], "gaussian");
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("lowrank_train.json")).unwrap()).unwrap();
    assert_eq!(settings["quantize"], "nf4");
    assert_eq!(settings["train"]["gradient_checkpointing"], 1);
    assert_eq!(settings["train"]["lora_plus_ratio"], 4.0);
    let g = lowrank(&[
        "generate",
        "--model",
        hf.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--chat",
        "Write May 11, 1980 as YYYY-MM-DD.",
        "--max-new-tokens",
        "4",
    ]);
    assert!(g.status.success(), "{}", text(&g.stderr));
    // On the 4-bit base it was trained on: the adapter alongside, or merged into the dequantised
    // weights, answers alike.
    let on_nf4 = [
        "generate",
        "--model",
        hf.to_str().unwrap(),
        "--quantize",
        "nf4",
        "--adapter",
        out.to_str().unwrap(),
        "--chat",
        "Write May 11, 1980 as YYYY-MM-DD.",
        "--max-new-tokens",
        "6",
    ];
    let (q, m) = (lowrank(&on_nf4), lowrank(&[&on_nf4[..], &["--merge"]].concat()));
    assert!(q.status.success() && m.status.success(), "{}{}", text(&q.stderr), text(&m.stderr));
    assert!(!q.stdout.is_empty());
    assert_eq!(text(&q.stdout), text(&m.stdout));
    let bad = lowrank(&["generate", "--model", gguf.to_str().unwrap(), "--quantize", "nf4", "--prompt", "Hi"]);
    assert!(!bad.status.success() && text(&bad.stderr).contains("already quantized"), "{}", text(&bad.stderr));
    let bad = lowrank(&[
        "train",
        "--model",
        hf.to_str().unwrap(),
        "--eval-data",
        data.to_str().unwrap(),
        "--output",
        tmp.path().join("e").to_str().unwrap(),
    ]);
    assert!(!bad.status.success() && text(&bad.stderr).contains("--eval-data needs --data"), "{}", text(&bad.stderr));

    // OLoRA trains on the residual base and is saved as a plain rank-2r LoRA for the original one.
    let olora = tmp.path().join("olora");
    let r = lowrank(&[
        "train",
        "--model",
        hf.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        olora.to_str().unwrap(),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--rank",
        "4",
        "--target-modules",
        "q_proj,v_proj",
        "--init",
        "olora",
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(olora.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["r"].as_u64(), cfg["lora_alpha"].as_f64(), cfg["init_lora_weights"].as_bool()),
        (Some(8), Some(16.0), Some(true))
    );
    let e = lowrank(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--output",
        tmp.path().join("p").to_str().unwrap(),
        "--steps",
        "1",
        "--init",
        "pissa",
    ]);
    assert!(
        !e.status.success() && text(&e.stderr).contains("quantized"),
        "pissa on the Q4_1 default model: {}",
        text(&e.stderr)
    );
    assert!(!tmp.path().join("p").exists(), "a refused init writes nothing");
}

/// `--dtype`: bf16 by default where the CPU has AVX-512-BF16; with `LOWRANK_BF16=0` (the
/// fallback, as on a CPU without it) the default is f32 and trains exactly as `--dtype f32`,
/// and asking for bf16 is refused before anything is written.
#[test]
fn dtype_defaults_to_bf16_where_available_and_falls_back_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.jsonl");
    let rows: String = (0..8)
        .map(|i| format!("{{\"text\": \"row {i}: the quick brown fox jumps over the lazy dog, then sleeps by the river bank at dusk.\"}}\n"))
        .collect();
    std::fs::write(&data, rows).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lowrank/tests/fixtures/models/qwen3/model");
    let run = |name: &str, extra: &[&str], no_bf16: bool| {
        let out = tmp.path().join(name);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lowrank"));
        cmd.args(["train", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()]);
        cmd.args(["--output", out.to_str().unwrap(), "--steps", "3", "--batch-size", "4", "--lr", "1e-2"]);
        cmd.args(extra);
        if no_bf16 {
            cmd.env("LOWRANK_BF16", "0");
        } else {
            cmd.env_remove("LOWRANK_BF16");
        }
        let r = cmd.output().unwrap();
        (out, r)
    };
    let read = |out: &Path| std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let dtype = |out: &Path| -> String {
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("lowrank_train.json")).unwrap()).unwrap();
        s["dtype"].as_str().unwrap().to_string()
    };

    let (f32_out, r) = run("f32", &["--dtype", "f32"], false);
    assert!(r.status.success() && text(&r.stderr).contains("f32 products"), "{}", text(&r.stderr));
    let (fallback, r) = run("fallback", &[], true);
    assert!(r.status.success() && text(&r.stderr).contains("f32 products"), "{}", text(&r.stderr));
    assert_eq!(dtype(&fallback), "f32");
    assert!(read(&fallback) == read(&f32_out), "the fallback trains otherwise than --dtype f32");

    let (refused, r) = run("refused", &["--dtype", "bf16"], true);
    assert!(!r.status.success() && text(&r.stderr).contains("AVX-512-BF16"), "{}", text(&r.stderr));
    assert!(!refused.exists(), "a refused --dtype writes nothing");

    if lowrank::kernels::bf16_available() {
        let (bf16_out, r) = run("default", &[], false);
        assert!(r.status.success() && text(&r.stderr).contains("bf16 products"), "{}", text(&r.stderr));
        assert_eq!(dtype(&bf16_out), "bf16");
        assert!(read(&bf16_out) != read(&f32_out), "bf16 training gave the f32 adapter bit for bit");
    }
}

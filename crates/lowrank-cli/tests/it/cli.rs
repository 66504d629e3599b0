//! The `lowrank` binary, run as a user would: stdout carries only the generated text, errors go
//! to stderr with a non-zero exit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

fn lowrank(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lowrank")).args(args).output().expect("running lowrank")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lowrank/tests/fixtures/models")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const FRANCE: &[&str] = &["generate", "--chat", "What is the capital of France?", "--max-new-tokens", "24"];

#[test]
fn default_model_answers_on_stdout_only() {
    let out = lowrank(FRANCE);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "The capital of France is Paris.\n");
}

/// A PEFT adapter for the default model (q_proj and v_proj of every layer), random A and B.
fn write_adapter(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"],"bias":"none"}"#;
    std::fs::write(dir.join("adapter_config.json"), cfg).unwrap();
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    for l in 0..30 {
        for (m, out) in [("q_proj", 576), ("v_proj", 192)] {
            let p = format!("base_model.model.model.layers.{l}.self_attn.{m}");
            t.insert(format!("{p}.lora_A.weight"), Tensor::randn(0f32, 0.3, (8, 576), &dev).unwrap());
            t.insert(format!("{p}.lora_B.weight"), Tensor::randn(0f32, 0.3, (out, 8), &dev).unwrap());
        }
    }
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
}

#[test]
fn adapter_weight_zero_is_the_base_and_weight_one_changes_the_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("noise");
    write_adapter(&dir);
    let base = lowrank(FRANCE);
    let zero_arg = format!("{}:0", dir.display());
    let zero = lowrank(&[FRANCE, &["--adapter", &zero_arg]].concat());
    assert!(zero.status.success(), "{}", text(&zero.stderr));
    assert_eq!(zero.stdout, base.stdout);
    let one = lowrank(&[FRANCE, &["--adapter", dir.to_str().unwrap(), "--verbose"]].concat());
    assert!(one.status.success(), "{}", text(&one.stderr));
    assert_ne!(one.stdout, base.stdout, "a strong random adapter must change the output");
    let err = text(&one.stderr);
    assert!(err.contains("adapter noise") && err.contains("decode") && err.contains("loaded"), "{err}");
}

#[test]
fn adapter_for_another_model_fails_with_a_hint() {
    let adapter = fixtures().join("llama/adapters/qv");
    let out = lowrank(&[FRANCE, &["--adapter", adapter.to_str().unwrap()]].concat());
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("error:") && err.contains("lora_A") && err.contains("HINT"), "{err}");
}

#[test]
fn missing_and_malformed_models_exit_non_zero() {
    let out = lowrank(&["generate", "--model", "/nonexistent/model", "--prompt", "hi"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/nonexistent/model"));

    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let out = lowrank(&["generate", "--model", junk.to_str().unwrap(), "--prompt", "hi"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("junk.gguf"), "{}", text(&out.stderr));
}

#[test]
fn inspect_reports_model_and_adapter() {
    let out = lowrank(&["inspect", fixtures().join("qwen2/model").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("family: qwen2") && s.contains("biases: qkv true") && s.contains("layers: 2"), "{s}");

    let out = lowrank(&["inspect", fixtures().join("llama/adapters/patterns").to_str().unwrap()]);
    let s = text(&out.stdout);
    assert!(s.contains("rank: 4") && s.contains("rank pattern") && s.contains("adapted modules: 14"), "{s}");

    let out = lowrank(&["inspect"]);
    let s = text(&out.stdout);
    assert!(s.contains("format: GGUF") && s.contains("q4_1") && s.contains("layers: 30"), "{s}");
}

#[test]
fn zero_dims_are_rejected_not_panicked() {
    // A safetensors file with a wrong-shaped norm: shape error names the tensor.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("llama/model");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut t = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    t.insert("model.norm.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let out = lowrank(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "hi"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("model.norm.weight"), "{}", text(&out.stderr));
}

#[test]
fn merged_adapter_answers_as_the_unmerged_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("noise");
    write_adapter(&dir);
    let arg = format!("{}:0.5", dir.display());
    let plain = lowrank(&[FRANCE, &["--adapter", &arg]].concat());
    let merged = lowrank(&[FRANCE, &["--adapter", &arg, "--merge"]].concat());
    assert!(plain.status.success() && merged.status.success(), "{}", text(&merged.stderr));
    assert_eq!(text(&merged.stdout), text(&plain.stdout));
    let none = lowrank(&[FRANCE, &["--merge"]].concat());
    assert!(!none.status.success(), "--merge without --adapter should be refused");
}

/// Options no run can use are refused by name before anything is allocated (a rank of 10⁹ used
/// to abort on the allocation).
#[test]
fn absurd_training_options_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    let rows: String = (0..4).map(|i| format!("{{\"prompt\": \"the {i}\", \"completion\": \" he{i}\"}}\n")).collect();
    std::fs::write(&data, rows).unwrap();
    let model = fixtures().join("qwen3/model");
    for (args, words) in [
        (&["--rank", "1000000000"][..], "--rank 1000000000"),
        (&["--rank", "1000", "--alpha", "8"][..], "rank 1000 for `model.layers.0"),
        (&["--alpha", "1e308"][..], "--alpha"),
        (&["--alpha", "nan"][..], "--alpha NaN"),
        (&["--lr", "1e400"][..], "--lr inf"),
        (&["--grad-accum", "0"][..], "--grad-accum"),
        (&["--dropout", "1.5"][..], "--dropout 1.5"),
    ] {
        let out_dir = tmp.path().join("out");
        let base = ["train", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--steps", "1"];
        let out = lowrank(&[&base[..], &["--output", out_dir.to_str().unwrap()], args].concat());
        assert!(!out.status.success() && out.status.code() == Some(1), "{args:?}: {:?}", out.status);
        assert!(text(&out.stderr).contains(words), "{args:?}: {}", text(&out.stderr));
        assert!(!out_dir.join("adapter_model.safetensors").exists());
    }
}

/// `generate --dtype bf16` runs the prompt's forward pass in bf16 and still answers the French
/// capital question on the default model as the f32 default does; where bf16 is unavailable
/// (`LOWRANK_BF16=0`) it is refused with the reason.
#[test]
fn generate_in_bf16_answers_as_f32_and_is_refused_without_the_cpu_feature() {
    let run = |extra: &[&str], no_bf16: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lowrank"));
        cmd.args(FRANCE).args(extra);
        if no_bf16 {
            cmd.env("LOWRANK_BF16", "0");
        } else {
            cmd.env_remove("LOWRANK_BF16");
        }
        cmd.output().expect("running lowrank")
    };
    let refused = run(&["--dtype", "bf16"], true);
    assert!(!refused.status.success() && text(&refused.stderr).contains("AVX-512-BF16"), "{}", text(&refused.stderr));
    if !lowrank::kernels::bf16_available() {
        return;
    }
    let (f32_out, bf16_out) = (run(&[], false), run(&["--dtype", "bf16"], false));
    assert!(f32_out.status.success() && bf16_out.status.success(), "{}", text(&bf16_out.stderr));
    assert!(text(&bf16_out.stdout).contains("Paris"), "{}", text(&bf16_out.stdout));
    assert!(text(&f32_out.stdout).contains("Paris"), "{}", text(&f32_out.stdout));
}

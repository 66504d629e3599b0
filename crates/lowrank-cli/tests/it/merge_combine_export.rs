//! `lowrank merge`, `combine` and `export` as a user runs them, on the tiny fixture models: outputs that load
//! back, refusals that leave existing files alone, and failures that leave no partial output.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lowrank(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lowrank")).args(args).output().expect("running lowrank")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lowrank/tests/fixtures/models").join(family)
}

fn merge_args<'a>(model: &'a Path, adapter: &'a str, out: &'a Path) -> Vec<&'a str> {
    vec!["merge", "--model", model.to_str().unwrap(), "--adapter", adapter, "--output", out.to_str().unwrap()]
}

/// Entries of `dir`.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn merges_into_a_directory_and_refuses_to_overwrite_it_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("llama").join("model");
    let adapter = format!("{}:0.5", fixture("llama").join("adapters/all_linear").display());
    let out = tmp.path().join("merged");
    let r = lowrank(&merge_args(&model, &adapter, &out));
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert_eq!(listing(&out), ["config.json", "generation_config.json", "model.safetensors"]);
    assert!(text(&r.stderr).contains("all_linear (weight 0.5)"), "{}", text(&r.stderr));
    let first = std::fs::read(out.join("model.safetensors")).unwrap();

    let again = lowrank(&merge_args(&model, &adapter, &out));
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists") && text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), first, "a refused merge touched the output");

    let mut forced = merge_args(&model, &adapter, &out);
    forced.extend(["--force", "--dtype", "bf16", "--max-shard-size", "100KB"]);
    let r = lowrank(&forced);
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert!(listing(&out).contains(&"model.safetensors.index.json".to_string()), "{:?}", listing(&out));
    assert_eq!(listing(tmp.path()), ["merged"], "temporaries left beside the output");
}

#[test]
fn an_adapter_for_another_model_is_a_clear_error_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // Rank 4 on q_proj, for a model with 32-wide hidden states (the fixtures have 64).
    let adapter = tmp.path().join("other");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"]}"#,
    )
    .unwrap();
    let dev = candle_core::Device::Cpu;
    let mut t = std::collections::HashMap::new();
    for l in 0..2 {
        let p = format!("base_model.model.model.layers.{l}.self_attn.q_proj");
        t.insert(
            format!("{p}.lora_A.weight"),
            candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &dev).unwrap(),
        );
        t.insert(
            format!("{p}.lora_B.weight"),
            candle_core::Tensor::zeros((64, 4), candle_core::DType::F32, &dev).unwrap(),
        );
    }
    candle_core::safetensors::save(&t, adapter.join("adapter_model.safetensors")).unwrap();
    let out = tmp.path().join("merged");
    let r = lowrank(&merge_args(&fixture("llama").join("model"), adapter.to_str().unwrap(), &out));
    assert!(!r.status.success());
    let err = text(&r.stderr);
    assert!(err.contains("q_proj") && err.contains("[4, 32]") && err.contains("HINT"), "{err}");
    assert_eq!(listing(tmp.path()), ["other"]);
}

#[test]
fn a_full_disk_leaves_no_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let model = fixture("qwen2").join("model");
    let adapter = fixture("qwen2").join("adapters/qv");
    // Files may grow to 64 KiB: the ~300 kB safetensors write fails part way, as on a full disk.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lowrank"));
    cmd.args(merge_args(&model, adapter.to_str().unwrap(), &out));
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 64 << 10, rlim_max: 64 << 10 };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let r = cmd.output().unwrap();
    assert!(!r.status.success(), "the write should have failed");
    let err = text(&r.stderr);
    assert!(err.contains("model.safetensors") && err.contains("File too large"), "{err}");
    assert!(listing(tmp.path()).is_empty(), "left behind: {:?}", listing(tmp.path()));
}

#[test]
fn combine_writes_a_peft_adapter_that_merge_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("llama").join("model");
    let (qv, all) = (fixture("llama").join("adapters/qv"), fixture("llama").join("adapters/all_linear"));
    let out = tmp.path().join("both");
    let args = |method: &str| {
        let mut v: Vec<String> =
            ["combine", "--model", model.to_str().unwrap(), "--method", method].map(String::from).to_vec();
        v.extend([
            "--adapter".into(),
            format!("{}:0.7", qv.display()),
            "--adapter".into(),
            format!("{}:-0.4", all.display()),
        ]);
        v.extend(["--output".into(), out.to_str().unwrap().into()]);
        v
    };
    let run = |a: Vec<String>| lowrank(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let r = run(args("cat"));
    assert!(r.status.success(), "{}", text(&r.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(12), Some(12.0)));

    let again = run(args("svd"));
    assert!(!again.status.success() && text(&again.stderr).contains("already exists"), "{}", text(&again.stderr));
    let linear = run([args("linear"), vec!["--force".into()]].concat());
    assert!(!linear.status.success() && text(&linear.stderr).contains("qv has r=4"), "{}", text(&linear.stderr));
    assert_eq!(
        cfg["r"],
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap()["r"]
    );

    let merged = tmp.path().join("merged");
    let r = lowrank(&merge_args(&model, out.to_str().unwrap(), &merged));
    assert!(r.status.success(), "{}", text(&r.stderr));

    // TIES needs a density; with one, it writes an adapter of the common rank.
    let rs = fixture("llama").join("adapters/rslora");
    let ties = |extra: &[&str]| {
        let o = tmp.path().join("ties");
        let mut v = vec![
            "combine",
            "--model",
            model.to_str().unwrap(),
            "--method",
            "ties",
            "--output",
            o.to_str().unwrap(),
            "--force",
        ];
        v.extend(extra);
        let a = [format!("{}:0.7", qv.display()), format!("{}:-0.4", rs.display())];
        lowrank(&[v, vec!["--adapter", &a[0], "--adapter", &a[1]]].concat())
    };
    let r = ties(&[]);
    assert!(!r.status.success() && text(&r.stderr).contains("--density"), "{}", text(&r.stderr));
    let r = ties(&["--density", "0.5"]);
    assert!(r.status.success() && text(&r.stderr).contains("(ties)"), "{}", text(&r.stderr));
}

#[test]
fn export_to_gguf_and_back_and_gguf_merge_needs_a_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("llama").join("model");
    let adapter = fixture("llama").join("adapters/patterns");
    let file = tmp.path().join("a.gguf");
    let (m, a, f) = (model.to_str().unwrap(), adapter.to_str().unwrap(), file.to_str().unwrap());
    let r = lowrank(&["export", "--model", m, "--adapter", a, "--output", f]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let back = tmp.path().join("back");
    let r = lowrank(&["export", "--model", m, "--from-gguf", f, "--output", back.to_str().unwrap()]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert_eq!(listing(&back), ["adapter_config.json", "adapter_model.safetensors"]);
    let again = lowrank(&["export", "--model", m, "--adapter", a, "--output", f]);
    assert!(!again.status.success() && text(&again.stderr).contains("already exists"));

    let out = tmp.path().join("m.gguf");
    let r = lowrank(&["merge", "--model", m, "--adapter", a, "--format", "gguf", "--output", out.to_str().unwrap()]);
    // The tiny HF model has no tokenizer, which llama.cpp needs inside the file.
    assert!(!r.status.success() && text(&r.stderr).contains("no tokenizer.json"), "{}", text(&r.stderr));
    assert!(!out.exists());
    let gguf = fixture("llama").join("gguf/tiny-F32.gguf");
    let r = lowrank(&[
        "merge",
        "--model",
        gguf.to_str().unwrap(),
        "--adapter",
        a,
        "--format",
        "gguf",
        "--dtype",
        "q8_0",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert!(out.is_file());
}

//! Writing PEFT adapter directories: a fixture adapter loaded and saved again reloads to the same
//! tensors bit for bit and the same logits, and its `adapter_config.json` has PEFT's key set
//! (byte-identical to what PEFT wrote, unless `"all-linear"` had to be resolved).

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use lowrank::adapter::{json_dumps_sorted, peft_config_json, Adapter, AdapterConfig, ModuleSelector, PEFT_VERSION};
use lowrank::model::{Model, ModuleTable};
use serde_json::Value;

const CASES: &[(&str, &[&str])] = &[
    ("llama", &["qv", "all_linear", "rslora", "patterns", "layers", "regex", "zero", "mix"]),
    ("qwen2", &["qv", "all_linear"]),
    ("mistral", &["qv", "all_linear"]),
];

fn fixture_dir(family: &str, name: &str) -> std::path::PathBuf {
    models_dir().join(family).join("adapters").join(name)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

/// Every tensor of `a` and `b` per module: same names, shapes and bits.
fn assert_same_tensors(a: &Adapter, b: &Adapter, table: &ModuleTable, what: &str) {
    assert_eq!(a.num_layers(), b.num_layers(), "{what}: layer count");
    for (id, m) in table.modules().iter().enumerate() {
        match (a.layer(id), b.layer(id)) {
            (None, None) => {}
            (Some(x), Some(y)) => {
                let (tx, ty) = (x.tensors(), y.tensors());
                assert_eq!(tx.len(), ty.len(), "{what}: {}", m.path);
                for ((nx, x), (ny, y)) in tx.iter().zip(&ty) {
                    assert_eq!(nx, ny, "{what}: {}", m.path);
                    assert_eq!(x.dims(), y.dims(), "{what}: {}.{nx}", m.path);
                    assert!(bits(x) == bits(y), "{what}: {}.{nx} differs", m.path);
                }
            }
            _ => panic!("{what}: {} adapted in one but not the other", m.path),
        }
    }
}

fn load(dir: &Path, model: &Model) -> Adapter {
    Adapter::load_peft(dir, model.modules(), &Device::Cpu).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

#[test]
fn saved_config_text_is_what_peft_wrote() {
    // The config writer alone (no all-linear resolution) reproduces PEFT's files byte for byte.
    for (family, names) in CASES {
        for name in *names {
            let path = fixture_dir(family, name).join("adapter_config.json");
            let text = std::fs::read_to_string(&path).unwrap();
            let cfg = AdapterConfig::from_json(&text, &path).unwrap();
            assert_eq!(json_dumps_sorted(&peft_config_json(&cfg)), text, "{family}/{name}");
        }
    }
}

#[test]
fn fixture_adapters_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    for (family, names) in CASES {
        let model = tiny_model(family);
        let table = model.modules();
        for name in *names {
            let what = format!("{family}/{name}");
            let src = fixture_dir(family, name);
            let orig = load(&src, &model);
            let out = tmp.path().join(family).join(name);
            orig.save_peft(&out, table).unwrap_or_else(|e| panic!("{what}: save: {e}"));
            let mut files: Vec<String> = std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            assert_eq!(files, ["adapter_config.json", "adapter_model.safetensors"], "{what}");

            // Same tensors, bit for bit, after a reload.
            let back = load(&out, &model);
            assert_same_tensors(&orig, &back, table, &what);

            // adapter_model.safetensors: PEFT's keys, f32, metadata {"format": "pt"}.
            let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let md = meta.metadata().clone().unwrap_or_default();
            assert_eq!(md.get("format").map(String::as_str), Some("pt"), "{what}: metadata {md:?}");
            let ours = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
            let peft = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
            assert_eq!(
                ours.keys().collect::<BTreeSet<_>>(),
                peft.keys().collect::<BTreeSet<_>>(),
                "{what}: tensor keys"
            );
            for (k, t) in &ours {
                assert_eq!(t.dtype(), candle_core::DType::F32, "{what}: {k}");
                assert!(bits(t) == bits(&peft[k]), "{what}: {k} differs from PEFT's file");
            }

            // adapter_config.json: PEFT's key set; byte-identical unless "all-linear" was resolved.
            let saved_text = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
            let peft_text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
            let (saved, peft_cfg) =
                (read_json(&out.join("adapter_config.json")), read_json(&src.join("adapter_config.json")));
            assert_eq!(keys(&saved), keys(&peft_cfg), "{what}: key set");
            if peft_cfg["target_modules"] == "all-linear" {
                // Resolved as PEFT 0.21 saves it: every linear module path of the model.
                let mut want: Vec<&str> = table.modules().iter().map(|m| m.path.as_str()).collect();
                want.sort();
                assert_eq!(saved["target_modules"], serde_json::json!(want), "{what}");
                let mut a = saved.clone();
                a["target_modules"] = peft_cfg["target_modules"].clone();
                assert_eq!(a, peft_cfg, "{what}: only target_modules changes");
            } else {
                assert_eq!(saved_text, peft_text, "{what}: config text");
            }

            // Same logits (bit for bit against the loaded original; 1e-4 against PEFT's).
            let (a, b) = (Arc::new(orig), Arc::new(back));
            let case = if *name == "mix" { "mix" } else { name };
            for (i, ids) in ids(family).iter().enumerate() {
                let la = logits(&model, ids, &[active(&a, 1.0)]);
                let lb = logits(&model, ids, &[active(&b, 1.0)]);
                assert!(bits(&la) == bits(&lb), "{what} seq {i}: logits changed after save + load");
                let d = max_diff(&lb, &reference(family, case, i));
                assert!(d < 1e-4, "{what} seq {i}: max |Δlogit| vs PEFT = {d}");
            }
        }
    }
}

#[test]
fn a_fresh_adapter_is_saved_with_every_peft_key() {
    let model = tiny_model("llama");
    let table = model.modules();
    let cfg = AdapterConfig::from_json(
        r#"{"r":4,"lora_alpha":8,"target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]}"#,
        Path::new("new"),
    )
    .unwrap();
    let mut cfg = AdapterConfig { raw: Default::default(), ..cfg };
    cfg.base_model_name_or_path = Some("HuggingFaceTB/SmolLM2-135M-Instruct".into());
    let a = Adapter::init("new", cfg, &model, 7).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("new");
    a.save_peft(&out, table).unwrap();
    let saved = read_json(&out.join("adapter_config.json"));
    let peft = read_json(&fixture_dir("llama", "qv").join("adapter_config.json"));
    assert_eq!(keys(&saved), keys(&peft), "a new config has exactly PEFT's key set");
    assert_eq!(saved["task_type"], "CAUSAL_LM");
    assert_eq!(saved["auto_mapping"], Value::Null);
    assert_eq!(saved["peft_type"], "LORA");
    assert_eq!(saved["peft_version"], PEFT_VERSION);
    assert_eq!(saved["inference_mode"], true);
    assert_eq!(saved["lora_alpha"], 8);
    assert_eq!(saved["base_model_name_or_path"], "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(saved["target_modules"].as_array().unwrap().len(), 7);
    let back = load(&out, &model);
    assert_same_tensors(&a, &back, table, "fresh");
    // Nothing else is left beside the directory (the temporary directory was renamed away).
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["new"]);
}

#[test]
fn all_linear_is_resolved_like_peft() {
    let model = tiny_model("llama");
    let table = model.modules();
    let cfg =
        AdapterConfig::from_json(r#"{"r":2,"lora_alpha":4,"target_modules":"all-linear"}"#, Path::new("x")).unwrap();
    let a = Adapter::init("x", cfg, &model, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    a.save_peft(&tmp.path().join("a"), table).unwrap();
    let saved = read_json(&tmp.path().join("a/adapter_config.json"));
    // PEFT's own llama all_linear fixture lists the same module paths.
    let peft = read_json(&fixture_dir("llama", "all_linear").join("adapter_config.json"));
    let set =
        |v: &Value| v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect::<BTreeSet<_>>();
    assert_eq!(set(&saved["target_modules"]), set(&peft["target_modules"]));
    let back = load(&tmp.path().join("a"), &model);
    assert_eq!(back.num_layers(), 14);
    assert!(matches!(back.config.target_modules, Some(ModuleSelector::List(_))));
}

#[test]
fn refuses_to_overwrite_and_checks_the_config() {
    let model = tiny_model("llama");
    let table = model.modules();
    let a = adapter(&model, "llama", "qv");
    let tmp = tempfile::tempdir().unwrap();

    // An empty directory is fine (e.g. one made by tempdir()).
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    a.save_peft(&empty, table).unwrap();
    // A non-empty one (a previous adapter included) is never overwritten.
    let e = a.save_peft(&empty, table).unwrap_err().to_string();
    assert!(e.contains("not an empty directory"), "{e}");
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(a.save_peft(&file, table).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    // A config that does not describe the layers is refused, and nothing is written.
    let mut cfg = a.config.clone();
    cfg.target_modules = Some(ModuleSelector::List(vec!["q_proj".into()]));
    let mut bad = Adapter::load_peft(&fixture_dir("llama", "qv"), table, &Device::Cpu).unwrap();
    bad.config = cfg;
    let e = bad.save_peft(&tmp.path().join("bad"), table).unwrap_err().to_string();
    assert!(e.contains("does not target"), "{e}");
    assert!(!tmp.path().join("bad").exists());
    let mut left: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["empty", "file"], "no temporary directory left behind");

    // A table from another model is refused.
    let e = a.save_peft(&tmp.path().join("other"), &ModuleTable::default()).unwrap_err().to_string();
    assert!(e.contains("module slots"), "{e}");
}

#[test]
fn training_fixture_adapters_round_trip() {
    // PEFT dirs written with task_type "CAUSAL_LM" (scripts/fixtures/training.py).
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/training");
    let tmp = tempfile::tempdir().unwrap();
    for family in ["llama", "qwen2"] {
        let model = tiny_model(family);
        for stage in ["init", "after5"] {
            let src = root.join(family).join(stage);
            let text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
            let a = load(&src, &model);
            assert_eq!(a.num_layers(), 14);
            let out = tmp.path().join(format!("{family}-{stage}"));
            a.save_peft(&out, model.modules()).unwrap();
            assert_eq!(std::fs::read_to_string(out.join("adapter_config.json")).unwrap(), text, "{family}/{stage}");
            assert_same_tensors(&a, &load(&out, &model), model.modules(), &format!("{family}/{stage}"));
        }
    }
}

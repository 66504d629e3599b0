//! Writing merged models as HF directories: what is written loads back to the same logits as
//! base + adapters, in shards, in bf16, and a non-finite merge writes nothing.

use crate::common;

use candle_core::DType;
use common::*;
use lowrank::export::{write_hf_model, HfOptions, TokenizerFiles};
use lowrank::model::{LoadOptions, Model};
use lowrank::staging::Existing;

#[test]
fn merged_directory_reloads_to_base_plus_adapter_logits_across_shards() {
    for family in ["llama", "qwen2"] {
        let src = models_dir().join(family).join("model");
        let mut model = tiny_model(family);
        let (qv, all) = (adapter(&model, family, "qv"), adapter(&model, family, "all_linear"));
        let set = [active(&qv, 0.7), active(&all, -0.4)];
        let ids = &ids(family)[0];
        let adapted = logits(&model, ids, &set);
        model.merge(&set).unwrap();

        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let opts = HfOptions { max_shard_bytes: 40_000, ..Default::default() };
        let written =
            write_hf_model(&model, &TokenizerFiles::from_hf_dir(&src).unwrap(), &out, &opts, Existing::Refuse).unwrap();
        let shards = written.files.iter().filter(|f| f.ends_with(".safetensors")).count();
        assert!(shards > 1, "{family}: 40 kB shards of a ~300 kB model: {:?}", written.files);
        for f in ["model.safetensors.index.json", "config.json", "generation_config.json"] {
            assert!(out.join(f).is_file(), "{family}: no {f}");
        }
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
        assert_eq!(index["weight_map"].as_object().unwrap().len(), written.tensors);
        assert_eq!(index["metadata"]["total_size"].as_u64(), Some(written.bytes));

        let reloaded = Model::from_path(&out, &LoadOptions::default()).unwrap();
        let d = max_diff(&logits(&reloaded, ids, &[]), &adapted);
        assert!(d < 1e-4, "{family}: reloaded merged model differs from base + adapters by {d}");
        // Nothing is left beside the output.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}

#[test]
fn bf16_export_holds_the_merged_weights_rounded_to_bf16() {
    let mut model = tiny_model("llama");
    let a = adapter(&model, "llama", "all_linear");
    model.merge(&[active(&a, 1.0)]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    let opts = HfOptions { dtype: DType::BF16, ..Default::default() };
    write_hf_model(&model, &TokenizerFiles::none(), &out, &opts, Existing::Refuse).unwrap();
    let stored = candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    for (name, w) in model.named_weights().unwrap() {
        let s = &stored[&name];
        assert_eq!(s.dtype(), DType::BF16, "{name}");
        let want = w.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(max_diff(&s.to_dtype(DType::F32).unwrap(), &want), 0.0, "{name}");
    }
}

#[test]
fn non_finite_merge_is_refused_and_writes_nothing() {
    let mut model = tiny_model("llama");
    let a = adapter(&model, "llama", "qv");
    model.merge(&[active(&a, 1e39)]).unwrap(); // overflows f32: ±inf in q_proj and v_proj
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bad");
    let opts = HfOptions { check_finite: true, ..Default::default() };
    let e = write_hf_model(&model, &TokenizerFiles::none(), &out, &opts, Existing::Refuse).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.self_attn.q_proj.weight") && e.contains("non-finite"), "{e}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "something was written");
}

#[test]
fn an_existing_output_is_refused_unless_replacing() {
    let model = tiny_model("llama");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    let none = TokenizerFiles::none();
    let e = write_hf_model(&model, &none, &out, &HfOptions::default(), Existing::Refuse).unwrap_err();
    let cause = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default();
    assert!(e.to_string().contains("/m") && cause.contains("already exists"), "{e}: {cause}");
    assert!(out.join("keep").exists());
    write_hf_model(&model, &none, &out, &HfOptions::default(), Existing::Replace).unwrap();
    assert!(!out.join("keep").exists() && out.join("model.safetensors").exists());
}

#[test]
fn merged_gguf_reloads_to_base_plus_adapter_logits() {
    use candle_core::quantized::GgmlDType;
    use lowrank::export::write_gguf_model;
    use lowrank::model::GgufFile;
    let src = models_dir().join("llama/gguf/tiny-F32.gguf");
    let mut model = Model::from_path(&src, &LoadOptions::default()).unwrap();
    let hf = tiny_model("llama"); // adapters are loaded against the same module table
    let a = adapter(&hf, "llama", "all_linear");
    let ids = &ids("llama")[1];
    let adapted = logits(&model, ids, &[active(&a, 0.8)]);
    model.merge(&[active(&a, 0.8)]).unwrap();
    let source = GgufFile::open(&src, &candle_core::Device::Cpu, false).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (ty, tol) in [(GgmlDType::F32, 1e-4), (GgmlDType::Q8_0, 0.1)] {
        let out = tmp.path().join(format!("{ty:?}.gguf"));
        write_gguf_model(&model, source.metadata(), &out, ty, true, Existing::Refuse).unwrap();
        let back = GgufFile::open(&out, &candle_core::Device::Cpu, false).unwrap();
        assert_eq!(back.architecture().unwrap(), "llama");
        let types: std::collections::HashMap<String, GgmlDType> =
            back.tensor_infos().into_iter().map(|(n, t, _)| (n, t)).collect();
        assert_eq!(types["blk.0.attn_q.weight"], ty);
        assert_eq!(types["blk.0.attn_norm.weight"], GgmlDType::F32, "norms stay f32");
        let reloaded = Model::from_path(&out, &LoadOptions::default()).unwrap();
        let d = max_diff(&logits(&reloaded, ids, &[]), &adapted);
        assert!(d < tol, "{ty:?}: merged GGUF differs from base + adapter by {d}");
    }
}

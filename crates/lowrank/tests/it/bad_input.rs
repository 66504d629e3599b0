//! Bad input gives a typed error that names what and where, never a panic.

use crate::common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use common::*;
use lowrank::adapter::Adapter;
use lowrank::model::{LoadOptions, Model};
use lowrank::Error;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load(path: &Path) -> Error {
    Model::from_path(path, &LoadOptions::default()).expect_err("loading must fail")
}

#[test]
fn truncated_safetensors_is_a_named_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&models_dir().join("llama/model"), tmp.path());
    let f = tmp.path().join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    let e = load(tmp.path());
    assert!(matches!(e, Error::Safetensors { .. }), "{e:?}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn config_missing_a_field_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&models_dir().join("llama/model"), tmp.path());
    let p = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load(tmp.path());
    let chain = format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
    assert!(chain.contains("hidden_size") && chain.contains("config.json"), "{chain}");
}

#[test]
fn unsupported_model_type_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&models_dir().join("llama/model"), tmp.path());
    let p = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace("\"llama\"", "\"gpt2\"");
    std::fs::write(&p, text).unwrap();
    assert!(load(tmp.path()).to_string().contains("gpt2"));
}

/// A family option lowrank does not implement is refused at load, naming the key and the value,
/// never run with wrong numbers.
#[test]
fn unimplemented_family_options_are_refused_by_key_and_value() {
    let cases: &[(&str, &str, serde_json::Value, &[&str])] = &[
        ("qwen3", "num_experts", serde_json::json!(8), &["num_experts", "8"]),
        ("gemma3", "vision_config", serde_json::json!({"hidden_size": 8}), &["vision_config"]),
        // Gemma 3 with its vision tower is read through its text_config.
        ("gemma3", "model_type", serde_json::json!("gemma3"), &["gemma3", "text_config"]),
        ("gemma2", "use_bidirectional_attention", serde_json::json!(true), &["use_bidirectional_attention"]),
        ("gemma3", "hidden_activation", serde_json::json!("relu"), &["relu"]),
        ("qwen3", "layer_types", serde_json::json!(["full_attention", "chunked_attention"]), &["chunked_attention"]),
        ("gemma2", "rope_parameters", serde_json::json!({"rope_type": "yarn", "factor": 2.0}), &["yarn"]),
        ("gemma2", "query_pre_attn_scalar", serde_json::json!(0), &["query_pre_attn_scalar"]),
    ];
    for (family, key, value, words) in cases {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&models_dir().join(family).join("model"), tmp.path());
        let p = tmp.path().join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg[*key] = value.clone();
        std::fs::write(&p, cfg.to_string()).unwrap();
        let e = load(tmp.path());
        assert!(matches!(e, Error::Config(_)), "{family} {key}: {e:?}");
        let msg = e.to_string();
        assert!(words.iter().all(|w| msg.contains(w)) && msg.contains("config.json"), "{family} {key}: {msg}");
    }
}

/// Rewrites one tensor of a copied adapter.
fn tampered_adapter(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&models_dir().join("llama/adapters/qv"), tmp.path());
    let f = tmp.path().join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &f).unwrap();
    tmp
}

const A0: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";

#[test]
fn adapter_for_a_bigger_model_reports_key_and_shapes() {
    let model = tiny_model("llama");
    let tmp = tampered_adapter(|t| {
        t.insert(A0.into(), Tensor::zeros((4, 128), candle_core::DType::F32, &Device::Cpu).unwrap());
    });
    let e = Adapter::load_peft(tmp.path(), model.modules(), &Device::Cpu).unwrap_err();
    match e {
        Error::ShapeMismatch { name, expected, found } => {
            assert_eq!(name, A0);
            assert_eq!((expected, found), (vec![4, 64], vec![4, 128]));
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
}

#[test]
fn adapter_key_for_a_module_the_model_lacks() {
    let model = tiny_model("llama");
    let tmp = tampered_adapter(|t| {
        let a = t.remove(A0).unwrap();
        t.insert("base_model.model.transformer.h.0.attn.q_proj.lora_A.weight".into(), a);
    });
    let e = Adapter::load_peft(tmp.path(), model.modules(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("transformer.h.0.attn.q_proj") && e.contains("no module"), "{e}");
}

#[test]
fn targeted_module_missing_from_the_file() {
    let model = tiny_model("llama");
    let tmp = tampered_adapter(|t| {
        t.remove(A0);
    });
    let e = Adapter::load_peft(tmp.path(), model.modules(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains(A0) && e.contains("targets"), "{e}");
}

#[test]
fn untargeted_tensor_in_the_file_is_not_skipped() {
    let model = tiny_model("llama");
    let tmp = tampered_adapter(|t| {
        let a = t[A0].clone();
        t.insert("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight".into(), a);
    });
    let e = Adapter::load_peft(tmp.path(), model.modules(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("mlp.up_proj") && e.contains("does not target"), "{e}");
}

#[test]
fn unsupported_adapter_option_is_an_error() {
    let model = tiny_model("llama");
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&models_dir().join("llama/adapters/qv"), tmp.path());
    let p = tmp.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace("\"use_qalora\": false", "\"use_qalora\": true");
    std::fs::write(&p, text).unwrap();
    let e = Adapter::load_peft(tmp.path(), model.modules(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("use_qalora"), "{e}");
}

#[test]
fn gguf_of_an_unsupported_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("gpt2.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    let arch = gguf_file::Value::String("gpt2".into());
    let t = candle_core::quantized::QTensor::quantize(
        &Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("token_embd.weight", &t)]).unwrap();
    drop(f);
    let e = load(&path).to_string();
    assert!(e.contains("gpt2") && e.contains("not supported"), "{e}");
}

#[test]
fn truncated_gguf_is_a_named_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cut.gguf");
    let bytes = std::fs::read(models_dir().join("llama/gguf/tiny-Q8_0.gguf")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = load(&path);
    assert!(matches!(e, Error::Gguf { .. }), "{e:?}");
    assert!(e.to_string().contains("cut.gguf"), "{e}");
}

/// A GGUF v3 header by hand: the metadata `kvs` (key, type id, value bytes) and the tensor infos
/// `tensors` (name, ggml dims innermost first, ggml type, offset), then `pad` zero bytes.
fn gguf_bytes(kvs: &[(&str, u32, Vec<u8>)], tensors: &[(&str, Vec<u64>, u32, u64)], pad: usize) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    for (k, ty, v) in kvs {
        string(&mut b, k);
        b.extend(ty.to_le_bytes());
        b.extend(v);
    }
    for (name, dims, ty, offset) in tensors {
        string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
    }
    b.extend(vec![0u8; pad]);
    b
}

/// Crafted GGUFs that made candle's reader or our un-permutation panic are named errors, for the
/// model and the LoRA GGUF reader alike.
#[test]
fn crafted_gguf_headers_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let arch = ("general.architecture", 8u32, [5u64.to_le_bytes().to_vec(), b"llama".to_vec()].concat());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "alignment0",
            gguf_bytes(&[arch.clone(), ("general.alignment", 4, 0u32.to_le_bytes().to_vec())], &[], 64),
            "alignment",
        ),
        // A later key wins, as in candle's map.
        (
            "alignment_twice",
            gguf_bytes(
                &[
                    ("general.alignment", 4, 32u32.to_le_bytes().to_vec()),
                    arch.clone(),
                    ("general.alignment", 4, 0u32.to_le_bytes().to_vec()),
                ],
                &[],
                64,
            ),
            "alignment",
        ),
        (
            "alignment3",
            gguf_bytes(&[arch.clone(), ("general.alignment", 5, 3i32.to_le_bytes().to_vec())], &[], 64),
            "power of two",
        ),
        // 64 x 2^58 f32 elements: the product wraps to 0 in 64 bits.
        (
            "huge",
            gguf_bytes(std::slice::from_ref(&arch), &[("token_embd.weight", vec![64, 1 << 58], 0, 0)], 4096),
            "token_embd.weight",
        ),
        (
            "empty_dim",
            gguf_bytes(std::slice::from_ref(&arch), &[("token_embd.weight", vec![64, 0], 0, 0)], 4096),
            "token_embd.weight",
        ),
        // Q8_0 rows of 40 do not split into blocks of 32.
        (
            "ragged",
            gguf_bytes(std::slice::from_ref(&arch), &[("token_embd.weight", vec![40, 4], 8, 0)], 4096),
            "token_embd.weight",
        ),
        (
            "past_end",
            gguf_bytes(std::slice::from_ref(&arch), &[("token_embd.weight", vec![64, 64], 0, 0)], 1024),
            "token_embd.weight",
        ),
        (
            "string_past_end",
            gguf_bytes(&[("general.architecture", 8, (1u64 << 40).to_le_bytes().to_vec())], &[], 16),
            "past the end",
        ),
    ];
    for (name, bytes, words) in cases {
        let path = tmp.path().join(format!("{name}.gguf"));
        std::fs::write(&path, bytes).unwrap();
        let e = load(&path);
        assert!(matches!(e, Error::Gguf { .. }), "{name}: {e:?}");
        assert!(e.to_string().contains(words) && e.to_string().contains(&format!("{name}.gguf")), "{name}: {e}");
        let table = tiny_model("llama").modules().clone();
        let heads = lowrank::formats::gguf_names::Heads { query: 4, kv: 2 };
        assert!(Adapter::load_gguf(&path, &table, heads, &Device::Cpu).is_err(), "{name}: the adapter reader took it");
    }

    // A quantized k projection whose 2 rows cannot be 2 halves of each of 2 kv heads.
    let src = models_dir().join("llama/gguf/tiny-Q8_0.gguf");
    let mut f = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        let mut t = content.tensor(&mut f, name, &Device::Cpu).unwrap();
        if name == "blk.0.attn_k.weight" {
            let cols = t.shape().dims()[1];
            let small = Tensor::zeros((2, cols), candle_core::DType::F32, &Device::Cpu).unwrap();
            t = candle_core::quantized::QTensor::quantize(&small, candle_core::quantized::GgmlDType::Q8_0).unwrap();
        }
        tensors.push((name.clone(), t));
    }
    let path = tmp.path().join("k_rows.gguf");
    let mut out = std::fs::File::create(&path).unwrap();
    let meta: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &candle_core::quantized::QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut out, &meta, &refs).unwrap();
    let e = load(&path);
    assert!(e.to_string().contains("attn_k") || e.to_string().contains("un-permute"), "{e}");
}

/// An adapter config whose alpha would make the scale overflow is refused at load, naming it.
#[test]
fn an_absurd_lora_alpha_is_refused_at_load() {
    for alpha in ["1e308", "-1e9"] {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&models_dir().join("llama/adapters/qv"), tmp.path());
        let p = tmp.path().join("adapter_config.json");
        let text = std::fs::read_to_string(&p).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
        cfg["lora_alpha"] = serde_json::from_str(alpha).unwrap();
        std::fs::write(&p, cfg.to_string()).unwrap();
        let model = tiny_model("llama");
        let e = Adapter::load_peft(tmp.path(), model.modules(), &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("lora_alpha") && e.to_string().contains("adapter_config.json"), "{e}");
    }
}

/// A shard index may name only files beside it.
#[test]
fn shard_names_outside_the_directory_are_refused() {
    for shard in ["../model.safetensors", "/etc/passwd", "sub/x.safetensors", ".."] {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&models_dir().join("llama/model"), tmp.path());
        let index = serde_json::json!({"metadata": {}, "weight_map": {"model.norm.weight": shard}});
        std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
        let e = load(tmp.path());
        assert!(e.to_string().contains("is not a file name in this directory"), "{shard}: {e}");
    }
}

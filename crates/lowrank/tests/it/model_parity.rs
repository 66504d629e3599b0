//! Logits of our transformer against transformers/PEFT fixtures (scripts/fixtures/models.py),
//! within 1e-4 in f32.

use crate::common;

use common::*;
use lowrank::model::{LoadOptions, Model};

const TOL: f32 = 1e-4;

fn check(family: &str, case: &str, model: &Model, adapters: &[lowrank::adapter::ActiveAdapter]) {
    for (i, ids) in ids(family).iter().enumerate() {
        let d = max_diff(&logits(model, ids, adapters), &reference(family, case, i));
        assert!(d < TOL, "{family}/{case} seq {i}: max |Δlogit| = {d}");
    }
}

#[test]
fn base_models_match_transformers() {
    for family in ["llama", "llama3", "qwen2", "mistral", "qwen3", "gemma2", "gemma3", "phi3"] {
        check(family, "base", &tiny_model(family), &[]);
    }
}

#[test]
fn peft_adapters_match_peft() {
    let cases: &[(&str, &[&str])] = &[
        ("llama", &["qv", "all_linear", "rslora", "patterns", "layers", "regex", "zero"]),
        ("qwen2", &["qv", "all_linear"]),
        ("mistral", &["qv", "all_linear"]),
        ("qwen3", &["qv", "all_linear"]),
        ("gemma2", &["qv", "all_linear"]),
        ("gemma3", &["qv", "all_linear"]),
        ("phi3", &["fused", "all_linear"]),
    ];
    for (family, names) in cases {
        let model = tiny_model(family);
        for name in *names {
            let a = adapter(&model, family, name);
            check(family, name, &model, &[active(&a, 1.0)]);
        }
    }
}

#[test]
fn weighted_adapters_add_up_like_peft_cat() {
    let model = tiny_model("llama");
    let qv = adapter(&model, "llama", "qv");
    let all = adapter(&model, "llama", "all_linear");
    check("llama", "mix", &model, &[active(&qv, 0.7), active(&all, -0.4)]);
}

#[test]
fn gguf_dequantised_matches_transformers_gguf_loader() {
    for ty in ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"] {
        let path = models_dir().join(format!("llama/gguf/tiny-{ty}.gguf"));
        let model = Model::from_path(&path, &LoadOptions { dequantize: true, ..Default::default() }).unwrap();
        check("llama", &format!("gguf_{ty}"), &model, &[]);
    }
}

#[test]
fn gguf_quantized_weights_match_in_f32_arithmetic() {
    // Kept packed in memory, dequantised tile by tile inside the matmul: same numbers.
    for ty in ["Q8_0", "Q4_0", "Q4_1"] {
        let path = models_dir().join(format!("llama/gguf/tiny-{ty}.gguf"));
        let model = Model::from_path(&path, &LoadOptions::default()).unwrap();
        check("llama", &format!("gguf_{ty}"), &model, &[]);
    }
}

/// The GGUF files llama.cpp's own converter wrote from the tiny models, and the K-quant files
/// llama.cpp's quantizer made (scripts/fixtures/converted.py), against transformers on their
/// dequantised weights.
#[test]
fn converter_written_gguf_matches_transformers() {
    let manifest = json(models_dir().join("converted.json"));
    for (family, entry) in manifest.as_object().unwrap() {
        let want = safetensors(models_dir().join(entry["logits"].as_str().unwrap()));
        let seqs: Vec<Vec<u32>> =
            serde_json::from_value(json(models_dir().join(entry["ids"].as_str().unwrap()))).unwrap();
        for case in entry["cases"].as_array().unwrap() {
            let key = case["key"].as_str().unwrap();
            let path = models_dir().join(case["gguf"].as_str().unwrap());
            // Dequantised at load, and kept packed with tiles dequantised inside the matmul.
            for dequantize in [true, false] {
                let model = Model::from_path(&path, &LoadOptions { dequantize, ..Default::default() }).unwrap();
                assert_eq!(model.config().family.gguf_architecture(), entry["architecture"].as_str().unwrap());
                for (i, ids) in seqs.iter().enumerate() {
                    let d = max_diff(&logits(&model, ids, &[]), &want[&format!("{key}.{i}")]);
                    assert!(d < TOL, "{family} {key} (dequantize {dequantize}) seq {i}: max |Δlogit| = {d}");
                }
            }
        }
    }
}

/// FNV-1a 64 of the values' little-endian f32 bytes (as converted.py hashes gguf-py's).
fn fnv1a64(values: &[f32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in values.iter().flat_map(|v| v.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// K-quant files quantized by llama.cpp itself (Q4_K_M, Q5_K_M, Q6_K: Q4_K, Q5_K and Q6_K
/// tensors) of a Qwen3 and a Llama (q/k rows permuted by the converter, un-permuted on the packed
/// blocks here): every weight lowrank dequantises, at load or from the packed blocks, is bit for
/// bit what llama.cpp's gguf-py gives.
#[test]
fn k_quant_weights_dequantise_exactly_as_llama_cpp() {
    let manifest = json(models_dir().join("converted.json"));
    let mut types = std::collections::BTreeSet::new();
    for fixture in ["qwen3-kquant", "llama-kquant"] {
        for case in manifest[fixture]["cases"].as_array().unwrap() {
            let path = models_dir().join(case["gguf"].as_str().unwrap());
            let want = case["dequantized_fnv1a64"].as_object().unwrap();
            types.extend(case["tensor_types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()));
            for dequantize in [true, false] {
                let model = Model::from_path(&path, &LoadOptions { dequantize, ..Default::default() }).unwrap();
                let weights = model.named_weights().unwrap();
                assert_eq!(weights.len(), want.len(), "{fixture} {}", case["key"]);
                for (hf, t) in weights {
                    let got = fnv1a64(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                    let label = format!("{fixture} {} {hf} (dequantize {dequantize})", case["key"]);
                    assert_eq!(Some(got.as_str()), want.get(&hf).and_then(|h| h.as_str()), "{label}");
                }
            }
        }
    }
    for ty in ["Q4_K", "Q5_K", "Q6_K"] {
        assert!(types.contains(ty), "no {ty} tensor among {types:?}");
    }
}

//! End to end on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF, fetched once into the
//! lowrank cache): greedy output against transformers (scripts/fixtures/models.py), from the GGUF
//! and from an HF directory.

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use common::*;
use lowrank::bundle::ModelBundle;
use lowrank::chat::Message;
use lowrank::export::{gguf_metadata_for_hf, write_gguf_model, write_hf_model, HfOptions, TokenizerFiles};
use lowrank::generate::{generate, FinishReason, GenerateOptions, SamplingParams};
use lowrank::model::{LoadOptions, Model, SeqInput};
use lowrank::staging::Existing;
use serde_json::Value;

const EOS: usize = 2;

fn default_gguf() -> PathBuf {
    match std::env::var_os("LOWRANK_DEFAULT_GGUF") {
        Some(p) => p.into(),
        None => lowrank_home::default_model_gguf().expect("fetching the default model"),
    }
}

fn fixture() -> Value {
    let p = models_dir().join("smollm2/greedy_france.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn chat_prompt(bundle: &ModelBundle) -> Vec<u32> {
    let msgs = [Message { role: "user".into(), content: "What is the capital of France?".into() }];
    let text = bundle.chat_template.as_ref().expect("chat template").render(&msgs, true).unwrap();
    bundle.tokenizer.encode(&text, false).unwrap()
}

/// Greedy decoding for exactly `n` tokens straight from the logits, EOS suppressed as
/// transformers' `min_new_tokens` does.
fn greedy_forced(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = [model.new_cache()];
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let logits = model.forward_last(&[SeqInput { tokens: &input, adapters: &[] }], Some(&mut cache)).unwrap();
        let mut row: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
        row[EOS] = f32::NEG_INFINITY;
        let next = row.iter().enumerate().fold(0, |best, (i, v)| if *v > row[best] { i } else { best }) as u32;
        out.push(next);
        input = vec![next];
    }
    out
}

#[test]
fn quantized_gguf_answers_like_transformers() {
    let want = fixture();
    let bundle = ModelBundle::open(&default_gguf(), &LoadOptions::default()).unwrap();
    let prompt = chat_prompt(&bundle);
    assert_eq!(prompt, ids_of(&want["prompt_ids"]), "chat template + tokenizer");
    let opts = GenerateOptions { max_new_tokens: 24, sampling: SamplingParams::greedy(), stop: vec![] };
    let mut streamed = String::new();
    let g = generate(&bundle.model, &bundle.tokenizer, &[], &prompt, &opts, |t| {
        streamed.push_str(t);
        Ok(())
    })
    .unwrap();
    let mut want_ids = ids_of(&want["gguf"]["generated_ids"]);
    assert_eq!(want_ids.pop(), Some(2), "reference ends with EOS");
    assert_eq!(g.tokens, want_ids);
    assert_eq!(g.finish, FinishReason::Eos);
    assert_eq!(g.text, "The capital of France is Paris.");
    assert_eq!(streamed, g.text);
}

fn check_forced(model: &Model, prompt: &[u32], want: &Value) {
    let logits = model.forward_last(&[SeqInput { tokens: prompt, adapters: &[] }], None).unwrap();
    let first: Vec<f32> = logits.squeeze(0).unwrap().narrow(0, 0, 16).unwrap().to_vec1().unwrap();
    for (i, (a, b)) in first.iter().zip(want["last_prompt_logits_first16"].as_array().unwrap()).enumerate() {
        let b = b.as_f64().unwrap() as f32;
        assert!((a - b).abs() < 1e-3, "logit {i}: {a} vs {b}");
    }
    assert_eq!(greedy_forced(model, prompt, 24), ids_of(&want["generated_ids_min24"]));
}

#[test]
fn gguf_matches_transformers_for_24_forced_tokens() {
    let want = fixture();
    for dequantize in [false, true] {
        let model = Model::from_path(&default_gguf(), &LoadOptions { dequantize, ..Default::default() }).unwrap();
        check_forced(&model, &ids_of(&want["prompt_ids"]), &want["gguf"]);
    }
}

/// The HF form: our own export of the dequantised GGUF (the same weights the reference's HF
/// directory holds) plus the reference tokenizer files, loaded through the HF path.
#[test]
fn hf_directory_matches_transformers_token_for_token() {
    let want = fixture();
    let gguf = Model::from_path(&default_gguf(), &LoadOptions { dequantize: true, ..Default::default() }).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2-hf");
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/smollm2-hf");
    write_hf_model(&gguf, &TokenizerFiles::from_hf_dir(&tok).unwrap(), &dir, &HfOptions::default(), Existing::Refuse)
        .unwrap();
    drop(gguf);
    let bundle = ModelBundle::open(&dir, &LoadOptions::default()).unwrap();
    let prompt = chat_prompt(&bundle);
    assert_eq!(prompt, ids_of(&want["prompt_ids"]), "HF tokenizer + chat template");
    check_forced(&bundle.model, &prompt, &want["hf"]);

    // And from that HF directory to a GGUF file, its tokenizer and template rebuilt as metadata.
    let gguf = tmp.path().join("smollm2.gguf");
    let metadata = gguf_metadata_for_hf(bundle.model.config(), &dir).unwrap();
    write_gguf_model(&bundle.model, &metadata, &gguf, GgmlDType::F32, false, Existing::Refuse).unwrap();
    drop(bundle);
    let bundle = ModelBundle::open(&gguf, &LoadOptions::default()).unwrap();
    assert_eq!(chat_prompt(&bundle), prompt, "GGUF tokenizer + chat template built from the HF files");
    check_forced(&bundle.model, &prompt, &want["hf"]);
}

/// Merging into the real model: all seven projections of every layer, a random rank-8 adapter,
/// merged logits equal base + adapter logits within 1e-4; unmerging gives the base logits back.
#[test]
fn merged_default_model_equals_base_plus_adapter() {
    use lowrank::adapter::{ActiveAdapter, Adapter, AdapterConfig, AdapterLayer, LoraLayer};
    let mut model = Model::from_path(&default_gguf(), &LoadOptions { dequantize: true, ..Default::default() }).unwrap();
    let cfg =
        AdapterConfig::from_json(r#"{"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}"#, Path::new("test"))
            .unwrap();
    let dev = candle_core::Device::Cpu;
    // Seeded uniform noise of standard deviation 0.05: the same adapter on every run.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    let mut noise =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rand::Rng::random_range(&mut rng, -0.0866f32..0.0866)).collect() };
    let layers: Vec<Option<Box<dyn AdapterLayer>>> = model
        .modules()
        .modules()
        .iter()
        .map(|m| {
            let a = candle_core::Tensor::from_vec(noise(8 * m.in_features), (8, m.in_features), &dev).unwrap();
            let b = candle_core::Tensor::from_vec(noise(m.out_features * 8), (m.out_features, 8), &dev).unwrap();
            (m.path != "lm_head")
                .then(|| Box::new(LoraLayer { a, b, scale: 2.0, dropout: None }) as Box<dyn AdapterLayer>)
        })
        .collect();
    let set = [ActiveAdapter { adapter: std::sync::Arc::new(Adapter::new("random".into(), cfg, layers)), weight: 1.0 }];
    let prompt = ids_of(&fixture()["prompt_ids"]);
    let run =
        |m: &Model, a: &[ActiveAdapter]| m.forward_last(&[SeqInput { tokens: &prompt, adapters: a }], None).unwrap();
    let (base, adapted) = (run(&model, &[]), run(&model, &set));
    let moved = (&adapted - &base).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(moved > 0.1, "the adapter should change the logits (moved {moved})");
    model.merge(&set).unwrap();
    let d = (run(&model, &[]) - &adapted).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-4, "merged differs from base + adapter by {d}");
    model.unmerge(&set).unwrap();
    let d = (run(&model, &[]) - &base).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-4, "unmerged differs from the base by {d}");
}

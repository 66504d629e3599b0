//! DoRA against PEFT (`use_dora=True`, scripts/fixtures/dora.py): logits, the gradients of A, B
//! and the magnitude, 5 AdamW steps, merged weights; and what must hold whatever PEFT says — a
//! fresh DoRA adapter is the identity, save/load keeps every tensor, a mixed batch equals its rows
//! run alone, unmerge undoes merge.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use lowrank::adapter::{ActiveAdapter, Adapter, AdapterConfig};
use lowrank::model::{Model, SeqInput};
use lowrank::train::{collect_grads, forward_backward, TrainSeq};

const FAMILIES: [&str; 6] = ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"];

fn dir(family: &str) -> PathBuf {
    training_dir("dora").join(family)
}

fn load(model: &Model, family: &str, which: &str) -> Arc<Adapter> {
    Arc::new(Adapter::load_peft(&dir(family).join(which), model.modules(), &Device::Cpu).unwrap())
}

/// The fixture batch (shared with the LoRA training fixtures): ids and target masks.
fn batch(family: &str) -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let b = TrainBatch::load(family);
    (b.ids, b.targets)
}

fn losses(family: &str) -> serde_json::Value {
    json(dir(family).join("losses.json"))
}

#[test]
fn logits_match_peft() {
    for family in FAMILIES {
        let model = tiny_model(family);
        let dora = load(&model, family, "init");
        assert!(dora.config.use_dora);
        let want = safetensors(dir(family).join("logits.safetensors"));
        let (ids, _) = batch(family);
        for (i, ids) in ids.iter().enumerate() {
            let got = logits(&model, ids, &[active(&dora, 1.0)]);
            let d = max_diff(&got, &want[&i.to_string()]);
            assert!(d < 1e-4, "{family} sequence {i}: logits differ by {d}");
            let base = logits(&model, ids, &[]);
            assert!(max_diff(&got, &base) > 1e-2, "{family}: the DoRA adapter should change the logits");
        }
    }
}

#[test]
fn gradients_of_a_b_and_magnitude_match_peft() {
    for family in FAMILIES {
        let model = tiny_model(family);
        let (adapter, vars) = load(&model, family, "init").to_trainable(model.modules(), None).unwrap();
        let active = [ActiveAdapter { adapter: Arc::new(adapter), weight: 1.0 }];
        let (ids, targets) = batch(family);
        let seqs: Vec<TrainSeq> = ids.iter().zip(&targets).map(|(i, t)| TrainSeq { ids: i, targets: t }).collect();
        let out = forward_backward(&model, &active, &seqs, 4, 1.0, 0).unwrap();
        let want_loss = losses(family)["loss"].as_f64().unwrap();
        assert!((out.loss - want_loss).abs() < 1e-5, "{family}: loss {} vs {want_loss}", out.loss);
        let want = safetensors(dir(family).join("grads.safetensors"));
        assert_eq!(want.len(), vars.len(), "one gradient per A, B and magnitude");
        let got = collect_grads(&out.grads, &vars.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>()).unwrap();
        let mut magnitudes = 0;
        for ((key, _), g) in vars.iter().zip(&got) {
            let d = max_diff(g, &want[key]);
            assert!(d < 1e-5, "{family} {key}: |Δgrad| = {d}");
            magnitudes += key.ends_with("lora_magnitude_vector") as usize;
        }
        // Every projection is adapted: 14 in two blocks, 8 where Phi-3 fuses them.
        assert_eq!(
            magnitudes,
            model.modules().modules().len(),
            "{family}: every adapted module has a trained magnitude"
        );
    }
}

#[test]
fn five_adamw_steps_match_torch() {
    for family in FAMILIES {
        let model = tiny_model(family);
        let (_, named) = five_adamw_steps(&model, &load(&model, family, "init"), family, &losses(family));
        let after = safetensors(dir(family).join("after5/adapter_model.safetensors"));
        for (key, v) in &named {
            let d = max_diff(v.as_tensor(), &after[key]);
            assert!(d < 1e-4, "{family} {key}: after 5 steps Δ = {d}");
        }
    }
}

#[test]
fn merged_weights_match_peft_and_unmerge_restores_the_base() {
    for family in FAMILIES {
        let mut model = tiny_model(family);
        let dora = load(&model, family, "init");
        let (ids, _) = batch(family);
        let unmerged = logits(&model, &ids[1], &[active(&dora, 1.0)]);
        let base_weights: Vec<Tensor> = model
            .blocks()
            .iter()
            .flat_map(|b| b.projections())
            .map(|p| p.base().weight().to_dense().unwrap())
            .collect();
        model.merge(&[active(&dora, 1.0)]).unwrap();
        let want = safetensors(dir(family).join("merged.safetensors"));
        let mut checked = 0;
        for (id, m) in model.modules().modules().iter().enumerate() {
            let Some(w) = want.get(&format!("{}.weight", m.path)) else { continue };
            let got = model.projection(id).unwrap().base().weight().to_dense().unwrap();
            let d = max_diff(&got, w);
            assert!(d < 1e-5, "{family} {}: merged weight differs by {d}", m.path);
            checked += 1;
        }
        assert_eq!(checked, model.modules().modules().len(), "{family}: every projection merged");
        let d = max_diff(&logits(&model, &ids[1], &[]), &unmerged);
        assert!(d < 1e-4, "{family}: merged logits differ from base + DoRA by {d}");
        model.unmerge(&[active(&dora, 1.0)]).unwrap();
        let restored: Vec<Tensor> = model
            .blocks()
            .iter()
            .flat_map(|b| b.projections())
            .map(|p| p.base().weight().to_dense().unwrap())
            .collect();
        for (a, b) in base_weights.iter().zip(&restored) {
            assert!(max_diff(a, b) < 1e-5, "{family}: unmerge left a difference of {}", max_diff(a, b));
        }
        assert!(model.unmerge(&[active(&dora, 1.0)]).is_err(), "unmerging an adapter that is not merged is an error");
    }
}

#[test]
fn fresh_dora_adapter_is_the_identity_and_saves_like_peft() {
    let model = tiny_model("qwen2");
    let cfg = AdapterConfig::from_json(
        r#"{"r":4,"lora_alpha":8,"use_dora":true,"target_modules":"all-linear"}"#,
        "d".as_ref(),
    )
    .unwrap();
    let fresh = Arc::new(Adapter::init("d", cfg, &model, 3).unwrap());
    let (ids, _) = batch("qwen2");
    let d = max_diff(&logits(&model, &ids[0], &[active(&fresh, 1.0)]), &logits(&model, &ids[0], &[]));
    assert!(d < 1e-5, "m = ‖W‖ and B = 0 must leave the model as it was (Δ = {d})");

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d");
    fresh.save_peft(&out, model.modules()).unwrap();
    let saved = safetensors(out.join("adapter_model.safetensors"));
    let peft = safetensors(dir("qwen2").join("init/adapter_model.safetensors"));
    let mut a: Vec<_> = saved.keys().collect();
    let mut b: Vec<_> = peft.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "the same tensor names as PEFT's DoRA adapter");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["use_dora"], true);
    let back = Adapter::load_peft(&out, model.modules(), &Device::Cpu).unwrap();
    for id in 0..model.modules().len() {
        let (x, y) = (fresh.layer(id).unwrap().tensors(), back.layer(id).unwrap().tensors());
        assert_eq!(x.len(), 3);
        for ((n, t), (_, u)) in x.iter().zip(&y) {
            assert_eq!(max_diff(t, u), 0.0, "module {id} {n} changed on the round trip");
        }
    }
}

#[test]
fn mixed_batch_with_dora_rows_equals_each_sequence_alone() {
    let model = tiny_model("qwen2");
    let dora = load(&model, "qwen2", "init");
    let lora = adapter(&model, "qwen2", "all_linear");
    let (ids, _) = batch("qwen2");
    let (d, l) = ([active(&dora, 1.0)], [active(&lora, 0.5)]);
    let rows = [
        SeqInput { tokens: &ids[0], adapters: &d },
        SeqInput { tokens: &ids[1], adapters: &l },
        SeqInput { tokens: &ids[1][..4], adapters: &[] },
        SeqInput { tokens: &ids[0][..5], adapters: &d },
    ];
    let all = model.logits(&model.forward(&rows, None).unwrap()).unwrap();
    let mut start = 0;
    for s in &rows {
        let alone = logits(&model, s.tokens, s.adapters);
        let got = all.narrow(0, start, s.tokens.len()).unwrap();
        assert!(max_diff(&got, &alone) < 1e-4, "rows {start}.. differ by {}", max_diff(&got, &alone));
        start += s.tokens.len();
    }
}

#[test]
fn dora_is_refused_where_it_has_no_meaning() {
    let model = tiny_model("llama");
    let dora = load(&model, "llama", "init");
    let lora = adapter(&model, "llama", "all_linear");
    let e = lowrank::adapter::combine(
        &[(&dora, 1.0), (&lora, 1.0)],
        lowrank::adapter::CombineMethod::Linear,
        model.modules(),
        "c",
    )
    .unwrap_err();
    assert!(e.to_string().contains("DoRA"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let e = dora
        .save_gguf(
            &tmp.path().join("x.gguf"),
            model.modules(),
            model.config().heads(),
            "llama",
            lowrank::staging::Existing::Refuse,
        )
        .unwrap_err();
    assert!(e.to_string().contains("DoRA"), "{e}");
    assert!(!tmp.path().join("x.gguf").exists());
    // DoRA on a layer lowrank does not adapt (embeddings, the LM head) is named as such.
    let cfg = AdapterConfig::from_json(
        r#"{"r":4,"use_dora":true,"target_modules":["embed_tokens","lm_head"]}"#,
        "e".as_ref(),
    )
    .unwrap();
    let e = Adapter::init("e", cfg, &model, 0).unwrap_err().to_string();
    assert!(e.contains("DoRA on embeddings") && e.contains("q_proj"), "{e}");
}

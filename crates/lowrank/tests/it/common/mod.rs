//! Shared helpers for the integration tests: fixture paths, reference logits, comparisons.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use lowrank::adapter::{ActiveAdapter, Adapter};
use lowrank::model::{LoadOptions, Model, SeqInput};

/// `crates/lowrank/tests/fixtures/models`.
pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

/// The token ids of a family's fixture sequences.
pub fn ids(family: &str) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(models_dir().join(family).join("ids.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Reference logits `[T, V]` for `<case>.<i>`.
pub fn reference(family: &str, case: &str, i: usize) -> Tensor {
    let path = models_dir().join(family).join("logits.safetensors");
    let mut all = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    all.remove(&format!("{case}.{i}")).unwrap_or_else(|| panic!("no fixture {case}.{i}"))
}

/// The tiny HF model of a family.
pub fn tiny_model(family: &str) -> Model {
    Model::from_path(&models_dir().join(family).join("model"), &LoadOptions::default()).unwrap()
}

/// An adapter of a family's fixtures.
pub fn adapter(model: &Model, family: &str, name: &str) -> Arc<Adapter> {
    let dir = models_dir().join(family).join("adapters").join(name);
    Arc::new(Adapter::load_peft(&dir, model.modules(), &Device::Cpu).unwrap())
}

/// Full logits `[T, V]` of one sequence run alone.
pub fn logits(model: &Model, ids: &[u32], adapters: &[ActiveAdapter]) -> Tensor {
    let h = model.forward(&[SeqInput { tokens: ids, adapters }], None).unwrap();
    model.logits(&h).unwrap()
}

/// Largest absolute difference.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Weight-1 activation of one adapter.
pub fn active(a: &Arc<Adapter>, weight: f64) -> ActiveAdapter {
    ActiveAdapter { adapter: a.clone(), weight }
}

/// `tests/fixtures/training/<family>` (scripts/fixtures/training.py).
pub fn training_dir(family: &str) -> PathBuf {
    models_dir().join("../training").join(family)
}

/// A JSON fixture file.
pub fn json(path: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The training fixtures' batch of a family: token ids and per-token target masks.
pub struct TrainBatch {
    pub ids: Vec<Vec<u32>>,
    pub targets: Vec<Vec<bool>>,
}

impl TrainBatch {
    pub fn load(family: &str) -> Self {
        let v = json(training_dir(family).join("batch.json"));
        let rows = |k: &str| -> Vec<Vec<u64>> { serde_json::from_value(v[k].clone()).unwrap() };
        Self {
            ids: rows("ids").into_iter().map(|r| r.into_iter().map(|x| x as u32).collect()).collect(),
            targets: rows("target_mask").into_iter().map(|r| r.into_iter().map(|x| x == 1).collect()).collect(),
        }
    }

    pub fn seqs(&self) -> Vec<lowrank::train::TrainSeq<'_>> {
        self.ids.iter().zip(&self.targets).map(|(i, t)| lowrank::train::TrainSeq { ids: i, targets: t }).collect()
    }
}

/// Five AdamW steps (the fixtures' torch settings: lr 1e-2, weight decay 0.01) of `init` on the
/// family's batch, each step's loss checked against `losses["losses"]`; the trained adapter and its
/// variables by PEFT key.
pub fn five_adamw_steps(
    model: &Model,
    init: &Adapter,
    family: &str,
    losses: &serde_json::Value,
) -> (Arc<Adapter>, Vec<(String, candle_core::Var)>) {
    use lowrank::train::{collect_grads, forward_backward, AdamW, AdamWConfig};
    let (adapter, named) = init.to_trainable(model.modules(), None).unwrap();
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let adapter = Arc::new(adapter);
    let active = [active(&adapter, 1.0)];
    let batch = TrainBatch::load(family);
    let seqs = batch.seqs();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig { weight_decay: 0.01, ..Default::default() }).unwrap();
    for step in 0..5 {
        let out = forward_backward(model, &active, &seqs, 4, 1.0, 0).unwrap();
        let w = losses["losses"][step].as_f64().unwrap();
        assert!((out.loss - w).abs() < 1e-4, "{family} step {step}: loss {} vs {w}", out.loss);
        opt.step(&collect_grads(&out.grads, &vars).unwrap(), 1e-2).unwrap();
    }
    (adapter, named)
}

/// Every tensor of a safetensors fixture, by name.
pub fn safetensors(path: PathBuf) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

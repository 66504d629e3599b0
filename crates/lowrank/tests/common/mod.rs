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

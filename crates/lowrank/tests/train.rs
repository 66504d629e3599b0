//! The training loop on a tiny model: resume equals an uninterrupted run bit for bit, the same
//! seed gives the same adapter, a blow-up stops the run and keeps the last good checkpoint.

mod common;

use std::path::Path;

use candle_core::Device;
use common::*;
use lowrank::adapter::{Adapter, AdapterConfig};
use lowrank::data::Example;
use lowrank::model::Model;
use lowrank::train::{AdamWConfig, Observer, RunEnd, Schedule, StepMetrics, TrainConfig, Trainer};

fn examples() -> Vec<Example> {
    // Deterministic pseudo-random sequences of different lengths; the second half of each is scored.
    let mut x = 12345u64;
    (0..10)
        .map(|i| {
            let len = 6 + i % 5;
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (x >> 33) as u32 % 128
                })
                .collect();
            let targets = (0..len).map(|t| t >= len / 2).collect();
            Example { ids, targets }
        })
        .collect()
}

fn config(dropout: f64) -> AdapterConfig {
    AdapterConfig::from_json(&format!(r#"{{"r":4,"lora_alpha":8,"lora_dropout":{dropout},"target_modules":["q_proj","v_proj","down_proj"]}}"#), Path::new("test")).unwrap()
}

fn train_config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 3,
        grad_accum: 2,
        lr: 5e-3,
        schedule: Schedule::Cosine,
        warmup: 2,
        adamw: AdamWConfig { weight_decay: 0.01, ..Default::default() },
        max_grad_norm: Some(1.0),
        seed: 7,
        save_every: Some(2),
        eval_every: Some(3),
        loss_chunk: 5,
    }
}

/// Stops the run after `at` steps (like Ctrl-C).
struct StopAt(usize, usize);
impl Observer for StopAt {
    fn on_step(&mut self, m: &StepMetrics, _total: usize) {
        self.1 = m.step;
    }
    fn should_stop(&mut self) -> bool {
        self.1 >= self.0
    }
}

fn tensors(t: &Trainer) -> Vec<Vec<f32>> {
    let a = t.adapter();
    (0..64).filter_map(|id| a.layer(id)).flat_map(|l| l.tensors().into_iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

fn run(model: &Model, out: &Path, dropout: f64, stop_at: usize) -> (RunEnd, Vec<Vec<f32>>) {
    let init = Adapter::init("a", config(dropout), &model, 7).unwrap();
    let mut t = Trainer::new(model, &init, train_config(6), out).unwrap();
    let data = examples();
    let end = t.run(&data[..8], &data[8..], &mut StopAt(stop_at, 0)).unwrap();
    (end, tensors(&t))
}

#[test]
fn resumed_run_equals_uninterrupted_run_bit_for_bit() {
    let model = tiny_model("llama");
    let tmp = tempfile::tempdir().unwrap();
    let (end, full) = run(&model, &tmp.path().join("full"), 0.1, usize::MAX);
    assert_eq!(end, RunEnd::Finished);

    let part = tmp.path().join("part");
    let (end, _) = run(&model, &part, 0.1, 3);
    assert_eq!(end, RunEnd::Stopped);
    let mut t = Trainer::resume(&model, train_config(6), &part, &part).unwrap();
    assert_eq!(t.step(), 3);
    let data = examples();
    assert_eq!(t.run(&data[..8], &data[8..], &mut StopAt(usize::MAX, 0)).unwrap(), RunEnd::Finished);
    assert_eq!(tensors(&t), full, "resumed adapter differs from the uninterrupted one");

    // Everything but the timing is identical.
    let read = |p: &Path| -> Vec<StepMetrics> {
        let mut m = lowrank::train::metrics::read(&p.join("metrics.jsonl")).unwrap();
        m.iter_mut().for_each(|m| m.tokens_per_s = 0.0);
        m
    };
    assert_eq!(read(&part), read(&tmp.path().join("full")), "metrics.jsonl after resume");
    assert_eq!(read(&part).len(), 6);
}

#[test]
fn same_seed_same_adapter_and_dropout_matters() {
    let model = tiny_model("llama");
    let tmp = tempfile::tempdir().unwrap();
    let (_, a) = run(&model, &tmp.path().join("a"), 0.2, usize::MAX);
    let (_, b) = run(&model, &tmp.path().join("b"), 0.2, usize::MAX);
    let (_, c) = run(&model, &tmp.path().join("c"), 0.0, usize::MAX);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn training_lowers_the_loss() {
    let model = tiny_model("llama");
    let tmp = tempfile::tempdir().unwrap();
    let init = Adapter::init("a", config(0.0), &model, 1).unwrap();
    let mut cfg = train_config(30);
    cfg.lr = 2e-2;
    let mut t = Trainer::new(&model, &init, cfg, tmp.path()).unwrap();
    let data = examples();
    let before = t.eval_loss(&data[..8]).unwrap();
    t.run(&data[..8], &[], &mut StopAt(usize::MAX, 0)).unwrap();
    let after = t.eval_loss(&data[..8]).unwrap();
    assert!(after < 0.7 * before, "loss {before} -> {after}");
}

#[test]
fn non_finite_update_stops_and_keeps_the_last_checkpoint() {
    let model = tiny_model("llama");
    let tmp = tempfile::tempdir().unwrap();
    let init = Adapter::init("a", config(0.0), &model, 1).unwrap();
    let mut cfg = train_config(6);
    cfg.lr = 1e38;
    cfg.warmup = 0;
    cfg.schedule = Schedule::Constant;
    let mut t = Trainer::new(&model, &init, cfg, tmp.path()).unwrap();
    t.save_checkpoint().unwrap();
    let data = examples();
    let e = t.run(&data[..8], &[], &mut StopAt(usize::MAX, 0)).unwrap_err().to_string();
    assert!(e.contains("step 1") || e.contains("step 2"), "{e}");
    assert!(e.contains("last good checkpoint"), "{e}");
    let latest = std::fs::read_to_string(tmp.path().join("checkpoints/latest")).unwrap();
    assert_eq!(latest, "step-000000");
    let ck = lowrank::train::checkpoint::load(tmp.path(), model.modules(), &Device::Cpu).unwrap();
    assert!(ck.adapter.layer(0).unwrap().tensors().iter().all(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite())));
}

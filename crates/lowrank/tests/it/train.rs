//! The training loop on a tiny model: resume equals an uninterrupted run bit for bit, the same
//! seed gives the same adapter, a blow-up stops the run and keeps the last good checkpoint.

use crate::common;

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
    AdapterConfig::from_json(
        &format!(
            r#"{{"r":4,"lora_alpha":8,"lora_dropout":{dropout},"target_modules":["q_proj","v_proj","down_proj"]}}"#
        ),
        Path::new("test"),
    )
    .unwrap()
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
        lora_plus_ratio: None,
        gradient_checkpointing: 0,
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
    (0..64)
        .filter_map(|id| a.layer(id))
        .flat_map(|l| l.tensors().into_iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

fn run(model: &Model, out: &Path, dropout: f64, stop_at: usize) -> (RunEnd, Vec<Vec<f32>>) {
    let init = Adapter::init("a", config(dropout), model, 7).unwrap();
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

/// What a crash mid-write leaves — a torn last line of metrics.jsonl, a staging directory never
/// renamed into place — does not stop `--resume`, which ends where the uninterrupted run does;
/// a `latest` that names anything but a checkpoint beside it is refused.
#[test]
fn a_crash_mid_write_leaves_a_run_that_resumes() {
    let model = tiny_model("llama");
    let tmp = tempfile::tempdir().unwrap();
    let (_, full) = run(&model, &tmp.path().join("full"), 0.1, usize::MAX);
    let part = tmp.path().join("part");
    run(&model, &part, 0.1, 3);
    let mut metrics = std::fs::OpenOptions::new().append(true).open(part.join("metrics.jsonl")).unwrap();
    std::io::Write::write_all(&mut metrics, br#"{"step": 4, "loss": 2.3"#).unwrap();
    let stale = part.join("checkpoints/.step-000004.tmp-12345");
    std::fs::create_dir_all(stale.join("adapter")).unwrap();
    let mut t = Trainer::resume(&model, train_config(6), &part, &part).unwrap();
    assert!(!stale.exists(), "the stale staging directory is still there");
    let data = examples();
    t.run(&data[..8], &data[8..], &mut StopAt(usize::MAX, 0)).unwrap();
    assert_eq!(tensors(&t), full);
    assert_eq!(lowrank::train::metrics::read(&part.join("metrics.jsonl")).unwrap().len(), 6);
    let mut names: Vec<String> = std::fs::read_dir(part.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["latest", "step-000004", "step-000006"], "the newest two (saved every 2 steps)");

    for bad in ["../../etc", "step-000006/../../x", ""] {
        std::fs::write(part.join("checkpoints/latest"), bad).unwrap();
        let e = Trainer::resume(&model, train_config(6), &part, &part).err().expect("a bad latest must fail");
        assert!(e.to_string().contains("latest"), "{bad}: {e}");
    }
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
    t.run(&data[..8], &data[..0], &mut StopAt(usize::MAX, 0)).unwrap();
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
    let e = t.run(&data[..8], &data[..0], &mut StopAt(usize::MAX, 0)).unwrap_err().to_string();
    assert!(e.contains("step 1") || e.contains("step 2"), "{e}");
    assert!(e.contains("last good checkpoint"), "{e}");
    let latest = std::fs::read_to_string(tmp.path().join("checkpoints/latest")).unwrap();
    assert_eq!(latest, "step-000000");
    let ck = lowrank::train::checkpoint::load(tmp.path(), model.modules(), &Device::Cpu).unwrap();
    assert!(ck.adapter.layer(0).unwrap().tensors().iter().all(|(_, t)| t
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite())));
}

/// LoRA+: one AdamW step from the same init moves `A` exactly as plain LoRA does and `B` by
/// `ratio ×` as much (the first Adam step is `lr · m̂ / (√v̂ + ε)`, linear in the rate).
#[test]
fn lora_plus_scales_the_learning_rate_of_b_only() {
    let model = tiny_model("llama");
    let data = examples();
    let init = Adapter::init("a", config(0.0), &model, 1).unwrap();
    let run = |ratio: Option<f64>, dir: &Path| {
        let mut cfg = train_config(1);
        (cfg.warmup, cfg.schedule, cfg.max_grad_norm, cfg.adamw.weight_decay, cfg.lora_plus_ratio) =
            (0, Schedule::Constant, None, 0.0, ratio);
        let mut t = Trainer::new(&model, &init, cfg, dir).unwrap();
        t.run(&data[..6], &data[..0], &mut StopAt(usize::MAX, 0)).unwrap();
        let a = t.adapter();
        (0..model.modules().len())
            .filter_map(|id| a.layer(id))
            .flat_map(|l| l.tensors().into_iter().map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())))
            .collect::<Vec<_>>()
    };
    let tmp = tempfile::tempdir().unwrap();
    let plain = run(None, &tmp.path().join("plain"));
    let plus = run(Some(4.0), &tmp.path().join("plus"));
    let (mut moved_b, mut checked_a) = (0, 0);
    for ((name, p), (_, q)) in plain.iter().zip(&plus) {
        if *name == "lora_A.weight" {
            assert_eq!(p, q, "A learns at the base rate");
            checked_a += 1;
        } else {
            // B started at 0, so its values are the step itself.
            for (x, y) in p.iter().zip(q) {
                assert!((4.0 * x - y).abs() <= 1e-6 + 1e-4 * y.abs(), "B moved {y}, expected 4 × {x}");
            }
            moved_b += p.iter().any(|x| *x != 0.0) as usize;
        }
    }
    assert!(checked_a > 0 && moved_b > 0);
}

/// `init_lora_weights = "gaussian"`: A ~ N(0, 1/r), B = 0 (the model is unchanged at step 0).
#[test]
fn gaussian_init_draws_a_with_std_one_over_r() {
    let model = tiny_model("llama");
    let cfg = AdapterConfig::from_json(
        r#"{"r":4,"lora_alpha":8,"init_lora_weights":"gaussian","target_modules":"all-linear"}"#,
        Path::new("g"),
    )
    .unwrap();
    let a = Adapter::init("g", cfg, &model, 3).unwrap();
    let values: Vec<f32> = (0..model.modules().len())
        .flat_map(|id| a.layer(id).unwrap().tensors()[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    let n = values.len() as f32;
    let mean = values.iter().sum::<f32>() / n;
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt();
    assert!(mean.abs() < 0.01 && (std - 0.25).abs() < 0.01, "mean {mean}, std {std} (want 0, 1/4 over {n} values)");
    let ids = &ids("llama")[0];
    assert_eq!(max_diff(&logits(&model, ids, &[active(&std::sync::Arc::new(a), 1.0)]), &logits(&model, ids, &[])), 0.0);
    let bad = AdapterConfig::from_json(
        r#"{"r":4,"init_lora_weights":"loftq","target_modules":"all-linear"}"#,
        Path::new("p"),
    )
    .unwrap();
    let e = Adapter::init("p", bad, &model, 3).unwrap_err().to_string();
    assert!(e.contains("loftq"), "{e}");
}

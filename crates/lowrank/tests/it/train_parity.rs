//! Gradients and AdamW steps against PEFT + torch (scripts/fixtures/training.py): the loss and
//! every lora_A / lora_B gradient after one backward, the adapter after 5 AdamW steps.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use lowrank::adapter::{ActiveAdapter, Adapter};
use lowrank::train::{collect_grads, forward_backward};

fn dir(family: &str) -> PathBuf {
    training_dir(family)
}

fn losses(family: &str) -> serde_json::Value {
    json(dir(family).join("losses.json"))
}

#[test]
fn loss_and_adapter_gradients_match_peft() {
    for family in ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"] {
        let model = tiny_model(family);
        let init = Adapter::load_peft(&dir(family).join("init"), model.modules(), &Device::Cpu).unwrap();
        let (adapter, vars) = init.to_trainable(model.modules(), None).unwrap();
        let active = [ActiveAdapter { adapter: Arc::new(adapter), weight: 1.0 }];
        let b = TrainBatch::load(family);
        let seqs = b.seqs();
        let out = forward_backward(&model, &active, &seqs, 4, 1.0, 0).unwrap();
        let want = losses(family)["loss"].as_f64().unwrap();
        assert!((out.loss - want).abs() < 1e-5, "{family}: loss {} vs {want}", out.loss);
        assert_eq!(out.targets, 17);

        let want: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir(family).join("grads.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(want.len(), vars.len());
        let got = collect_grads(&out.grads, &vars.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>()).unwrap();
        for ((key, _), g) in vars.iter().zip(&got) {
            let d = max_diff(g, &want[key]);
            assert!(d < 1e-5, "{family} {key}: |Δgrad| = {d}");
        }
    }
}

#[test]
fn five_adamw_steps_match_torch() {
    for family in ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"] {
        let model = tiny_model(family);
        let init = Adapter::load_peft(&dir(family).join("init"), model.modules(), &Device::Cpu).unwrap();
        let want = losses(family);
        let (adapter, _) = five_adamw_steps(&model, &init, family, &want);
        let active = [ActiveAdapter { adapter, weight: 1.0 }];
        let b = TrainBatch::load(family);
        let seqs = b.seqs();
        let after = Adapter::load_peft(&dir(family).join("after5"), model.modules(), &Device::Cpu).unwrap();
        let mut worst = 0f32;
        for id in 0..model.modules().len() {
            let (Some(got), Some(want)) = (active[0].adapter.layer(id), after.layer(id)) else { continue };
            for ((_, g), (_, w)) in got.tensors().iter().zip(want.tensors()) {
                worst = worst.max(max_diff(g, w));
            }
        }
        assert!(worst < 1e-4, "{family}: adapter after 5 steps differs by {worst}");
        let out = forward_backward(&model, &active, &seqs, 4, 1.0, 0).unwrap();
        let w = want["loss_after5"].as_f64().unwrap();
        assert!((out.loss - w).abs() < 1e-4, "{family}: loss after 5 steps {} vs {w}", out.loss);
    }
}

/// Gradient checkpointing changes where activations come from, not the numbers: the loss and
/// every gradient equal PEFT's, and, with dropout on, the non-checkpointed run's (the recomputed
/// blocks draw the same masks).
#[test]
fn checkpointed_gradients_match_peft_and_the_plain_run() {
    for family in ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"] {
        let model = tiny_model(family);
        let init = Adapter::load_peft(&dir(family).join("init"), model.modules(), &Device::Cpu).unwrap();
        let b = TrainBatch::load(family);
        let seqs = b.seqs();
        let want: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir(family).join("grads.safetensors"), &Device::Cpu).unwrap();
        let (adapter, vars) = init.to_trainable(model.modules(), None).unwrap();
        let active = [ActiveAdapter { adapter: Arc::new(adapter), weight: 1.0 }];
        let out = forward_backward(&model, &active, &seqs, 4, 1.0, 1).unwrap();
        let want_loss = losses(family)["loss"].as_f64().unwrap();
        assert!((out.loss - want_loss).abs() < 1e-5, "{family}: loss {} vs {want_loss}", out.loss);
        let got = collect_grads(&out.grads, &vars.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>()).unwrap();
        for ((key, _), g) in vars.iter().zip(&got) {
            let d = max_diff(g, &want[key]);
            assert!(d < 1e-5, "{family} {key}: checkpointed |Δgrad| = {d}");
        }

        let ctl = lowrank::adapter::DropoutControl::new(0.3, 11);
        ctl.set_enabled(true);
        let (adapter, vars) = init.to_trainable(model.modules(), Some(&ctl)).unwrap();
        let vars: Vec<_> = vars.into_iter().map(|(_, v)| v).collect();
        let active = [ActiveAdapter { adapter: Arc::new(adapter), weight: 1.0 }];
        let plain = forward_backward(&model, &active, &seqs, 4, 1.0, 0).unwrap();
        let plain_grads = collect_grads(&plain.grads, &vars).unwrap();
        // Every block, and every second block (the tiny models have two: one of each kind).
        for every in [1, 2] {
            let ckpt = forward_backward(&model, &active, &seqs, 4, 1.0, every).unwrap();
            assert_eq!(plain.loss, ckpt.loss, "{family}: the same dropout masks give the same loss");
            for (p, c) in plain_grads.iter().zip(&collect_grads(&ckpt.grads, &vars).unwrap()) {
                assert!(
                    max_diff(p, c) < 1e-6,
                    "{family}: with dropout, checkpointing every {every} moved a gradient by {}",
                    max_diff(p, c)
                );
            }
        }
    }
}

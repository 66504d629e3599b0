//! The bf16 training mode against the f32 one and against PyTorch's CPU autocast
//! (scripts/fixtures/training_bf16.py): the products with the frozen weights take bf16 operands,
//! so the loss and the LoRA gradients move by bf16 rounding. On the six tiny families the loss
//! moves by at most 5e-4 of itself (autocast: up to 1.1e-3) and each LoRA gradient by at most
//! 3.2% of its norm (autocast: up to 5.3%), every one closer to f32's than autocast's is. Every
//! storage kind's bf16 product stays within bf16 rounding of the f32 one. A checkpoint stored in
//! bf16 stays bf16 in memory and computes exactly as its values widened to f32.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::*;
use lowrank::adapter::{ActiveAdapter, Adapter};
use lowrank::kernels::{bf16_available, with_matmul_precision, Precision};
use lowrank::train::{collect_grads, forward_backward};
use lowrank::weights::FrozenWeight;

/// `‖a − b‖ / ‖b‖`.
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
    norm(&(a - b).unwrap()) / norm(b)
}

/// Where the CPU has no AVX-512-BF16 (or `LOWRANK_BF16=0`), asking for bf16 is an error that
/// says why; nothing runs in bf16 there.
fn bf16_or_refused() -> bool {
    if bf16_available() {
        return true;
    }
    let error = with_matmul_precision(Precision::Bf16, || ()).unwrap_err().to_string();
    assert!(error.contains("AVX-512-BF16"), "{error}");
    false
}

#[test]
fn bf16_step_moves_loss_and_gradients_less_than_autocast() {
    if !bf16_or_refused() {
        return;
    }
    for family in ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"] {
        let model = tiny_model(family);
        let dir = training_dir(family);
        let init = Adapter::load_peft(&dir.join("init"), model.modules(), &Device::Cpu).unwrap();
        let (adapter, vars) = init.to_trainable(model.modules(), None).unwrap();
        let active = [ActiveAdapter { adapter: Arc::new(adapter), weight: 1.0 }];
        let batch = TrainBatch::load(family);
        let seqs = batch.seqs();
        let out = with_matmul_precision(Precision::Bf16, || forward_backward(&model, &active, &seqs, 4, 1.0, 0))
            .unwrap()
            .unwrap();
        let vars: Vec<_> = vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let got = collect_grads(&out.grads, &vars.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>()).unwrap();

        let reference = json(dir.join("bf16/loss.json"));
        let (f32_loss, autocast_loss) = (reference["f32_loss"].as_f64().unwrap(), reference["loss"].as_f64().unwrap());
        let f32_grads: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir.join("grads.safetensors"), &Device::Cpu).unwrap();
        let autocast: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir.join("bf16/grads.safetensors"), &Device::Cpu).unwrap();

        // The loss: within 1e-3 of itself of f32's (autocast moves it by up to 1.1e-3 here), and
        // moved at all (bf16 ran).
        let (ours, theirs) = ((out.loss - f32_loss).abs(), (autocast_loss - f32_loss).abs());
        assert!(ours <= 1e-3 * f32_loss && ours > 0.0, "{family}: loss moved {ours:.2e}, autocast {theirs:.2e}");
        // Each gradient: moved from f32 by at most autocast's largest move, and as close to
        // autocast's as autocast is to f32.
        let autocast_moved = vars.iter().map(|(k, _)| relative(&autocast[k], &f32_grads[k])).fold(0.0, f64::max);
        let (mut worst_f32, mut worst_autocast) = (0f64, 0f64);
        for ((key, _), g) in vars.iter().zip(&got) {
            worst_f32 = worst_f32.max(relative(g, &f32_grads[key]));
            worst_autocast = worst_autocast.max(relative(g, &autocast[key]));
        }
        eprintln!(
            "{family}: loss Δ {ours:.2e} (autocast {theirs:.2e}); gradients from f32 {worst_f32:.2e}, \
             from autocast {worst_autocast:.2e} (autocast from f32 {autocast_moved:.2e})"
        );
        assert!(worst_f32 > 0.0 && worst_f32 <= autocast_moved, "{family}: {worst_f32} vs {autocast_moved}");
        assert!(worst_autocast <= 1.5 * autocast_moved, "{family}: {worst_autocast} vs {autocast_moved}");
    }
}

/// Every storage kind's bf16 products: within bf16 rounding of the f32 ones (each output within
/// 2⁻⁷ of the row's scale), and not equal to them (the bf16 path ran).
#[test]
fn bf16_products_of_every_storage_kind_round_like_bf16() {
    if !bf16_or_refused() {
        return;
    }
    let dev = Device::Cpu;
    let (n, m, k) = (40, 96, 256);
    let w = Tensor::randn(0f32, 0.05, (m, k), &dev).unwrap();
    let x: Vec<f32> = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let dy: Vec<f32> = Tensor::randn(0f32, 1.0, (n, m), &dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut kinds = vec![("f32", FrozenWeight::Dense(w.clone()))];
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        kinds.push(("gguf", FrozenWeight::Quant(Arc::new(QTensor::quantize(&w, dtype).unwrap()))));
    }
    kinds.push(("bf16", FrozenWeight::Dense(w.to_dtype(DType::BF16).unwrap())));
    let nf4 = lowrank::weights::Nf4Tensor::quantize(&w).unwrap();
    kinds.push(("nf4", FrozenWeight::Nf4(Arc::new(nf4))));
    for (kind, weight) in &kinds {
        for (name, a, cols) in [("x Wᵀ", &x, m), ("dy W", &dy, k)] {
            let run = |p| match name {
                "x Wᵀ" => weight.xwt(a, n, p).unwrap(),
                _ => weight.dyw(a, n, p).unwrap(),
            };
            let (exact, rounded) = (run(Precision::F32), run(Precision::Bf16));
            let mut differs = false;
            for (row_e, row_r) in exact.chunks(cols).zip(rounded.chunks(cols)) {
                let scale = row_e.iter().fold(0f32, |s, v| s.max(v.abs()));
                for (e, r) in row_e.iter().zip(row_r) {
                    assert!((e - r).abs() <= scale / 128.0, "{kind} {:?} {name}: {r} vs {e}", weight.ggml_dtype());
                    differs |= e != r;
                }
            }
            assert!(differs, "{kind} {name}: the bf16 product equals the f32 one");
        }
    }
}

/// An HF directory of the tiny Llama with every tensor stored as `dtype`, its values first
/// rounded to bf16 (so the f32 copy holds exactly the bf16 one's values).
fn rounded_copy(dir: &std::path::Path, dtype: DType) {
    let src = models_dir().join("llama/model");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let tensors: HashMap<String, Tensor> = safetensors(src.join("model.safetensors"))
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap().to_dtype(dtype).unwrap()))
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

/// One training step of the tiny Llama's fixture batch from its PEFT fixture adapter, in
/// `precision`: the loss and every LoRA gradient.
fn llama_step(model: &lowrank::model::Model, precision: Precision) -> (f64, Vec<Tensor>) {
    let init = Adapter::load_peft(&training_dir("llama").join("init"), model.modules(), &Device::Cpu).unwrap();
    let (adapter, vars) = init.to_trainable(model.modules(), None).unwrap();
    let active = [ActiveAdapter { adapter: Arc::new(adapter), weight: 1.0 }];
    let batch = TrainBatch::load("llama");
    let out = with_matmul_precision(precision, || forward_backward(model, &active, &batch.seqs(), 4, 1.0, 0))
        .unwrap()
        .unwrap();
    let vars: Vec<_> = vars.into_iter().map(|(_, v)| v).collect();
    (out.loss, collect_grads(&out.grads, &vars).unwrap())
}

/// A bf16 checkpoint's matrices stay bf16 in memory (half the bytes of their f32 widening) and
/// give the same logits and the same training step, to the bit, in f32 precision; in bf16
/// precision too (the products round both to the same bf16 operands).
#[test]
fn a_bf16_checkpoint_stays_bf16_and_computes_as_its_f32_widening() {
    let tmp = tempfile::tempdir().unwrap();
    let (half_dir, wide_dir) = (tmp.path().join("bf16"), tmp.path().join("f32"));
    rounded_copy(&half_dir, DType::BF16);
    rounded_copy(&wide_dir, DType::F32);
    let load = |d: &std::path::Path| lowrank::model::Model::from_path(d, &Default::default()).unwrap();
    let (half, wide) = (load(&half_dir), load(&wide_dir));

    let projections = |m: &lowrank::model::Model| -> Vec<(String, usize)> {
        m.blocks()
            .iter()
            .flat_map(|b| b.projections())
            .map(|p| (p.base().weight().dtype_name(), p.base().weight().size_in_bytes()))
            .collect()
    };
    for ((h_dtype, h_bytes), (w_dtype, w_bytes)) in projections(&half).into_iter().zip(projections(&wide)) {
        assert_eq!((h_dtype.as_str(), w_dtype.as_str()), ("bf16", "f32"));
        assert_eq!(2 * h_bytes, w_bytes);
    }
    assert!(half.weight_bytes() < wide.weight_bytes() * 6 / 10, "{} vs {}", half.weight_bytes(), wide.weight_bytes());

    let ids = &ids("llama")[0];
    let (h, w) = (logits(&half, ids, &[]), logits(&wide, ids, &[]));
    assert_eq!(max_diff(&h, &w), 0.0, "logits differ");
    // Merged, the bf16 base's projections become f32 (a LoRA update is below bf16's step) and
    // equal the widened base's merge.
    let merged = |dir: &std::path::Path| {
        let mut model = load(dir);
        model.merge(&[active(&adapter(&model, "llama", "all_linear"), 1.0)]).unwrap();
        assert!(model.blocks().iter().flat_map(|b| b.projections()).all(|p| p.base().weight().dtype_name() == "f32"));
        logits(&model, ids, &[])
    };
    let (h, w) = (merged(&half_dir), merged(&wide_dir));
    assert_eq!(max_diff(&h, &w), 0.0, "merged logits differ");
    assert!(max_diff(&h, &logits(&half, ids, &[])) > 1e-3, "the merge changed nothing");

    let mut precisions = vec![Precision::F32];
    if bf16_available() {
        precisions.push(Precision::Bf16);
    }
    for precision in precisions {
        let ((h_loss, h_grads), (w_loss, w_grads)) = (llama_step(&half, precision), llama_step(&wide, precision));
        assert_eq!(h_loss, w_loss, "{precision}: loss");
        for (a, b) in h_grads.iter().zip(&w_grads) {
            assert_eq!(max_diff(a, b), 0.0, "{precision}: a gradient differs");
        }
    }
}

/// `LoadOptions::frozen_bf16` (what `lowrank train --dtype bf16` loads with) keeps an f32 base's
/// projections in bf16, at half the bytes, and a bf16 training step is the same to the bit as
/// on the f32 copy: the bf16 products round the f32 weights to those very values.
#[test]
fn frozen_bf16_halves_the_projections_and_keeps_the_bf16_step() {
    if !bf16_available() {
        assert!(bf16_or_refused());
        return;
    }
    let dir = models_dir().join("llama/model");
    let opts = lowrank::model::LoadOptions { frozen_bf16: true, ..Default::default() };
    let (half, wide) = (
        lowrank::model::Model::from_path(&dir, &opts).unwrap(),
        lowrank::model::Model::from_path(&dir, &Default::default()).unwrap(),
    );
    for (h, w) in
        half.blocks().iter().zip(wide.blocks()).flat_map(|(h, w)| h.projections().into_iter().zip(w.projections()))
    {
        let (h, w) = (h.base().weight(), w.base().weight());
        assert_eq!((h.dtype_name().as_str(), w.dtype_name().as_str()), ("bf16", "f32"));
        assert_eq!(2 * h.size_in_bytes(), w.size_in_bytes());
    }
    let ((h_loss, h_grads), (w_loss, w_grads)) =
        (llama_step(&half, Precision::Bf16), llama_step(&wide, Precision::Bf16));
    assert_eq!(h_loss, w_loss, "loss");
    for (a, b) in h_grads.iter().zip(&w_grads) {
        assert_eq!(max_diff(a, b), 0.0, "a gradient differs");
    }
}

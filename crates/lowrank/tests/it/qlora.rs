//! QLoRA: a full-precision base quantised to NF4 at load. The 4-bit model computes exactly what
//! the dense model holding its dequantised weights computes — logits, loss, and the gradients of
//! LoRA and DoRA adapters — while holding about 4.1 bits per projection weight.

use crate::common;

use std::sync::Arc;

use candle_core::Device;
use common::*;
use lowrank::adapter::{ActiveAdapter, Adapter, AdapterConfig};
use lowrank::model::{LoadOptions, Model, Quantize};
use lowrank::train::{collect_grads, forward_backward, TrainSeq};
use lowrank::weights::Nf4Tensor;

fn nf4_model(family: &str) -> Model {
    let opts = LoadOptions { quantize: Some(Quantize::Nf4), ..Default::default() };
    Model::from_path(&models_dir().join(family).join("model"), &opts).unwrap()
}

/// The NF4 model's projections dequantised into a dense model (merging an adapter whose
/// `B = 0` writes `W + 0` as dense f32).
fn dequantised(family: &str) -> Model {
    let mut m = nf4_model(family);
    let cfg =
        AdapterConfig::from_json(r#"{"r":1,"lora_alpha":1,"target_modules":"all-linear"}"#, "zero".as_ref()).unwrap();
    let zero = Arc::new(Adapter::init("zero", cfg, &m, 0).unwrap());
    m.merge(&[active(&zero, 1.0)]).unwrap();
    m
}

fn norm(t: &candle_core::Tensor) -> f32 {
    t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
}

#[test]
fn projections_are_held_in_about_four_bits() {
    let full = tiny_model("llama");
    let q = nf4_model("llama");
    for (p, f) in
        q.blocks().iter().flat_map(|b| b.projections()).zip(full.blocks().iter().flat_map(|b| b.projections()))
    {
        assert_eq!(p.base().weight().dtype_name(), "nf4");
        let (m, k) = p.base().weight().dims().unwrap();
        let bits = 8.0 * p.base().weight().size_in_bytes() as f64 / (m * k) as f64;
        assert!((4.0..4.3).contains(&bits), "{bits} bits per weight");
        assert_eq!(f.base().weight().size_in_bytes(), 4 * m * k);
        // 16 levels per block of 64: about a tenth of a weight's size, relative to the whole matrix.
        let (wq, wf) = (p.base().weight().to_dense().unwrap(), f.base().weight().to_dense().unwrap());
        let rel = norm(&(&wq - &wf).unwrap()) / norm(&wf);
        assert!((0.03..0.15).contains(&rel), "module {}: relative weight error {rel}", p.id());
    }
    assert_eq!(q.embed_weight().dtype_name(), "f32", "embeddings stay full precision");
    assert!(q.weight_bytes() < full.weight_bytes());
    // 4-bit weights move the logits of a random tiny model, but not beyond recognition.
    let ids = &ids("llama")[0];
    let (a, b) = (logits(&q, ids, &[]), logits(&full, ids, &[]));
    let rel = norm(&(&a - &b).unwrap()) / norm(&b);
    assert!(rel > 0.0 && rel < 0.5, "NF4 vs f32 logits: relative difference {rel}");
}

#[test]
fn gradients_through_the_4bit_base_equal_those_through_its_dequantised_weights() {
    for (family, adapter_json) in [
        ("qwen2", r#"{"r":4,"lora_alpha":8,"target_modules":"all-linear"}"#),
        ("llama", r#"{"r":4,"lora_alpha":8,"use_dora":true,"target_modules":"all-linear"}"#),
    ] {
        let q = nf4_model(family);
        let dense = dequantised(family);
        let cfg = AdapterConfig::from_json(adapter_json, "a".as_ref()).unwrap();
        let init = Adapter::init("a", cfg, &q, 5).unwrap();
        // B ≠ 0, so A gets a gradient too.
        let tmp = tempfile::tempdir().unwrap();
        init.save_peft(&tmp.path().join("a"), q.modules()).unwrap();
        let ids = ids(family);
        let targets: Vec<Vec<bool>> = ids.iter().map(|s| vec![true; s.len()]).collect();
        let seqs: Vec<TrainSeq> = ids.iter().zip(&targets).map(|(i, t)| TrainSeq { ids: i, targets: t }).collect();
        let mut results = Vec::new();
        for model in [&q, &dense] {
            let a = Adapter::load_peft(&tmp.path().join("a"), model.modules(), &Device::Cpu).unwrap();
            let (a, vars) = a.to_trainable(model.modules(), None).unwrap();
            let vars: Vec<_> = vars.into_iter().map(|(_, v)| v).collect();
            let active = [ActiveAdapter { adapter: Arc::new(a), weight: 1.0 }];
            let out = forward_backward(model, &active, &seqs, 8, 1.0, 0).unwrap();
            results.push((out.loss, collect_grads(&out.grads, &vars).unwrap()));
        }
        let ((l1, g1), (l2, g2)) = (&results[0], &results[1]);
        assert!((l1 - l2).abs() < 1e-5, "{family}: loss {l1} vs {l2}");
        let mut nonzero = 0;
        for (a, b) in g1.iter().zip(g2) {
            let d = max_diff(a, b);
            assert!(d < 1e-5, "{family}: gradients differ by {d}");
            nonzero += (a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0) as usize;
        }
        assert!(
            nonzero >= g1.len() / 2,
            "{family}: the adapter's gradients reach through the 4-bit base ({nonzero} of {})",
            g1.len()
        );
    }
}

#[test]
fn an_already_quantized_gguf_is_refused() {
    let opts = LoadOptions { quantize: Some(Quantize::Nf4), ..Default::default() };
    let e = Model::from_path(&models_dir().join("llama/gguf/tiny-Q4_1.gguf"), &opts).unwrap_err().to_string();
    assert!(e.contains("already quantized") && e.contains("q4_1"), "{e}");
    // A full-precision GGUF is quantised like an HF directory.
    let m = Model::from_path(&models_dir().join("llama/gguf/tiny-F32.gguf"), &opts).unwrap();
    assert_eq!(m.blocks()[0].projections()[0].base().weight().dtype_name(), "nf4");
}

/// bitsandbytes 0.50.2's own `quantize_4bit(w, quant_type="nf4", blocksize=64,
/// compress_statistics=True)` on CPU, per case of scripts/fixtures/nf4.py (a tiny-model weight,
/// 280 blocks with rows that cross them, element counts that are not a multiple of 64 or are odd,
/// one block, zero / tied / outlier / subnormal blocks, and 32 rows of SmolLM2's q_proj): our
/// quantiser writes the same bytes and the same f32 scales, bit for bit, and dequantises to
/// bnb's values exactly.
#[test]
fn nf4_quantisation_is_bitsandbytes_byte_for_byte() {
    let fx = safetensors(models_dir().join("../nf4/nf4.safetensors"));
    let get = |case: &str, field: &str| &fx[&format!("{case}.{field}")];
    let f32_bits = |t: &candle_core::Tensor| -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    };
    let mut cases: Vec<&str> = fx.keys().filter_map(|k| k.strip_suffix(".weight")).collect();
    cases.sort();
    assert_eq!(cases, ["edge", "multi", "odd", "ragged", "single", "smollm2_q_proj", "tiny"]);
    for case in cases {
        let q = Nf4Tensor::quantize(get(case, "weight")).unwrap();
        assert_eq!(q.packed(), get(case, "packed").to_vec1::<u8>().unwrap(), "{case}: packed levels");
        assert_eq!(
            q.absmax_indices(),
            get(case, "absmax_q").to_vec1::<u8>().unwrap(),
            "{case}: quantised block maxima"
        );
        assert_eq!(
            q.absmax2().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            f32_bits(get(case, "absmax2")),
            "{case}: nested scales"
        );
        assert_eq!(
            vec![q.offset().to_bits()],
            f32_bits(get(case, "offset")),
            "{case}: offset {} vs {}",
            q.offset(),
            get(case, "offset")
        );
        assert_eq!(
            f32_bits(&q.dequantize(&Device::Cpu).unwrap()),
            f32_bits(get(case, "dequantized")),
            "{case}: dequantised"
        );
    }
}

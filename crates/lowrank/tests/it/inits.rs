//! PiSSA and OLoRA against PEFT (scripts/fixtures/inits.py): the initial factors (up to the sign
//! of each rank-one component: PEFT's SVD and QR are LAPACK's), the residual base, the identity at
//! step 0; and the conversion to a plain LoRA against the original base.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use lowrank::adapter::{Adapter, AdapterConfig, AdapterLayer};

fn config(init: &str) -> AdapterConfig {
    let json = format!(
        r#"{{"r":4,"lora_alpha":8,"init_lora_weights":"{init}","target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]}}"#
    );
    AdapterConfig::from_json(&json, init.as_ref()).unwrap()
}

fn factors(l: &dyn AdapterLayer) -> (Tensor, Tensor) {
    let t = l.tensors();
    (t[0].1.clone(), t[1].1.clone())
}

#[test]
fn pissa_and_olora_match_peft_and_leave_the_model_unchanged() {
    for init in ["pissa", "olora"] {
        let mut model = tiny_model("llama");
        let dir = models_dir().join("../training/inits").join(init);
        let want = safetensors(dir.join("adapter_model.safetensors"));
        let residual = safetensors(dir.join("residual.safetensors"));
        let ids = &ids("llama")[0];
        let before = logits(&model, ids, &[]);
        let start = Arc::new(Adapter::init("s", config(init), &model, 0).unwrap());
        assert!(start.takes_from_base());
        for (id, m) in model.modules().modules().iter().enumerate() {
            let (a, b) = factors(start.layer(id).unwrap());
            let key = |s: &str| format!("base_model.model.{}.{s}.weight", m.path);
            let (wa, wb) = (&want[&key("lora_A")], &want[&key("lora_B")]);
            for j in 0..4 {
                let row = |t: &Tensor| t.get(j).unwrap();
                let col = |t: &Tensor| t.narrow(1, j, 1).unwrap();
                let same = max_diff(&row(&a), &row(wa)).max(max_diff(&col(&b), &col(wb)));
                let flipped =
                    max_diff(&row(&a), &row(wa).neg().unwrap()).max(max_diff(&col(&b), &col(wb).neg().unwrap()));
                assert!(same.min(flipped) < 1e-4, "{init} {} component {j}: differs by {}", m.path, same.min(flipped));
            }
        }
        // The base gives up s·B₀A₀: PEFT's residual, and the adapted model is the original one.
        model.unmerge(&[active(&start, 1.0)]).unwrap();
        for (id, m) in model.modules().modules().iter().enumerate() {
            let w = model.projection(id).unwrap().base().weight().to_dense().unwrap();
            let d = max_diff(&w, &residual[&format!("{}.weight", m.path)]);
            assert!(d < 1e-5, "{init} {}: residual differs by {d}", m.path);
        }
        let d = max_diff(&logits(&model, ids, &[active(&start, 1.0)]), &before);
        assert!(d < 1e-4, "{init}: residual base + initial adapter moved the logits by {d}");
    }
}

#[test]
fn a_trained_residual_adapter_converts_to_plain_lora_on_the_original_base() {
    let original = tiny_model("llama");
    let mut residual_model = tiny_model("llama");
    let start = Arc::new(Adapter::init("s", config("pissa"), &original, 0).unwrap());
    residual_model.unmerge(&[active(&start, 1.0)]).unwrap();
    // "Trained": B moved away from B₀ (any change will do).
    let tmp = tempfile::tempdir().unwrap();
    start.save_peft(&tmp.path().join("s"), original.modules()).unwrap();
    let st = tmp.path().join("s/adapter_model.safetensors");
    let moved: HashMap<String, Tensor> = safetensors(st.clone())
        .into_iter()
        .map(|(k, t)| {
            if k.contains("lora_B") {
                let t = (&t * 1.3).unwrap();
                (k, t)
            } else {
                (k, t)
            }
        })
        .collect();
    candle_core::safetensors::save(&moved, &st).unwrap();
    let trained = Arc::new(Adapter::load_peft(&tmp.path().join("s"), original.modules(), &Device::Cpu).unwrap());
    let plain = Arc::new(trained.relative_to_original(&start, original.modules()).unwrap());
    assert_eq!((plain.config.r, plain.config.lora_alpha), (8, 16.0));
    assert!(!plain.takes_from_base());
    let ids = &ids("llama")[1];
    let want = logits(&residual_model, ids, &[active(&trained, 1.0)]);
    let got = logits(&original, ids, &[active(&plain, 1.0)]);
    assert!(
        max_diff(&got, &want) < 1e-4,
        "converted adapter on the original base differs by {}",
        max_diff(&got, &want)
    );
    assert!(max_diff(&got, &logits(&original, ids, &[])) > 1e-3, "the training change shows");
    // It round-trips as a PEFT directory.
    plain.save_peft(&tmp.path().join("plain"), original.modules()).unwrap();
    let back = Arc::new(Adapter::load_peft(&tmp.path().join("plain"), original.modules(), &Device::Cpu).unwrap());
    assert!(max_diff(&logits(&original, ids, &[active(&back, 1.0)]), &got) < 1e-6);
}

#[test]
fn pissa_on_a_quantized_base_is_refused() {
    let gguf =
        lowrank::model::Model::from_path(&models_dir().join("llama/gguf/tiny-Q8_0.gguf"), &Default::default()).unwrap();
    let e = Adapter::init("s", config("pissa"), &gguf, 0).unwrap_err().to_string();
    assert!(e.contains("quantized") && e.contains("q8_0"), "{e}");
    let dora = AdapterConfig::from_json(
        r#"{"r":4,"init_lora_weights":"olora","use_dora":true,"target_modules":["q_proj"]}"#,
        "d".as_ref(),
    )
    .unwrap();
    assert!(Adapter::init("d", dora, &tiny_model("llama"), 0).unwrap_err().to_string().contains("DoRA"));
}

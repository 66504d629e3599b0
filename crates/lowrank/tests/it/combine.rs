//! `combine` against PEFT's `add_weighted_adapter` (scripts/fixtures/combine.py: linear, cat,
//! svd, ties with both sign elections, magnitude pruning), and its
//! invariants: linear of one adapter at weight 1 is that adapter, cat of two is both at once.

use crate::common;

use std::collections::{BTreeSet, HashMap};

use candle_core::{Device, Tensor};
use common::*;
use lowrank::adapter::{combine, Adapter, AdapterLayer, CombineMethod, MajoritySign};

fn delta(layer: &dyn AdapterLayer) -> Tensor {
    layer.delta_weight().unwrap()
}

#[test]
fn combined_adapters_match_peft_add_weighted_adapter() {
    let model = tiny_model("llama");
    let fix = models_dir().join("llama");
    let want = candle_core::safetensors::load(fix.join("combine.safetensors"), &Device::Cpu).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fix.join("combine.json")).unwrap()).unwrap();
    let mut loaded: HashMap<String, std::sync::Arc<Adapter>> = HashMap::new();
    for case in manifest["cases"].as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let inputs: Vec<(std::sync::Arc<Adapter>, f64)> = case["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let n = a["name"].as_str().unwrap();
                (
                    loaded.entry(n.into()).or_insert_with(|| adapter(&model, "llama", n)).clone(),
                    a["weight"].as_f64().unwrap(),
                )
            })
            .collect();
        let refs: Vec<(&Adapter, f64)> = inputs.iter().map(|(a, w)| (a.as_ref(), *w)).collect();
        let density = case["density"].as_f64().unwrap_or(1.0);
        let method = match case["method"].as_str().unwrap() {
            "linear" => CombineMethod::Linear,
            "cat" => CombineMethod::Cat,
            "ties" => {
                let sign = if case["majority_sign_method"] == "frequency" {
                    MajoritySign::Frequency
                } else {
                    MajoritySign::Total
                };
                CombineMethod::Ties { density, sign }
            }
            "magnitude_prune" => CombineMethod::MagnitudePrune { density },
            _ => CombineMethod::Svd(case["svd_rank"].as_u64().map(|r| r as usize)),
        };
        let got = combine(&refs, method, model.modules(), name).unwrap();
        assert_eq!(got.config.r as u64, case["r"].as_u64().unwrap(), "{name}: r");
        assert_eq!(got.config.lora_alpha, case["lora_alpha"].as_f64().unwrap(), "{name}: lora_alpha");
        let table = model.modules().modules();
        let ours: BTreeSet<&str> =
            (0..table.len()).filter(|&i| got.layer(i).is_some()).map(|i| table[i].path.as_str()).collect();
        let theirs: BTreeSet<&str> = case["modules"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
        assert_eq!(ours, theirs, "{name}: adapted modules");
        for (i, m) in table.iter().enumerate() {
            let Some(layer) = got.layer(i) else { continue };
            let key = |t: &str| format!("{name}.{}.{t}", m.path);
            let d = max_diff(&delta(layer), &want[&key("delta")]);
            assert!(d < 1e-5, "{name} {}: ΔW differs from PEFT's by {d}", m.path);
            if !matches!(method, CombineMethod::Svd(_)) {
                // linear, cat, ties and pruning are deterministic factor by factor (SVD only up to signs).
                let lr = layer.low_rank().unwrap();
                assert!(max_diff(lr.a, &want[&key("lora_A")]) < 1e-6, "{name} {}: A", m.path);
                assert!(max_diff(lr.b, &want[&key("lora_B")]) < 1e-6, "{name} {}: B", m.path);
            }
        }
        // Saved, it reads back as the same update.
        let tmp = tempfile::tempdir().unwrap();
        got.save_peft(&tmp.path().join(name), model.modules()).unwrap();
        let back = Adapter::load_peft(&tmp.path().join(name), model.modules(), &Device::Cpu).unwrap();
        for i in 0..table.len() {
            if let (Some(x), Some(y)) = (got.layer(i), back.layer(i)) {
                assert!(max_diff(&delta(x), &delta(y)) < 1e-6, "{name}: saved and reloaded differ");
            }
        }
    }
}

#[test]
fn linear_of_one_is_itself_and_cat_of_two_is_both_at_once() {
    let model = tiny_model("llama");
    let (qv, all) = (adapter(&model, "llama", "qv"), adapter(&model, "llama", "all_linear"));
    let ids = &ids("llama")[1];
    let one = std::sync::Arc::new(combine(&[(&all, 1.0)], CombineMethod::Linear, model.modules(), "one").unwrap());
    let d = max_diff(&logits(&model, ids, &[active(&one, 1.0)]), &logits(&model, ids, &[active(&all, 1.0)]));
    assert!(d < 1e-5, "linear of one adapter differs from it by {d}");
    let both =
        std::sync::Arc::new(combine(&[(&qv, 0.7), (&all, -0.4)], CombineMethod::Cat, model.modules(), "both").unwrap());
    let d = max_diff(
        &logits(&model, ids, &[active(&both, 1.0)]),
        &logits(&model, ids, &[active(&qv, 0.7), active(&all, -0.4)]),
    );
    assert!(d < 1e-4, "cat differs from applying both by {d}");
}

#[test]
fn linear_refuses_different_ranks_and_names_them() {
    let model = tiny_model("llama");
    let (qv, all) = (adapter(&model, "llama", "qv"), adapter(&model, "llama", "all_linear"));
    let e = combine(&[(&qv, 1.0), (&all, 1.0)], CombineMethod::Linear, model.modules(), "x").unwrap_err().to_string();
    assert!(e.contains("qv has r=4") && e.contains("all_linear has r=8") && e.contains("cat or svd"), "{e}");
    let e = combine(&[(&qv, 1.0), (&qv, 1.0)], CombineMethod::MagnitudePrune { density: 1.5 }, model.modules(), "x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("density"), "{e}");
    let e = combine(&[], CombineMethod::Cat, model.modules(), "x").unwrap_err().to_string();
    assert!(e.contains("no adapters"), "{e}");
}

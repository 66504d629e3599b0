//! Invariants that hold whatever the reference says: a fresh adapter is the identity, weights
//! scale and add linearly, a mixed batch equals its rows run alone, the KV cache changes nothing.

use crate::common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use lowrank::adapter::{ActiveAdapter, Adapter, AdapterConfig};
use lowrank::model::{AdapterRun, SeqInput};

fn fresh_config() -> AdapterConfig {
    AdapterConfig::from_json(r#"{"r":8,"lora_alpha":16,"target_modules":"all-linear"}"#, "fresh".as_ref()).unwrap()
}

#[test]
fn fresh_adapter_leaves_logits_unchanged() {
    let model = tiny_model("llama");
    let fresh = Arc::new(Adapter::init("fresh", fresh_config(), &model, 7).unwrap());
    assert_eq!(fresh.num_layers(), model.modules().len());
    let ids = &ids("llama")[1];
    let d = max_diff(&logits(&model, ids, &[active(&fresh, 1.0)]), &logits(&model, ids, &[]));
    assert_eq!(d, 0.0, "B = 0 must leave the model exactly as it was");
}

#[test]
fn adapter_with_weight_zero_equals_base() {
    let model = tiny_model("llama");
    let a = adapter(&model, "llama", "all_linear");
    let ids = &ids("llama")[0];
    let d = max_diff(&logits(&model, ids, &[active(&a, 0.0)]), &logits(&model, ids, &[]));
    assert!(d < 1e-6, "weight 0 changed logits by {d}");
    let d = max_diff(&logits(&model, ids, &[active(&a, 1.0)]), &logits(&model, ids, &[]));
    assert!(d > 1e-2, "the adapter should matter at weight 1 (Δ = {d})");
}

#[test]
fn weighted_adapters_add_linearly_in_every_projection() {
    let model = tiny_model("llama");
    let qv = adapter(&model, "llama", "qv");
    let all = adapter(&model, "llama", "all_linear");
    let (w1, w2) = (0.7, -0.4);
    for block in model.blocks() {
        for p in block.projections() {
            let k = model.modules().modules()[p.id()].in_features;
            let x = Tensor::randn(0f32, 1.0, (5, k), &Device::Cpu).unwrap();
            let run = |adapters: &[ActiveAdapter]| p.forward(&x, &[AdapterRun { rows: 0..5, adapters }]).unwrap();
            let base = run(&[]);
            let both = run(&[active(&qv, w1), active(&all, w2)]);
            let sep =
                ((run(&[active(&qv, w1)]) - &base).unwrap() + (run(&[active(&all, w2)]) - &base).unwrap()).unwrap();
            let d = max_diff(&(both - &base).unwrap(), &sep);
            assert!(d < 1e-5, "module {}: Δ = {d}", p.id());
        }
    }
}

#[test]
fn mixed_batch_rows_equal_each_sequence_alone() {
    // qwen3's second layer attends within a window of 5, which the longer rows cross.
    // phi3: a 12-token row on LongRoPE's long factors beside rows on the short ones.
    for family in ["qwen2", "qwen3", "gemma2", "gemma3", "phi3"] {
        let model = tiny_model(family);
        let qv = adapter(&model, family, if family == "phi3" { "fused" } else { "qv" });
        let all = adapter(&model, family, "all_linear");
        let seqs_ids = ids(family);
        let a1 = [active(&qv, 1.0)];
        let a2 = [active(&all, 0.5)];
        let batch = [
            SeqInput { tokens: &seqs_ids[0], adapters: &a1 },
            SeqInput { tokens: &seqs_ids[1], adapters: &a2 },
            SeqInput { tokens: &seqs_ids[1][..5], adapters: &[] },
            SeqInput { tokens: &seqs_ids[0][..3], adapters: &a1 },
        ];
        let hidden = model.forward(&batch, None).unwrap();
        let all_logits = model.logits(&hidden).unwrap();
        let mut start = 0;
        for s in &batch {
            let alone = logits(&model, s.tokens, s.adapters);
            let rows = all_logits.narrow(0, start, s.tokens.len()).unwrap();
            let d = max_diff(&rows, &alone);
            assert!(d < 1e-4, "{family}: rows {start}.. differ by {d}");
            start += s.tokens.len();
        }
    }
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    // qwen3: a prefix of 6 and then 6 decoded tokens through a window of 5 in its second layer.
    // phi3: within LongRoPE's original context (8), since past it transformers itself switches
    // factors mid-sequence and its cached keys no longer match a full forward.
    for family in ["llama3", "mistral", "qwen3", "gemma2", "gemma3", "phi3"] {
        let model = tiny_model(family);
        let all = ids(family);
        let ids =
            if family == "phi3" { all.iter().min_by_key(|s| s.len()) } else { all.iter().max_by_key(|s| s.len()) };
        let ids = ids.unwrap();
        let a = match family {
            "llama3" => None,
            "phi3" => Some(adapter(&model, family, "fused")),
            _ => Some(adapter(&model, family, "qv")),
        };
        let adapters: Vec<ActiveAdapter> = a.iter().map(|a| active(a, 1.0)).collect();
        let full = logits(&model, ids, &adapters);
        let k = ids.len() / 2;
        let mut cache = [model.new_cache()];
        model.forward(&[SeqInput { tokens: &ids[..k], adapters: &adapters }], Some(&mut cache)).unwrap();
        for (i, &t) in ids.iter().enumerate().skip(k) {
            let step = model.forward_last(&[SeqInput { tokens: &[t], adapters: &adapters }], Some(&mut cache)).unwrap();
            let d = max_diff(&step.squeeze(0).unwrap(), &full.get(i).unwrap());
            assert!(d < 1e-4, "{family} position {i}: Δ = {d}");
        }
        assert_eq!(cache[0].len(), ids.len());
    }
}

#[test]
fn merged_model_equals_base_plus_adapters_and_unmerge_restores_it() {
    for family in ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"] {
        let mut model = tiny_model(family);
        let first = if family == "phi3" { "fused" } else { "qv" };
        let (qv, all) = (adapter(&model, family, first), adapter(&model, family, "all_linear"));
        let set = [active(&qv, 0.7), active(&all, -0.4)];
        let ids = &ids(family)[0];
        let (base, adapted) = (logits(&model, ids, &[]), logits(&model, ids, &set));
        let before: Vec<Tensor> = model
            .blocks()
            .iter()
            .flat_map(|b| b.projections().into_iter().map(|p| p.base().weight().to_dense().unwrap()))
            .collect();
        model.merge(&set).unwrap();
        let d = max_diff(&logits(&model, ids, &[]), &adapted);
        assert!(d < 1e-4, "{family}: merged model differs from base + adapters by {d}");
        model.unmerge(&set).unwrap();
        let d = max_diff(&logits(&model, ids, &[]), &base);
        assert!(d < 1e-4, "{family}: unmerged model differs from the base by {d}");
        // Switching a merged model from one adapter set to another.
        model.merge(&set).unwrap();
        model.switch_merged(&set, &[active(&qv, 1.0)]).unwrap();
        let d = max_diff(&logits(&model, ids, &[]), &logits(&tiny_model(family), ids, &[active(&qv, 1.0)]));
        assert!(d < 1e-4, "{family}: switched merged model differs from base + qv by {d}");
        model.unmerge(&[active(&qv, 1.0)]).unwrap();
        let after = model
            .blocks()
            .iter()
            .flat_map(|b| b.projections().into_iter().map(|p| p.base().weight().to_dense().unwrap()));
        for (w0, w1) in before.iter().zip(after) {
            let d = max_diff(w0, &w1);
            assert!(d < 1e-6, "{family}: merge then unmerge moved a weight by {d}");
        }
    }
}

//! llama.cpp LoRA adapters: exported with llama.cpp's scale and row order (checked against the
//! converter's layout of the tiny GGUF fixture), read back to the same update, refused for DoRA.

use crate::common;

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use common::*;
use lowrank::adapter::{Adapter, LoraLayer};
use lowrank::model::{LoadOptions, Model};
use lowrank::staging::Existing;

/// The converter's q/k permutation, written out independently: rows `[heads, 2, D/2]` → `[heads, D/2, 2]`.
fn converter_permute(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    t.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn read_gguf(path: &std::path::Path) -> (HashMap<String, Value>, HashMap<String, Tensor>) {
    let mut f = std::fs::File::open(path).unwrap();
    let c = Content::read(&mut f).unwrap();
    let names: Vec<String> = c.tensor_infos.keys().cloned().collect();
    let t = names
        .into_iter()
        .map(|n| (n.clone(), c.tensor(&mut f, &n, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap()))
        .collect();
    (c.metadata, t)
}

#[test]
fn exported_adapter_applies_in_llama_cpp_layout_and_reads_back() {
    let model = tiny_model("llama");
    let cfg = model.config().clone();
    let (_, base_gguf) = read_gguf(&models_dir().join("llama/gguf/tiny-F32.gguf"));
    for name in ["qv", "rslora", "patterns", "all_linear"] {
        let a = adapter(&model, "llama", name);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.gguf");
        a.save_gguf(&path, model.modules(), cfg.heads(), "llama", Existing::Refuse).unwrap();
        let (meta, t) = read_gguf(&path);
        assert_eq!(meta["general.type"].to_string().unwrap(), "adapter");
        assert_eq!(meta["adapter.type"].to_string().unwrap(), "lora");
        let alpha = meta["adapter.lora.alpha"].to_f32().unwrap() as f64;
        for (id, m) in model.modules().modules().iter().enumerate() {
            let Some(layer) = a.layer(id) else { continue };
            let (l, proj) = (m.layer.unwrap(), m.name());
            let g = match proj {
                "q_proj" => "attn_q",
                "k_proj" => "attn_k",
                "v_proj" => "attn_v",
                "o_proj" => "attn_output",
                "gate_proj" => "ffn_gate",
                "up_proj" => "ffn_up",
                _ => "ffn_down",
            };
            let key = format!("blk.{l}.{g}.weight");
            // llama.cpp: W' = W + (alpha / r) · B A, with r = lora_b's columns.
            let (la, lb) = (&t[&format!("{key}.lora_a")], &t[&format!("{key}.lora_b")]);
            let r = lb.dim(1).unwrap() as f64;
            let ours = ((&base_gguf[&key] + (lb.matmul(la).unwrap() * (alpha / r)).unwrap()).unwrap()).clone();
            // PEFT: W_hf + ΔW, put in the converter's layout.
            let merged_hf = (model.blocks()[l]
                .projections()
                .into_iter()
                .find(|p| p.id() == id)
                .unwrap()
                .base()
                .weight()
                .to_dense()
                .unwrap()
                + layer.delta_weight().unwrap())
            .unwrap();
            let want = match proj {
                "q_proj" => converter_permute(&merged_hf, cfg.num_heads),
                "k_proj" => converter_permute(&merged_hf, cfg.num_kv_heads),
                _ => merged_hf,
            };
            let d = max_diff(&ours, &want);
            assert!(d < 1e-5, "{name} {key}: llama.cpp's merged weight differs from PEFT's by {d}");
        }
        // Read back: the same update in every module, and PEFT-saveable.
        let back = Adapter::load_gguf(&path, model.modules(), cfg.heads(), &Device::Cpu).unwrap();
        for id in 0..model.modules().len() {
            match (a.layer(id), back.layer(id)) {
                (Some(x), Some(y)) => assert!(
                    max_diff(&x.delta_weight().unwrap(), &y.delta_weight().unwrap()) < 1e-6,
                    "{name}: module {id}"
                ),
                (None, None) => {}
                _ => panic!("{name}: module {id} adapted on one side only"),
            }
        }
        back.save_peft(&tmp.path().join("peft"), model.modules()).unwrap();
        let again = Adapter::load_peft(&tmp.path().join("peft"), model.modules(), &Device::Cpu).unwrap();
        let ids = &ids("llama")[0];
        let d = max_diff(
            &logits(&model, ids, &[active(&std::sync::Arc::new(again), 1.0)]),
            &logits(&model, ids, &[active(&a, 1.0)]),
        );
        assert!(d < 1e-5, "{name}: GGUF → PEFT adapter changes logits by {d}");
    }
}

#[test]
fn qwen2_rows_are_not_permuted() {
    let model = tiny_model("qwen2");
    let a = adapter(&model, "qwen2", "qv");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("q.gguf");
    a.save_gguf(&path, model.modules(), model.config().heads(), "qwen2", Existing::Refuse).unwrap();
    let (_, t) = read_gguf(&path);
    let q0 = model.modules().id("model.layers.0.self_attn.q_proj").unwrap();
    let lr = a.layer(q0).unwrap().low_rank().unwrap();
    let lb = &t["blk.0.attn_q.weight.lora_b"];
    let r = lb.dim(1).unwrap() as f64;
    let alpha = a.config.lora_alpha;
    assert!(max_diff(&(lb * (alpha / r)).unwrap(), &(lr.b * lr.scale).unwrap()) < 1e-6);
}

#[test]
fn dora_and_existing_files_are_refused() {
    let model = Model::from_path(&models_dir().join("llama/model"), &LoadOptions::default()).unwrap();
    let a = adapter(&model, "llama", "qv");
    let mut cfg = a.config.clone();
    cfg.use_dora = true;
    let layers = (0..model.modules().len())
        .map(|id| {
            a.layer(id).map(|l| {
                Box::new(LoraLayer {
                    a: l.low_rank().unwrap().a.clone(),
                    b: l.low_rank().unwrap().b.clone(),
                    scale: 2.0,
                    dropout: None,
                }) as Box<dyn lowrank::adapter::AdapterLayer>
            })
        })
        .collect();
    let dora = Adapter::new("dora".into(), cfg, layers);
    let tmp = tempfile::tempdir().unwrap();
    let e = dora
        .save_gguf(&tmp.path().join("d.gguf"), model.modules(), model.config().heads(), "llama", Existing::Refuse)
        .unwrap_err()
        .to_string();
    assert!(e.contains("DoRA") && e.contains("lowrank merge"), "{e}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    let path = tmp.path().join("a.gguf");
    std::fs::write(&path, b"keep").unwrap();
    assert!(a.save_gguf(&path, model.modules(), model.config().heads(), "llama", Existing::Refuse).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"keep");
}

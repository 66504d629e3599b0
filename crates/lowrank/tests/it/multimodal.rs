//! The text model of Gemma 3 with its vision tower (`Gemma3ForConditionalGeneration`) against
//! transformers and PEFT (scripts/fixtures/multimodal.py): the checkpoint's `language_model.*`
//! weights, PEFT's `model.language_model.*` module paths, and an adapter that PEFT also put in
//! the vision tower.

use std::path::Path;

use candle_core::Device;
use lowrank::adapter::Adapter;
use lowrank::model::ModelConfig;

use crate::common::*;

const TOL: f32 = 1e-4;

fn check(model: &lowrank::model::Model, case: &str, adapter: Option<&std::sync::Arc<Adapter>>) {
    let active: Vec<_> = adapter.iter().map(|a| active(a, 1.0)).collect();
    for (i, ids) in ids("gemma3").iter().enumerate() {
        let d = max_diff(&logits(model, ids, &active), &reference("gemma3mm", case, i));
        assert!(d < TOL, "gemma3mm/{case} seq {i}: max |Δlogit| = {d}");
    }
}

fn peft_keys(dir: &Path) -> Vec<String> {
    let t = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut keys: Vec<String> = t.into_keys().collect();
    keys.sort();
    keys
}

#[test]
fn multimodal_gemma3_runs_its_text_model_as_transformers() {
    let model = tiny_model("gemma3mm");
    assert!(model.config().language_model);
    assert!(model.modules().modules().iter().all(|m| m.path.starts_with("model.language_model.layers.")));
    check(&model, "base", None);

    // PEFT's adapter, whose vision-tower layers text generation does not run.
    let dir = models_dir().join("gemma3mm/adapters/qv");
    assert!(peft_keys(&dir).iter().any(|k| k.contains("vision_tower")));
    let qv = std::sync::Arc::new(Adapter::load_peft(&dir, model.modules(), &Device::Cpu).unwrap());
    assert_eq!(qv.num_layers(), 4);
    check(&model, "qv", Some(&qv));

    // The same adapter as PEFT wrote it under transformers < 4.52 (`language_model.model.*`).
    let tmp = tempfile::tempdir().unwrap();
    let legacy = tmp.path().join("legacy");
    std::fs::create_dir(&legacy).unwrap();
    std::fs::copy(dir.join("adapter_config.json"), legacy.join("adapter_config.json")).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, _> = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")
                .replace("base_model.model.model.vision_tower.", "base_model.model.vision_tower.");
            (k, v)
        })
        .collect();
    candle_core::safetensors::save(&renamed, legacy.join("adapter_model.safetensors")).unwrap();
    let old = std::sync::Arc::new(Adapter::load_peft(&legacy, model.modules(), &Device::Cpu).unwrap());
    check(&model, "qv", Some(&old));

    // Saved for PEFT on the multimodal model: its module paths, and the list of exactly the text
    // modules held (PEFT would otherwise adapt the vision tower's q_proj/v_proj too).
    let saved = tmp.path().join("saved");
    qv.save_peft(&saved, model.modules()).unwrap();
    let keys = peft_keys(&saved);
    assert_eq!(keys.len(), 8);
    assert!(keys.iter().all(|k| k.starts_with("base_model.model.model.language_model.layers.")), "{keys:?}");
    let config = json(saved.join("adapter_config.json"));
    let mut targets: Vec<&str> =
        config["target_modules"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    targets.sort();
    assert_eq!(
        targets,
        [0, 1]
            .iter()
            .flat_map(|l| ["q_proj", "v_proj"].map(|p| format!("model.language_model.layers.{l}.self_attn.{p}")))
            .collect::<Vec<_>>()
    );
    let back = std::sync::Arc::new(Adapter::load_peft(&saved, model.modules(), &Device::Cpu).unwrap());
    check(&model, "qv", Some(&back));
}

/// Published Gemma 3 configs list in `text_config` only what differs from transformers'
/// `Gemma3TextConfig` (gemma-3-4b-it's, verbatim): the rest is its defaults.
#[test]
fn a_minimal_text_config_takes_gemma3_text_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.json");
    std::fs::write(
        &path,
        r#"{"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
            "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02,
            "mm_tokens_per_image": 256, "model_type": "gemma3",
            "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                            "sliding_window": 1024},
            "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
            "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                              "model_type": "siglip_vision_model", "num_attention_heads": 16,
                              "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": false}}"#,
    )
    .unwrap();
    let cfg = ModelConfig::from_hf_file(&path).unwrap();
    assert!(cfg.language_model);
    assert_eq!(
        (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
        (262_208, 2560, 34, 8, 4, 256)
    );
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.sliding_window, Some(1024));
    assert_eq!(cfg.sliding_layers.iter().filter(|s| !**s).count(), 5, "every sixth layer global");
    assert_eq!(cfg.rope_scaling, lowrank::ops::RopeScaling::Linear { factor: 8.0 });
    assert_eq!(cfg.sliding_rope, Some((10_000.0, lowrank::ops::RopeScaling::None)));
    assert_eq!(cfg.attn_scale, 256f64.powf(-0.5));
}

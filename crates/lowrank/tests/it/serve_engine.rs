//! The serving engine on the default model: requests for different adapters, batched together,
//! each answer token for token what generation with that adapter alone gives; a full queue is
//! refused; a client that goes away is dropped. And on a tiny model, the three decoding paths
//! (`generate`, `greedy_batch`, the engine) stop at the same place at the context limit.

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use lowrank::adapter::{ActiveAdapter, Adapter, AdapterConfig, AdapterLayer, LoraLayer};
use lowrank::bundle::ModelBundle;
use lowrank::chat::Message;
use lowrank::generate::{generate, greedy_batch, FinishReason, GenerateOptions, SamplingParams};
use lowrank::model::{LoadOptions, Model, ModelFormat, ModuleTable};
use lowrank::serve::{Engine, EngineConfig, Event, Job, Metrics, SubmitError};
use lowrank::tokenizer::Tokenizer;

fn bundle() -> ModelBundle {
    let path = match std::env::var_os("LOWRANK_DEFAULT_GGUF") {
        Some(p) => p.into(),
        None => lowrank_home::default_model_gguf().expect("default model"),
    };
    ModelBundle::open(&path, &LoadOptions::default()).unwrap()
}

/// A random q/v adapter, strong enough to change greedy answers.
fn random_adapter(table: &ModuleTable, seed: u64) -> Arc<Adapter> {
    let cfg = AdapterConfig::from_json(
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}"#,
        Path::new("t"),
    )
    .unwrap();
    let dev = Device::Cpu;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut noise = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
            })
            .collect()
    };
    let layers = table
        .modules()
        .iter()
        .map(|m| {
            (m.name() == "q_proj" || m.name() == "v_proj").then(|| {
                let a = Tensor::from_vec(noise(4 * m.in_features), (4, m.in_features), &dev).unwrap();
                let b = Tensor::from_vec(noise(4 * m.out_features), (m.out_features, 4), &dev).unwrap();
                Box::new(LoraLayer { a, b, scale: 2.0, dropout: None }) as Box<dyn AdapterLayer>
            })
        })
        .collect();
    Arc::new(Adapter::new(format!("random{seed}"), cfg, layers))
}

fn prompt(b: &ModelBundle, q: &str) -> Vec<u32> {
    let text = b.chat_template.as_ref().unwrap().render(&[Message::new("user", q)], true).unwrap();
    b.tokenizer.encode(&text, false).unwrap()
}

fn job(prompt: Vec<u32>, adapters: Vec<ActiveAdapter>, max: usize, tx: mpsc::Sender<Event>) -> Job {
    let options = GenerateOptions { max_new_tokens: max, sampling: SamplingParams::greedy(), stop: vec![] };
    Job { prompt, adapters, options, label: "test".into(), sink: Box::new(move |e| tx.send(e).is_ok()) }
}

fn collect(rx: mpsc::Receiver<Event>) -> (String, FinishReason, usize) {
    let mut text = String::new();
    for e in rx {
        match e {
            Event::Text(t) => text.push_str(&t),
            Event::Done { finish, completion_tokens, .. } => return (text, finish, completion_tokens),
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
    panic!("no Done event");
}

#[test]
fn mixed_adapter_batch_equals_each_adapter_alone() {
    let b = bundle();
    let adapters = [
        None,
        Some(random_adapter(b.model.modules(), 1)),
        Some(random_adapter(b.model.modules(), 2)),
        Some(random_adapter(b.model.modules(), 3)),
    ];
    let questions = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello."];
    let opts = GenerateOptions { max_new_tokens: 12, sampling: SamplingParams::greedy(), stop: vec![] };
    let mut alone = Vec::new();
    let mut prompts = Vec::new();
    for (a, q) in adapters.iter().zip(questions) {
        let p = prompt(&b, q);
        let set: Vec<ActiveAdapter> = a.iter().map(|a| ActiveAdapter { adapter: a.clone(), weight: 1.0 }).collect();
        alone.push(generate(&b.model, &b.tokenizer, &set, &p, &opts, |_| Ok(())).unwrap().text);
        prompts.push((p, set));
    }
    assert!(alone[1..].iter().any(|t| t != &alone[0]), "the adapters should change some answers: {alone:?}");

    let (engine, thread) = Engine::start(b, EngineConfig::default(), Arc::new(Metrics::default())).unwrap();
    let receivers: Vec<_> = prompts
        .into_iter()
        .map(|(p, set)| {
            let (tx, rx) = mpsc::channel();
            engine.submit(job(p, set, 12, tx)).unwrap();
            rx
        })
        .collect();
    for (rx, want) in receivers.into_iter().zip(&alone) {
        let (text, _, _) = collect(rx);
        assert_eq!(&text, want);
    }
    // A client that goes away is dropped; the engine keeps serving.
    let (tx, rx) = mpsc::channel();
    drop(rx);
    engine.submit(job(vec![1, 2, 3], vec![], 50, tx)).unwrap();
    let (tx, rx) = mpsc::channel();
    engine.submit(job(vec![1, 2, 3], vec![], 3, tx)).unwrap();
    let (_, finish, n) = collect(rx);
    assert_eq!((finish, n), (FinishReason::Length, 3));
    engine.drain();
    assert!(matches!(engine.submit(job(vec![1], vec![], 1, mpsc::channel().0)), Err(SubmitError::Closed)));
    drop(engine);
    thread.join().unwrap();
}

#[test]
fn a_full_queue_refuses_and_a_bad_prompt_is_an_error_event() {
    let b = bundle();
    let ctx = b.model.config().max_position_embeddings;
    let (engine, _thread) = Engine::start(
        b,
        EngineConfig { max_batch: 1, max_queue: 1, kv_budget_tokens: 1 << 20 },
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    engine.submit(job(vec![1; ctx + 5], vec![], 4, tx)).unwrap();
    match rx.recv().unwrap() {
        Event::Error(e) => assert!(e.contains("context"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    // Flood: with one running and one waiting at most, some submissions must be refused.
    let mut refused = 0;
    let mut keep = Vec::new();
    for _ in 0..20 {
        let (tx, rx) = mpsc::channel();
        match engine.submit(job(vec![1, 2, 3], vec![], 64, tx)) {
            Ok(()) => keep.push(rx),
            Err(SubmitError::QueueFull(_)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0, "a queue of one should refuse some of 20 quick submissions");
}

/// A prompt with a token id past the embedding fails at admission, alone: the request batched
/// with it gets its full answer, the same as when it runs alone.
#[test]
fn a_bad_token_id_fails_its_own_request_only() {
    let b = bundle();
    let vocab = b.model.config().vocab_size as u32;
    let good = prompt(&b, "What is the capital of France?");
    let (engine, _thread) = Engine::start(b, EngineConfig::default(), Arc::new(Metrics::default())).unwrap();
    let run = |p: Vec<u32>| {
        let (tx, rx) = mpsc::channel();
        engine.submit(job(p, vec![], 8, tx)).unwrap();
        rx
    };
    let alone = collect(run(good.clone()));
    let mut bad = good.clone();
    bad[2] = vocab;
    let (bad_rx, good_rx) = (run(bad), run(good));
    match bad_rx.recv().unwrap() {
        Event::Error(e) => assert!(e.contains(&format!("token id {vocab}")) && e.contains("position 2"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(collect(good_rx), alone);
}

/// The three decoding paths share one per-sequence state, so they agree at the context limit: a
/// prompt three tokens short of the tiny Llama's context (256) gets exactly three new tokens from
/// each, the same ones, ending for length; a prompt one short gets one; a prompt as long as the
/// context is refused by each.
#[test]
fn decoding_paths_agree_at_the_context_limit() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let open = || ModelBundle {
        model: Model::from_path(&dir.join("models/llama/model"), &LoadOptions::default()).unwrap(),
        tokenizer: Tokenizer::from_hf_dir(&dir.join("tokenizer/tiny-spm-hf")).unwrap(),
        chat_template: None,
        path: dir.clone(),
        format: ModelFormat::HfDir,
        load_secs: 0.0,
    };
    let b = open();
    let ctx = b.model.config().max_position_embeddings;
    assert_eq!(ctx, 256);
    let eos = b.tokenizer.eos_token_ids().to_vec();
    // Token ids the tiny model continues without an eos at the end of the context.
    let prompt = |len: usize| -> Vec<u32> { (0..len as u32).map(|i| 3 + (i * 7) % 120).collect() };
    let opts = GenerateOptions { max_new_tokens: 10, sampling: SamplingParams::greedy(), stop: vec![] };
    let (engine, thread) = Engine::start(open(), EngineConfig::default(), Arc::new(Metrics::default())).unwrap();
    for room in [3, 1] {
        let p = prompt(ctx - room);
        let alone = generate(&b.model, &b.tokenizer, &[], &p, &opts, |_| Ok(())).unwrap();
        assert_eq!((alone.finish, alone.tokens.len()), (FinishReason::Length, room), "generate, room {room}");
        assert!(alone.tokens.iter().all(|t| !eos.contains(t)));
        let batch = greedy_batch(&b.model, &b.tokenizer, &[], &[p.clone(), prompt(5)], 10).unwrap();
        assert_eq!(batch[0], alone.tokens, "greedy_batch, room {room}");
        let (tx, rx) = mpsc::channel();
        engine.submit(job(p, vec![], 10, tx)).unwrap();
        let (text, finish, n) = collect(rx);
        assert_eq!((text, finish, n), (alone.text, FinishReason::Length, room), "engine, room {room}");
    }
    let full = prompt(ctx);
    let error = generate(&b.model, &b.tokenizer, &[], &full, &opts, |_| Ok(())).unwrap_err();
    assert!(matches!(error, lowrank::Error::PromptTooLong { tokens: 256, context: 256 }), "{error}");
    assert!(greedy_batch(&b.model, &b.tokenizer, &[], std::slice::from_ref(&full), 10).is_err());
    let (tx, rx) = mpsc::channel();
    engine.submit(job(full, vec![], 10, tx)).unwrap();
    assert!(matches!(rx.recv().unwrap(), Event::Error(e) if e.contains("context is 256")));
    drop(engine);
    thread.join().unwrap();
}

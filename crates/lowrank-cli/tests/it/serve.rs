//! `lowrank serve` on the default model, driven over real HTTP on loopback: OpenAI's endpoints,
//! streaming, adapters chosen by `model` and batched together, errors in OpenAI's shape,
//! vanishing clients, run-time adapter loading, graceful shutdown — and the official `openai`
//! Python package as a client.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

/// A running server, killed when dropped.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn start(extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(["serve", "--port", "0", "--max-batch", "8"])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting lowrank serve");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("lowrank serve exited before listening");
        }
        if let Some(rest) = line.split("on http://").nth(1) {
            break rest.trim().trim_end_matches("/v1").to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in err.lines() {});
    // Listening comes first; the model may still be loading (503 until then).
    let mut saw_loading = false;
    for _ in 0..600 {
        match http(&addr, "GET", "/health", "") {
            (200, _) => return Server { child, addr },
            (503, body) => {
                assert!(body.contains("loading"), "{body}");
                saw_loading = true;
            }
            other => panic!("unexpected /health answer {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("not ready after 30 s (saw loading: {saw_loading})");
}

/// One HTTP/1.1 request; returns the status and the (de-chunked) body.
pub(crate) fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = raw.split_once("\r\n\r\n").expect("a full response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

pub(crate) fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = http(addr, "POST", path, &body.to_string());
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A PEFT adapter on q_proj and v_proj with seeded noise: it changes the model's answers.
fn write_adapter(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj","v_proj"],"bias":"none"}"#;
    std::fs::write(dir.join("adapter_config.json"), cfg).unwrap();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut noise = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
            })
            .collect()
    };
    let mut t = HashMap::new();
    for l in 0..30 {
        for (m, out) in [("q_proj", 576), ("v_proj", 192)] {
            let p = format!("base_model.model.model.layers.{l}.self_attn.{m}");
            t.insert(format!("{p}.lora_A.weight"), Tensor::from_vec(noise(4 * 576), (4, 576), &Device::Cpu).unwrap());
            t.insert(format!("{p}.lora_B.weight"), Tensor::from_vec(noise(out * 4), (out, 4), &Device::Cpu).unwrap());
        }
    }
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
}

/// `lowrank generate --chat Q` with `adapter` alone, greedy.
fn generate_alone(adapter: Option<&Path>, question: &str, n: usize) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lowrank"));
    cmd.args(["generate", "--chat", question, "--max-new-tokens", &n.to_string()]);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().strip_suffix('\n').unwrap().to_string()
}

pub(crate) fn adapters_dir(n: u64) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapters");
    for i in 1..=n {
        write_adapter(&dir.join(format!("a{i}")), i);
    }
    (tmp, dir)
}

fn chat(model: &str, q: &str, max: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max, "temperature": 0})
}

const BASE: &str = "SmolLM2-135M-Instruct.Q4_1";

#[test]
fn concurrent_requests_for_different_adapters_each_match_generate_alone() {
    let (_tmp, dir) = adapters_dir(3);
    let pinned = format!("pinned={}", dir.join("a1").display());
    let server = start(&["--adapters-dir", dir.to_str().unwrap(), "--adapter", &pinned]);
    let (status, models) = http(&server.addr, "GET", "/v1/models", "");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [BASE, "pinned"]);
    assert_eq!(models["data"][1]["parent"], BASE);

    let cases = [
        (BASE, None, "What is the capital of France?"),
        ("a1", Some("a1"), "Name a colour."),
        ("a2", Some("a2"), "What is 2 + 2?"),
        ("a3", Some("a3"), "Say hello."),
    ];
    let threads: Vec<_> = cases
        .iter()
        .map(|&(model, _, q)| {
            let addr = server.addr.clone();
            std::thread::spawn(move || post(&addr, "/v1/chat/completions", &chat(model, q, 12)))
        })
        .collect();
    let answers: Vec<(u16, Value)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut texts = Vec::new();
    for ((model, adapter, q), (status, body)) in cases.iter().zip(&answers) {
        assert_eq!(*status, 200, "{body}");
        let got = body["choices"][0]["message"]["content"].as_str().unwrap();
        let want = generate_alone(adapter.map(|a| dir.join(a)).as_deref(), q, 12);
        assert_eq!(got, want, "{model}");
        assert_eq!(body["model"], *model);
        assert_eq!(
            body["usage"]["completion_tokens"].as_u64().unwrap() + body["usage"]["prompt_tokens"].as_u64().unwrap(),
            body["usage"]["total_tokens"].as_u64().unwrap()
        );
        texts.push(got.to_string());
    }
    assert!(texts[1..].iter().any(|t| t != &texts[0]), "the adapters should change answers: {texts:?}");
    // Loaded on first use from --adapters-dir, now listed with their parent.
    let (_, models) = http(&server.addr, "GET", "/v1/models", "");
    assert!(models.contains("\"a2\"") && models.contains("\"a3\""), "{models}");
    let (_, metrics) = http(&server.addr, "GET", "/metrics", "");
    assert!(
        metrics.contains("lowrank_requests_total{model=\"a2\",outcome=\"stop\"} 1")
            || metrics.contains("lowrank_requests_total{model=\"a2\",outcome=\"length\"} 1"),
        "{metrics}"
    );
}

#[test]
fn streaming_gives_the_same_text_in_chunks_then_done() {
    let server = start(&[]);
    let body = json!({"model": BASE, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let (status, text) = http(&server.addr, "POST", "/v1/completions", &body.to_string());
    assert_eq!(status, 200);
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let streamed: String = chunks.iter().filter_map(|c| c["choices"].get(0)?["text"].as_str()).collect();
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 8);
    let (_, whole) = post(
        &server.addr,
        "/v1/completions",
        &json!({"model": BASE, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(streamed, whole["choices"][0]["text"].as_str().unwrap());
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    // n = 3 sampled choices: three completions, seeds seed, seed + 1, seed + 2; usage sums them.
    let (s3, three) = post(
        &server.addr,
        "/v1/completions",
        &json!({"model": BASE, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 3}),
    );
    assert_eq!(s3, 200, "{three}");
    let texts: Vec<&str> = three["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!((texts.len(), three["choices"][2]["index"].as_u64()), (3, Some(2)));
    assert_eq!(three["usage"]["completion_tokens"], 18);
    let (_, seed6) = post(
        &server.addr,
        "/v1/completions",
        &json!({"model": BASE, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 6}),
    );
    assert_eq!(seed6["choices"][0]["text"].as_str(), Some(texts[1]), "choice 1 is seed + 1");
    // Chat: a role delta first, then content deltas, then the finish reason.
    let mut req = chat(BASE, "What is the capital of France?", 24);
    req["stream"] = json!(true);
    let (_, text) = http(&server.addr, "POST", "/v1/chat/completions", &req.to_string());
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "The capital of France is Paris.");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let (tmp, dir) = adapters_dir(1);
    write_adapter(&tmp.path().join("outside"), 9);
    let server = start(&["--adapters-dir", dir.to_str().unwrap(), "--allow-runtime-adapters"]);
    let a = &server.addr;
    let check = |status: u16, body: &str, want: u16, needle: &str| {
        assert_eq!(status, want, "{body}");
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("not an OpenAI error: {body}"));
        assert!(v["error"]["type"].is_string() && msg.contains(needle), "{body}");
    };
    let (s, b) = http(a, "POST", "/v1/chat/completions", "{not json");
    check(s, &b, 400, "invalid request body");
    let (s, b) = http(a, "POST", "/v1/completions", r#"{"model": "x", "prompt": "hi", "max_tokens": "many"}"#);
    check(s, &b, 400, "invalid request body");
    let (s, b) = http(
        a,
        "POST",
        "/v1/completions",
        &json!({"model": BASE, "prompt": "hi", "max_tokens": 1_000_000}).to_string(),
    );
    check(s, &b, 400, "maximum context length");
    let long = "word ".repeat(9000);
    let (s, b) =
        http(a, "POST", "/v1/completions", &json!({"model": BASE, "prompt": long, "max_tokens": 4}).to_string());
    check(s, &b, 400, "maximum context length");
    let (s, b) =
        http(a, "POST", "/v1/completions", &json!({"model": BASE, "prompt": "hi", "temperature": 7}).to_string());
    check(s, &b, 400, "temperature");
    let (s, b) = http(a, "POST", "/v1/chat/completions", &chat("no-such-adapter", "hi", 4).to_string());
    check(s, &b, 404, "does not exist");
    let (s, b) = http(a, "POST", "/v1/chat/completions", &chat("../outside", "hi", 4).to_string());
    check(s, &b, 404, "does not exist");
    let outside = tmp.path().join("outside");
    let (s, b) = http(a, "POST", "/v1/load_lora_adapter", &json!({"lora_name": "x", "lora_path": outside}).to_string());
    check(s, &b, 400, "not a directory directly inside");
    let (s, b) = http(a, "POST", "/v1/unload_lora_adapter", &json!({"lora_name": "never-loaded"}).to_string());
    check(s, &b, 404, "does not exist");

    // A client that vanishes mid-stream is dropped; others are served.
    let mut gone = TcpStream::connect(a).unwrap();
    let body = json!({"model": BASE, "prompt": "Once upon a time", "max_tokens": 200, "stream": true}).to_string();
    write!(gone, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut first = [0u8; 64];
    let _ = gone.read(&mut first).unwrap();
    drop(gone);

    // A slow client (reads nothing for a while) still gets its whole stream.
    let mut slow = TcpStream::connect(a).unwrap();
    let body = json!({"model": BASE, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stream": true})
        .to_string();
    write!(
        slow,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut raw = String::new();
    slow.read_to_string(&mut raw).unwrap();
    assert!(raw.contains("\"finish_reason\":\"length\"") && raw.contains("data: [DONE]"), "{raw}");

    // Run-time loading from inside the adapters dir, then unloading.
    let inside = dir.join("a1");
    let (s, b) =
        http(a, "POST", "/v1/load_lora_adapter", &json!({"lora_name": "late", "lora_path": inside}).to_string());
    assert_eq!(s, 200, "{b}");
    let (s, b) = post(a, "/v1/chat/completions", &chat("late", "What is 2 + 2?", 6));
    assert_eq!(s, 200, "{b}");
    let (s, _) = http(a, "POST", "/v1/unload_lora_adapter", &json!({"lora_name": "late"}).to_string());
    assert_eq!(s, 200);
    let (_, models) = http(a, "GET", "/v1/models", "");
    assert!(!models.contains("\"late\""), "{models}");
    let (s, b) = post(a, "/v1/chat/completions", &chat(BASE, "What is the capital of France?", 24));
    assert_eq!((s, b["choices"][0]["message"]["content"].as_str()), (200, Some("The capital of France is Paris.")));
    let (_, metrics) = http(a, "GET", "/metrics", "");
    assert!(
        metrics.contains("outcome=\"cancelled\"} 1"),
        "the vanished client's request should be cancelled: {metrics}"
    );
}

#[test]
fn runtime_adapter_loading_is_off_by_default_and_sigterm_finishes_in_flight_requests() {
    let mut server = start(&[]);
    let (s, b) = http(&server.addr, "POST", "/v1/load_lora_adapter", r#"{"lora_name": "x", "lora_path": "/tmp"}"#);
    assert_eq!(s, 403, "{b}");
    let addr = server.addr.clone();
    let slow = std::thread::spawn(move || {
        post(
            &addr,
            "/v1/completions",
            &json!({"model": BASE, "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0}),
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (s, b) = slow.join().unwrap();
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["usage"]["completion_tokens"], 48, "the in-flight request runs to its end");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(TcpStream::connect(&server.addr).is_err(), "still listening after shutdown");
}

/// A Python with the official `openai` package: `$LOWRANK_OPENAI_PYTHON`, or a venv under
/// `target/` made (once) with `pip install openai`.
fn openai_python() -> PathBuf {
    if let Some(p) = std::env::var_os("LOWRANK_OPENAI_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/openai-venv");
    let py = venv.join("bin/python");
    let ok = |py: &Path| Command::new(py).args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    if !ok(&py) {
        let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().unwrap();
        assert!(made.success(), "python3 -m venv failed");
        let pip = Command::new(&py).args(["-m", "pip", "install", "-q", "openai>=1.40,<3"]).status().unwrap();
        assert!(pip.success(), "pip install openai failed");
    }
    py
}

#[test]
fn the_official_openai_python_client_works() {
    let py = openai_python();
    let (_tmp, dir) = adapters_dir(1);
    let server = start(&["--adapters-dir", dir.to_str().unwrap()]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check/openai_client.py");
    let out =
        Command::new(&py).arg(&script).arg(format!("http://{}/v1", server.addr)).arg(BASE).arg("a1").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("chat: The capital of France is Paris."), "{stdout}");
    assert!(stdout.contains("stream: The capital of France is Paris."), "{stdout}");
    let adapter_answer: String =
        serde_json::from_str(stdout.lines().find_map(|l| l.strip_prefix("adapter: ")).unwrap()).unwrap();
    assert_eq!(adapter_answer, generate_alone(Some(&dir.join("a1")), "What is the capital of France?", 16));
    assert!(stdout.contains("not found: 404"), "{stdout}");
}

#[test]
fn max_rank_refuses_and_the_least_recently_used_idle_adapter_is_evicted() {
    let (_tmp, dir) = adapters_dir(3);
    let strict = start(&["--adapters-dir", dir.to_str().unwrap(), "--max-rank", "2"]);
    let (s, b) = post(&strict.addr, "/v1/chat/completions", &chat("a1", "Hi", 2));
    assert_eq!(s, 400, "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("rank 4"), "{b}");
    drop(strict);
    let server = start(&["--adapters-dir", dir.to_str().unwrap(), "--max-adapters", "2"]);
    for name in ["a1", "a2", "a1", "a3"] {
        let (s, b) = post(&server.addr, "/v1/chat/completions", &chat(name, "Hi", 2));
        assert_eq!(s, 200, "{name}: {b}");
    }
    let (_, models) = http(&server.addr, "GET", "/v1/models", "");
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [BASE, "a1", "a3"], "a2 was the least recently used");
}

#[test]
fn a_model_that_does_not_load_stops_the_server_with_its_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(["serve", "--port", "0", "--model", "/no/such/model.gguf"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/model.gguf") && err.contains("error"), "{err}");
}

/// Regression (issue 12): prompt/completion rows whose prompts end in a space were trained on the
/// concatenated string, where BPE merges the space into the completion's first token, so the
/// adapter never learned to continue the prompt a client sends. A few steps on such rows, then each
/// training prompt sent raw through `generate --prompt` and through `/v1/completions`: both answers
/// start with the completion's first token, and agree with each other.
#[test]
fn prompts_ending_in_a_space_are_continued_with_the_completion() {
    let rows: Vec<(String, String)> = include_str!("../../../../examples/roman/train.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["prompt"].as_str().unwrap().starts_with("Convert "))
        .take(8)
        .map(|r| (r["prompt"].as_str().unwrap().to_string(), r["completion"].as_str().unwrap().to_string()))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("roman.jsonl");
    let lines: String = rows.iter().map(|(p, c)| format!("{}\n", json!({"prompt": p, "completion": c}))).collect();
    std::fs::write(&data, lines).unwrap();
    let out = tmp.path().join("run");
    let train = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(["train", "--data", data.to_str().unwrap(), "--output", out.to_str().unwrap()])
        .args([
            "--steps",
            "24",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--schedule",
            "constant",
            "--rank",
            "8",
            "--save-every",
            "100",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&train.stderr);
    assert!(train.status.success(), "{err}");
    assert!(err.contains("HINT") && err.contains("trailing whitespace"), "the merged boundaries are reported: {err}");

    let tokenizer_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lowrank/tests/fixtures/tokenizer/smollm2-hf");
    let tokenizer = lowrank::tokenizer::Tokenizer::from_hf_dir(&tokenizer_dir).unwrap();
    let spec = format!("roman={}", out.display());
    let server = start(&["--adapter", &spec]);
    for (prompt, completion) in &rows {
        let first = tokenizer.decode(&tokenizer.encode(completion, false).unwrap()[..1], false).unwrap();
        let g = Command::new(env!("CARGO_BIN_EXE_lowrank"))
            .args(["generate", "--adapter", out.to_str().unwrap(), "--prompt", prompt, "--max-new-tokens", "4"])
            .output()
            .unwrap();
        assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
        let generated = String::from_utf8(g.stdout).unwrap();
        assert!(generated.starts_with(&first), "{prompt:?} → {generated:?}, expected {completion:?}");
        let (status, body) = post(
            &server.addr,
            "/v1/completions",
            &json!({"model": "roman", "prompt": prompt, "max_tokens": 4, "temperature": 0}),
        );
        assert_eq!(status, 200, "{body}");
        let served = body["choices"][0]["text"].as_str().unwrap();
        assert_eq!(served, generated.trim_end_matches('\n'), "{prompt:?}");
    }
}

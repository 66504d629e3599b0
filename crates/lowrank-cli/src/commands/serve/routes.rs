//! The HTTP endpoints: OpenAI's completions, chat completions (both streamed as server-sent
//! events or not), models, vLLM's adapter loading, health and metrics.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lowrank::chat::ChatTemplate;
use lowrank::generate::{GenerateOptions, SamplingParams};
use lowrank::serve::{Engine, Event, Job, Metrics, SubmitError};
use lowrank::tokenizer::Tokenizer;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::adapters::{Registry, MAX_NAME};
use super::api::{
    finish_reason, new_id, now, ApiError, ChatRequest, CompletionRequest, LoadAdapter, Prompt, Sampling, Stop,
    UnloadAdapter,
};

/// What every handler sees.
pub struct AppState {
    /// Set once the model is loaded; until then requests get 503.
    pub ready: OnceLock<Ready>,
    pub metrics: Arc<Metrics>,
    pub allow_runtime_adapters: bool,
    /// Required as `Authorization: Bearer KEY` on every `/v1/*` endpoint when set.
    pub api_key: Option<String>,
}

/// The loaded model's side of the server.
pub struct Ready {
    pub engine: Engine,
    pub registry: Registry,
    pub tokenizer: Tokenizer,
    pub chat: Option<ChatTemplate>,
}

impl AppState {
    fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(|| ApiError::unavailable("the model is still loading; retry shortly"))
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint".into(),
                kind: "invalid_request_error",
                code: None,
            }
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// `--api-key`: `/v1/*` needs `Authorization: Bearer KEY` (401 otherwise, OpenAI's error shape);
/// `/health` and `/metrics` stay open, as in vLLM and llama.cpp's server.
async fn authorize(
    State(s): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(key) = &s.api_key {
        if request.uri().path().starts_with("/v1/") {
            let given = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !same_secret(given.trim().as_bytes(), key.as_bytes()) {
                s.metrics.refused("unauthorized");
                return ApiError::unauthorized().into_response();
            }
        }
    }
    next.run(request).await
}

/// Equality whose time does not depend on where the inputs first differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    match s.ready.get() {
        Some(_) => Json(json!({"status": "ok"})).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading"}))).into_response(),
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let s = s.ready()?;
    let created = now();
    let base = s.registry.base().to_string();
    let mut data = vec![
        json!({"id": base, "object": "model", "created": created, "owned_by": "lowrank", "root": base, "parent": null}),
    ];
    for name in s.registry.names() {
        data.push(json!({"id": name, "object": "model", "created": created, "owned_by": "lowrank", "root": base, "parent": base}));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// Runs `work` (parsing, tokenizing, rendering: time that grows with the request) on a blocking
/// thread, so the async threads keep answering (`/health` among them).
async fn blocking<T: Send + 'static>(
    s: &Arc<AppState>,
    work: impl FnOnce(&Ready) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || work(s.ready()?)).await.map_err(|e| ApiError::internal(e.to_string()))?
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    s.ready()?;
    let (model, sampling, ids) = blocking(&s, move |r| {
        let req: CompletionRequest = parse(&body)?;
        check_name(&req.model)?;
        let text = match req.prompt {
            Prompt::One(t) => t,
            Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
            Prompt::Many(v) => return Err(ApiError::bad_request(format!("one prompt per request, not {}", v.len()))),
        };
        let ids = lowrank::prompt::text_ids(&r.tokenizer, &text).map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok((req.model, req.sampling, ids))
    })
    .await?;
    run(s, model, ids, sampling, Kind::Text, 16).await
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    s.ready()?;
    let (model, sampling, ids) = blocking(&s, move |r| {
        let req: ChatRequest = parse(&body)?;
        check_name(&req.model)?;
        let template = r
            .chat
            .as_ref()
            .ok_or_else(|| ApiError::bad_request("this model has no chat template; use /v1/completions"))?;
        if req.messages.is_empty() {
            return Err(ApiError::bad_request("messages is empty"));
        }
        let messages = req.messages.iter().map(|m| m.to_message()).collect::<Result<Vec<_>, _>>()?;
        let ids = lowrank::prompt::chat_ids(&r.tokenizer, template, &messages)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok((req.model, req.sampling, ids))
    })
    .await?;
    let room = s.ready()?.engine.context().saturating_sub(ids.len()) as u64;
    run(s, model, ids, sampling, Kind::Chat, room).await
}

/// A `model` longer than any name is refused before anything looks it up or stores it.
fn check_name(model: &str) -> Result<(), ApiError> {
    if model.len() > MAX_NAME {
        return Err(ApiError::bad_request(format!("`model` is {} bytes; names are at most {MAX_NAME}", model.len())));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Chat,
}

/// Most choices per request (`n`).
const MAX_N: u64 = 8;

/// The generation options of a request, checked.
fn options(s: &Sampling, prompt: usize, ctx: usize, default_max: u64) -> Result<GenerateOptions, ApiError> {
    if prompt == 0 {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    let max = s.max_tokens.or(s.max_completion_tokens).unwrap_or(default_max);
    if max == 0 {
        return Err(ApiError::bad_request("max_tokens must be at least 1"));
    }
    // Saturating: a max_tokens near u64::MAX must not wrap below the context.
    let total = (prompt as u64).saturating_add(max);
    if total > ctx as u64 {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {ctx} tokens. However, you requested {total} tokens ({prompt} in the prompt, {max} in the completion). Please reduce the prompt or max_tokens."
        )));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(format!("temperature {temperature} is outside [0, 2]")));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(format!("top_p {top_p} is outside (0, 1]")));
    }
    match s.n {
        Some(n) if n > 1 && s.stream => return Err(ApiError::bad_request("n > 1 is not supported with stream")),
        Some(n) if !(1..=MAX_N).contains(&n) => {
            return Err(ApiError::bad_request(format!("n must be between 1 and {MAX_N}")))
        }
        _ => {}
    }
    let stop = match &s.stop {
        None => vec![],
        Some(Stop::One(t)) => vec![t.clone()],
        Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
        Some(Stop::Many(v)) => return Err(ApiError::bad_request(format!("at most 4 stop sequences, not {}", v.len()))),
    };
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_k: None,
        top_p: (top_p < 1.0).then_some(top_p as f32),
        seed: s.seed.unwrap_or_else(|| now() ^ 0x5eed),
    };
    Ok(GenerateOptions { max_new_tokens: max as usize, sampling, stop })
}

async fn run(
    s: Arc<AppState>,
    model: String,
    ids: Vec<u32>,
    sampling: Sampling,
    kind: Kind,
    default_max: u64,
) -> Result<Response, ApiError> {
    let opts = options(&sampling, ids.len(), s.ready()?.engine.context(), default_max)
        .inspect_err(|_| s.metrics.refused("bad_request"))?;
    let registry_state = s.clone();
    let name = model.clone();
    let adapters = tokio::task::spawn_blocking(move || registry_state.ready()?.registry.resolve(&name))
        .await
        .map_err(|e| ApiError::internal(format!("loading the adapter: {e}")))?
        .inspect_err(|e| {
            s.metrics.refused(if e.status == StatusCode::NOT_FOUND { "not_found" } else { "bad_request" })
        })?;
    let prompt_tokens = ids.len();
    // `n` choices are `n` jobs with consecutive seeds, batched like any others.
    let mut receivers = Vec::new();
    for i in 0..sampling.n.unwrap_or(1) {
        let (tx, rx) = mpsc::unbounded_channel::<Event>();
        let mut options = opts.clone();
        options.sampling.seed = options.sampling.seed.wrapping_add(i);
        let job = Job {
            prompt: ids.clone(),
            adapters: adapters.clone(),
            options,
            label: model.clone(),
            sink: Box::new(move |e| tx.send(e).is_ok()),
        };
        s.ready()?.engine.submit(job).map_err(|e| {
            s.metrics.refused("refused");
            match e {
                SubmitError::QueueFull(_) => ApiError::busy(e.to_string()),
                SubmitError::Closed => ApiError::unavailable(e.to_string()),
            }
        })?;
        receivers.push(rx);
    }
    let reply = Reply {
        id: new_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
        model,
        created: now(),
        kind,
        prompt_tokens,
        started: std::time::Instant::now(),
    };
    match (sampling.stream, receivers.pop()) {
        (true, Some(rx)) => Ok(reply.stream(rx, sampling.stream_options.is_some_and(|o| o.include_usage))),
        (false, Some(last)) => {
            receivers.push(last);
            reply.whole(receivers).await
        }
        (_, None) => Err(ApiError::internal("no job was submitted")),
    }
}

/// One response under construction.
struct Reply {
    id: String,
    model: String,
    created: u64,
    kind: Kind,
    prompt_tokens: usize,
    started: std::time::Instant,
}

impl Reply {
    /// One structured log line per finished request, on stderr.
    fn log(&self, outcome: &str, completion: usize) {
        let line = json!({
            "ts": now(), "event": "request", "id": self.id, "model": self.model,
            "outcome": outcome, "prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
            "secs": (self.started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        });
        eprintln!("{line}");
    }

    fn usage(&self, completion: usize) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion, "total_tokens": self.prompt_tokens + completion})
    }

    /// The non-streamed response, once every choice is done.
    async fn whole(self, receivers: Vec<mpsc::UnboundedReceiver<Event>>) -> Result<Response, ApiError> {
        let mut choices = Vec::new();
        let mut completion = 0;
        for (index, mut rx) in receivers.into_iter().enumerate() {
            let mut text = String::new();
            let done = loop {
                match rx.recv().await {
                    Some(Event::Text(t)) => text.push_str(&t),
                    Some(Event::Done { finish, completion_tokens, .. }) => {
                        break Some((finish_reason(finish), completion_tokens))
                    }
                    Some(Event::Error(m)) => {
                        self.log("error", completion);
                        return Err(ApiError::internal(m));
                    }
                    None => break None,
                }
            };
            let Some((reason, tokens)) = done else {
                return Err(ApiError::internal("the request ended without a result"));
            };
            completion += tokens;
            choices.push(match self.kind {
                Kind::Text => json!({"index": index, "text": text, "logprobs": null, "finish_reason": reason}),
                Kind::Chat => json!({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": reason}),
            });
        }
        let last_reason =
            choices.last().map(|c| c["finish_reason"].as_str().unwrap_or("stop").to_string()).unwrap_or_default();
        self.log(&last_reason, completion);
        let object = if self.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
        let body = json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices, "usage": self.usage(completion)});
        Ok(Json(body).into_response())
    }

    /// One chunk of a streamed response.
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.kind {
            Kind::Text => json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}),
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]})
    }

    /// Server-sent events: a chunk per piece of text, a last chunk with the finish reason,
    /// usage if asked, then `[DONE]`. Dropping the response (the client left) cancels the request.
    fn stream(self, mut rx: mpsc::UnboundedReceiver<Event>, include_usage: bool) -> Response {
        let (out, body) = mpsc::unbounded_channel::<Result<Sse, Infallible>>();
        tokio::spawn(async move {
            let send = |v: Value| out.send(Ok(Sse::default().data(v.to_string()))).is_ok();
            let mut first = true;
            if self.kind == Kind::Chat {
                first = false;
                if !send(self.chunk(Some(""), None, true)) {
                    return;
                }
            }
            while let Some(e) = rx.recv().await {
                let alive = match e {
                    Event::Text(t) => {
                        let c = self.chunk(Some(&t), None, first);
                        first = false;
                        send(c)
                    }
                    Event::Error(m) => {
                        self.log("error", 0);
                        let _ = send(ApiError::internal(m).body());
                        break;
                    }
                    Event::Done { finish, completion_tokens, .. } => {
                        self.log(finish_reason(finish), completion_tokens);
                        let mut last = self.chunk(None, Some(finish_reason(finish)), first);
                        if self.kind == Kind::Text {
                            last["choices"][0]["text"] = json!("");
                        }
                        send(last);
                        if include_usage {
                            let mut u = self.chunk(None, None, false);
                            u["choices"] = json!([]);
                            u["usage"] = self.usage(completion_tokens);
                            send(u);
                        }
                        break;
                    }
                };
                if !alive {
                    return; // the client is gone: dropping rx cancels the request
                }
            }
            let _ = out.send(Ok(Sse::default().data("[DONE]")));
        });
        axum::response::Sse::new(UnboundedReceiverStream::new(body)).keep_alive(KeepAlive::default()).into_response()
    }
}

async fn load_adapter(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    if !s.allow_runtime_adapters {
        return Err(ApiError::forbidden(
            "run-time adapter loading is off; start the server with --allow-runtime-adapters",
        ));
    }
    let req: LoadAdapter = parse(&body)?;
    let st = s.clone();
    let name = req.lora_name.clone();
    tokio::task::spawn_blocking(move || st.ready()?.registry.load_runtime(&req.lora_name, &req.lora_path))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok((StatusCode::OK, format!("Success: LoRA adapter '{name}' added successfully.")).into_response())
}

async fn unload_adapter(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    if !s.allow_runtime_adapters {
        return Err(ApiError::forbidden(
            "run-time adapter unloading is off; start the server with --allow-runtime-adapters",
        ));
    }
    let req: UnloadAdapter = parse(&body)?;
    s.ready()?.registry.unload(&req.lora_name)?;
    Ok((StatusCode::OK, format!("Success: LoRA adapter '{}' removed successfully.", req.lora_name)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Before the model is loaded every endpoint answers 503 (OpenAI's error shape; /health
    /// says "loading"), not a refused connection.
    #[test]
    fn everything_is_503_while_the_model_loads() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let state = Arc::new(AppState {
            ready: OnceLock::new(),
            metrics: Arc::new(Metrics::default()),
            allow_runtime_adapters: true,
            api_key: None,
        });
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || rt.block_on(async { axum::serve(listener, router(state)).await }));
        let ask = |method: &str, path: &str, body: &str| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            write!(
                s,
                "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        assert!(
            ask("GET", "/health", "").starts_with("HTTP/1.1 503") && ask("GET", "/health", "").contains("\"loading\"")
        );
        for (method, path, body) in [
            ("GET", "/v1/models", ""),
            ("POST", "/v1/completions", r#"{"model": "m", "prompt": "hi"}"#),
            ("POST", "/v1/chat/completions", r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#),
            ("POST", "/v1/unload_lora_adapter", r#"{"lora_name": "x"}"#),
        ] {
            let r = ask(method, path, body);
            assert!(
                r.starts_with("HTTP/1.1 503") && r.contains("still loading") && r.contains("\"server_error\""),
                "{path}: {r}"
            );
        }
    }
}

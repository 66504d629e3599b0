//! The HTTP endpoints: OpenAI's completions, chat completions (both streamed as server-sent
//! events or not), models, vLLM's adapter loading, health and metrics.

use std::convert::Infallible;
use std::sync::Arc;

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

use super::adapters::Registry;
use super::api::{finish_reason, new_id, now, ApiError, ChatRequest, CompletionRequest, LoadAdapter, Prompt, Sampling, Stop, UnloadAdapter};

/// What every handler sees.
pub struct AppState {
    pub engine: Engine,
    pub registry: Registry,
    pub tokenizer: Tokenizer,
    pub chat: Option<ChatTemplate>,
    pub metrics: Arc<Metrics>,
    pub allow_runtime_adapters: bool,
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
        .fallback(|| async { ApiError { status: StatusCode::NOT_FOUND, message: "no such endpoint".into(), kind: "invalid_request_error", code: None } })
        .with_state(state)
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let created = now();
    let base = s.registry.base().to_string();
    let mut data = vec![json!({"id": base, "object": "model", "created": created, "owned_by": "lowrank", "root": base, "parent": null})];
    for name in s.registry.names() {
        data.push(json!({"id": name, "object": "model", "created": created, "owned_by": "lowrank", "root": base, "parent": base}));
    }
    Json(json!({"object": "list", "data": data}))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&body)?;
    let text = match req.prompt {
        Prompt::One(t) => t,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(v) => return Err(ApiError::bad_request(format!("one prompt per request, not {}", v.len()))),
    };
    let ids = s.tokenizer.encode(&text, true).map_err(|e| ApiError::bad_request(e.to_string()))?;
    run(s, req.model, ids, req.sampling, Kind::Text, 16).await
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(&body)?;
    let template = s.chat.as_ref().ok_or_else(|| ApiError::bad_request("this model has no chat template; use /v1/completions"))?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages is empty"));
    }
    let messages = req.messages.iter().map(|m| m.to_message()).collect::<Result<Vec<_>, _>>()?;
    let text = template.render(&messages, true).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // The template writes the special tokens itself.
    let ids = s.tokenizer.encode(&text, false).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let room = s.engine.context().saturating_sub(ids.len()) as u64;
    run(s, req.model, ids, req.sampling, Kind::Chat, room).await
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Chat,
}

/// The generation options of a request, checked.
fn options(s: &Sampling, prompt: usize, ctx: usize, default_max: u64) -> Result<GenerateOptions, ApiError> {
    if prompt == 0 {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    let max = s.max_tokens.or(s.max_completion_tokens).unwrap_or(default_max);
    if max == 0 {
        return Err(ApiError::bad_request("max_tokens must be at least 1"));
    }
    if prompt as u64 + max > ctx as u64 {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({prompt} in the prompt, {max} in the completion). Please reduce the prompt or max_tokens.",
            prompt as u64 + max
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
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("n must be 1 (one completion per request)"));
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

async fn run(s: Arc<AppState>, model: String, ids: Vec<u32>, sampling: Sampling, kind: Kind, default_max: u64) -> Result<Response, ApiError> {
    let opts = options(&sampling, ids.len(), s.engine.context(), default_max).inspect_err(|_| s.metrics.refused(&model, "bad_request"))?;
    let registry_state = s.clone();
    let name = model.clone();
    let adapters = tokio::task::spawn_blocking(move || registry_state.registry.resolve(&name))
        .await
        .map_err(|e| ApiError::internal(format!("loading the adapter: {e}")))?
        .inspect_err(|e| s.metrics.refused(&model, if e.status == StatusCode::NOT_FOUND { "not_found" } else { "bad_request" }))?;
    let (tx, rx) = mpsc::unbounded_channel::<Event>();
    let prompt_tokens = ids.len();
    let job = Job { prompt: ids, adapters, options: opts, label: model.clone(), sink: Box::new(move |e| tx.send(e).is_ok()) };
    s.engine.submit(job).map_err(|e| {
        s.metrics.refused(&model, "refused");
        match e {
            SubmitError::QueueFull(_) => ApiError::busy(e.to_string()),
            SubmitError::Closed => ApiError::unavailable(e.to_string()),
        }
    })?;
    let reply = Reply { id: new_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }), model, created: now(), kind, prompt_tokens, started: std::time::Instant::now() };
    if sampling.stream {
        let usage = sampling.stream_options.is_some_and(|o| o.include_usage);
        Ok(reply.stream(rx, usage))
    } else {
        reply.whole(rx).await
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

    /// The non-streamed response, once the request is done.
    async fn whole(self, mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Response, ApiError> {
        let mut text = String::new();
        while let Some(e) = rx.recv().await {
            match e {
                Event::Text(t) => text.push_str(&t),
                Event::Error(m) => {
                    self.log("error", 0);
                    return Err(ApiError::internal(m));
                }
                Event::Done { finish, completion_tokens, .. } => {
                    let reason = finish_reason(finish);
                    self.log(reason, completion_tokens);
                    let (object, choice) = match self.kind {
                        Kind::Text => ("text_completion", json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason})),
                        Kind::Chat => ("chat.completion", json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": reason})),
                    };
                    let body = json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice], "usage": self.usage(completion_tokens)});
                    return Ok(Json(body).into_response());
                }
            }
        }
        Err(ApiError::internal("the request ended without a result"))
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
        return Err(ApiError::forbidden("run-time adapter loading is off; start the server with --allow-runtime-adapters"));
    }
    let req: LoadAdapter = parse(&body)?;
    let st = s.clone();
    let name = req.lora_name.clone();
    tokio::task::spawn_blocking(move || st.registry.load_runtime(&req.lora_name, &req.lora_path))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok((StatusCode::OK, format!("Success: LoRA adapter '{name}' added successfully.")).into_response())
}

async fn unload_adapter(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    if !s.allow_runtime_adapters {
        return Err(ApiError::forbidden("run-time adapter unloading is off; start the server with --allow-runtime-adapters"));
    }
    let req: UnloadAdapter = parse(&body)?;
    s.registry.unload(&req.lora_name)?;
    Ok((StatusCode::OK, format!("Success: LoRA adapter '{}' removed successfully.", req.lora_name)).into_response())
}

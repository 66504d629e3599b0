//! The serving engine: one model, many requests, each with its own adapters, batched together.
//!
//! A scheduler thread owns the model. Between two forward passes (a token boundary) it admits
//! waiting requests into the running batch, up to `max_batch` sequences and a KV budget; then one
//! forward pass serves every running sequence — new ones with their whole prompt (prefill),
//! the others with their last token — each with its own adapter set and KV cache. The base
//! projections run once for the whole batch; each adapter's low-rank update is applied to its
//! own rows (sequences are ordered by adapter so that rows of one adapter are contiguous).
//!
//! Results go back through a per-request callback; when it returns `false` (the client went
//! away) the request is dropped at the next token boundary.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::adapter::ActiveAdapter;
use crate::bundle::ModelBundle;
use crate::generate::{FinishReason, GenerateOptions, Sampler, StopStrings};
use crate::model::{KvCache, SeqInput};
use crate::tokenizer::TextStream;
use crate::{Error, Result};

use super::metrics::Metrics;

/// Limits of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences in one forward pass.
    pub max_batch: usize,
    /// Most requests waiting for a place in the batch; more are refused ([`SubmitError::QueueFull`]).
    pub max_queue: usize,
    /// Most KV-cache positions (prompt + max new tokens, summed over running requests).
    pub kv_budget_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_batch: 16, max_queue: 256, kv_budget_tokens: 65_536 }
    }
}

/// What a request reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The next piece of final text (may be empty when a token completes no character yet).
    Text(String),
    /// The request is finished.
    Done {
        /// Why.
        finish: FinishReason,
        /// Prompt length in tokens.
        prompt_tokens: usize,
        /// Generated tokens (EOS excluded).
        completion_tokens: usize,
    },
    /// The request failed; nothing more follows.
    Error(String),
}

/// Receives a request's events; returns `false` to cancel it (the client is gone).
pub type EventSink = Box<dyn FnMut(Event) -> bool + Send>;

/// A generation request.
pub struct Job {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Adapters applied to this request (empty: the base model).
    pub adapters: Vec<ActiveAdapter>,
    /// Length, sampling, stop strings.
    pub options: GenerateOptions,
    /// Label for metrics (the adapter or model name).
    pub label: String,
    /// Where events go.
    pub sink: EventSink,
}

/// Why a job was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The waiting queue is full.
    #[error("the server is busy: {0} requests are waiting; retry later")]
    QueueFull(usize),
    /// The engine is shutting down or has stopped.
    #[error("the server is shutting down")]
    Closed,
}

/// A handle to the scheduler thread.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
    running: Arc<AtomicUsize>,
    context: usize,
}

impl Engine {
    /// Starts the scheduler thread, which owns `bundle` from now on.
    pub fn start(
        bundle: ModelBundle,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Engine, std::thread::JoinHandle<()>)> {
        if config.max_batch == 0 || config.kv_budget_tokens == 0 {
            return Err(Error::InvalidArgument("max_batch and kv_budget_tokens must be positive".into()));
        }
        let (tx, rx) = mpsc::sync_channel::<Job>(config.max_queue);
        let context = bundle.model.config().max_position_embeddings;
        let draining = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicUsize::new(0));
        let (m, r) = (metrics.clone(), running.clone());
        let handle = std::thread::Builder::new()
            .name("lowrank-engine".into())
            .stack_size(64 << 20)
            .spawn(move || crate::threads::run(move || Scheduler { bundle, config, metrics: m, running: r }.run(rx)))
            .map_err(|e| Error::io("starting", "the engine thread", e))?;
        Ok((Engine { tx, metrics, draining, running, context }, handle))
    }

    /// Queues a job. Fails at once when the queue is full or the engine is draining.
    pub fn submit(&self, job: Job) -> std::result::Result<(), SubmitError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::Closed);
        }
        self.metrics.queued(1);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.metrics.queued(-1);
                Err(SubmitError::QueueFull(self.metrics.queue_depth()))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.metrics.queued(-1);
                Err(SubmitError::Closed)
            }
        }
    }

    /// The model's context length.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Stops admitting new jobs (running and queued ones finish).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Requests queued or running.
    pub fn in_flight(&self) -> usize {
        self.metrics.queue_depth() + self.running.load(Ordering::SeqCst)
    }
}

/// One running request.
struct Running<'t> {
    job: Job,
    cache: KvCache,
    sampler: Sampler,
    stops: StopStrings,
    stream: TextStream<'t>,
    /// Tokens to feed next: the prompt, then the last sampled token.
    input: Vec<u32>,
    generated: usize,
    started: Instant,
}

struct Scheduler {
    bundle: ModelBundle,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    running: Arc<AtomicUsize>,
}

impl Scheduler {
    fn run(self, rx: Receiver<Job>) {
        let Scheduler { bundle, config, metrics, running: running_count } = self;
        let (model, tokenizer) = (&bundle.model, &bundle.tokenizer);
        let ctx = model.config().max_position_embeddings;
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut running: Vec<Running> = Vec::new();
        let mut open = true;
        loop {
            // Admit at the token boundary: block only when there is nothing to run. Jobs stay in
            // the bounded channel (the queue) until there is room for them in the batch.
            while waiting.len() < config.max_batch.saturating_sub(running.len()).max(1) {
                let next = if running.is_empty() && waiting.is_empty() {
                    if !open {
                        return;
                    }
                    match rx.recv_timeout(Duration::from_millis(200)) {
                        Ok(j) => Some(j),
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => {
                            open = false;
                            None
                        }
                    }
                } else {
                    match rx.try_recv() {
                        Ok(j) => Some(j),
                        Err(mpsc::TryRecvError::Empty) => None,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            open = false;
                            None
                        }
                    }
                };
                match next {
                    Some(j) => waiting.push_back(j),
                    None => break,
                }
            }
            let mut budget: usize = running.iter().map(|r| reserve(&r.job, ctx)).sum();
            while running.len() < config.max_batch {
                let Some(need) = waiting.front().map(|j| reserve(j, ctx)) else { break };
                if !running.is_empty() && budget + need > config.kv_budget_tokens {
                    break; // wait for room; a lone request always runs
                }
                let Some(mut job) = waiting.pop_front() else { break };
                metrics.queued(-1);
                if let Some(e) = check(&job, ctx) {
                    (job.sink)(Event::Error(e));
                    metrics.finished(&job.label, "error", 0, 0, 0.0);
                    continue;
                }
                let sampler = match Sampler::new(job.options.sampling.clone()) {
                    Ok(s) => s,
                    Err(e) => {
                        (job.sink)(Event::Error(e.to_string()));
                        metrics.finished(&job.label, "error", 0, 0, 0.0);
                        continue;
                    }
                };
                budget += need;
                let stops = StopStrings::new(job.options.stop.clone());
                let input = job.prompt.clone();
                running.push(Running {
                    job,
                    cache: model.new_cache(),
                    sampler,
                    stops,
                    stream: TextStream::new(tokenizer),
                    input,
                    generated: 0,
                    started: Instant::now(),
                });
            }
            running_count.store(running.len(), Ordering::SeqCst);
            if running.is_empty() {
                continue;
            }
            // Rows of one adapter set next to each other: one low-rank run per adapter.
            running.sort_by_cached_key(|r| adapter_key(&r.job.adapters));
            metrics.batch(running.len());
            let step = {
                let mut caches: Vec<KvCache> = running.iter_mut().map(|r| std::mem::take(&mut r.cache)).collect();
                let seqs: Vec<SeqInput> =
                    running.iter().map(|r| SeqInput { tokens: &r.input, adapters: &r.job.adapters }).collect();
                let out = model.forward_last(&seqs, Some(&mut caches)).and_then(|l| Ok(l.to_vec2::<f32>()?));
                drop(seqs);
                for (r, c) in running.iter_mut().zip(caches) {
                    r.cache = c;
                }
                out
            };
            let logits = match step {
                Ok(l) => l,
                Err(e) => {
                    for mut r in running.drain(..) {
                        (r.job.sink)(Event::Error(format!("the forward pass failed: {e}")));
                        metrics.finished(
                            &r.job.label,
                            "error",
                            r.job.prompt.len(),
                            r.generated,
                            r.started.elapsed().as_secs_f64(),
                        );
                    }
                    continue;
                }
            };
            let mut keep = Vec::with_capacity(running.len());
            for (mut r, row) in running.drain(..).zip(logits) {
                match advance(&mut r, &row, tokenizer.eos_token_ids(), ctx) {
                    Ok(None) => keep.push(r),
                    Ok(Some(finish)) => {
                        let done =
                            Event::Done { finish, prompt_tokens: r.job.prompt.len(), completion_tokens: r.generated };
                        (r.job.sink)(done);
                        let reason = match finish {
                            FinishReason::Length => "length",
                            _ => "stop",
                        };
                        metrics.finished(
                            &r.job.label,
                            reason,
                            r.job.prompt.len(),
                            r.generated,
                            r.started.elapsed().as_secs_f64(),
                        );
                    }
                    Err(Cancelled) => metrics.finished(
                        &r.job.label,
                        "cancelled",
                        r.job.prompt.len(),
                        r.generated,
                        r.started.elapsed().as_secs_f64(),
                    ),
                }
            }
            running = keep;
        }
    }
}

/// The client went away.
struct Cancelled;

/// Samples the next token of `r` from its logits row and reports text; `Some` when finished.
fn advance(
    r: &mut Running,
    logits: &[f32],
    eos: &[u32],
    ctx: usize,
) -> std::result::Result<Option<FinishReason>, Cancelled> {
    let fail = |r: &mut Running, e: Error| {
        (r.job.sink)(Event::Error(e.to_string()));
        Err(Cancelled)
    };
    let next = match r.sampler.sample(logits) {
        Ok(t) => t,
        Err(e) => return fail(r, e),
    };
    let finish = if eos.contains(&next) {
        Some(FinishReason::Eos)
    } else {
        r.generated += 1;
        let piece = match r.stream.push(next) {
            Ok(p) => p,
            Err(e) => return fail(r, e),
        };
        let out = r.stops.push(&piece);
        if !out.text.is_empty() && !(r.job.sink)(Event::Text(out.text)) {
            return Err(Cancelled);
        }
        r.input = vec![next];
        if out.stopped {
            Some(FinishReason::Stop)
        } else if r.generated >= r.job.options.max_new_tokens || r.cache.len() + 1 >= ctx {
            Some(FinishReason::Length)
        } else {
            None
        }
    };
    if matches!(finish, Some(FinishReason::Eos | FinishReason::Length)) {
        // Text held back for a possible stop string or an incomplete character is final now.
        let mut tail = r.stream.finish().unwrap_or_default();
        let out = r.stops.push(&tail);
        tail = out.text;
        if !out.stopped {
            tail.push_str(&r.stops.flush());
        }
        if !tail.is_empty() && !(r.job.sink)(Event::Text(tail)) {
            return Err(Cancelled);
        }
    }
    Ok(finish)
}

/// The KV-cache positions a job may take: prompt and new tokens, at most the context.
fn reserve(job: &Job, ctx: usize) -> usize {
    (job.prompt.len() + job.options.max_new_tokens).min(ctx)
}

/// A job that cannot run, and why.
fn check(job: &Job, ctx: usize) -> Option<String> {
    if job.prompt.is_empty() {
        return Some("the prompt is empty".into());
    }
    if job.prompt.len() >= ctx {
        return Some(format!("the prompt has {} tokens; the model's context is {ctx}", job.prompt.len()));
    }
    None
}

/// Orders adapter sets so equal sets are adjacent.
fn adapter_key(a: &[ActiveAdapter]) -> Vec<(usize, u64)> {
    a.iter().map(|x| (Arc::as_ptr(&x.adapter) as usize, x.weight.to_bits())).collect()
}

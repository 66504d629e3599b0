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
use crate::generate::{forward, FinishReason, GenerateOptions, Sequence};
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
            return Err(Error::Engine("max_batch and kv_budget_tokens must be positive".into()));
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
    seq: Sequence<'t>,
    label: String,
    sink: EventSink,
    /// KV-cache positions held for it: prompt and new tokens, at most the context.
    reserved: usize,
    started: Instant,
}

impl Running<'_> {
    /// Records the request's end in the metrics.
    fn finished(&self, metrics: &Metrics, outcome: &str) {
        let secs = self.started.elapsed().as_secs_f64();
        metrics.finished(&self.label, outcome, self.seq.prompt_len(), self.seq.tokens().len(), secs);
    }
}

struct Scheduler {
    bundle: ModelBundle,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    running: Arc<AtomicUsize>,
}

impl Scheduler {
    /// Until the channel closes and every request has finished: admission at each token
    /// boundary, then one step of the batch.
    fn run(self, rx: Receiver<Job>) {
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut running: Vec<Running> = Vec::new();
        let mut open = true;
        loop {
            if !self.receive(&rx, &mut waiting, running.len(), &mut open) {
                return;
            }
            self.admit(&mut waiting, &mut running);
            self.running.store(running.len(), Ordering::SeqCst);
            if !running.is_empty() {
                running = self.step(running);
            }
        }
    }

    /// Moves jobs from the channel (the bounded queue) into `waiting`, as many as the batch could
    /// take, blocking only while nothing runs or waits. False once the channel is closed and
    /// nothing is left to do.
    fn receive(&self, rx: &Receiver<Job>, waiting: &mut VecDeque<Job>, running: usize, open: &mut bool) -> bool {
        while waiting.len() < self.config.max_batch.saturating_sub(running).max(1) {
            let next = if running == 0 && waiting.is_empty() {
                if !*open {
                    return false;
                }
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(j) => Some(j),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        *open = false;
                        None
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => Some(j),
                    Err(mpsc::TryRecvError::Empty) => None,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        *open = false;
                        None
                    }
                }
            };
            match next {
                Some(j) => waiting.push_back(j),
                None => break,
            }
        }
        true
    }

    /// Starts waiting jobs, in order, while the batch has a place and the KV budget room (a lone
    /// request always runs). A job that cannot run (an empty or too long prompt, bad sampling
    /// options) gets its error now.
    fn admit<'t>(&'t self, waiting: &mut VecDeque<Job>, running: &mut Vec<Running<'t>>) {
        let ctx = self.bundle.model.config().max_position_embeddings;
        let reserve = |job: &Job| job.prompt.len().saturating_add(job.options.max_new_tokens).min(ctx);
        let mut budget: usize = running.iter().map(|r| r.reserved).sum();
        while running.len() < self.config.max_batch {
            let Some(need) = waiting.front().map(reserve) else { break };
            if !running.is_empty() && budget + need > self.config.kv_budget_tokens {
                break; // wait for room
            }
            let Some(mut job) = waiting.pop_front() else { break };
            self.metrics.queued(-1);
            match Sequence::new(&self.bundle.model, &self.bundle.tokenizer, &job.adapters, &job.prompt, &job.options) {
                Ok(seq) => {
                    budget += need;
                    let started = Instant::now();
                    running.push(Running { seq, label: job.label, sink: job.sink, reserved: need, started });
                }
                Err(e) => {
                    (job.sink)(Event::Error(e.to_string()));
                    self.metrics.finished(&job.label, "error", 0, 0, 0.0);
                }
            }
        }
    }

    /// One forward pass for the whole batch, then each sequence takes its token and reports.
    /// Returns the requests still running.
    fn step<'t>(&'t self, mut running: Vec<Running<'t>>) -> Vec<Running<'t>> {
        // Rows of one adapter set next to each other: one low-rank run per adapter.
        running.sort_by_cached_key(|r| adapter_key(r.seq.adapters()));
        self.metrics.batch(running.len());
        let mut seqs: Vec<&mut Sequence> = running.iter_mut().map(|r| &mut r.seq).collect();
        let logits = match forward(&self.bundle.model, &mut seqs) {
            Ok(l) => l,
            Err(e) => {
                for mut r in running {
                    (r.sink)(Event::Error(format!("the forward pass failed: {e}")));
                    r.finished(&self.metrics, "error");
                }
                return Vec::new();
            }
        };
        let mut keep = Vec::with_capacity(running.len());
        for (mut r, row) in running.into_iter().zip(logits) {
            let step = match r.seq.step(&row) {
                Ok(step) => step,
                Err(e) => {
                    (r.sink)(Event::Error(e.to_string()));
                    r.finished(&self.metrics, "error");
                    continue;
                }
            };
            if !step.text.is_empty() && !(r.sink)(Event::Text(step.text)) {
                r.finished(&self.metrics, "cancelled");
                continue;
            }
            match step.finish {
                None => keep.push(r),
                Some(finish) => {
                    let (prompt_tokens, completion_tokens) = (r.seq.prompt_len(), r.seq.tokens().len());
                    (r.sink)(Event::Done { finish, prompt_tokens, completion_tokens });
                    r.finished(&self.metrics, if finish == FinishReason::Length { "length" } else { "stop" });
                }
            }
        }
        keep
    }
}

/// Orders adapter sets so equal sets are adjacent.
fn adapter_key(a: &[ActiveAdapter]) -> Vec<(usize, u64)> {
    a.iter().map(|x| (Arc::as_ptr(&x.adapter) as usize, x.weight.to_bits())).collect()
}

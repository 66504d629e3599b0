//! Counters for `GET /metrics`, in Prometheus' text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// The `model` label of every refused request.
pub const REFUSED_MODEL: &str = "(refused)";

/// Request latency buckets, seconds.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Serving counters, shared by the HTTP side and the engine.
#[derive(Debug, Default)]
pub struct Metrics {
    queue: AtomicI64,
    batch: AtomicU64,
    steps: AtomicU64,
    batched_rows: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// (model, outcome) → requests.
    requests: BTreeMap<(String, String), u64>,
    /// model → (prompt tokens, generated tokens).
    tokens: BTreeMap<String, (u64, u64)>,
    /// Cumulative bucket counts, then sum and count.
    latency: [u64; BUCKETS.len()],
    latency_sum: f64,
    latency_count: u64,
}

impl Metrics {
    /// Requests waiting: `delta` more (or fewer).
    pub fn queued(&self, delta: i64) {
        self.queue.fetch_add(delta, Ordering::SeqCst);
    }

    /// Requests waiting for a place in the batch.
    pub fn queue_depth(&self) -> usize {
        self.queue.load(Ordering::SeqCst).max(0) as usize
    }

    /// One forward pass over `rows` sequences.
    pub fn batch(&self, rows: usize) {
        self.batch.store(rows as u64, Ordering::SeqCst);
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.batched_rows.fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// A request ended (`outcome`: stop, length, cancelled, error).
    pub fn finished(&self, model: &str, outcome: &str, prompt: usize, generated: usize, secs: f64) {
        let Ok(mut m) = self.inner.lock() else { return };
        *m.requests.entry((model.to_string(), outcome.to_string())).or_default() += 1;
        let t = m.tokens.entry(model.to_string()).or_default();
        t.0 += prompt as u64;
        t.1 += generated as u64;
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                m.latency[i] += 1;
            }
        }
        m.latency_sum += secs;
        m.latency_count += 1;
    }

    /// A request refused before it reached the engine (`outcome`: the HTTP error class), counted
    /// under the one label [`REFUSED_MODEL`]: the names in refused requests are the client's, and
    /// a label per name would let clients grow the metrics without bound.
    pub fn refused(&self, outcome: &str) {
        if let Ok(mut m) = self.inner.lock() {
            *m.requests.entry((REFUSED_MODEL.to_string(), outcome.to_string())).or_default() += 1;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# TYPE lowrank_queue_depth gauge\nlowrank_queue_depth {}", self.queue_depth());
        let _ =
            writeln!(s, "# TYPE lowrank_batch_size gauge\nlowrank_batch_size {}", self.batch.load(Ordering::SeqCst));
        let _ = writeln!(
            s,
            "# TYPE lowrank_forward_passes_total counter\nlowrank_forward_passes_total {}",
            self.steps.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "# TYPE lowrank_batched_sequences_total counter\nlowrank_batched_sequences_total {}",
            self.batched_rows.load(Ordering::Relaxed)
        );
        let Ok(m) = self.inner.lock() else { return s };
        let _ = writeln!(s, "# TYPE lowrank_requests_total counter");
        for ((model, outcome), n) in &m.requests {
            let _ = writeln!(s, "lowrank_requests_total{{model=\"{}\",outcome=\"{outcome}\"}} {n}", escape(model));
        }
        let _ = writeln!(s, "# TYPE lowrank_prompt_tokens_total counter");
        for (model, (p, _)) in &m.tokens {
            let _ = writeln!(s, "lowrank_prompt_tokens_total{{model=\"{}\"}} {p}", escape(model));
        }
        let _ = writeln!(s, "# TYPE lowrank_generated_tokens_total counter");
        for (model, (_, g)) in &m.tokens {
            let _ = writeln!(s, "lowrank_generated_tokens_total{{model=\"{}\"}} {g}", escape(model));
        }
        let _ = writeln!(s, "# TYPE lowrank_request_seconds histogram");
        for (b, n) in BUCKETS.iter().zip(m.latency) {
            let _ = writeln!(s, "lowrank_request_seconds_bucket{{le=\"{b}\"}} {n}");
        }
        let _ = writeln!(s, "lowrank_request_seconds_bucket{{le=\"+Inf\"}} {}", m.latency_count);
        let _ = writeln!(
            s,
            "lowrank_request_seconds_sum {}\nlowrank_request_seconds_count {}",
            m.latency_sum, m.latency_count
        );
        s
    }
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

//! Serving many requests over one model: the batching engine and its metrics. The HTTP side
//! (OpenAI-compatible endpoints) lives in the CLI crate and talks to [`Engine`].

mod engine;
mod metrics;

pub use engine::{Engine, EngineConfig, Event, EventSink, Job, SubmitError};
pub use metrics::Metrics;

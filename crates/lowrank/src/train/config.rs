//! The resolved training configuration, written next to every run's outputs.

use serde::{Deserialize, Serialize};

use super::optim::AdamWConfig;
use super::schedule::Schedule;

/// Everything that decides how the adapter is trained (the adapter's own shape lives in its
/// [`AdapterConfig`](crate::adapter::AdapterConfig)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Linear warmup steps.
    pub warmup: usize,
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Seed for init, data order and dropout.
    pub seed: u64,
    /// Write a checkpoint every N steps (None: only at the end).
    pub save_every: Option<usize>,
    /// Evaluate every N steps (None: only at the end).
    pub eval_every: Option<usize>,
    /// Rows of logits materialised at a time in the loss, at most (fewer where a vocabulary
    /// makes them over 24 MiB).
    pub loss_chunk: usize,
    /// LoRA+: `B` (and DoRA's magnitudes) learn at `lr ×` this (PEFT's `loraplus_lr_ratio`).
    #[serde(default)]
    pub lora_plus_ratio: Option<f64>,
    /// Recompute every k-th block's activations in the backward pass instead of keeping them
    /// (0: off, 1: every block).
    #[serde(default)]
    pub gradient_checkpointing: usize,
}

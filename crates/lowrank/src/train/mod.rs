//! Training LoRA adapters: the loss, the optimizer, the schedule, checkpoints, the loop.

pub mod checkpoint;
mod config;
mod loss;
pub mod metrics;
mod optim;
mod residual;
mod schedule;
mod step;
mod trainer;

pub use config::TrainConfig;
pub use loss::{chunked_cross_entropy, cross_entropy_sum, LossAndSurrogate};
pub use metrics::StepMetrics;
pub use optim::{global_norm, AdamW, AdamWConfig};
pub use residual::ResidualBase;
pub use schedule::{lr_at, Schedule};
pub use step::{collect_grads, forward_backward, row_targets, StepOutput, TrainSeq};
pub use trainer::{eval_loss, Observer, RunEnd, Trainer};

//! The training loop: accumulate, clip, step, evaluate, log, checkpoint — all visible in `run`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Tensor, Var};

use super::checkpoint::{self, CheckpointState};
use super::config::TrainConfig;
use super::loss::cross_entropy_sum;
use super::metrics::{self, StepMetrics};
use super::optim::{global_norm, AdamW};
use super::schedule::lr_at;
use super::step::{collect_grads, forward_backward, row_targets, TrainSeq};
use crate::adapter::{ActiveAdapter, Adapter, DropoutControl};
use crate::data::{BatchPlan, Examples};
use crate::model::{Model, SeqInput};
use crate::{Error, Result};

/// Hears about progress and may ask the loop to stop (Ctrl-C).
pub trait Observer {
    /// After every optimizer step.
    fn on_step(&mut self, metrics: &StepMetrics, total_steps: usize);
    /// Polled before every step; `true` makes the loop checkpoint and return.
    fn should_stop(&mut self) -> bool;
}

/// How [`Trainer::run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// All steps done.
    Finished,
    /// The observer asked to stop; a checkpoint was written.
    Stopped,
}

/// An adapter being trained on a frozen model.
pub struct Trainer<'a> {
    model: &'a Model,
    cfg: TrainConfig,
    adapter: Arc<Adapter>,
    vars: Vec<Var>,
    opt: AdamW,
    step: usize,
    out: PathBuf,
    dropout: Arc<DropoutControl>,
}

impl<'a> Trainer<'a> {
    /// Starts from `initial` (its tensors are copied into trainable variables).
    pub fn new(model: &'a Model, initial: &Adapter, cfg: TrainConfig, out: &Path) -> Result<Self> {
        if let Some(r) = cfg.lora_plus_ratio.filter(|r| !(r.is_finite() && *r > 0.0)) {
            return Err(Error::Training(format!("the LoRA+ ratio must be a positive number, not {r}")));
        }
        std::fs::create_dir_all(out).map_err(|e| Error::io("creating", out, e))?;
        let dropout = DropoutControl::new(initial.config.lora_dropout, cfg.seed);
        let (adapter, named) = initial.to_trainable(model.modules(), Some(&dropout))?;
        // LoRA+ (PEFT's create_loraplus_optimizer): lora_B and the 1-D DoRA magnitudes are "group B".
        let scales: Vec<f64> = named
            .iter()
            .map(|(name, v)| match cfg.lora_plus_ratio {
                Some(r) if name.contains(".lora_B.") || v.rank() == 1 => r,
                _ => 1.0,
            })
            .collect();
        let vars: Vec<Var> = named.into_iter().map(|(_, v)| v).collect();
        let opt = AdamW::new(vars.clone(), cfg.adamw)?.with_lr_scales(scales)?;
        Ok(Self { model, cfg, adapter: Arc::new(adapter), vars, opt, step: 0, out: out.into(), dropout })
    }

    /// Continues the run whose checkpoint is in `from` (a run directory or a checkpoint).
    pub fn resume(model: &'a Model, cfg: TrainConfig, out: &Path, from: &Path) -> Result<Self> {
        let ck = checkpoint::load(from, model.modules(), model.device())?;
        if ck.state.config != cfg {
            return Err(Error::Training(format!(
                "the checkpoint in {} was made with another configuration; resume with the same settings\n  checkpoint: {:?}\n  now:        {:?}",
                ck.dir.display(),
                ck.state.config,
                cfg
            )));
        }
        let mut t = Self::new(model, &ck.adapter, cfg, out)?;
        t.opt.load_state(&ck.optimizer, ck.state.step)?;
        t.step = ck.state.step;
        metrics::truncate(&t.out.join("metrics.jsonl"), t.step)?;
        Ok(t)
    }

    /// Optimizer steps completed.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The adapter (its tensors are the live variables).
    pub fn adapter(&self) -> &Arc<Adapter> {
        &self.adapter
    }

    /// Mean next-token loss over the target tokens of `examples` (no gradient).
    pub fn eval_loss(&self, examples: &(impl Examples + ?Sized)) -> Result<f64> {
        eval_loss(self.model, &self.active(), examples, self.cfg.batch_size, self.cfg.loss_chunk)
    }

    fn active(&self) -> [ActiveAdapter; 1] {
        [ActiveAdapter { adapter: self.adapter.clone(), weight: 1.0 }]
    }

    /// Writes a checkpoint of the current step.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let state = CheckpointState { step: self.step, config: self.cfg.clone() };
        checkpoint::save(&self.out, &state, &self.adapter, self.model.modules(), &self.opt)
    }

    /// Trains until `cfg.steps` optimizer steps are done or the observer asks to stop, reading
    /// each micro-batch from `train` when it is due; evaluates on `eval` (when it is not empty).
    pub fn run(
        &mut self,
        train: &(impl Examples + ?Sized),
        eval: &(impl Examples + ?Sized),
        obs: &mut dyn Observer,
    ) -> Result<RunEnd> {
        let cfg = self.cfg.clone();
        let plan = BatchPlan::new(train.len(), cfg.batch_size, cfg.seed);
        let metrics_path = self.out.join("metrics.jsonl");
        let active = self.active();
        while self.step < cfg.steps {
            if obs.should_stop() {
                self.save_checkpoint()?;
                return Ok(RunEnd::Stopped);
            }
            let started = Instant::now();
            let lr = lr_at(cfg.schedule, cfg.lr, self.step, cfg.steps, cfg.warmup);

            // Accumulate gradients over micro-batches; each contributes loss / grad_accum.
            let (mut loss, mut tokens) = (0.0, 0);
            let mut grads: Option<Vec<Tensor>> = None;
            self.dropout.set_enabled(true);
            for k in 0..cfg.grad_accum {
                let micro = self.step * cfg.grad_accum + k;
                self.dropout.set_micro_step(micro as u64);
                let batch = train.fetch(&plan.batch(micro))?;
                let seqs: Vec<TrainSeq> = batch.iter().map(|e| TrainSeq { ids: &e.ids, targets: &e.targets }).collect();
                let out = forward_backward(
                    self.model,
                    &active,
                    &seqs,
                    cfg.loss_chunk,
                    1.0 / cfg.grad_accum as f64,
                    cfg.gradient_checkpointing,
                )?;
                loss += out.loss;
                tokens += out.tokens;
                let g = collect_grads(&out.grads, &self.vars)?;
                grads = Some(match grads {
                    None => g,
                    Some(acc) => acc.iter().zip(&g).map(|(a, b)| a + b).collect::<candle_core::Result<_>>()?,
                });
            }
            self.dropout.set_enabled(false);
            let mut grads = grads.unwrap_or_default();

            // Clip the global norm (as torch.nn.utils.clip_grad_norm_), refuse non-finite values.
            let grad_norm = global_norm(&grads)?;
            if !loss.is_finite() || !grad_norm.is_finite() {
                return Err(Error::Training(format!(
                    "loss {loss} / gradient norm {grad_norm} at step {}: stopped before the update; the last good checkpoint is in {}",
                    self.step + 1,
                    self.out.join("checkpoints").display()
                )));
            }
            if let Some(max) = cfg.max_grad_norm {
                let coef = max / (grad_norm + 1e-6);
                if coef < 1.0 {
                    grads = grads.iter().map(|g| g * coef).collect::<candle_core::Result<_>>()?;
                }
            }

            self.opt.step(&grads, lr)?;
            self.step += 1;
            let param_norm = global_norm(&self.vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>())?;
            if !param_norm.is_finite() {
                return Err(Error::Training(format!(
                    "the adapter became non-finite at step {} (learning rate {lr}); the last good checkpoint is in {}",
                    self.step,
                    self.out.join("checkpoints").display()
                )));
            }

            // Training throughput: the step itself, not the evaluation that may follow it.
            let tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64();
            let due = |every: Option<usize>| every.is_some_and(|n| n > 0 && self.step.is_multiple_of(n));
            let eval_loss = if !eval.is_empty() && (due(cfg.eval_every) || self.step == cfg.steps) {
                Some(self.eval_loss(eval)?)
            } else {
                None
            };
            let m = StepMetrics { step: self.step, loss, eval_loss, lr, grad_norm, tokens_per_s };
            metrics::append(&metrics_path, &m)?;
            obs.on_step(&m, cfg.steps);
            if due(cfg.save_every) && self.step < cfg.steps {
                self.save_checkpoint()?;
            }
        }
        self.save_checkpoint()?;
        Ok(RunEnd::Finished)
    }
}

/// Mean next-token loss of `model` with `adapters` over the targets of `examples`.
pub fn eval_loss(
    model: &Model,
    adapters: &[ActiveAdapter],
    examples: &(impl Examples + ?Sized),
    batch_size: usize,
    chunk: usize,
) -> Result<f64> {
    let (mut sum, mut count) = (0.0, 0);
    let all: Vec<usize> = (0..examples.len()).collect();
    for indices in all.chunks(batch_size.max(1)) {
        let batch = examples.fetch(indices)?;
        let seqs: Vec<TrainSeq> = batch.iter().map(|e| TrainSeq { ids: &e.ids, targets: &e.targets }).collect();
        let inputs: Vec<SeqInput> = seqs.iter().map(|s| SeqInput { tokens: s.ids, adapters }).collect();
        let hidden = model.forward(&inputs, None)?.detach();
        let (s, c) = cross_entropy_sum(&hidden, model.output_head(), &row_targets(&seqs), chunk)?;
        sum += s;
        count += c;
    }
    if count == 0 {
        return Err(Error::Training("the evaluation set has no target tokens".into()));
    }
    Ok(sum / count as f64)
}

//! LoRA dropout on the adapter input during training, reproducible and resumable: the mask of a
//! module at a micro-step is a pure function of `(seed, micro-step, module id)`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};

use crate::Result;

/// Shared switch and clock for every dropout of one adapter.
#[derive(Debug)]
pub struct DropoutControl {
    p: f64,
    seed: u64,
    micro_step: AtomicU64,
    enabled: AtomicBool,
}

impl DropoutControl {
    /// Dropout probability `p` with `seed`; starts disabled.
    pub fn new(p: f64, seed: u64) -> Arc<Self> {
        Arc::new(Self { p, seed, micro_step: AtomicU64::new(0), enabled: AtomicBool::new(false) })
    }

    /// Turns dropout on (training) or off (evaluation, inference).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// Sets the clock (the trainer's global micro-batch index).
    pub fn set_micro_step(&self, step: u64) {
        self.micro_step.store(step, Ordering::SeqCst);
    }
}

/// The dropout of one module.
#[derive(Clone, Debug)]
pub struct Dropout {
    ctl: Arc<DropoutControl>,
    module: u64,
}

impl Dropout {
    /// Dropout for module `module` under `ctl`.
    pub fn new(ctl: Arc<DropoutControl>, module: usize) -> Self {
        Self { ctl, module: module as u64 }
    }

    /// Whether [`Dropout::apply`] changes its input now (enabled, `p > 0`).
    pub fn active(&self) -> bool {
        self.ctl.enabled.load(Ordering::SeqCst) && self.ctl.p > 0.0
    }

    /// `x` with each element zeroed with probability `p` and the rest scaled by `1/(1-p)`;
    /// `x` itself when disabled.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.ctl;
        if !c.enabled.load(Ordering::SeqCst) || c.p <= 0.0 {
            return Ok(x.clone());
        }
        let step = c.micro_step.load(Ordering::SeqCst);
        let key = c.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.module.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        let mut rng = rand::rngs::StdRng::seed_from_u64(key);
        let keep = (1.0 / (1.0 - c.p)) as f32;
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.random::<f64>() < c.p { 0.0 } else { keep }).collect();
        Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?)?)
    }
}

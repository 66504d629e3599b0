//! Plain LoRA: `Δy = s · x Aᵀ Bᵀ`.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::config::AdapterConfig;
use super::dropout::Dropout;
use super::AdapterLayer;
use crate::ops::{FrozenLinear, LowRank};
use crate::Result;

/// One LoRA pair for a `[M, K]` projection.
#[derive(Clone, Debug)]
pub struct LoraLayer {
    /// `A: [r, K]`.
    pub a: Tensor,
    /// `B: [M, r]`.
    pub b: Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)`).
    pub scale: f64,
    /// Dropout on the input while training.
    pub dropout: Option<Dropout>,
}

/// How `A` starts (PEFT's `init_lora_weights`); `B` starts at zero either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// `true` (the default): kaiming-uniform with a = √5, i.e. uniform on ±1/√K.
    Kaiming,
    /// `"gaussian"`: normal with standard deviation 1/r.
    Gaussian,
}

impl LoraInit {
    /// The init an adapter config asks for; an error for those lowrank cannot make.
    pub fn from_config(cfg: &AdapterConfig) -> Result<Self> {
        match cfg.raw.get("init_lora_weights") {
            None | Some(serde_json::Value::Bool(true)) => Ok(LoraInit::Kaiming),
            Some(serde_json::Value::String(s)) if s == "gaussian" => Ok(LoraInit::Gaussian),
            Some(v) => Err(crate::Error::InvalidArgument(format!(
                "init_lora_weights = {v}: only true (kaiming-uniform) and \"gaussian\" can initialise a new adapter (pissa, olora, loftq, ... are not supported)"
            ))),
        }
    }
}

impl LoraLayer {
    /// PEFT's init: `A` as `init` says, `B = 0`.
    pub fn init(r: usize, in_features: usize, out_features: usize, scale: f64, init: LoraInit, rng: &mut rand::rngs::StdRng, device: &Device) -> Result<Self> {
        let a: Vec<f32> = match init {
            LoraInit::Kaiming => {
                let bound = 1.0 / (in_features as f32).sqrt();
                (0..r * in_features).map(|_| rng.random_range(-bound..bound)).collect()
            }
            LoraInit::Gaussian => (0..r * in_features).map(|_| standard_normal(rng) / r as f32).collect(),
        };
        Ok(Self {
            a: Tensor::from_vec(a, (r, in_features), device)?,
            b: Tensor::zeros((out_features, r), DType::F32, device)?,
            scale,
            dropout: None,
        })
    }

    /// A seeded RNG for [`LoraLayer::init`].
    pub fn rng(seed: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(seed)
    }
}

/// One draw from N(0, 1) (Box–Muller).
fn standard_normal(rng: &mut rand::rngs::StdRng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

impl AdapterLayer for LoraLayer {
    fn forward(&self, x: &Tensor, _base_out: &Tensor, _base: &FrozenLinear) -> Result<Tensor> {
        let x = match &self.dropout {
            Some(d) => d.apply(x)?,
            None => x.clone(),
        };
        // [N, K] x [K, r] -> [N, r]; x [r, M] -> [N, M]. Scaling the narrow [N, r] (not the
        // [N, M] result, as PEFT writes it) saves one [N, M] tensor per projection in the graph.
        let h = (x.matmul(&self.a.t()?)? * self.scale)?;
        Ok(h.matmul(&self.b.t()?)?)
    }

    fn delta_weight(&self) -> Result<Tensor> {
        // [M, r] x [r, K] -> [M, K]
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }

    fn rank(&self) -> usize {
        self.a.dim(0).unwrap_or(0)
    }

    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("lora_A.weight", &self.a), ("lora_B.weight", &self.b)]
    }

    fn to_trainable(&self, dropout: Option<Dropout>) -> Result<super::Trainable> {
        let a = Var::from_tensor(&self.a.copy()?)?;
        let b = Var::from_tensor(&self.b.copy()?)?;
        let layer = LoraLayer { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale: self.scale, dropout };
        Ok((Box::new(layer), vec![("lora_A.weight", a), ("lora_B.weight", b)]))
    }

    fn low_rank(&self) -> Option<LowRank<'_>> {
        match self.dropout {
            None => Some(LowRank { a: &self.a, b: &self.b, scale: self.scale }),
            Some(_) => None,
        }
    }
}

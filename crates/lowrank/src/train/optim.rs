//! AdamW with decoupled weight decay (PyTorch's `torch.optim.AdamW`), state kept in named
//! tensors so checkpoints can save and restore it exactly.

use candle_core::{Tensor, Var};

use crate::Result;

/// AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// The optimizer: one `(m, v)` pair per parameter and the step count.
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Var>,
    lr_scales: Vec<f64>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
}

impl AdamW {
    /// A fresh optimizer over `params`.
    pub fn new(params: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        let m = params.iter().map(|p| p.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        let lr_scales = vec![1.0; params.len()];
        Ok(Self { config, params, lr_scales, m, v, step: 0 })
    }

    /// Per-parameter learning-rate multipliers (LoRA+: a higher rate for `B`), one per
    /// parameter in order.
    pub fn with_lr_scales(mut self, scales: Vec<f64>) -> Result<Self> {
        if scales.len() != self.params.len() {
            return Err(crate::Error::Training(format!(
                "{} learning-rate scales for {} parameters",
                scales.len(),
                self.params.len()
            )));
        }
        self.lr_scales = scales;
        Ok(self)
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One update with learning rate `lr` from `grads[i]` for `params[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let c = self.config;
        self.step += 1;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (p, g)) in self.params.iter().zip(grads).enumerate() {
            let lr = lr * self.lr_scales[i];
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            // θ ← θ(1 - lr·wd) - lr · m̂ / (√v̂ + ε)
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let theta = ((p.as_tensor() * (1.0 - lr * c.weight_decay))? - (update * lr)?)?;
            p.set(&theta)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The state as named tensors (`m.<i>`, `v.<i>`) and the step count.
    pub fn state(&self) -> (Vec<(String, Tensor)>, usize) {
        let mut out = Vec::with_capacity(2 * self.m.len());
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            out.push((format!("m.{i}"), m.clone()));
            out.push((format!("v.{i}"), v.clone()));
        }
        (out, self.step)
    }

    /// Restores a state written by [`AdamW::state`].
    pub fn load_state(&mut self, tensors: &std::collections::HashMap<String, Tensor>, step: usize) -> Result<()> {
        for i in 0..self.params.len() {
            for (name, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{name}.{i}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| crate::Error::Training(format!("optimizer state lacks `{key}`")))?;
                crate::model::check_shape(&key, slot.dims(), t.dims())?;
                *slot = t.clone();
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Global L2 norm of a set of gradients.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads {
        sum += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// torch.optim.AdamW(lr=0.1, weight_decay=0.01), 3 steps on p = [1, -2] with grad = 2p:
    ///   p = torch.tensor([1., -2.], requires_grad=True); opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01)
    ///   for _ in range(3): opt.zero_grad(); (p**2).sum().backward(); opt.step()
    ///   -> tensor([ 0.6989, -1.6949])
    #[test]
    fn matches_torch_adamw() -> Result<()> {
        let p = Var::new(&[1f32, -2.0], &Device::Cpu)?;
        let mut opt = AdamW::new(vec![p.clone()], AdamWConfig { weight_decay: 0.01, ..Default::default() })?;
        for _ in 0..3 {
            let g = (p.as_tensor() * 2.0)?;
            opt.step(&[g], 0.1)?;
        }
        let got = p.as_tensor().to_vec1::<f32>()?;
        assert!((got[0] - 0.6989).abs() < 1e-4 && (got[1] + 1.6949).abs() < 1e-4, "{got:?}");
        Ok(())
    }
}

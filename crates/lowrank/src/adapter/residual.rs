//! PiSSA and OLoRA start from the base weight: the init takes `s·B₀A₀` out of `W` (the base then
//! holds the residual `W − s·B₀A₀`) and trains `A`, `B` from there. What travels is either that
//! residual base with the adapter, or — what lowrank writes — the adapter expressed against the
//! original base, PEFT's `path_initial_model_for_weight_conversion`: `ΔW = s(B A − B₀A₀) =
//! s·[B | −B₀][A ; A₀]`, a plain LoRA of rank `2r` (alpha doubled, or times √2 with rsLoRA, so the
//! scale is unchanged) that loads on the unmodified base anywhere.

use candle_core::Tensor;

use super::config::LoraInit;
use super::lora::LoraLayer;
use super::target::plan;
use super::{Adapter, AdapterLayer};
use crate::module_table::ModuleTable;
use crate::{Error, Result};

impl Adapter {
    /// Whether this adapter's init took `s·B₀A₀` out of the base (PiSSA, OLoRA): the model it
    /// trains on must then hold the residual (`Model::unmerge` of the initial adapter).
    pub fn takes_from_base(&self) -> bool {
        matches!(LoraInit::from_config(&self.config), Ok(LoraInit::Pissa | LoraInit::Olora))
    }

    /// `self` (trained on the residual base left by `init`) as a plain LoRA against the original
    /// base: rank `2r`, `A' = [A ; A₀]`, `B' = [B | −B₀]`, `init_lora_weights = true`.
    pub fn relative_to_original(&self, init: &Adapter, table: &ModuleTable) -> Result<Adapter> {
        let err = |m: String| Error::Adapter { path: self.name.clone().into(), message: m };
        let mut config = self.config.clone();
        config.r *= 2;
        config.lora_alpha *= if config.use_rslora { std::f64::consts::SQRT_2 } else { 2.0 };
        config.rank_pattern.values_mut().for_each(|r| *r *= 2);
        config.alpha_pattern.values_mut().for_each(|a| *a *= 2.0);
        config.raw.insert("init_lora_weights".into(), serde_json::Value::Bool(true));
        let plans = plan(&config, table, std::path::Path::new(&self.name))?;
        let mut layers: Vec<Option<Box<dyn AdapterLayer>>> = Vec::with_capacity(table.len());
        for (id, p) in plans.iter().enumerate() {
            let (Some(p), Some(now), Some(start)) = (p, self.layer(id), init.layer(id)) else {
                layers.push(None);
                continue;
            };
            let factors = |l: &dyn AdapterLayer| -> Result<(Tensor, Tensor)> {
                match l.tensors().as_slice() {
                    [("lora_A.weight", a), ("lora_B.weight", b)] => Ok(((*a).clone(), (*b).clone())),
                    _ => Err(err(format!("module {id} is not a plain LoRA layer"))),
                }
            };
            let ((a, b), (a0, b0)) = (factors(now)?, factors(start)?);
            let a = Tensor::cat(&[&a, &a0], 0)?; // [2r, K]
            let b = Tensor::cat(&[&b, &b0.neg()?], 1)?; // [M, 2r]
            layers.push(Some(Box::new(LoraLayer { a, b, scale: p.scale, dropout: None })));
        }
        let mut out = Adapter::new(self.name.clone(), config, layers);
        out.path = self.path.clone();
        Ok(out)
    }
}

//! Combining weighted LoRA adapters into one, with PEFT's `add_weighted_adapter` semantics.
//!
//! For adapters `i` with weights `wᵢ` and scalings `sᵢ`, per adapted module:
//! * `linear` (all the same rank `r`): `A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ`, `B = Σ √|wᵢsᵢ|·Bᵢ`. Not
//!   `Σ wᵢΔWᵢ` in general (cross terms): PEFT calls it a rough approximation.
//! * `cat`: `A = [w₁s₁A₁; w₂s₂A₂; …]`, `B = [B₁ B₂ …]`, rank `Σ rᵢ` (zero-padded where a module
//!   lacks an adapter): exactly `Σ wᵢΔWᵢ`.
//! * `svd`: the best rank-`R` factors of `Σ wᵢΔWᵢ` (`R` given, or the largest input rank).
//!
//! The result has `lora_alpha = r` (scaling 1) and PEFT's other config fields from the first
//! adapter, with `rank_pattern` and `alpha_pattern` cleared — and `use_rslora` off: PEFT copies
//! it from the first adapter, which would scale the combined update by `√r` on load.

use std::collections::BTreeSet;

use candle_core::Tensor;

use super::config::ModuleSelector;
use super::{Adapter, AdapterLayer, LoraLayer};
use crate::model::ModuleTable;
use crate::ops::truncated_svd_of_product;
use crate::{Error, Result};

/// How to combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CombineMethod {
    /// Weighted sums of the A and B factors (same rank).
    Linear,
    /// Factors stacked: the rank is the sum of the ranks.
    Cat,
    /// Truncated SVD of the weighted sum of updates, to this rank (default: the largest input rank).
    Svd(Option<usize>),
}

/// The adapters `inputs` (with their weights) combined into a new adapter named `name`.
pub fn combine(inputs: &[(&Adapter, f64)], method: CombineMethod, table: &ModuleTable, name: &str) -> Result<Adapter> {
    let err = |m: String| Error::InvalidArgument(format!("combine: {m}"));
    let Some((first, _)) = inputs.first() else { return Err(err("no adapters given".into())) };
    if let Some((a, w)) = inputs.iter().find(|(_, w)| !w.is_finite()) {
        return Err(err(format!("weight {w} of {} is not finite", a.name)));
    }
    // PEFT: with a single adapter, `cat` is the same update as `linear`.
    let method = if inputs.len() == 1 && method == CombineMethod::Cat { CombineMethod::Linear } else { method };
    let ranks: Vec<usize> = inputs.iter().map(|(a, _)| a.config.rank_pattern.values().copied().fold(a.config.r, usize::max)).collect();
    let new_rank = match method {
        CombineMethod::Linear => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                let list: Vec<String> = inputs.iter().zip(&ranks).map(|((a, _), r)| format!("{} has r={r}", a.name)).collect();
                return Err(err(format!("linear needs adapters of one rank ({}); use --method cat or svd", list.join(", "))));
            }
            ranks[0]
        }
        CombineMethod::Cat => ranks.iter().sum(),
        CombineMethod::Svd(r) => r.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1)),
    };
    if new_rank == 0 {
        return Err(err("the combined rank must be positive".into()));
    }

    let mut layers: Vec<Option<Box<dyn AdapterLayer>>> = Vec::with_capacity(table.len());
    for (id, module) in table.modules().iter().enumerate() {
        let mut parts = Vec::new(); // (A [r, K], B [M, r], wᵢ·sᵢ)
        for (a, w) in inputs {
            let Some(layer) = a.layer(id) else { continue };
            let lr = layer.low_rank().ok_or_else(|| err(format!("{}: `{}` is not a plain LoRA layer", a.name, module.path)))?;
            parts.push((lr.a.clone(), lr.b.clone(), w * lr.scale));
        }
        if parts.is_empty() {
            layers.push(None);
            continue;
        }
        let (a, b) = match method {
            CombineMethod::Linear => linear(&parts).map_err(|e| err(format!("`{}`: {e}", module.path)))?,
            CombineMethod::Cat => cat(&parts, new_rank)?,
            CombineMethod::Svd(_) => svd(&parts, new_rank)?,
        };
        layers.push(Some(Box::new(LoraLayer { a, b, scale: 1.0, dropout: None })));
    }

    let mut config = first.config.clone();
    config.r = new_rank;
    config.lora_alpha = new_rank as f64;
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    config.use_rslora = false;
    config.target_modules = Some(union_of_targets(inputs, table)?);
    for key in ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules"] {
        config.raw.remove(key);
    }
    Ok(Adapter::new(name.to_string(), config, layers))
}

/// `A = Σ sign·√|c|·Aᵢ`, `B = Σ √|c|·Bᵢ` (`c = wᵢsᵢ`).
fn linear(parts: &[(Tensor, Tensor, f64)]) -> Result<(Tensor, Tensor)> {
    let mut a = (parts[0].0.zeros_like())?;
    let mut b = (parts[0].1.zeros_like())?;
    for (ai, bi, c) in parts {
        if ai.dims() != a.dims() || bi.dims() != b.dims() {
            return Err(Error::InvalidArgument(format!("ranks differ in this module ({:?} and {:?})", a.dims(), ai.dims())));
        }
        let root = c.abs().sqrt();
        a = (a + (ai * (root * c.signum()))?)?;
        b = (b + (bi * root)?)?;
    }
    Ok((a, b))
}

/// `A = [c₁A₁; c₂A₂; …; 0]`, `B = [B₁ B₂ … 0]`, padded to `rank`.
fn cat(parts: &[(Tensor, Tensor, f64)], rank: usize) -> Result<(Tensor, Tensor)> {
    let a_parts = parts.iter().map(|(a, _, c)| a * *c).collect::<candle_core::Result<Vec<_>>>()?;
    let mut a = Tensor::cat(&a_parts, 0)?;
    let mut b = Tensor::cat(&parts.iter().map(|(_, b, _)| b.clone()).collect::<Vec<_>>(), 1)?;
    let used = a.dim(0)?;
    if used < rank {
        let k = a.dim(1)?;
        let m = b.dim(0)?;
        let (a0, b0) = (Tensor::zeros((rank - used, k), a.dtype(), a.device())?, Tensor::zeros((m, rank - used), b.dtype(), b.device())?);
        a = Tensor::cat(&[&a, &a0], 0)?;
        b = Tensor::cat(&[&b, &b0], 1)?;
    }
    Ok((a, b))
}

/// The rank-`rank` SVD factors of `Σ cᵢ Bᵢ Aᵢ`, computed from the stacked factors in f64.
fn svd(parts: &[(Tensor, Tensor, f64)], rank: usize) -> Result<(Tensor, Tensor)> {
    let (a, b) = cat(parts, 0)?; // [R, K], [M, R] with the weights in A
    let (inner, k) = a.dims2()?;
    let m = b.dim(0)?;
    let to64 = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1()?) };
    let (b2, a2) = truncated_svd_of_product(&to64(&b)?, m, inner, &to64(&a)?, k, rank);
    let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let dev = a.device();
    Ok((Tensor::from_vec(to32(a2), (rank, k), dev)?, Tensor::from_vec(to32(b2), (m, rank), dev)?))
}

/// PEFT's union of target modules: lists are merged; strings (regexes) are joined as
/// `(p1)|(p2)`; a mix is refused, as PEFT refuses it. `all-linear` counts as the list it stands for.
fn union_of_targets(inputs: &[(&Adapter, f64)], table: &ModuleTable) -> Result<ModuleSelector> {
    let mut lists: Vec<Vec<String>> = Vec::new();
    let mut patterns: Vec<String> = Vec::new();
    for (a, _) in inputs {
        match &a.config.target_modules {
            Some(ModuleSelector::Pattern(p)) if p.eq_ignore_ascii_case("all-linear") => {
                lists.push(table.modules().iter().map(|m| m.path.clone()).filter(|p| p != "lm_head").collect())
            }
            Some(ModuleSelector::Pattern(p)) => patterns.push(p.clone()),
            Some(ModuleSelector::List(l)) => lists.push(l.clone()),
            None => return Err(Error::Adapter { path: a.path.clone().unwrap_or_default(), message: "target_modules is missing".into() }),
        }
    }
    match (lists.is_empty(), patterns.is_empty()) {
        (true, false) => Ok(ModuleSelector::Pattern(patterns.iter().map(|p| format!("({p})")).collect::<Vec<_>>().join("|"))),
        (false, true) => Ok(ModuleSelector::List(lists.into_iter().flatten().collect::<BTreeSet<_>>().into_iter().collect())),
        _ => Err(Error::InvalidArgument(
            "combine: the adapters' target_modules mix lists and regex strings; PEFT cannot represent their union either".into(),
        )),
    }
}

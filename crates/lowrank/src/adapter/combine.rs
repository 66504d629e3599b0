//! Combining weighted LoRA adapters into one, with PEFT's `add_weighted_adapter` semantics.
//!
//! For adapters `i` with weights `wᵢ` and scalings `sᵢ`, per adapted module:
//! * `linear` (all the same rank `r`): `A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ`, `B = Σ √|wᵢsᵢ|·Bᵢ`. Not
//!   `Σ wᵢΔWᵢ` in general (cross terms): PEFT calls it a rough approximation.
//! * `cat`: `A = [w₁s₁A₁; w₂s₂A₂; …]`, `B = [B₁ B₂ …]`, rank `Σ rᵢ` (zero-padded where a module
//!   lacks an adapter): exactly `Σ wᵢΔWᵢ`.
//! * `svd`: the best rank-`R` factors of `Σ wᵢΔWᵢ` (`R` given, or the largest input rank).
//! * `ties` and `magnitude_prune` (same ranks), on the A and B factors with the `linear`
//!   weights: each factor keeps its largest `density` fraction of entries by magnitude; TIES
//!   then elects a sign per entry (from the sum, or the count, of the pruned factors) and averages
//!   the weighted entries that agree with it; magnitude pruning sums them.
//!
//! The result has `lora_alpha = r` (scaling 1) and PEFT's other config fields from the first
//! adapter, with `rank_pattern` and `alpha_pattern` cleared — and `use_rslora` off: PEFT copies
//! it from the first adapter, which would scale the combined update by `√r` on load.

use std::collections::BTreeSet;

use candle_core::Tensor;

use super::config::ModuleSelector;
use super::{Adapter, AdapterLayer, LoraLayer};
use crate::kernels::truncated_svd_of_product;
use crate::module_table::ModuleTable;
use crate::{Error, Result};

/// How to combine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CombineMethod {
    /// Weighted sums of the A and B factors (same rank).
    Linear,
    /// Factors stacked: the rank is the sum of the ranks.
    Cat,
    /// Truncated SVD of the weighted sum of updates, to this rank (default: the largest input rank).
    Svd(Option<usize>),
    /// TIES on the factors (same ranks): prune to `density`, elect signs, average agreeing entries.
    Ties {
        /// Fraction of each factor's entries kept, in `[0, 1]`.
        density: f64,
        /// How the sign of each entry is elected.
        sign: MajoritySign,
    },
    /// Factors pruned to `density` by magnitude, then summed with weights (same ranks).
    MagnitudePrune {
        /// Fraction of each factor's entries kept, in `[0, 1]`.
        density: f64,
    },
}

impl CombineMethod {
    /// PEFT's `combination_type`.
    pub fn name(&self) -> &'static str {
        match self {
            CombineMethod::Linear => "linear",
            CombineMethod::Cat => "cat",
            CombineMethod::Svd(_) => "svd",
            CombineMethod::Ties { .. } => "ties",
            CombineMethod::MagnitudePrune { .. } => "magnitude_prune",
        }
    }
}

/// How TIES elects each entry's sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MajoritySign {
    /// The sign of the sum of the pruned values.
    Total,
    /// The sign most values have.
    Frequency,
}

/// How the per-adapter factors of one module are merged.
#[derive(Clone, Copy)]
enum FactorMerge {
    Sum,
    Prune(f64),
    Ties(f64, MajoritySign),
}

/// The adapters `inputs` (with their weights) combined into a new adapter named `name`.
pub fn combine(inputs: &[(&Adapter, f64)], method: CombineMethod, table: &ModuleTable, name: &str) -> Result<Adapter> {
    let err = |m: String| Error::NewAdapter(format!("combine: {m}"));
    let Some((first, _)) = inputs.first() else { return Err(err("no adapters given".into())) };
    if let Some((a, w)) = inputs.iter().find(|(_, w)| !w.is_finite()) {
        return Err(err(format!("weight {w} of {} is not finite", a.name)));
    }
    if let Some((a, _)) = inputs.iter().find(|(a, _)| a.config.use_dora) {
        return Err(err(format!("{} is a DoRA adapter: its update rescales the base weight, so it has no low-rank factors to combine (merge it instead)", a.name)));
    }
    // PEFT: with a single adapter, `cat` is the same update as `linear`.
    let method = if inputs.len() == 1 && method == CombineMethod::Cat { CombineMethod::Linear } else { method };
    let ranks: Vec<usize> =
        inputs.iter().map(|(a, _)| a.config.rank_pattern.values().copied().fold(a.config.r, usize::max)).collect();
    let factor_merge = match method {
        CombineMethod::Ties { density, sign } => Some(FactorMerge::Ties(density, sign)),
        CombineMethod::MagnitudePrune { density } => Some(FactorMerge::Prune(density)),
        CombineMethod::Linear => Some(FactorMerge::Sum),
        _ => None,
    };
    if let CombineMethod::Ties { density, .. } | CombineMethod::MagnitudePrune { density } = method {
        if !(0.0..=1.0).contains(&density) {
            return Err(err(format!("density {density} is outside [0, 1]")));
        }
    }
    let new_rank = match method {
        CombineMethod::Linear | CombineMethod::Ties { .. } | CombineMethod::MagnitudePrune { .. } => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                let list: Vec<String> =
                    inputs.iter().zip(&ranks).map(|((a, _), r)| format!("{} has r={r}", a.name)).collect();
                return Err(err(format!(
                    "{} needs adapters of one rank ({}); use --method cat or svd",
                    method.name(),
                    list.join(", ")
                )));
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
            let lr = layer
                .low_rank()
                .ok_or_else(|| err(format!("{}: `{}` is not a plain LoRA layer", a.name, module.path)))?;
            parts.push((lr.a.clone(), lr.b.clone(), w * lr.scale));
        }
        if parts.is_empty() {
            layers.push(None);
            continue;
        }
        let (a, b) = match (method, factor_merge) {
            (_, Some(how)) => factors(&parts, how).map_err(|e| err(format!("`{}`: {e}", module.path)))?,
            (CombineMethod::Svd(_), _) => svd(&parts, new_rank)?,
            _ => cat(&parts, new_rank)?,
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

/// PEFT's weights for the factors (`c = wᵢsᵢ`): `sign(c)·√|c|` on A, `√|c|` on B; each list of
/// factors merged by `how` (`Sum`: `A = Σ sign·√|c|·Aᵢ`, `B = Σ √|c|·Bᵢ`).
fn factors(parts: &[(Tensor, Tensor, f64)], how: FactorMerge) -> Result<(Tensor, Tensor)> {
    let (a0, b0) = (&parts[0].0, &parts[0].1);
    if parts.iter().any(|(a, b, _)| a.dims() != a0.dims() || b.dims() != b0.dims()) {
        return Err(Error::NewAdapter(format!("ranks differ in this module ({:?} and others)", a0.dims())));
    }
    let wa: Vec<f64> = parts.iter().map(|(_, _, c)| c.abs().sqrt() * c.signum()).collect();
    let wb: Vec<f64> = parts.iter().map(|(_, _, c)| c.abs().sqrt()).collect();
    let values =
        |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?) };
    let a: Vec<Vec<f32>> = parts.iter().map(|(a, _, _)| values(a)).collect::<Result<_>>()?;
    let b: Vec<Vec<f32>> = parts.iter().map(|(_, b, _)| values(b)).collect::<Result<_>>()?;
    let dev = a0.device();
    Ok((
        Tensor::from_vec(merge_tasks(&a, &wa, how), a0.shape(), dev)?,
        Tensor::from_vec(merge_tasks(&b, &wb, how), b0.shape(), dev)?,
    ))
}

/// PEFT's task merging (`merge_utils`) of equally shaped `tasks` with `weights`.
fn merge_tasks(tasks: &[Vec<f32>], weights: &[f64], how: FactorMerge) -> Vec<f32> {
    let n = tasks[0].len();
    let pruned: Vec<Vec<f32>> = match how {
        FactorMerge::Sum => tasks.to_vec(),
        FactorMerge::Prune(d) | FactorMerge::Ties(d, _) => tasks.iter().map(|t| prune(t, d)).collect(),
    };
    (0..n)
        .map(|e| match how {
            FactorMerge::Sum | FactorMerge::Prune(_) => pruned.iter().zip(weights).map(|(t, &w)| t[e] * w as f32).sum(),
            FactorMerge::Ties(_, sign) => {
                // The elected sign: of the sum (total) or of the count of signs (frequency).
                let score: f32 = match sign {
                    MajoritySign::Total => pruned.iter().map(|t| t[e]).sum(),
                    MajoritySign::Frequency => pruned.iter().map(|t| signum(t[e])).sum(),
                };
                let elected = if score >= 0.0 { 1.0 } else { -1.0 };
                let agree: Vec<usize> = (0..pruned.len()).filter(|&i| signum(pruned[i][e]) == elected).collect();
                let sum: f32 = agree.iter().map(|&i| pruned[i][e] * weights[i] as f32).sum();
                sum / (agree.len().max(1) as f32)
            }
        })
        .collect()
}

/// `torch.sign`: 0 for 0.
fn signum(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The entries of largest magnitude, `int(density · len)` of them, the rest zeroed.
fn prune(t: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()));
    let mut out = vec![0f32; t.len()];
    for &i in &order[..k] {
        out[i] = t[i];
    }
    out
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
        let (a0, b0) = (
            Tensor::zeros((rank - used, k), a.dtype(), a.device())?,
            Tensor::zeros((m, rank - used), b.dtype(), b.device())?,
        );
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
    let (b2, a2) = truncated_svd_of_product(&to64(&b)?, m, inner, &to64(&a)?, k, rank)
        .ok_or_else(|| Error::NewAdapter("the SVD combination needs finite adapter weights".into()))?;
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
            None => {
                return Err(Error::Adapter {
                    path: a.path.clone().unwrap_or_default(),
                    message: "target_modules is missing".into(),
                })
            }
        }
    }
    match (lists.is_empty(), patterns.is_empty()) {
        (true, false) => Ok(ModuleSelector::Pattern(patterns.iter().map(|p| format!("({p})")).collect::<Vec<_>>().join("|"))),
        (false, true) => Ok(ModuleSelector::List(lists.into_iter().flatten().collect::<BTreeSet<_>>().into_iter().collect())),
        _ => Err(Error::NewAdapter(
            "combine: the adapters' target_modules mix lists and regex strings; PEFT cannot represent their union either".into(),
        )),
    }
}

//! Plain LoRA: `Δy = s · x Aᵀ Bᵀ`.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::config::LoraInit;
use super::dropout::Dropout;
use super::AdapterLayer;
use crate::ops::{lora_linear, FrozenLinear, LowRank};
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

impl LoraLayer {
    /// PEFT's init: `A` as `init` says, `B = 0`.
    pub fn init(
        r: usize,
        in_features: usize,
        out_features: usize,
        scale: f64,
        init: LoraInit,
        rng: &mut rand::rngs::StdRng,
        device: &Device,
    ) -> Result<Self> {
        let a: Vec<f32> = match init {
            LoraInit::Kaiming => {
                let bound = 1.0 / (in_features as f32).sqrt();
                (0..r * in_features).map(|_| rng.random_range(-bound..bound)).collect()
            }
            LoraInit::Gaussian => (0..r * in_features).map(|_| standard_normal(rng) / r as f32).collect(),
            LoraInit::Pissa | LoraInit::Olora => {
                return Err(crate::Error::NewAdapter(
                    "pissa and olora start from the base weight: use LoraLayer::from_weight".into(),
                ))
            }
        };
        Ok(Self {
            a: Tensor::from_vec(a, (r, in_features), device)?,
            b: Tensor::zeros((out_features, r), DType::F32, device)?,
            scale,
            dropout: None,
        })
    }

    /// PiSSA's or OLoRA's start from the frozen weight `w: [M, K]` (PEFT's `pissa_init` /
    /// `olora_init`): the layer, whose `s·B A` the base must then give up (see
    /// [`Adapter::residual_base`](super::Adapter)).
    pub fn from_weight(w: &Tensor, r: usize, scale: f64, init: LoraInit) -> Result<Self> {
        let (m, k) = w.dims2()?;
        if r > m.min(k) {
            return Err(crate::Error::NewAdapter(format!("rank {r} exceeds the {m}×{k} weight's")));
        }
        let wv: Vec<f64> = w.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let (b, a) = match init {
            // B = V_r sqrt(S_r / s), A = sqrt(S_r / s) U_rᵀ (PEFT names W's SVD V S Uᵀ).
            LoraInit::Pissa => {
                let (u, sv, vt) = if m.min(k) <= EXACT_SVD_MAX {
                    crate::kernels::top_svd(&wv, m, k, r).ok_or_else(non_finite)?
                } else {
                    randomized_top_svd(w, r)?
                };
                let root: Vec<f64> = sv.iter().map(|x| (x / scale).sqrt()).collect();
                let b: Vec<f64> = (0..m * r).map(|i| u[i] * root[i % r]).collect();
                let a: Vec<f64> = (0..r * k).map(|i| vt[i] * root[i / k]).collect();
                (b, a)
            }
            LoraInit::Olora => crate::kernels::leading_qr(&wv, m, k, r).ok_or_else(non_finite)?,
            LoraInit::Kaiming | LoraInit::Gaussian => {
                return Err(crate::Error::NewAdapter("from_weight is for pissa and olora".into()))
            }
        };
        let dev = w.device();
        let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        Ok(Self {
            a: Tensor::from_vec(f32s(a), (r, k), dev)?,
            b: Tensor::from_vec(f32s(b), (m, r), dev)?,
            scale,
            dropout: None,
        })
    }

    /// A seeded RNG for [`LoraLayer::init`].
    pub fn rng(seed: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(seed)
    }
}

fn non_finite() -> crate::Error {
    crate::Error::NewAdapter("PiSSA and OLoRA need a finite base weight".into())
}

/// Up to this `min(M, K)`, PiSSA's SVD is exact (`min(M, K)²·max(M, K)`); above it, randomized.
const EXACT_SVD_MAX: usize = 256;

/// Power iterations of [`randomized_top_svd`].
const POWER_ITERATIONS: usize = 24;

/// The top `r` singular triplets of `w: [M, K]` by randomized subspace iteration (Halko et al.):
/// a block of `2r` vectors, [`POWER_ITERATIONS`] rounds of `Wᵀ`/`W` products (f32 gemm) with
/// re-orthonormalisation (f64), then the exact SVD of the `2r × K` projection. Its error in a
/// component shrinks like `(σ_{2r+1} / σ_j)^(2q+1)`: below f32 rounding for the separated top
/// singular values of trained weights.
fn randomized_top_svd(w: &Tensor, r: usize) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let (m, k) = w.dims2()?;
    let q = (2 * r).min(m.min(k));
    let dev = w.device();
    let w = w.to_dtype(DType::F32)?;
    let wt = w.t()?.contiguous()?;
    let to_t = |v: &[f64], rows: usize, cols: usize| -> Result<Tensor> {
        Ok(Tensor::from_vec(v.iter().map(|&x| x as f32).collect::<Vec<f32>>(), (rows, cols), dev)?)
    };
    let to_v = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
    // A fixed start (a function of the shape): the init is reproducible.
    let mut rng = rand::rngs::StdRng::seed_from_u64((m * 1_000_003 + k) as u64);
    let omega: Vec<f64> = (0..k * q).map(|_| standard_normal(&mut rng) as f64).collect();
    let mut y = crate::kernels::orthonormal_columns(&to_v(&w.matmul(&to_t(&omega, k, q)?)?)?, m, q); // [m, q]
    for _ in 0..POWER_ITERATIONS {
        let z = crate::kernels::orthonormal_columns(&to_v(&wt.matmul(&to_t(&y, m, q)?)?)?, k, q); // [k, q]
        y = crate::kernels::orthonormal_columns(&to_v(&w.matmul(&to_t(&z, k, q)?)?)?, m, q);
    }
    let small = to_v(&to_t(&y, m, q)?.t()?.matmul(&w)?)?; // Qᵀ W: [q, k]
    let (us, s, vt) = crate::kernels::top_svd(&small, q, k, r).ok_or_else(non_finite)?; // [q, r], [r], [r, k]
    let u: Vec<f64> = (0..m * r).map(|idx| (0..q).map(|t| y[(idx / r) * q + t] * us[t * r + idx % r]).sum()).collect();
    Ok((u, s, vt))
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

    /// The factors, unless dropout is drawing masks now: a trainer's layers always carry a
    /// [`Dropout`], which with p = 0 (the default) or outside training never drops anything, and
    /// must not keep them off the fused path (it did: `lowrank train` ran every projection
    /// unfused, 1.2 GB and a third of a step more than the same step with the fused op).
    fn low_rank(&self) -> Option<LowRank<'_>> {
        match &self.dropout {
            Some(d) if d.active() => None,
            _ => Some(LowRank { a: &self.a, b: &self.b, scale: self.scale }),
        }
    }

    /// `x Wᵀ + bias + weight · s · x Aᵀ Bᵀ` as one op (no dropout), where the fused kernel
    /// applies.
    fn fused(&self, x: &Tensor, base: &FrozenLinear, weight: f64) -> Result<Option<Tensor>> {
        let Some(lr) = self.low_rank() else { return Ok(None) };
        let Some(y) = lora_linear(x, base.weight(), &LowRank { scale: lr.scale * weight, ..lr })? else {
            return Ok(None);
        };
        Ok(Some(match base.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trainer's layer carries a dropout; only while it draws masks (p > 0, enabled) does the
    /// layer leave the fused op.
    #[test]
    fn dropout_keeps_the_fused_path_unless_it_drops() -> Result<()> {
        use crate::adapter::{Dropout, DropoutControl};
        let dev = Device::Cpu;
        let (a, b) = (Tensor::ones((2, 8), DType::F32, &dev)?, Tensor::ones((4, 2), DType::F32, &dev)?);
        for (p, enabled, fused) in [(0.0, true, true), (0.0, false, true), (0.1, false, true), (0.1, true, false)] {
            let ctl = DropoutControl::new(p, 1);
            ctl.set_enabled(enabled);
            let layer = LoraLayer { a: a.clone(), b: b.clone(), scale: 1.0, dropout: Some(Dropout::new(ctl, 0)) };
            assert_eq!(layer.low_rank().is_some(), fused, "p {p}, enabled {enabled}");
        }
        Ok(())
    }

    /// The randomized SVD PiSSA uses above [`EXACT_SVD_MAX`] finds the exact top triplets of a
    /// matrix with a trained weight's kind of spectrum (a power-law head over a noise floor).
    #[test]
    fn randomized_svd_finds_the_exact_top_triplets() -> Result<()> {
        let (m, k, r) = (300, 270, 4);
        let mut rng = LoraLayer::rng(5);
        let mut gauss = |n: usize| (0..n).map(|_| standard_normal(&mut rng) as f64).collect::<Vec<f64>>();
        let u = crate::kernels::orthonormal_columns(&gauss(m * k), m, k);
        let v = crate::kernels::orthonormal_columns(&gauss(k * k), k, k);
        let sigma: Vec<f64> = (0..k).map(|j| 10.0 / (1.0 + j as f64).powf(0.7) + 0.05).collect();
        let w: Vec<f32> = (0..m * k)
            .map(|idx| (0..k).map(|t| u[(idx / k) * k + t] * sigma[t] * v[(idx % k) * k + t]).sum::<f64>() as f32)
            .collect();
        let wt = Tensor::from_vec(w, (m, k), &Device::Cpu)?;
        let (ru, rs, rvt) = randomized_top_svd(&wt, r)?;
        for j in 0..r {
            assert!((rs[j] - sigma[j]).abs() < 1e-4 * sigma[j], "σ{j}: {} vs {}", rs[j], sigma[j]);
            let dot_u: f64 = (0..m).map(|i| ru[i * r + j] * u[i * k + j]).sum();
            let dot_v: f64 = (0..k).map(|i| rvt[j * k + i] * v[i * k + j]).sum();
            assert!(
                dot_u.abs() > 1.0 - 1e-5 && (dot_u * dot_v - 1.0).abs() < 1e-5,
                "component {j}: |u·u'| {dot_u}, v·v' {dot_v}"
            );
        }
        Ok(())
    }
}

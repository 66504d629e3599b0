//! The gated MLP activation `act(g) ⊙ u` as one op with a backward: SwiGLU (`silu`, Llama, Qwen,
//! Phi) and GeGLU (`gelu_pytorch_tanh`, Gemma).
//!
//! From candle ops it is several graph nodes (the activation's parts, then the product), each
//! keeping an `[N, I]` tensor and producing zero-filled `[N, I]` gradients; here the forward keeps
//! nothing but its inputs and the backward writes both gradients in one pass.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::exp;
use crate::kernels::{stored, values};
use crate::{Error, Result};

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// The activation of the gate projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu(g) = g · σ(g)` (transformers' `silu`).
    Silu,
    /// `gelu_pytorch_tanh`: `g/2 · (1 + tanh(√(2/π) · (g + 0.044715 g³)))`.
    GeluTanh,
}

impl Activation {
    /// The activation named by an HF config's `hidden_act` / `hidden_activation`.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu_pytorch_tanh" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    /// The HF config name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::GeluTanh => "gelu_pytorch_tanh",
        }
    }

    /// `(act(g), act'(g))`.
    #[inline(always)]
    fn value_and_slope(self, g: f32) -> (f32, f32) {
        match self {
            Self::Silu => {
                let s = 1.0 / (1.0 + exp(-g));
                // d silu(g)/dg = σ(g) · (1 + g · (1 − σ(g)))
                (g * s, s * (1.0 + g * (1.0 - s)))
            }
            Self::GeluTanh => {
                const BETA: f32 = 0.797_884_6; // √(2/π)
                const KAPPA: f32 = 0.044715;
                let t = (BETA * (g + KAPPA * g * g * g)).tanh();
                let slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * BETA * (1.0 + 3.0 * KAPPA * g * g);
                (0.5 * g * (1.0 + t), slope)
            }
        }
    }
}

/// `g, u: [..] -> act(g) ⊙ u` (same shape).
pub fn glu(g: &Tensor, u: &Tensor, act: Activation) -> Result<Tensor> {
    if g.shape() != u.shape() {
        return Err(Error::Batch(format!("glu: gate {:?} and up {:?} differ", g.dims(), u.dims())));
    }
    if g.device().is_cpu() && g.dtype() == DType::F32 && u.dtype() == DType::F32 {
        return Ok(g.contiguous()?.apply_op2(&u.contiguous()?, Glu(act))?);
    }
    let a = match act {
        Activation::Silu => g.silu()?,
        Activation::GeluTanh => g.gelu()?, // candle's gelu is the tanh approximation
    };
    Ok((a * u)?)
}

struct Glu(Activation);

/// `y = act(g) ⊙ u`, element by element.
#[inline(always)]
fn forward_rows(act: Activation, g: &[f32], u: &[f32], y: &mut [f32]) {
    // One loop per activation, so each is a plain element loop the compiler vectorises.
    match act {
        Activation::Silu => {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = Activation::Silu.value_and_slope(g).0 * u;
            }
        }
        Activation::GeluTanh => {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = Activation::GeluTanh.value_and_slope(g).0 * u;
            }
        }
    }
}

/// `dg = d ⊙ u ⊙ act'(g)`, `du = d ⊙ act(g)`, element by element.
#[inline(always)]
fn backward_rows(act: Activation, g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
    #[inline(always)]
    fn each(act: Activation, g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(d) {
            let (a, slope) = act.value_and_slope(g);
            *dg = d * u * slope;
            *du = d * a;
        }
    }
    match act {
        Activation::Silu => each(Activation::Silu, g, u, d, dg, du),
        Activation::GeluTanh => each(Activation::GeluTanh, g, u, d, dg, du),
    }
}

/// [`forward_rows`] in 16-lane AVX-512 where the CPU has it (the crate is built for baseline
/// x86-64, so only a function compiled for the feature gets the wide loop).
fn forward(act: Activation, g: &[f32], u: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(act: Activation, g: &[f32], u: &[f32], y: &mut [f32]) {
            forward_rows(act, g, u, y)
        }
        // SAFETY: the CPU has AVX-512F, checked above.
        return unsafe { avx512(act, g, u, y) };
    }
    forward_rows(act, g, u, y)
}

/// [`backward_rows`], likewise.
fn backward(act: Activation, g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(act: Activation, g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
            backward_rows(act, g, u, d, dg, du)
        }
        // SAFETY: the CPU has AVX-512F, checked above.
        return unsafe { avx512(act, g, u, d, dg, du) };
    }
    backward_rows(act, g, u, d, dg, du)
}

impl CustomOp2 for Glu {
    fn name(&self) -> &'static str {
        "glu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (values(s1, l1)?, values(s2, l2)?);
        let mut y = vec![0f32; g.len()];
        let act = self.0;
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| forward(act, g, u, y));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let ((sg, lg), (su, lu), (sd, ld)) = (g.storage_and_layout(), u.storage_and_layout(), dy.storage_and_layout());
        let (gv, uv, dv) = (stored(&sg, lg)?, stored(&su, lu)?, stored(&sd, ld)?);
        if uv.len() != gv.len() || dv.len() != gv.len() {
            candle_core::bail!("glu backward: gate, up and gradient differ in size")
        }
        let (mut dg, mut du) = (vec![0f32; gv.len()], vec![0f32; gv.len()]);
        let act = self.0;
        dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).enumerate().for_each(|(i, (dg, du))| {
            let at = i * CHUNK;
            let (gv, uv, dv) = (&gv[at..at + dg.len()], &uv[at..at + dg.len()], &dv[at..at + dg.len()]);
            backward(act, gv, uv, dv, dg, du)
        });
        let dev = g.device();
        Ok((Some(Tensor::from_vec(dg, lg.shape(), dev)?), Some(Tensor::from_vec(du, lu.shape(), dev)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn equals_act_times_up_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&Tensor::randn(0f32, 3.0, (70, 300), &dev)?)?;
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (70, 300), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (70, 300), &dev)?;
        for (act, reference) in
            [(Activation::Silu, g.as_tensor().silu()?), (Activation::GeluTanh, g.as_tensor().gelu()?)]
        {
            let got = glu(g.as_tensor(), u.as_tensor(), act)?;
            let want = (reference * u.as_tensor())?;
            let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?) };
            assert!(diff(&got, &want)? < 1e-5, "{act:?}: forward differs by {}", diff(&got, &want)?);
            let (gr, gr_ref) = ((got * &up)?.sum_all()?.backward()?, (want * &up)?.sum_all()?.backward()?);
            for (name, v) in [("gate", &g), ("up", &u)] {
                let (a, b) = (gr.get(v.as_tensor()).expect("grad"), gr_ref.get(v.as_tensor()).expect("grad"));
                assert!(diff(a, b)? < 1e-4, "{act:?}: d{name} differs by {}", diff(a, b)?);
            }
        }
        Ok(())
    }
}

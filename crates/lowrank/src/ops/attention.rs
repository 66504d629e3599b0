//! Causal self-attention as one op with a backward: `softmax(cap(q kᵀ · scale) + mask) v` per
//! head, where `cap(x) = c · tanh(x / c)` when the model soft-caps its scores (Gemma 2) and
//! `cap(x) = x` otherwise.
//!
//! Queries are processed a block of rows at a time against only the keys they can see
//! (FlashAttention's tiling, on CPU): the `[heads, T, S]` score matrix is never held, the
//! masked-out upper triangle is never computed, and the backward recomputes each block's
//! probabilities from `q` and `k` instead of keeping them in the graph. Every product is a
//! strided `gemm`, so the `[tokens, heads, D]` layout needs no transposes.
//!
//! Layout: rows are tokens; `q: [Nq, heads, D]`, `k, v: [Nk, kv, D]`, output `[Nq, heads, D]`.
//! A [`Segment`] is one sequence: its query rows, its key rows, and query `t` at position
//! `past + t` where `past = k_len - q_len` (keys already cached). Query heads share kv heads in
//! groups of `heads / kv` (GQA): head `h` reads kv head `h / (heads / kv)`.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use std::borrow::Cow;

use super::rope::rotate;
use super::{apply_rope, softmax_last_dim};
use crate::kernels::{exp_shifted, gemm, Mat};
use crate::kernels::{stored, values};
use crate::{Error, Result};

/// Query rows per tile: a `[BLOCK, S]` score tile stays in L2 for the lengths we train on.
const BLOCK: usize = 64;

/// One sequence's rows in the flattened batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First query row in `q`.
    pub q_start: usize,
    /// Query rows (new tokens).
    pub q_len: usize,
    /// First key row in `k` and `v`.
    pub k_start: usize,
    /// Key rows: the cached tokens followed by the new ones.
    pub k_len: usize,
}

/// How a layer scores its keys.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    /// Multiplies `q kᵀ`: `1/√D` for most models, `query_pre_attn_scalar^-1/2` for Gemma.
    pub scale: f32,
    /// `c` of `c · tanh(x / c)` applied to the scaled scores (Gemma 2's `attn_logit_softcapping`).
    pub softcap: Option<f32>,
    /// Keys this many positions back or further are masked (sliding-window layers).
    pub window: Option<usize>,
}

impl Scores {
    /// `1/√head_dim`, no cap, no window.
    pub fn plain(head_dim: usize) -> Self {
        Self { scale: 1.0 / (head_dim as f32).sqrt(), softcap: None, window: None }
    }
}

/// `q: [Nq, heads, D]`, `k, v: [Nk, kv, D]` -> `[Nq, heads, D]`: every segment's queries attend
/// causally (and within the window, if any) to that segment's keys, scored as `scores` says.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, segments: &[Segment], scores: Scores) -> Result<Tensor> {
    let op = Attention::new(q, k, v, segments, scores, None)?;
    if [q, k, v].iter().all(|t| cpu_f32(t)) {
        return Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?);
    }
    op.composed(q, k, v)
}

/// [`causal_attention`] of `q` and `k` rotated by `cos, sin: [N, 1, D/2]` ([`apply_rope`]), with
/// no cache (`q`, `k` and `v` the same `N` rows). On the CPU the rotation happens inside the op,
/// forward and backward, so the graph keeps only the unrotated `q` and `k`: one copy of them per
/// layer, not two. Elsewhere, or for a partial rotation, it is `apply_rope` and then the op.
pub fn rotary_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    segments: &[Segment],
    scores: Scores,
) -> Result<Tensor> {
    let (n, _, d) = q.dims3()?;
    let whole = [cos, sin].iter().all(|t| t.dims3().ok() == Some((n, 1, d / 2)) && cpu_f32(t));
    if !(whole && [q, k, v].iter().all(|t| cpu_f32(t)) && d % 2 == 0 && k.dim(0)? == n) {
        return causal_attention(&apply_rope(q, cos, sin)?, &apply_rope(k, cos, sin)?, v, segments, scores);
    }
    let op = Attention::new(q, k, v, segments, scores, Some((cos.contiguous()?, sin.contiguous()?)))?;
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The op: its segments and head geometry.
#[derive(Clone, Debug)]
struct Attention {
    segments: Vec<Segment>,
    heads: usize,
    kv: usize,
    d: usize,
    /// Keys further back than this many positions are masked (`usize::MAX`: none).
    window: usize,
    scale: f32,
    softcap: Option<f32>,
    /// `cos, sin: [N, 1, D/2]` that rotate `q` and `k` inside the op ([`rotary_causal_attention`]).
    rope: Option<(Tensor, Tensor)>,
}

/// Contiguous f32 views of the inputs: `q`, `k`, `v` and their row strides.
struct Views<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

impl Attention {
    /// The op for these operands, after checking that they fit.
    fn new(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        segments: &[Segment],
        scores: Scores,
        rope: Option<(Tensor, Tensor)>,
    ) -> Result<Self> {
        let (nq, heads, d) = q.dims3()?;
        let (nk, kv, dk) = k.dims3()?;
        if v.dims3()? != (nk, kv, dk) || dk != d || kv == 0 || heads % kv != 0 {
            return Err(Error::Batch(format!(
                "attention: q {:?}, k {:?}, v {:?} do not fit [Nq, heads, D], [Nk, kv, D] with heads a multiple of kv",
                q.dims(),
                k.dims(),
                v.dims()
            )));
        }
        for s in segments {
            if s.q_len > s.k_len || s.q_start + s.q_len > nq || s.k_start + s.k_len > nk {
                return Err(Error::Batch(format!("attention: segment {s:?} outside q rows {nq} / k rows {nk}")));
            }
        }
        Ok(Attention {
            segments: segments.to_vec(),
            heads,
            kv,
            d,
            window: scores.window.unwrap_or(usize::MAX).max(1),
            scale: scores.scale,
            softcap: scores.softcap,
            rope,
        })
    }

    /// `q` and `k` as the op sees them: rotated into new buffers when it rotates, else as given.
    fn rotated<'a>(&self, q: &'a [f32], k: &'a [f32]) -> candle_core::Result<[Cow<'a, [f32]>; 2]> {
        let Some((cos, sin)) = &self.rope else { return Ok([Cow::Borrowed(q), Cow::Borrowed(k)]) };
        let ((sc, lc), (ss, ls)) = (cos.storage_and_layout(), sin.storage_and_layout());
        let (c, s) = (stored(&sc, lc)?, stored(&ss, ls)?);
        let half = self.d / 2;
        Ok([Cow::Owned(rotate(q, c, s, half, 1.0)), Cow::Owned(rotate(k, c, s, half, 1.0))])
    }

    /// The gradient of a rotated operand back to the unrotated one (rotation by minus the angle).
    fn unrotated(&self, g: Vec<f32>) -> candle_core::Result<Vec<f32>> {
        let Some((cos, sin)) = &self.rope else { return Ok(g) };
        let ((sc, lc), (ss, ls)) = (cos.storage_and_layout(), sin.storage_and_layout());
        Ok(rotate(&g, stored(&sc, lc)?, stored(&ss, ls)?, self.d / 2, -1.0))
    }

    fn q_stride(&self) -> usize {
        self.heads * self.d
    }

    fn k_stride(&self) -> usize {
        self.kv * self.d
    }

    /// The kv head that query head `h` reads.
    fn kv_head(&self, h: usize) -> usize {
        h / (self.heads / self.kv)
    }

    /// Keys `[lo, hi)` (segment-relative) that some query of rows `[t0, t1)` can see.
    fn key_range(&self, s: &Segment, t0: usize, t1: usize) -> (usize, usize) {
        let past = s.k_len - s.q_len;
        ((past + t0 + 1).saturating_sub(self.window), (past + t1).min(s.k_len))
    }

    /// Query rows `[t0, t1)` of head `h` against keys `[lo, hi)`: probabilities into
    /// `p: [t1 - t0, hi - lo]`, masked entries 0. With a soft cap and `slopes`, also the cap's
    /// derivative `1 − tanh²` at every score, for the backward.
    #[allow(clippy::too_many_arguments)]
    fn probs(
        &self,
        x: &Views,
        s: &Segment,
        h: usize,
        t0: usize,
        t1: usize,
        lo: usize,
        hi: usize,
        p: &mut Vec<f32>,
        slopes: Option<&mut Vec<f32>>,
    ) {
        let (rows, keys, d) = (t1 - t0, hi - lo, self.d);
        p.clear();
        p.resize(rows * keys, 0.0);
        let q = &x.q[(s.q_start + t0) * self.q_stride() + h * d..];
        let k = &x.k[(s.k_start + lo) * self.k_stride() + self.kv_head(h) * d..];
        // p[rows, keys] = scale · q[rows, D] · kᵀ[D, keys]
        gemm(
            rows,
            keys,
            d,
            p,
            keys,
            false,
            Mat::rows(q, self.q_stride()),
            Mat::cols(k, self.k_stride()),
            self.scale,
            false,
        );
        if let Some(c) = self.softcap {
            let inv = 1.0 / c;
            match slopes {
                Some(sl) => {
                    sl.clear();
                    sl.extend(p.iter_mut().map(|e| {
                        let t = (*e * inv).tanh();
                        *e = c * t;
                        1.0 - t * t
                    }));
                }
                None => p.iter_mut().for_each(|e| *e = c * (*e * inv).tanh()),
            }
        }
        let past = s.k_len - s.q_len;
        for (i, row) in p.chunks_exact_mut(keys).enumerate() {
            let pos = past + t0 + i;
            // Visible keys of this query, relative to lo: [a, b).
            let a = (pos + 1).saturating_sub(self.window).max(lo) - lo;
            let b = pos + 1 - lo;
            let vis = &mut row[a..b];
            let max = vis.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let inv = 1.0 / exp_shifted(vis, max);
            vis.iter_mut().for_each(|e| *e *= inv);
            row[..a].fill(0.0);
            row[b..].fill(0.0);
        }
    }

    /// Head `h` of segment `s`: `[q_len, D]`.
    fn forward_head(&self, x: &Views, s: &Segment, h: usize) -> Vec<f32> {
        let d = self.d;
        let mut out = vec![0f32; s.q_len * d];
        let mut p = Vec::new();
        for t0 in (0..s.q_len).step_by(BLOCK) {
            let t1 = (t0 + BLOCK).min(s.q_len);
            let (lo, hi) = self.key_range(s, t0, t1);
            self.probs(x, s, h, t0, t1, lo, hi, &mut p, None);
            let v = &x.v[(s.k_start + lo) * self.k_stride() + self.kv_head(h) * d..];
            // out[t0..t1] = p[rows, keys] · v[keys, D]
            gemm(
                t1 - t0,
                d,
                hi - lo,
                &mut out[t0 * d..],
                d,
                false,
                Mat::rows(&p, hi - lo),
                Mat::rows(v, self.k_stride()),
                1.0,
                false,
            );
        }
        out
    }

    /// Gradients of head `h` of segment `s` given `o` and `go` (`[Nq, heads, D]`):
    /// `(dq [q_len, D], dk [k_len, D], dv [k_len, D])`, the last two this head's share of its
    /// kv head's gradient.
    fn backward_head(&self, x: &Views, o: &[f32], go: &[f32], s: &Segment, h: usize) -> [Vec<f32>; 3] {
        let (d, qs, ks) = (self.d, self.q_stride(), self.k_stride());
        let (mut dq, mut dk, mut dv) = (vec![0f32; s.q_len * d], vec![0f32; s.k_len * d], vec![0f32; s.k_len * d]);
        let (mut p, mut dp, mut slopes) = (Vec::new(), Vec::new(), Vec::new());
        let g = self.kv_head(h);
        for t0 in (0..s.q_len).step_by(BLOCK) {
            let t1 = (t0 + BLOCK).min(s.q_len);
            let (lo, hi) = self.key_range(s, t0, t1);
            let (rows, keys) = (t1 - t0, hi - lo);
            self.probs(x, s, h, t0, t1, lo, hi, &mut p, Some(&mut slopes));
            let row0 = (s.q_start + t0) * qs + h * d;
            let (q, go_blk, o_blk) = (&x.q[row0..], &go[row0..], &o[row0..]);
            let k = &x.k[(s.k_start + lo) * ks + g * d..];
            let v = &x.v[(s.k_start + lo) * ks + g * d..];
            // dv[lo..hi] += pᵀ[keys, rows] · go[rows, D]
            gemm(keys, d, rows, &mut dv[lo * d..], d, true, Mat::cols(&p, keys), Mat::rows(go_blk, qs), 1.0, false);
            // dp[rows, keys] = go[rows, D] · vᵀ[D, keys]
            dp.clear();
            dp.resize(rows * keys, 0.0);
            gemm(rows, keys, d, &mut dp, keys, false, Mat::rows(go_blk, qs), Mat::cols(v, ks), 1.0, false);
            // ds = p ⊙ (dp − Σ_d go·o) · scale (softmax backward, then the score scale), times
            // the cap's slope where scores are capped
            for i in 0..rows {
                let delta: f32 =
                    go_blk[i * qs..i * qs + d].iter().zip(&o_blk[i * qs..i * qs + d]).map(|(a, b)| a * b).sum();
                for (e, pe) in dp[i * keys..(i + 1) * keys].iter_mut().zip(&p[i * keys..(i + 1) * keys]) {
                    *e = pe * (*e - delta) * self.scale;
                }
            }
            if self.softcap.is_some() {
                dp.iter_mut().zip(&slopes).for_each(|(e, sl)| *e *= sl);
            }
            // dq[t0..t1] = ds[rows, keys] · k[keys, D]
            gemm(rows, d, keys, &mut dq[t0 * d..], d, false, Mat::rows(&dp, keys), Mat::rows(k, ks), 1.0, false);
            // dk[lo..hi] += dsᵀ[keys, rows] · q[rows, D]
            gemm(keys, d, rows, &mut dk[lo * d..], d, true, Mat::cols(&dp, keys), Mat::rows(q, qs), 1.0, false);
        }
        [dq, dk, dv]
    }

    /// The same attention from candle ops, for devices and dtypes without the kernel (and as the
    /// reference in tests).
    fn composed(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (d, groups) = (self.d, self.heads / self.kv);
        let mut outs = Vec::with_capacity(self.segments.len());
        for s in &self.segments {
            let (t, n) = (s.q_len, s.k_len);
            // [kv, groups·T, D]: the query heads that share a kv head next to each other.
            let qs = q.narrow(0, s.q_start, t)?.transpose(0, 1)?.contiguous()?.reshape((self.kv, groups * t, d))?;
            let ks = k.narrow(0, s.k_start, n)?.transpose(0, 1)?.contiguous()?; // [kv, S, D]
            let vs = v.narrow(0, s.k_start, n)?.transpose(0, 1)?.contiguous()?;
            let mut scores = (qs.matmul(&ks.t()?)? * self.scale as f64)?; // [kv, groups·T, S]
            if let Some(c) = self.softcap {
                scores = ((scores / c as f64)?.tanh()? * c as f64)?;
            }
            let past = n - t;
            let mut mask = vec![0f32; t * n];
            for i in 0..t {
                for j in 0..n {
                    if j > past + i || past + i - j >= self.window {
                        mask[i * n + j] = f32::NEG_INFINITY;
                    }
                }
            }
            let mask = Tensor::from_vec(mask, (t, n), q.device())?.to_dtype(q.dtype())?;
            let scores =
                scores.reshape((self.kv, groups, t, n))?.broadcast_add(&mask)?.reshape((self.kv, groups * t, n))?;
            let o = softmax_last_dim(&scores)?.matmul(&vs)?.reshape((self.heads, t, d))?;
            outs.push(o.transpose(0, 1)?); // [T, heads, D]
        }
        Ok(Tensor::cat(&outs, 0)?.contiguous()?)
    }

    /// Every (segment, head) pair: the units of parallel work.
    fn tasks(&self) -> Vec<(usize, usize)> {
        (0..self.segments.len()).flat_map(|s| (0..self.heads).map(move |h| (s, h))).collect()
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [q, k] = self.rotated(values(s1, l1)?, values(s2, l2)?)?;
        let x = Views { q: &q, k: &k, v: values(s3, l3)? };
        let (qs, d) = (self.q_stride(), self.d);
        let heads: Vec<_> =
            self.tasks().into_par_iter().map(|(s, h)| self.forward_head(&x, &self.segments[s], h)).collect();
        // Rows no segment covers stay 0.
        let mut out = vec![0f32; x.q.len()];
        for ((s, h), o) in self.tasks().into_iter().zip(heads) {
            let seg = &self.segments[s];
            for (t, row) in o.chunks_exact(d).enumerate() {
                let at = (seg.q_start + t) * qs + h * d;
                out[at..at + d].copy_from_slice(row);
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        go: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let go = go.contiguous()?;
        let (sq, lq) = q.storage_and_layout();
        let (sk, lk) = k.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let (so, lo) = o.storage_and_layout();
        let (sg, lg) = go.storage_and_layout();
        let [q_data, k_data] = self.rotated(stored(&sq, lq)?, stored(&sk, lk)?)?;
        let x = Views { q: &q_data, k: &k_data, v: stored(&sv, lv)? };
        let (o_data, go_data) = (stored(&so, lo)?, stored(&sg, lg)?);
        if o_data.len() != x.q.len() || go_data.len() != x.q.len() {
            candle_core::bail!("causal-attention backward: output or its gradient has the wrong size")
        }
        let heads: Vec<_> = self
            .tasks()
            .into_par_iter()
            .map(|(s, h)| self.backward_head(&x, o_data, go_data, &self.segments[s], h))
            .collect();
        let (qs, ks, d) = (self.q_stride(), self.k_stride(), self.d);
        let (mut dq, mut dk, mut dv) = (vec![0f32; x.q.len()], vec![0f32; x.k.len()], vec![0f32; x.v.len()]);
        for ((s, h), [hq, hk, hv]) in self.tasks().into_iter().zip(heads) {
            let seg = &self.segments[s];
            for (t, row) in hq.chunks_exact(d).enumerate() {
                let at = (seg.q_start + t) * qs + h * d;
                dq[at..at + d].copy_from_slice(row);
            }
            let g = self.kv_head(h);
            for (j, (rk, rv)) in hk.chunks_exact(d).zip(hv.chunks_exact(d)).enumerate() {
                let at = (seg.k_start + j) * ks + g * d;
                dk[at..at + d].iter_mut().zip(rk).for_each(|(a, b)| *a += b);
                dv[at..at + d].iter_mut().zip(rv).for_each(|(a, b)| *a += b);
            }
        }
        let (dq, dk) = (self.unrotated(dq)?, self.unrotated(dk)?);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, lq.shape(), dev)?),
            Some(Tensor::from_vec(dk, lk.shape(), dev)?),
            Some(Tensor::from_vec(dv, lv.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()).unwrap_or(f32::INFINITY)
    }

    /// Kernel against the composed ops, forward and all three gradients, for a batch of
    /// segments with GQA, a cached prefix, and a sliding window longer than a block.
    #[test]
    fn kernel_matches_composed_ops_and_their_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv, d) = (6, 2, 16);
        // Two fresh sequences (one longer than two blocks) and one continuing 5 cached tokens.
        let segs = [
            Segment { q_start: 0, q_len: 150, k_start: 0, k_len: 150 },
            Segment { q_start: 150, q_len: 7, k_start: 150, k_len: 7 },
            Segment { q_start: 157, q_len: 3, k_start: 157, k_len: 8 },
        ];
        for (window, softcap) in [(None, None), (Some(70), None), (Some(70), Some(2.0f32))] {
            let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (160, heads, d), &dev)?)?;
            // 170 key rows: the last 5 belong to no segment.
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (170, kv, d), &dev)?)?;
            let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (170, kv, d), &dev)?)?;
            let up = Tensor::randn(0f32, 1.0, (160, heads, d), &dev)?;
            let scores = Scores { scale: 0.3, softcap, window };
            let got = causal_attention(&q, &k, &v, &segs, scores)?;
            let want = Attention::new(&q, &k, &v, &segs, scores, None)?.composed(&q, &k, &v)?;
            assert!(
                max_diff(&got, &want) < 1e-5,
                "window {window:?} cap {softcap:?}: forward differs by {}",
                max_diff(&got, &want)
            );
            let g = (got * &up)?.sum_all()?.backward()?;
            let g_ref = (want * &up)?.sum_all()?.backward()?;
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (g.get(var.as_tensor()).expect("grad"), g_ref.get(var.as_tensor()).expect("grad"));
                assert!(
                    max_diff(a, b) < 1e-4,
                    "window {window:?} cap {softcap:?}: d{name} differs by {}",
                    max_diff(a, b)
                );
            }
            let unused = g.get(k.as_tensor()).expect("grad").narrow(0, 165, 5)?.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert_eq!(unused, 0.0, "rows no segment reads get no gradient");
        }
        Ok(())
    }

    /// Rotating inside the op gives what rotating first does, to the bit, forward and backward.
    #[test]
    fn rotating_inside_equals_rotating_first() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv, d) = (4, 2, 8);
        let segs = [
            Segment { q_start: 0, q_len: 70, k_start: 0, k_len: 70 },
            Segment { q_start: 70, q_len: 9, k_start: 70, k_len: 9 },
        ];
        let table = crate::ops::RopeTable::new(d, 10000.0, &crate::ops::RopeScaling::None)?;
        let positions: Vec<usize> = (0..70).chain(0..9).collect();
        let lengths: Vec<usize> = [70; 70].into_iter().chain([9; 9]).collect();
        let (cos, sin) = table.cos_sin(&positions, &lengths, &dev)?;
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (79, heads, d), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (79, kv, d), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (79, kv, d), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (79, heads, d), &dev)?;
        let scores = Scores::plain(d);
        let got = rotary_causal_attention(&q, &k, &v, (&cos, &sin), &segs, scores)?;
        let (qr, kr) = (apply_rope(&q, &cos, &sin)?, apply_rope(&k, &cos, &sin)?);
        let want = causal_attention(&qr, &kr, &v, &segs, scores)?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
        };
        assert!(bits(&got)? == bits(&want)?, "forward differs");
        let g = (&got * &up)?.sum_all()?.backward()?;
        let g_ref = (&want * &up)?.sum_all()?.backward()?;
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, b) = (g.get(var.as_tensor()).expect("grad"), g_ref.get(var.as_tensor()).expect("grad"));
            assert!(bits(a)? == bits(b)?, "d{name} differs");
        }
        Ok(())
    }

    #[test]
    fn rejects_segments_outside_the_rows() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((4, 2, 8), DType::F32, &dev)?;
        let k = Tensor::zeros((4, 1, 8), DType::F32, &dev)?;
        let seg = [Segment { q_start: 2, q_len: 3, k_start: 0, k_len: 4 }];
        assert!(matches!(causal_attention(&q, &k, &k, &seg, Scores::plain(8)), Err(Error::Batch(_))));
        Ok(())
    }
}

//! Choosing the next token from one row of logits.
//!
//! The semantics are transformers' logits processors, applied in its order:
//! temperature (`logits / T`) → top-k (drop every logit below the k-th largest; ties with the
//! k-th are kept) → top-p (sort descending, keep the shortest prefix whose probability reaches
//! `p`; the first token is always kept) → multinomial draw. `temperature == 0` is greedy decoding
//! (argmax, first index on ties) and ignores top-k and top-p, as `do_sample=False` does.
//!
//! Cost per token is O(V) for a vocabulary of V: top-k uses `select_nth_unstable`, and top-p
//! sorts only a growing head of the distribution (the nucleus is usually small), never all V.

use std::cmp::Ordering;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// How to pick tokens. `temperature == 0` means greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits; 0 selects greedy decoding.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (and any tied with the k-th).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`, in (0, 1].
    pub top_p: Option<f32>,
    /// Seed of the sampler's random stream.
    pub seed: u64,
}

impl SamplingParams {
    /// Greedy decoding (argmax at every step).
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_k: None, top_p: None, seed: 0 }
    }
}

/// Draws tokens with [`SamplingParams`] from a seeded random stream: the same seed and the same
/// sequence of logits give the same tokens.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch reused across calls: `(token id, scaled logit or weight)` of live candidates.
    cand: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler after checking `params`: temperature finite and >= 0, `top_k >= 1`,
    /// `top_p` in (0, 1].
    pub fn new(params: SamplingParams) -> Result<Self> {
        if !(params.temperature.is_finite() && params.temperature >= 0.0) {
            return Err(Error::Sampling(format!(
                "temperature must be a finite number >= 0, got {}",
                params.temperature
            )));
        }
        if params.top_k == Some(0) {
            return Err(Error::Sampling("top_k must be >= 1, got 0".into()));
        }
        if let Some(p) = params.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Sampling(format!("top_p must be in (0, 1], got {p}")));
            }
        }
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng, cand: Vec::new() })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token id from `logits` (one row, `[vocab]`). `-inf` marks a forbidden token; a NaN,
    /// an empty row or a row with no allowed token is an [`Error::Sampling`].
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let (argmax, max) = checked_argmax(logits)?;
        if self.params.temperature == 0.0 {
            return Ok(argmax);
        }
        self.fill_candidates(logits, max);
        if let Some(k) = self.params.top_k {
            top_k(&mut self.cand, k);
        }
        // From here on `cand.1` is an unnormalised probability.
        for c in self.cand.iter_mut() {
            c.1 = c.1.exp();
        }
        if let Some(p) = self.params.top_p.filter(|&p| p < 1.0) {
            top_p(&mut self.cand, p);
        }
        Ok(draw(&self.cand, self.rng.random::<f64>()).unwrap_or(argmax))
    }

    /// Fills `cand` with `(id, (logit - max) / T)` for every token that can be drawn. Shifting by
    /// the max before dividing keeps tiny temperatures from overflowing. With `+inf` logits only
    /// those tokens are candidates, equally likely (the limit of the softmax).
    fn fill_candidates(&mut self, logits: &[f32], max: f32) {
        let t = self.params.temperature;
        self.cand.clear();
        if max == f32::INFINITY {
            let inf = logits.iter().enumerate().filter(|(_, &l)| l == f32::INFINITY);
            self.cand.extend(inf.map(|(i, _)| (i as u32, 0.0)));
            return;
        }
        for (i, &l) in logits.iter().enumerate() {
            let s = (l - max) / t;
            if s > f32::NEG_INFINITY {
                self.cand.push((i as u32, s));
            }
        }
    }
}

/// Index and value of the largest logit (first on ties), after rejecting NaN, empty rows and
/// rows where every token is `-inf`.
fn checked_argmax(logits: &[f32]) -> Result<(u32, f32)> {
    if logits.is_empty() {
        return Err(Error::Sampling("sampling from an empty row of logits".into()));
    }
    if u32::try_from(logits.len()).is_err() {
        return Err(Error::Sampling(format!("vocabulary of {} tokens exceeds u32", logits.len())));
    }
    let (mut best, mut max) = (0u32, f32::NEG_INFINITY);
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            return Err(Error::Sampling(format!("logit {i} is NaN")));
        }
        if l > max {
            (best, max) = (i as u32, l);
        }
    }
    if max == f32::NEG_INFINITY {
        return Err(Error::Sampling("every logit is -inf: no token can be sampled".into()));
    }
    Ok((best, max))
}

/// Descending by value, then ascending by id: a total order on candidates (values are never NaN).
fn by_value_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal).then(a.0.cmp(&b.0))
}

/// Keeps the `k` largest candidates plus any tied with the k-th (transformers' `TopKLogitsWarper`
/// removes only values strictly below the k-th). Order afterwards is unspecified.
fn top_k(cand: &mut Vec<(u32, f32)>, k: usize) {
    if k >= cand.len() {
        return;
    }
    cand.select_nth_unstable_by(k - 1, by_value_desc);
    let kth = cand[k - 1].1;
    let mut kept = k;
    for j in k..cand.len() {
        if cand[j].1 >= kth {
            cand.swap(kept, j);
            kept += 1;
        }
    }
    cand.truncate(kept);
}

/// Keeps, in descending order, each candidate whose predecessors' probability is still below
/// `p` (transformers' `TopPLogitsWarper`). `cand.1` holds unnormalised probabilities. Sorts a
/// head of 256 candidates, growing it 4× until it holds the nucleus.
fn top_p(cand: &mut Vec<(u32, f32)>, p: f32) {
    let total: f64 = cand.iter().map(|c| c.1 as f64).sum();
    let target = p as f64 * total;
    let mut head = cand.len().min(256);
    loop {
        if head < cand.len() {
            cand.select_nth_unstable_by(head - 1, by_value_desc);
        }
        cand[..head].sort_unstable_by(by_value_desc);
        let mut mass = 0.0f64;
        for i in 0..head {
            if mass >= target {
                cand.truncate(i.max(1));
                return;
            }
            mass += cand[i].1 as f64;
        }
        if head == cand.len() || mass >= target {
            cand.truncate(head);
            return;
        }
        head = cand.len().min(head * 4);
    }
}

/// The candidate at `u ∈ [0, 1)` of the cumulative weight, or `None` if all weights are zero.
fn draw(cand: &[(u32, f32)], u: f64) -> Option<u32> {
    let total: f64 = cand.iter().map(|c| c.1 as f64).sum();
    let threshold = u * total;
    let mut acc = 0.0f64;
    let mut last_positive = None;
    for &(id, w) in cand {
        if w > 0.0 {
            acc += w as f64;
            last_positive = Some(id);
            if acc > threshold {
                return Some(id);
            }
        }
    }
    last_positive // rounding left `acc` a hair below `threshold`
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, seed: 7 }
    }

    /// Pseudo-random logits without ties, vocabulary `n`.
    fn logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 20.0 - 10.0).collect()
    }

    fn argmax(xs: &[f32]) -> u32 {
        checked_argmax(xs).unwrap().0
    }

    #[test]
    fn greedy_picks_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]).unwrap(), 1);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, -5.0, -7.0]).unwrap(), 1);
        let xs = logits(50_000, 1);
        assert_eq!(s.sample(&xs).unwrap(), argmax(&xs));
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        for (seed, t) in [(1, 0.1), (2, 1.0), (3, 5.0), (4, 100.0)] {
            let mut s = Sampler::new(params(t, Some(1), None)).unwrap();
            for step in 0..20 {
                let xs = logits(1000, seed * 100 + step);
                assert_eq!(s.sample(&xs).unwrap(), argmax(&xs), "T={t}");
            }
        }
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut s = Sampler::new(params(1.5, None, Some(1e-6))).unwrap();
        for step in 0..20 {
            let xs = logits(5000, step);
            assert_eq!(s.sample(&xs).unwrap(), argmax(&xs));
        }
        // Ties at the top resolve to the first index, as greedy does.
        assert_eq!(s.sample(&[1.0, 4.0, 4.0, 0.0]).unwrap(), 1);
    }

    /// Frequencies of each token over `n` draws.
    fn histogram(p: SamplingParams, xs: &[f32], n: usize) -> Vec<f64> {
        let mut s = Sampler::new(p).unwrap();
        let mut counts = vec![0usize; xs.len()];
        for _ in 0..n {
            counts[s.sample(xs).unwrap() as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    fn softmax(xs: &[f32], t: f32) -> Vec<f64> {
        let e: Vec<f64> = xs.iter().map(|&x| ((x / t) as f64).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    }

    #[test]
    fn draws_follow_softmax_of_scaled_logits() {
        let xs = [1.0f32, 2.0, 0.5];
        for t in [0.7f32, 1.0, 2.0] {
            let freq = histogram(params(t, None, None), &xs, 20_000);
            for (f, p) in freq.iter().zip(softmax(&xs, t)) {
                assert!((f - p).abs() < 0.02, "T={t}: freq {freq:?} vs softmax");
            }
        }
    }

    #[test]
    fn top_k_and_top_p_renormalise_the_survivors() {
        // probs ≈ [0.09, 0.24, 0.67]: top_k=2 keeps ids 1 and 2.
        let xs = [1.0f32, 2.0, 3.0];
        let freq = histogram(params(1.0, Some(2), None), &xs, 20_000);
        let e = [2f64.exp(), 3f64.exp()];
        assert_eq!(freq[0], 0.0);
        assert!((freq[2] - e[1] / (e[0] + e[1])).abs() < 0.02, "{freq:?}");
        // top_p=0.8: 0.67 < 0.8 so id 1 joins; 0.67+0.24 >= 0.8 so id 0 does not.
        let freq = histogram(params(1.0, None, Some(0.8)), &xs, 20_000);
        assert_eq!(freq[0], 0.0);
        assert!((freq[2] - e[1] / (e[0] + e[1])).abs() < 0.02, "{freq:?}");
        // top_p=0.6: the top token alone already holds 0.67.
        assert_eq!(histogram(params(1.0, None, Some(0.6)), &xs, 1000)[2], 1.0);
    }

    #[test]
    fn top_k_keeps_ties_with_the_kth() {
        let mut c: Vec<(u32, f32)> =
            [5.0, 1.0, 3.0, 3.0, 0.0].iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
        top_k(&mut c, 2);
        let mut ids: Vec<u32> = c.iter().map(|c| c.0).collect();
        ids.sort();
        assert_eq!(ids, vec![0, 2, 3]);
    }

    #[test]
    fn top_p_over_a_large_flat_vocabulary_grows_its_head() {
        // 100k equal tokens: the nucleus for p = 0.5 is half the vocabulary, beyond any head.
        let mut c: Vec<(u32, f32)> = (0..100_000).map(|i| (i, 1.0)).collect();
        top_p(&mut c, 0.5);
        assert_eq!(c.len(), 50_000);
        assert!(c.iter().all(|c| c.0 < 50_000), "ties keep the lowest ids");
    }

    #[test]
    fn same_seed_same_tokens() {
        let rows: Vec<Vec<f32>> = (0..50).map(|i| logits(2000, i)).collect();
        let run = |seed| {
            let mut s =
                Sampler::new(SamplingParams { temperature: 0.9, top_k: Some(50), top_p: Some(0.95), seed }).unwrap();
            rows.iter().map(|r| s.sample(r).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }

    #[test]
    fn non_finite_logits() {
        let mut s = Sampler::new(params(1.0, None, None)).unwrap();
        for _ in 0..100 {
            let id = s.sample(&[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 1.0]).unwrap();
            assert!(id == 1 || id == 3);
        }
        for _ in 0..100 {
            let id = s.sample(&[0.0, f32::INFINITY, 5.0, f32::INFINITY]).unwrap();
            assert!(id == 1 || id == 3);
        }
        assert!(s.sample(&[0.0, f32::NAN]).unwrap_err().to_string().contains("NaN"));
        assert!(s.sample(&[f32::NEG_INFINITY; 3]).is_err());
        assert!(s.sample(&[]).is_err());
        // A tiny temperature must not overflow into NaN.
        let mut cold = Sampler::new(params(1e-30, None, None)).unwrap();
        assert_eq!(cold.sample(&[3.0, 5.0, 4.0]).unwrap(), 1);
    }

    #[test]
    fn invalid_params_name_the_field() {
        let bad = [
            (params(-0.1, None, None), "temperature"),
            (params(f32::NAN, None, None), "temperature"),
            (params(f32::INFINITY, None, None), "temperature"),
            (params(1.0, Some(0), None), "top_k"),
            (params(1.0, None, Some(0.0)), "top_p"),
            (params(1.0, None, Some(1.5)), "top_p"),
            (params(1.0, None, Some(f32::NAN)), "top_p"),
        ];
        for (p, field) in bad {
            let err = Sampler::new(p.clone()).err().unwrap_or_else(|| panic!("{p:?} accepted"));
            assert!(matches!(err, Error::Sampling(_)) && err.to_string().contains(field), "{err}");
        }
        assert!(Sampler::new(params(0.0, Some(1), Some(1.0))).is_ok());
    }
}

//! Dense linear algebra in f64 for adapter arithmetic, on `faer` (row-major slices in and out):
//! PiSSA's top singular triplets, OLoRA's leading QR, and the truncated SVD of a low-rank product
//! `B A` without forming it. With `B = Q_b R_b` and `Aᵀ = Q_a R_a` (thin QR),
//! `B A = Q_b (R_b R_aᵀ) Q_aᵀ`, so only the small core needs an SVD, whatever the size of `W`.
//! The SVDs and the QR return `None` for non-finite input (or, should it ever happen, an SVD that does not
//! converge).

use faer::{Mat, MatRef};

/// `(B', A')` with `B' A'` the best rank-`r` approximation of `B A` (Eckart–Young), as PEFT's
/// SVD combination writes it: `B' = U_r S_r: [m, r]`, `A' = V_rᵀ: [r, k]`. `b: [m, inner]` and
/// `a: [inner, k]` are row-major. Where `r` exceeds the rank, the extra rows and columns are 0.
pub fn truncated_svd_of_product(
    b: &[f64],
    m: usize,
    inner: usize,
    a: &[f64],
    k: usize,
    r: usize,
) -> Option<(Vec<f64>, Vec<f64>)> {
    assert!(b.len() == m * inner && a.len() == inner * k, "truncated_svd_of_product: operand sizes");
    if !finite(b) || !finite(a) {
        return None;
    }
    let (qb, rb) = thin_qr(mat(b, m, inner).as_ref()); // [m, p], [p, inner]
    let (qa, ra) = thin_qr(mat(a, inner, k).transpose()); // [k, q], [q, inner]
    let svd = (&rb * ra.transpose()).thin_svd().ok()?; // core [p, q] = U S Vᵀ
    let us = &qb * svd.U() * svd.S(); // [m, t]
    let v = &qa * svd.V(); // [k, t]
    let keep = r.min(us.ncols());
    let b_out = (0..m * r).map(|i| if i % r < keep { us[(i / r, i % r)] } else { 0.0 }).collect();
    let a_out = (0..r * k).map(|i| if i / k < keep { v[(i % k, i / k)] } else { 0.0 }).collect();
    Some((b_out, a_out))
}

/// OLoRA's factors of `w: [m, k]` (row-major): `Q_r: [m, r]`, the first `r` columns of `w`'s
/// thin QR, and `R_r = Q_rᵀ w: [r, k]`, its first `r` rows of `R` (the diagonal of `R` positive).
pub fn leading_qr(w: &[f64], m: usize, k: usize, r: usize) -> Option<(Vec<f64>, Vec<f64>)> {
    assert!(w.len() == m * k && r <= m.min(k), "leading_qr: operand sizes");
    if !finite(w) {
        return None;
    }
    let w = mat(w, m, k);
    let (mut q, rr) = thin_qr(w.subcols(0, r)); // [m, r], [r, r]
    for j in 0..r {
        if rr[(j, j)] < 0.0 {
            q.col_mut(j).iter_mut().for_each(|x| *x = -*x);
        }
    }
    let rest = q.transpose() * &w; // [r, k]
    Some((rows(q.as_ref()), rows(rest.as_ref())))
}

/// PiSSA's factors: the top `r` singular triplets of `w: [m, k]` (row-major), `(U_r: [m, r],
/// S_r: [r], V_rᵀ: [r, k])`, singular values descending (the thin SVD of `w`, cut to `r`).
pub fn top_svd(w: &[f64], m: usize, k: usize, r: usize) -> Option<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    assert!(w.len() == m * k && r <= m.min(k), "top_svd: operand sizes");
    if !finite(w) {
        return None;
    }
    let svd = mat(w, m, k).thin_svd().ok()?;
    let u = rows(svd.U().subcols(0, r));
    let s = (0..r).map(|j| svd.S()[j]).collect();
    let vt = rows(svd.V().subcols(0, r).transpose());
    Some((u, s, vt))
}

/// The `Q` of `a: [m, n]`'s thin QR (`m ≥ n`): orthonormal columns spanning `a`'s.
pub fn orthonormal_columns(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    assert!(a.len() == m * n && m >= n, "orthonormal_columns: operand sizes");
    rows(thin_qr(mat(a, m, n).as_ref()).0.as_ref())
}

/// Householder thin QR of `a: [m, n]`: `Q: [m, p]` with orthonormal columns and upper-triangular
/// `R: [p, n]`, `p = min(m, n)`.
fn thin_qr(a: MatRef<'_, f64>) -> (Mat<f64>, Mat<f64>) {
    let qr = a.qr();
    (qr.compute_thin_Q(), qr.thin_R().to_owned())
}

fn finite(a: &[f64]) -> bool {
    a.iter().all(|x| x.is_finite())
}

/// A row-major `[m, n]` slice as a matrix.
fn mat(a: &[f64], m: usize, n: usize) -> Mat<f64> {
    Mat::from_fn(m, n, |i, j| a[i * n + j])
}

/// A matrix as a row-major vector.
fn rows(a: MatRef<'_, f64>) -> Vec<f64> {
    (0..a.nrows() * a.ncols()).map(|i| a[(i / a.ncols(), i % a.ncols())]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect()
    }

    fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
        (0..cols * rows).map(|i| a[(i % rows) * cols + i / rows]).collect()
    }

    fn matmul(a: &[f64], b: &[f64], m: usize, inner: usize, n: usize) -> Vec<f64> {
        (0..m * n).map(|i| (0..inner).map(|t| a[(i / n) * inner + t] * b[t * n + i % n]).sum()).collect()
    }

    #[test]
    fn svd_reconstructs_and_orders_singular_values() {
        let n = 7;
        let a = lcg(1, n * n);
        let (u, s, vt) = top_svd(&a, n, n, n).unwrap();
        let v = transpose(&vt, n, n);
        assert!(s.windows(2).all(|w| w[0] >= w[1]));
        let us: Vec<f64> = (0..n * n).map(|i| u[i] * s[i % n]).collect();
        let back = matmul(&us, &vt, n, n, n);
        let err = back.iter().zip(&a).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(err < 1e-12, "reconstruction error {err}");
        let vtv = matmul(&transpose(&v, n, n), &v, n, n, n);
        let off = (0..n * n).map(|i| (vtv[i] - if i / n == i % n { 1.0 } else { 0.0 }).abs()).fold(0.0, f64::max);
        assert!(off < 1e-12, "V is not orthogonal: {off}");
    }

    #[test]
    fn full_rank_product_is_exact_and_truncation_keeps_the_largest_directions() {
        let (m, inner, k) = (9, 4, 6);
        let (b, a) = (lcg(2, m * inner), lcg(3, inner * k));
        let want = matmul(&b, &a, m, inner, k);
        let (b2, a2) = truncated_svd_of_product(&b, m, inner, &a, k, 6).unwrap(); // r above the rank
        let got = matmul(&b2, &a2, m, 6, k);
        let err = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(err < 1e-12, "rank-4 product through rank 6: {err}");
        // Rank 1: the squared residual is the sum of the other squared singular values
        // (Eckart–Young); with A' orthonormal, the singular values are B''s column norms.
        let (bf, _) = truncated_svd_of_product(&b, m, inner, &a, k, inner).unwrap();
        let s: Vec<f64> = (0..inner).map(|j| (0..m).map(|i| bf[i * inner + j].powi(2)).sum::<f64>().sqrt()).collect();
        assert!(s.windows(2).all(|w| w[0] >= w[1]) && s[3] > 0.0, "{s:?}");
        let (b1, a1) = truncated_svd_of_product(&b, m, inner, &a, k, 1).unwrap();
        let one = matmul(&b1, &a1, m, 1, k);
        let resid: f64 = one.iter().zip(&want).map(|(x, y)| (x - y) * (x - y)).sum();
        let rest: f64 = s[1..].iter().map(|x| x * x).sum();
        assert!((resid - rest).abs() < 1e-10 * rest, "rank-1 residual {resid} vs {rest}");
        // A rank-deficient product: zero columns in B.
        let mut bz = b.clone();
        (0..m).for_each(|i| bz[i * inner + 3] = 0.0);
        let (b3, a3) = truncated_svd_of_product(&bz, m, inner, &a, k, 4).unwrap();
        let got = matmul(&b3, &a3, m, 4, k);
        let want = matmul(&bz, &a, m, inner, k);
        let err = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(err < 1e-12, "rank-deficient product: {err}");
    }

    #[test]
    fn top_svd_and_leading_qr_of_wide_and_tall_matrices() {
        for (m, k) in [(9, 5), (5, 9)] {
            let w = lcg(3, m * k);
            let r = 3;
            let (u, s, vt) = top_svd(&w, m, k, r).unwrap();
            assert!(s.windows(2).all(|p| p[0] >= p[1]) && s[r - 1] > 0.0);
            // The top-r singular values are those of the full SVD of wᵀw's square root.
            let n = m.min(k);
            let gram = if m >= k {
                matmul(&transpose(&w, m, k), &w, k, m, k)
            } else {
                matmul(&w, &transpose(&w, m, k), m, k, m)
            };
            let full = top_svd(&gram, n, n, n).unwrap().1;
            for j in 0..r {
                assert!((s[j] * s[j] - full[j]).abs() < 1e-10, "σ{j}² {} vs {}", s[j] * s[j], full[j]);
            }
            // u and v orthonormal, and w v = u s.
            let wv = matmul(&w, &transpose(&vt, r, k), m, k, r);
            let err = (0..m * r).map(|i| (wv[i] - u[i] * s[i % r]).abs()).fold(0.0, f64::max);
            assert!(err < 1e-10, "w v ≠ u s by {err}");
            let (q, rr) = leading_qr(&w, m, k, r).unwrap();
            let qtq = matmul(&transpose(&q, m, r), &q, r, m, r);
            assert!((0..r * r).all(|i| (qtq[i] - if i / r == i % r { 1.0 } else { 0.0 }).abs() < 1e-12));
            // q rr reproduces the first r columns of w, with rr upper-triangular there.
            let back = matmul(&q, &rr, m, r, k);
            for i in 0..m {
                for c in 0..r {
                    assert!((back[i * k + c] - w[i * k + c]).abs() < 1e-12);
                }
            }
            assert!((0..r).all(|j| rr[j * k + j] > 0.0) && (1..r).all(|j| (0..j).all(|c| rr[j * k + c].abs() < 1e-12)));
        }
    }

    #[test]
    fn non_finite_input_is_refused_not_returned() {
        let mut w = lcg(4, 12);
        w[5] = f64::NAN;
        assert!(top_svd(&w, 4, 3, 2).is_none() && leading_qr(&w, 4, 3, 2).is_none());
        assert!(truncated_svd_of_product(&w, 4, 3, &lcg(5, 6), 2, 2).is_none());
        assert!(top_svd(&lcg(4, 12), 4, 3, 2).is_some());
    }
}

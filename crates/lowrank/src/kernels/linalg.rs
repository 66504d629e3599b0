//! Small dense linear algebra in f64 for adapter arithmetic: the truncated SVD of a low-rank
//! product `B A` without forming it. With `B = Q_b R_b` and `Aᵀ = Q_a R_a` (thin QR),
//! `B A = Q_b (R_b R_aᵀ) Q_aᵀ`, so only the `R × R` core needs an SVD (one-sided Jacobi), where
//! `R` is the inner dimension — a few dozen for adapters, whatever the size of `W`.

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
) -> (Vec<f64>, Vec<f64>) {
    assert!(b.len() == m * inner && a.len() == inner * k, "truncated_svd_of_product: operand sizes");
    let (qb, rb) = thin_qr(b, m, inner); // [m, inner], [inner, inner]
    let (qa, ra) = thin_qr(&transpose(a, inner, k), k, inner); // [k, inner], [inner, inner]
    let core = matmul(&rb, &transpose(&ra, inner, inner), inner, inner, inner);
    let (u, s, v) = svd_square(&core, inner);
    let keep = r.min(inner);
    let mut b_out = vec![0.0; m * r];
    let mut a_out = vec![0.0; r * k];
    for j in 0..keep {
        for i in 0..m {
            b_out[i * r + j] = (0..inner).map(|t| qb[i * inner + t] * u[t * inner + j]).sum::<f64>() * s[j];
        }
        for c in 0..k {
            a_out[j * k + c] = (0..inner).map(|t| qa[c * inner + t] * v[t * inner + j]).sum();
        }
    }
    (b_out, a_out)
}

/// OLoRA's factors of `w: [m, k]` (row-major): `Q_r: [m, r]`, the first `r` columns of `w`'s
/// thin QR, and `R_r = Q_rᵀ w: [r, k]`, its first `r` rows of `R` (the diagonal of `R` positive).
pub fn leading_qr(w: &[f64], m: usize, k: usize, r: usize) -> (Vec<f64>, Vec<f64>) {
    assert!(w.len() == m * k && r <= m.min(k), "leading_qr: operand sizes");
    let first: Vec<f64> = (0..m).flat_map(|i| w[i * k..i * k + r].to_vec()).collect(); // [m, r]
    let (q, _) = thin_qr(&first, m, r);
    let rr = matmul(&transpose(&q, m, r), w, r, m, k);
    (q, rr)
}

/// PiSSA's factors: the top `r` singular triplets of `w: [m, k]` (row-major), `(U_r: [m, r],
/// S_r: [r], V_rᵀ: [r, k])`, singular values descending. Exact (one-sided Jacobi on a
/// `min(m, k)` square core), so its cost grows as `min(m, k)³`.
pub fn top_svd(w: &[f64], m: usize, k: usize, r: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    assert!(w.len() == m * k && r <= m.min(k), "top_svd: operand sizes");
    if m < k {
        // wᵀ = U' S V'ᵀ, so w = V' S U'ᵀ.
        let (u, s, vt) = top_svd(&transpose(w, m, k), k, m, r);
        return (transpose(&vt, r, m), s, transpose(&u, k, r));
    }
    let eye: Vec<f64> = (0..k * k).map(|i| if i / k == i % k { 1.0 } else { 0.0 }).collect();
    let (us, vt) = truncated_svd_of_product(w, m, k, &eye, k, r); // [m, r] = U S, [r, k]
    let s: Vec<f64> = (0..r).map(|j| (0..m).map(|i| us[i * r + j] * us[i * r + j]).sum::<f64>().sqrt()).collect();
    let u = (0..m * r).map(|idx| if s[idx % r] > 0.0 { us[idx] / s[idx % r] } else { 0.0 }).collect();
    (u, s, vt)
}

/// The `Q` of `a: [m, n]`'s thin QR: orthonormal columns spanning `a`'s.
pub fn orthonormal_columns(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    thin_qr(a, m, n).0
}

/// Thin QR of `a: [m, n]` by modified Gram–Schmidt, each column orthogonalised twice: `Q: [m, n]`
/// with orthonormal (or, past the rank, zero) columns and upper-triangular `R: [n, n]`.
fn thin_qr(a: &[f64], m: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let scale = a.iter().fold(0f64, |s, x| s.max(x.abs())).max(f64::MIN_POSITIVE);
    let mut q = vec![0.0; m * n];
    let mut r = vec![0.0; n * n];
    for j in 0..n {
        let mut v: Vec<f64> = (0..m).map(|i| a[i * n + j]).collect();
        for _ in 0..2 {
            for p in 0..j {
                let d: f64 = (0..m).map(|i| q[i * n + p] * v[i]).sum();
                r[p * n + j] += d;
                v.iter_mut().enumerate().for_each(|(i, x)| *x -= d * q[i * n + p]);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-13 * scale * (m as f64).sqrt() {
            r[j * n + j] = norm;
            (0..m).for_each(|i| q[i * n + j] = v[i] / norm);
        }
    }
    (q, r)
}

/// SVD of a square `a: [n, n]` by one-sided Jacobi: `(U, S, V)` with `a = U diag(S) Vᵀ`, `S`
/// descending; columns of `U` for zero singular values are zero.
fn svd_square(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut w = a.to_vec(); // its columns are rotated until mutually orthogonal
    let mut v: Vec<f64> = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let alpha: f64 = col(&w, n, p).map(|x| x * x).sum();
                let beta: f64 = col(&w, n, q).map(|x| x * x).sum();
                let gamma: f64 = col(&w, n, p).zip(col(&w, n, q)).map(|(x, y)| x * y).sum();
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for m in [&mut w, &mut v] {
                    for i in 0..n {
                        let (x, y) = (m[i * n + p], m[i * n + q]);
                        m[i * n + p] = c * x - s * y;
                        m[i * n + q] = s * x + c * y;
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let norms: Vec<f64> = (0..n).map(|c| col(&w, n, c).map(|x| x * x).sum::<f64>().sqrt()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| norms[j].total_cmp(&norms[i]));
    let (mut u, mut s, mut vs) = (vec![0.0; n * n], vec![0.0; n], vec![0.0; n * n]);
    for (new, &old) in order.iter().enumerate() {
        s[new] = norms[old];
        for i in 0..n {
            vs[i * n + new] = v[i * n + old];
            if norms[old] > 0.0 {
                u[i * n + new] = w[i * n + old] / norms[old];
            }
        }
    }
    (u, s, vs)
}

/// Column `c` of the row-major `[n, n]` matrix `m`.
fn col(m: &[f64], n: usize, c: usize) -> impl Iterator<Item = f64> + '_ {
    (0..n).map(move |i| m[i * n + c])
}

fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols * rows).map(|i| a[(i % rows) * cols + i / rows]).collect()
}

fn matmul(a: &[f64], b: &[f64], m: usize, inner: usize, n: usize) -> Vec<f64> {
    (0..m * n).map(|i| (0..inner).map(|t| a[(i / n) * inner + t] * b[t * n + i % n]).sum()).collect()
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

    #[test]
    fn svd_reconstructs_and_orders_singular_values() {
        let n = 7;
        let a = lcg(1, n * n);
        let (u, s, v) = svd_square(&a, n);
        assert!(s.windows(2).all(|w| w[0] >= w[1]));
        let us: Vec<f64> = (0..n * n).map(|i| u[i] * s[i % n]).collect();
        let back = matmul(&us, &transpose(&v, n, n), n, n, n);
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
        let (b2, a2) = truncated_svd_of_product(&b, m, inner, &a, k, 6); // r above the rank
        let got = matmul(&b2, &a2, m, 6, k);
        let err = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(err < 1e-12, "rank-4 product through rank 6: {err}");
        // Rank 1: the squared residual is the sum of the other squared singular values
        // (Eckart–Young); with A' orthonormal, the singular values are B''s column norms.
        let (bf, _) = truncated_svd_of_product(&b, m, inner, &a, k, inner);
        let s: Vec<f64> = (0..inner).map(|j| (0..m).map(|i| bf[i * inner + j].powi(2)).sum::<f64>().sqrt()).collect();
        assert!(s.windows(2).all(|w| w[0] >= w[1]) && s[3] > 0.0, "{s:?}");
        let (b1, a1) = truncated_svd_of_product(&b, m, inner, &a, k, 1);
        let one = matmul(&b1, &a1, m, 1, k);
        let resid: f64 = one.iter().zip(&want).map(|(x, y)| (x - y) * (x - y)).sum();
        let rest: f64 = s[1..].iter().map(|x| x * x).sum();
        assert!((resid - rest).abs() < 1e-10 * rest, "rank-1 residual {resid} vs {rest}");
        // A rank-deficient product: zero columns in B.
        let mut bz = b.clone();
        (0..m).for_each(|i| bz[i * inner + 3] = 0.0);
        let (b3, a3) = truncated_svd_of_product(&bz, m, inner, &a, k, 4);
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
            let (u, s, vt) = top_svd(&w, m, k, r);
            assert!(s.windows(2).all(|p| p[0] >= p[1]) && s[r - 1] > 0.0);
            // The top-r singular values are those of the full SVD of wᵀw's square root.
            let full = if m >= k {
                svd_square(&matmul(&transpose(&w, m, k), &w, k, m, k), k).1
            } else {
                svd_square(&matmul(&w, &transpose(&w, m, k), m, k, m), m).1
            };
            for j in 0..r {
                assert!((s[j] * s[j] - full[j]).abs() < 1e-10, "σ{j}² {} vs {}", s[j] * s[j], full[j]);
            }
            // u and v orthonormal, and w v = u s.
            let wv = matmul(&w, &transpose(&vt, r, k), m, k, r);
            let err = (0..m * r).map(|i| (wv[i] - u[i] * s[i % r]).abs()).fold(0.0, f64::max);
            assert!(err < 1e-10, "w v ≠ u s by {err}");
            let (q, rr) = leading_qr(&w, m, k, r);
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
}

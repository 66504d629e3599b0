//! Products with a frozen weight in bf16, accumulated in f32, on AVX-512-BF16 (`vdpbf16ps`).
//!
//! `y = x Wᵀ` and `dx = dy W` as PyTorch's CPU autocast computes them: both operands rounded to
//! bf16 (round to nearest even), each pair of products summed in f32. The left operand is
//! rounded once; each thread takes a range of output columns and walks `W` a tile of rows at a
//! time (the tiles dequantised one by one when `W` is packed, as the f32 path does), packs its
//! part of the tile in bf16 into the layout `vdpbf16ps` wants, and multiplies every row of the
//! left operand by it in a register-blocked microkernel. Splitting the columns, not the rows,
//! packs each part of `W` once, whatever the number of rows (the loss's vocabulary-wide head is
//! called on a few hundred rows at a time).
//!
//! `vdpbf16ps acc, a, b` adds `a[2i]·b[2i] + a[2i+1]·b[2i+1]` to lane `i` of 16: the right
//! operand holds, for one pair of reduction indices, 16 output columns' pairs side by side. A
//! packed panel is `[pairs][NR]` of such pairs (two registers of 16 columns); the left operand's
//! pair is broadcast to every lane.
//!
//! | product | left operand (pairs along) | panel pairs `(W[·][·], W[·][·])` | panel columns |
//! |---|---|---|---|
//! | `x Wᵀ` | `x[n, k]` (k) | `(W[j][2p], W[j][2p+1])` | rows `j` of the tile |
//! | `dy W` | `dy[n, m]` (m) | `(W[2q][c], W[2q+1][c])` | columns `c` of `W` |

use rayon::prelude::*;

use super::qmatmul::WeightRows;

/// Rows of `W` taken at a time by `x Wᵀ` (a multiple of [`NR`]): they are output columns, summed
/// over all of `k` in registers.
const ROWS: usize = 128;
/// Rows of `W` taken at a time by `dy W` (even): they are the reduction, so each tile costs a
/// load and a store of the output; long tiles make those rare.
const REDUCE_ROWS: usize = 512;
/// Output columns of a panel: two registers of 16 f32.
const NR: usize = 32;
/// Rows of the left operand a microkernel call holds in registers (2 × `MR` accumulators).
const MR: usize = 12;
/// Pairs of the reduction a microkernel call sums at most (a reduction is cut in equal chunks):
/// a panel's chunk (16 KiB) stays in L1 while the [`MC`] rows take it, [`MR`] at a time. Whole
/// panels of the model's reductions (36–96 KiB) did not, which cost ~10% of the products.
const KC: usize = 128;
/// Rows of the left operand taken against every panel of a tile before the next rows (they stay
/// in L2 while the panels pass through it).
const MC: usize = 4 * MR;

/// Whether this CPU can run the bf16 kernels (AVX-512F, -BW, -VL and -BF16: every CPU with the
/// last has the others).
pub fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `f` rounded to the nearest bf16 (ties to even), as PyTorch rounds; NaN stays NaN.
pub fn bf16_bits(f: f32) -> u16 {
    let bits = f.to_bits();
    if f.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 `bits`.
pub fn bf16_value(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// `rows × cols` f32 values (row-major) in bf16, each row padded with a zero to an even
/// length: `cols.div_ceil(2)` pairs a row, each read as one `u32`. Not zero-filled first: every
/// pair is written (a fill of the whole operand on one thread cost more than the rounding).
fn to_pairs(a: &[f32], rows: usize, cols: usize) -> Vec<u32> {
    let stride = cols.div_ceil(2);
    let mut out = Vec::with_capacity(rows * stride);
    if stride > 0 {
        out.spare_capacity_mut().par_chunks_mut(stride).zip(a.par_chunks(cols)).for_each(|(dst, src)| {
            // SAFETY: the entry points checked cpu_has_bf16(); `dst` holds cols.div_ceil(2) pairs.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                avx512::row_pairs(src, dst)
            }
        });
    }
    // SAFETY: row_pairs wrote every pair of every row (`stride` of them, all `rows` rows).
    unsafe { out.set_len(rows * stride) };
    out
}

/// `y[n, m] = x[n, k] · Wᵀ` with both rounded to bf16, summed in f32. Panics when this CPU has
/// no AVX-512-BF16 (check [`cpu_has_bf16`]).
pub fn xwt_bf16(x: &[f32], n: usize, m: usize, k: usize, w: &(impl WeightRows + ?Sized)) -> Vec<f32> {
    assert!(cpu_has_bf16(), "xwt_bf16 needs AVX-512-BF16");
    assert_eq!(x.len(), n * k, "xwt_bf16: x is not [{n}, {k}]");
    let kp = k.div_ceil(2); // pairs along k
    let a = to_pairs(x, n, k);
    by_column_ranges(n, m, |out| {
        // Output columns c0..c1 are rows of W: tiles of them packed as panels of NR, pairs along k.
        let (c0, c1) = (out.c0, out.c0 + out.cols);
        let (mut buf, mut panel) = (Vec::new(), Vec::new());
        for t0 in (c0..c1).step_by(ROWS) {
            let tr = ROWS.min(c1 - t0);
            pack_rows(Tile::of(w, t0, tr, k, &mut buf), tr, k, kp, &mut panel);
            multiply_panels(&a, kp, n, &panel, kp, out.columns(t0 - c0, tr), false);
        }
    })
}

/// `dx[n, k] = dy[n, m] · W` with both rounded to bf16, summed in f32. Panics when this CPU has
/// no AVX-512-BF16 (check [`cpu_has_bf16`]).
pub fn dyw_bf16(dy: &[f32], n: usize, m: usize, k: usize, w: &(impl WeightRows + ?Sized)) -> Vec<f32> {
    assert!(cpu_has_bf16(), "dyw_bf16 needs AVX-512-BF16");
    assert_eq!(dy.len(), n * m, "dyw_bf16: dy is not [{n}, {m}]");
    if m == 0 {
        return vec![0.0; n * k]; // an empty sum (no tile below would write the output)
    }
    let mp = m.div_ceil(2); // pairs along m
    let a = to_pairs(dy, n, m);
    by_column_ranges(n, k, |out| {
        // Output columns c0..c1 are columns of W; its rows, the reduction, come a tile at a time.
        let (mut buf, mut panel) = (Vec::new(), Vec::new());
        for t0 in (0..m).step_by(REDUCE_ROWS) {
            let tr = REDUCE_ROWS.min(m - t0);
            let pairs = tr.div_ceil(2);
            pack_columns(Tile::of(w, t0, tr, k, &mut buf), tr, k, out.c0, out.c0 + out.cols, &mut panel);
            multiply_panels(&a[t0 / 2..], mp, n, &panel, pairs, out, t0 > 0);
        }
    })
}

/// Columns `c0..c0 + cols` of every row of a row-major `[rows, stride]` output that one thread
/// fills while others fill other columns of the same rows (so no `&mut` slice can hold it).
#[derive(Clone, Copy)]
struct Columns {
    /// Where column `c0` of row 0 is.
    ptr: *mut f32,
    rows: usize,
    c0: usize,
    cols: usize,
    stride: usize,
}

// SAFETY: each thread gets a `Columns` of its own, disjoint from the others' (by_column_ranges).
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

impl Columns {
    /// Columns `from..from + cols` of these (relative to `c0`).
    fn columns(self, from: usize, cols: usize) -> Columns {
        assert!(from + cols <= self.cols);
        // SAFETY: in bounds of this block's row 0, as asserted.
        Columns { ptr: unsafe { self.ptr.add(from) }, c0: self.c0 + from, cols, ..self }
    }

    /// Rows `from..from + rows` of these.
    fn rows(self, from: usize, rows: usize) -> Columns {
        assert!(from + rows <= self.rows);
        // SAFETY: row `from` of the output, as asserted (`stride` is its row length).
        Columns { ptr: unsafe { self.ptr.add(from * self.stride) }, rows, ..self }
    }
}

/// `out[i, ..] (+)= a[i] · panels` for every row `i < n` of `a` (row stride `a_stride` pairs):
/// the panels (`pairs` × [`NR`] each) cover `out`'s columns. [`MC`] rows at a time go against
/// every panel, so they stay in L2 meanwhile.
fn multiply_panels(a: &[u32], a_stride: usize, n: usize, panels: &[u32], pairs: usize, out: Columns, accumulate: bool) {
    assert!(out.rows == n);
    for i0 in (0..n).step_by(MC) {
        let rows = MC.min(n - i0);
        for (pi, p0) in (0..out.cols).step_by(NR).enumerate() {
            let b = &panels[pi * pairs * NR..(pi + 1) * pairs * NR];
            let dst = out.rows(i0, rows).columns(p0, NR.min(out.cols - p0));
            // Equal chunks of at most KC pairs; a single empty one when there are no pairs, so
            // the output is still written (with zeros).
            let chunk = pairs.div_ceil(pairs.div_ceil(KC).max(1)).max(1);
            for q0 in (0..pairs.max(1)).step_by(chunk) {
                let (a, b) = (&a[i0 * a_stride + q0..], &b[q0 * NR..]);
                run_rows(a, a_stride, b, chunk.min(pairs - q0), dst, accumulate || q0 > 0);
            }
        }
    }
}

/// A `[n, cols]` output computed in column ranges (multiples of [`NR`] wide), one per rayon
/// thread: `f(part)` must write every value of `part`, the [`Columns`] `c0..c1` of every row.
/// Each thread packs only its own part of `W`, and writes straight into the output, which is
/// not zero-filled first (on one thread, that fill cost a few percent of a training step).
fn by_column_ranges(n: usize, cols: usize, f: impl Fn(Columns) + Sync) -> Vec<f32> {
    let threads = rayon::current_num_threads().max(1);
    let per = cols.div_ceil(threads).div_ceil(NR).max(1) * NR;
    let mut out = Vec::with_capacity(n * cols);
    let whole = Columns { ptr: out.as_mut_ptr(), rows: n, c0: 0, cols, stride: cols };
    (0..cols).step_by(per).collect::<Vec<_>>().into_par_iter().for_each(|c0| f(whole.columns(c0, per.min(cols - c0))));
    // SAFETY: the parts cover columns 0..cols of all n rows, and `f` wrote every value of each.
    unsafe { out.set_len(n * cols) };
    out
}

/// Rows `t0..t0 + tr` of `W` to pack: f32 (rounded while packed), or bf16 as stored (taken as
/// they are: pairs of a row are then its `u32`s, so `k` must be even).
#[derive(Clone, Copy)]
enum Tile<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Tile<'a> {
    /// `W`'s rows `t0..t0 + tr`: its stored bf16 when it has them and `k` is even, else as f32
    /// tiles (`buf` grows to hold them if they need a place).
    fn of(w: &'a (impl WeightRows + ?Sized), t0: usize, tr: usize, k: usize, buf: &'a mut Vec<f32>) -> Tile<'a> {
        match w.bf16() {
            Some(b) if k.is_multiple_of(2) => {
                let rows = &b[t0 * k..(t0 + tr) * k];
                // SAFETY: bf16 is a 16-bit plain-old-data type (repr(transparent) over u16).
                Tile::Bf16(unsafe { std::slice::from_raw_parts(rows.as_ptr().cast(), rows.len()) })
            }
            _ => {
                let len = w.buffer_len(tr, k);
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
                Tile::F32(w.rows(t0, tr, &mut buf[..len]))
            }
        }
    }

    fn len(self) -> usize {
        match self {
            Tile::F32(t) => t.len(),
            Tile::Bf16(t) => t.len(),
        }
    }
}

/// `panel` grown to `len` and cut to it. A tile packs every value the product reads; what a
/// previous tile left past it only reaches output columns that are never stored, so nothing is
/// zeroed (that was a memset of the whole weight per product).
fn panel_of(panel: &mut Vec<u32>, len: usize) -> &mut [u32] {
    if panel.len() < len {
        panel.resize(len, 0);
    }
    &mut panel[..len]
}

/// Packs `tile` (`tr × k`, its rows output columns) as panels of [`NR`] rows: `panel[pi][p][j] =
/// (tile[pi·NR + j][2p], tile[pi·NR + j][2p + 1])`, zeros past `k` and in the rest of the last
/// 16 rows.
fn pack_rows(tile: Tile, tr: usize, k: usize, kp: usize, panel: &mut Vec<u32>) {
    let panel = panel_of(panel, tr.div_ceil(NR) * kp * NR);
    assert!(tile.len() >= tr * k);
    // SAFETY: cpu_has_bf16() was checked by the entry point; sizes as asserted and allocated.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        avx512::pack_rows(tile, tr, k, kp, panel)
    }
}

/// Packs columns `c0..c1` (`c0` a multiple of [`NR`]) of `tile` (`tr × k`, its rows reduction
/// indices) as panels of [`NR`] columns: `panel[pi][q][c] = (tile[2q][c0 + pi·NR + c],
/// tile[2q + 1][c0 + pi·NR + c])`, zero in the high half past the tile.
fn pack_columns(tile: Tile, tr: usize, k: usize, c0: usize, c1: usize, panel: &mut Vec<u32>) {
    let pairs = tr.div_ceil(2);
    let panel = panel_of(panel, (c1 - c0).div_ceil(NR) * pairs * NR);
    assert!(tile.len() >= tr * k && c0.is_multiple_of(NR) && c0 <= c1 && c1 <= k);
    // SAFETY: as for pack_rows.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        avx512::pack_columns(tile, tr, k, c0, c1, panel)
    }
}

/// `out[i, ..] (+)= Σ_p a[i][p] · b[p][..]` for the rows of `out` (of `a` at stride `a_stride`
/// pairs) and a panel `b` of `pairs` × [`NR`] covering `out`'s columns, [`MR`] rows at a time.
fn run_rows(a: &[u32], a_stride: usize, b: &[u32], pairs: usize, out: Columns, accumulate: bool) {
    let rows = out.rows;
    assert!(b.len() >= pairs * NR && out.cols <= NR);
    assert!(rows == 0 || (rows - 1) * a_stride + pairs <= a.len());
    for i0 in (0..rows).step_by(MR) {
        let mr = MR.min(rows - i0);
        let dst = out.rows(i0, mr);
        // SAFETY: `cpu_has_bf16()` was checked by the caller's entry point; the asserts above keep
        // every row `i < mr` of `a` (pairs `..pairs`) in bounds, and `dst` is `mr` rows of `cols`
        // values of the output at its stride, written by this thread alone.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::micro(
                mr,
                a[i0 * a_stride..].as_ptr(),
                a_stride,
                b.as_ptr(),
                pairs,
                dst.ptr,
                dst.stride,
                dst.cols,
                accumulate,
            )
        };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Tile, MR, NR};

    /// The first `len ≤ 16` lanes.
    #[inline]
    fn mask16(len: usize) -> __mmask16 {
        if len >= 16 {
            0xffff
        } else {
            ((1u32 << len) - 1) as u16
        }
    }

    /// 16 f32 at `src` (the first `len ≤ 16`, zeros after) rounded to bf16, zero-extended into
    /// the 16 lanes of 32 bits.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn bf16x16(src: *const f32, len: usize) -> __m512i {
        let v = _mm512_maskz_loadu_ps(mask16(len), src);
        _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)))
    }

    /// 16 values of a tile from `at` (the first `len ≤ 16`, zeros after) in bf16, zero-extended
    /// into the 16 lanes of 32 bits.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline]
    unsafe fn column16(tile: Tile, at: usize, len: usize) -> __m512i {
        match tile {
            Tile::F32(t) => bf16x16(t.as_ptr().add(at), len),
            Tile::Bf16(t) => _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask16(len), t.as_ptr().add(at).cast())),
        }
    }

    /// 32 f32 at `src` (the first `len ≤ 32`, zeros after) as 16 bf16 pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn pairs16(src: *const f32, len: usize) -> __m512i {
        let lo = _mm512_maskz_loadu_ps(mask16(len), src);
        let hi = _mm512_maskz_loadu_ps(mask16(len.saturating_sub(16)), src.add(16.min(len)));
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
    }

    /// `dst[p] = (src[2p], src[2p + 1])` in bf16 for every `p < src.len().div_ceil(2)` (a zero
    /// past `src` in the last), whatever `dst` held.
    ///
    /// # Safety
    /// AVX-512F and AVX-512-BF16; `dst.len() ≥ src.len().div_ceil(2)`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn row_pairs(src: &[f32], dst: &mut [std::mem::MaybeUninit<u32>]) {
        assert!(dst.len() >= src.len().div_ceil(2));
        for (p0, chunk) in src.chunks(32).enumerate() {
            let v = pairs16(chunk.as_ptr(), chunk.len());
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(p0 * 16).cast(), mask16(chunk.len().div_ceil(2)), v);
        }
    }

    /// Transposes 16 × 16 lanes of 32 bits: `out[c][r] = rows[r][c]`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn transpose16(rows: &[__m512i; 16]) -> [__m512i; 16] {
        let mut t = [_mm512_setzero_si512(); 16];
        for k in 0..8 {
            t[2 * k] = _mm512_unpacklo_epi32(rows[2 * k], rows[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_epi32(rows[2 * k], rows[2 * k + 1]);
        }
        // u[4g + c], 128-bit lane L: column 4L + c of rows 4g..4g + 4.
        let mut u = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
            u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
            u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
            u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
        }
        let mut out = [_mm512_setzero_si512(); 16];
        for c in 0..4 {
            let (a, b, cc, d) = (u[c], u[4 + c], u[8 + c], u[12 + c]);
            let x0 = _mm512_shuffle_i32x4::<0x88>(a, b); // a.0 a.2 b.0 b.2
            let x1 = _mm512_shuffle_i32x4::<0xdd>(a, b); // a.1 a.3 b.1 b.3
            let y0 = _mm512_shuffle_i32x4::<0x88>(cc, d);
            let y1 = _mm512_shuffle_i32x4::<0xdd>(cc, d);
            out[c] = _mm512_shuffle_i32x4::<0x88>(x0, y0); // lane 0 of a, b, c, d
            out[4 + c] = _mm512_shuffle_i32x4::<0x88>(x1, y1); // lane 1
            out[8 + c] = _mm512_shuffle_i32x4::<0xdd>(x0, y0); // lane 2
            out[12 + c] = _mm512_shuffle_i32x4::<0xdd>(x1, y1); // lane 3
        }
        out
    }

    /// [`super::pack_rows`]: 16 tile rows × 16 pairs at a time, transposed in registers.
    ///
    /// # Safety
    /// AVX-512F and AVX-512-BF16; `tile` holds `tr × k`, `panel` holds `tr.div_ceil(NR) · kp · NR`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn pack_rows(tile: Tile, tr: usize, k: usize, kp: usize, panel: &mut [u32]) {
        assert!(tile.len() >= tr * k && panel.len() >= tr.div_ceil(NR) * kp * NR);
        for j0 in (0..tr).step_by(16) {
            let base = (j0 / NR) * kp * NR + j0 % NR;
            for p0 in (0..kp).step_by(16) {
                let len = k - 2 * p0; // values left in each row from pair p0
                let mut rows = [_mm512_setzero_si512(); 16];
                for (jj, row) in rows.iter_mut().enumerate().take(tr - j0) {
                    let at = (j0 + jj) * k + 2 * p0;
                    *row = match tile {
                        Tile::F32(t) => pairs16(t.as_ptr().add(at), len.min(32)),
                        // k is even: the row's pairs are its u32s.
                        Tile::Bf16(t) => _mm512_maskz_loadu_epi32(mask16(len.min(32) / 2), t.as_ptr().add(at).cast()),
                    };
                }
                let cols = transpose16(&rows);
                for (pp, col) in cols.iter().enumerate().take(kp - p0) {
                    _mm512_storeu_si512(panel.as_mut_ptr().add(base + (p0 + pp) * NR).cast(), *col);
                }
            }
        }
    }

    /// [`super::pack_columns`]: two tile rows interleaved 16 columns at a time.
    ///
    /// # Safety
    /// AVX-512F and AVX-512-BF16; `tile` holds `tr × k`, `c0 ≤ c1 ≤ k`, `panel` holds
    /// `(c1 - c0).div_ceil(NR) · pairs · NR`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn pack_columns(tile: Tile, tr: usize, k: usize, c0: usize, c1: usize, panel: &mut [u32]) {
        let pairs = tr.div_ceil(2);
        assert!(tile.len() >= tr * k && c1 <= k && panel.len() >= (c1 - c0).div_ceil(NR) * pairs * NR);
        for q in 0..pairs {
            let has_hi = 2 * q + 1 < tr;
            for c in (c0..c1).step_by(16) {
                let len = 16.min(c1 - c);
                let lo = column16(tile, 2 * q * k + c, len);
                let hi = if has_hi { column16(tile, (2 * q + 1) * k + c, len) } else { _mm512_setzero_si512() };
                let v = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
                let at = ((c - c0) / NR) * pairs * NR + q * NR + (c - c0) % NR;
                _mm512_mask_storeu_epi32(panel.as_mut_ptr().add(at).cast(), mask16(len), v);
            }
        }
    }

    /// `out[i][..cols] (+)= Σ_p a[i·a_stride + p] ⊙ b[p·NR..]` for `i < mr ≤ MR`, in f32 from
    /// bf16 pairs.
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512-BF16; `a` holds `mr` rows of `pairs` pairs at stride
    /// `a_stride`, `b` holds `pairs × NR` pairs, `out` holds `mr` rows of `cols ≤ NR` values at
    /// stride `out_stride`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn micro(
        mr: usize,
        a: *const u32,
        a_stride: usize,
        b: *const u32,
        pairs: usize,
        out: *mut f32,
        out_stride: usize,
        cols: usize,
        accumulate: bool,
    ) {
        // One instance per row count, so the accumulators live in registers.
        macro_rules! dispatch {
            ($($n:literal)*) => {
                match mr {
                    $($n => block::<$n>(a, a_stride, b, pairs, out, out_stride, cols, accumulate),)*
                    _ => unreachable!("mr is at most MR"),
                }
            };
        }
        const _: () = assert!(MR == 12 && NR == 32);
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn block<const R: usize>(
        a: *const u32,
        a_stride: usize,
        b: *const u32,
        pairs: usize,
        out: *mut f32,
        out_stride: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let (lo_mask, hi_mask) = (mask16(cols), mask16(cols.saturating_sub(16)));
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                let o = out.add(i * out_stride);
                row[0] = _mm512_maskz_loadu_ps(lo_mask, o);
                row[1] = _mm512_maskz_loadu_ps(hi_mask, o.add(16));
            }
        }
        for p in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
            for (i, row) in acc.iter_mut().enumerate() {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i * a_stride + p) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], x, b0);
                row[1] = _mm512_dpbf16_ps(row[1], x, b1);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let o = out.add(i * out_stride);
            _mm512_mask_storeu_ps(o, lo_mask, row[0]);
            _mm512_mask_storeu_ps(o.add(16), hi_mask, row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::DenseRows;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn round(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&f| bf16_value(bf16_bits(f))).collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_value(bf16_bits(f32::INFINITY)), f32::INFINITY);
        assert_eq!(bf16_bits(-2.5), 0xc020);
    }

    /// Both products equal f64 sums of the bf16-rounded operands (to f32 rounding), for shapes
    /// that leave every kind of edge: rows past a multiple of MR, columns past NR, odd k and m.
    #[test]
    fn products_equal_sums_of_rounded_operands() {
        if !cpu_has_bf16() {
            eprintln!("no AVX-512-BF16 on this CPU: nothing to check");
            return;
        }
        // (3, 1029, 34): several tiles of `dy W`'s reduction, the last of odd length, after full
        // ones (a packed panel is reused without being cleared). (2, 0, 3) and (2, 3, 0): empty
        // sums (the outputs are not zero-filled before the kernels write them).
        for (n, m, k) in
            [(2, 0, 3), (2, 3, 0), (1, 1, 1), (5, 33, 7), (13, 70, 64), (40, 130, 97), (25, 256, 300), (3, 1029, 34)]
        {
            let (x, w, dy) = (values(n * k, 1), values(m * k, 2), values(n * m, 3));
            let (xr, wr, dyr) = (round(&x), round(&w), round(&dy));
            let rows = DenseRows { w: &w, k };
            let y = xwt_bf16(&x, n, m, k, &rows);
            let dx = dyw_bf16(&dy, n, m, k, &rows);
            // W stored in bf16 (packed as it is where k is even) gives the same bits.
            let stored: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_bits(bf16_bits(v))).collect();
            let stored = crate::kernels::Bf16Rows { w: &stored, k };
            assert!(xwt_bf16(&x, n, m, k, &stored) == y, "x Wᵀ {n}×{m}×{k}: bf16-stored W differs");
            assert!(dyw_bf16(&dy, n, m, k, &stored) == dx, "dy W {n}×{m}×{k}: bf16-stored W differs");
            for i in 0..n {
                for j in 0..m {
                    let want: f64 = (0..k).map(|t| f64::from(xr[i * k + t]) * f64::from(wr[j * k + t])).sum();
                    let got = f64::from(y[i * m + j]);
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "x Wᵀ {n}×{m}×{k} [{i},{j}]: {got} vs {want}"
                    );
                }
                for c in 0..k {
                    let want: f64 = (0..m).map(|t| f64::from(dyr[i * m + t]) * f64::from(wr[t * k + c])).sum();
                    let got = f64::from(dx[i * k + c]);
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "dy W {n}×{m}×{k} [{i},{c}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

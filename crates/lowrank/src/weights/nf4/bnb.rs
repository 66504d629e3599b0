//! bitsandbytes' arithmetic, reproduced to the bit: its dynamic 8-bit map, the index its CPU
//! blockwise quantiser picks, and torch's f32 sum behind the NF4 offset.

/// The index bitsandbytes' CPU `quantize_blockwise` (csrc/cpu_ops.cpp) writes for `x`, a value
/// already divided by its block's maximum: not a search of the map but a lookup in a table of
/// 65536 points spaced evenly on [-1, 1], each holding the first map index whose upper midpoint is
/// not below it. Near a midpoint this can differ from the exactly nearest value.
pub(super) fn dynamic_index(x: f32) -> u8 {
    const POINTS: usize = 65536;
    static LUT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let lut = LUT.get_or_init(|| {
        let map = dynamic_map();
        let mids: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut k = 0;
        (0..POINTS)
            .map(|i| {
                let point = -1.0 + (2.0 * i as f32) / (POINTS - 1) as f32;
                while k < mids.len() && mids[k] < point {
                    k += 1;
                }
                k as u8
            })
            .collect()
    });
    let x = x.clamp(-1.0, 1.0);
    lut[((x + 1.0) * 0.5 * (POINTS - 1) as f32 + 0.5) as usize]
}

/// The sum of `x` in f32 as torch's CPU `sum` computes it (`cascade_sum` in
/// aten/src/ATen/native/cpu/SumKernel.cpp, one thread): 8-lane vectors, each lane summed by
/// `row_sum`, then the leftover elements and the lanes added in order. bitsandbytes' offset is
/// `absmax.mean()`, that sum divided by the count; a plain f64 mean was an ulp off for about 40% of
/// the sizes tried. Torch splits sums of more than 32768 elements across its threads.
pub(super) fn torch_sum(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    if x.len() < LANES {
        return row_sum(&x.iter().map(|&v| [v]).collect::<Vec<[f32; 1]>>())[0];
    }
    let vectors: Vec<[f32; LANES]> = x
        .chunks_exact(LANES)
        .map(|c| {
            let mut v = [0f32; LANES];
            v.copy_from_slice(c);
            v
        })
        .collect();
    let lanes = row_sum(&vectors);
    let tail = x[vectors.len() * LANES..].iter().fold(0f32, |s, v| s + v);
    lanes.iter().fold(tail, |s, v| s + v)
}

/// torch's `row_sum` of `items` (each `L` lanes, added lane-wise): 4 interleaved partial sums
/// (`multi_row_sum`), each a cascade of 4 accumulators that carry up every `2^p` items, the
/// leftover items into the first, then the four added.
fn row_sum<const L: usize>(items: &[[f32; L]]) -> [f32; L] {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    fn add<const L: usize>(acc: &mut [f32; L], x: &[f32; L]) {
        acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
    }
    let rows = items.len() / ILP;
    // c10::CeilLog2 (1 for 0, 1 and 2).
    let ceil_log2 = if rows <= 2 { 1 } else { (usize::BITS - (rows - 1).leading_zeros()) as usize };
    let power = (ceil_log2 / LEVELS).max(4);
    let (step, mask) = (1usize << power, (1usize << power) - 1);
    let mut acc = [[[0f32; L]; ILP]; LEVELS];
    let mut i = 0;
    while i + step <= rows {
        for _ in 0..step {
            (0..ILP).for_each(|k| add(&mut acc[0][k], &items[i * ILP + k]));
            i += 1;
        }
        for j in 1..LEVELS {
            let (below, above) = acc.split_at_mut(j);
            for (up, low) in above[0].iter_mut().zip(&mut below[j - 1]) {
                add(up, low);
                *low = [0.0; L];
            }
            if i & (mask << (j * power)) != 0 {
                break;
            }
        }
    }
    for r in i..rows {
        (0..ILP).for_each(|k| add(&mut acc[0][k], &items[r * ILP + k]));
    }
    let mut sums = acc[0];
    for level in &acc[1..] {
        (0..ILP).for_each(|k| add(&mut sums[k], &level[k]));
    }
    items[rows * ILP..].iter().for_each(|x| add(&mut sums[0], x));
    let (first, rest) = sums.split_at_mut(1);
    rest.iter().for_each(|x| add(&mut first[0], x));
    first[0]
}

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`): for exponents
/// `e = 0..6`, the midpoints of `2^e + 1` points spaced evenly on `[0.1, 1]`, times `10^(e-6)`,
/// with both signs; then 0 and 1; sorted (256 values). The points are `torch.linspace` in f32 as
/// torch's CPU kernel computes them: `start + step·i` for the first half and `end − step·(n−1−i)`
/// for the rest, each one fused multiply-add (GCC contracts them in torch's AVX2 and Arm builds).
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        let mut v: Vec<f32> = Vec::with_capacity(256);
        for e in 0..7 {
            let n = (1usize << e) + 1;
            let (start, end) = (0.1f32, 1f32);
            let step = (end - start) / (n - 1) as f32;
            let bounds: Vec<f32> =
                (0..n)
                    .map(|i| {
                        if i < n / 2 {
                            step.mul_add(i as f32, start)
                        } else {
                            (-step).mul_add((n - 1 - i) as f32, end)
                        }
                    })
                    .collect();
            let scale = 1.0 / 10f32.powi(6 - e);
            for w in bounds.windows(2) {
                let mean = (w[0] + w[1]) / 2.0;
                v.push(scale * mean);
                v.push(-scale * mean);
            }
        }
        v.push(0.0);
        v.push(1.0);
        v.sort_by(f32::total_cmp);
        let mut map = [0f32; 256];
        map.copy_from_slice(&v);
        map
    })
}

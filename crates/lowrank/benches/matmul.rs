//! The frozen-weight products of a training step, f32 against bf16, on the default model's
//! shapes (SmolLM2-135M: hidden 576, kv 192, MLP 1536) for a batch of 4 × 256 tokens.
//!
//!     cargo bench -p lowrank --bench matmul -- [--rows 1024] [--reps 7] [--threads 2]
//!
//! For each `[out, in]` weight, dense f32, dense bf16 (as an HF checkpoint stores it) and Q4_1: `x Wᵀ` (forward) and `dy W` (input gradient),
//! median of `reps` calls, in GFLOP/s (2·n·out·in per call). `scripts/bench/matmul.sh` runs it
//! beside PyTorch's f32 and bf16 `matmul` (oneDNN) on the same shapes.
//!
//! stdout: one row per product `weight kind direction f32_gflops bf16_gflops`.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use lowrank::kernels::bf16_available;
use lowrank::weights::FrozenWeight;

/// `[out, in]` of the default model's projections.
const SHAPES: [(&str, usize, usize); 4] =
    [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536)];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

fn main() -> Result<()> {
    let (mut rows, mut reps, mut threads) = (1024usize, 7usize, 2usize);
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(flag) = args.next() {
        let value: usize = args.next().context("a flag needs a value")?.parse()?;
        match flag.as_str() {
            "--rows" => rows = value,
            "--reps" => reps = value,
            "--threads" => threads = value,
            other => bail!("unknown flag {other}"),
        }
    }
    // Driven from a worker of the pool, as `lowrank` drives its model (`threads::run`): small
    // products are not timed with a cross-thread wake-up each.
    rayon::ThreadPoolBuilder::new().num_threads(threads).build()?.install(|| products(rows, reps, threads))
}

fn products(rows: usize, reps: usize, threads: usize) -> Result<()> {
    if !bf16_available() {
        bail!("this CPU has no AVX-512-BF16");
    }
    let dev = Device::Cpu;
    println!("# {rows} rows, {threads} threads, median of {reps}; GFLOP/s");
    println!("weight kind direction f32 bf16");
    for (name, m, k) in SHAPES {
        let w = Tensor::randn(0f32, 0.05, (m, k), &dev)?;
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, (rows, k), &dev)?.flatten_all()?.to_vec1()?;
        let dy: Vec<f32> = Tensor::randn(0f32, 1.0, (rows, m), &dev)?.flatten_all()?.to_vec1()?;
        let flops = 2.0 * (rows * m * k) as f64 / 1e9;
        for (kind, weight) in [
            ("f32", FrozenWeight::Dense(w.clone())),
            ("bf16", FrozenWeight::Dense(w.to_dtype(candle_core::DType::BF16)?)),
            ("q4_1", FrozenWeight::Quant(std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1)?))),
        ] {
            for (direction, a) in [("xWt", &x), ("dyW", &dy)] {
                let run = |precision| {
                    time(reps, || {
                        let out = match direction {
                            "xWt" => weight.xwt(a, rows, precision)?,
                            _ => weight.dyw(a, rows, precision)?,
                        };
                        std::hint::black_box(out);
                        Ok(())
                    })
                };
                let f32_s = run(lowrank::kernels::Precision::F32)?;
                let bf16_s = run(lowrank::kernels::Precision::Bf16)?;
                println!("{name} {kind} {direction} {:.1} {:.1}", flops / f32_s, flops / bf16_s);
            }
        }
    }
    Ok(())
}

//! LoRA training throughput and peak memory of the default model (SmolLM2-135M-Instruct) on
//! CPU, for one load mode per process: the GGUF as loaded (Q4_1, quantised matmul) or
//! dequantised to f32.
//!
//!     cargo bench -p lowrank --bench train -- --mode q4_1
//!     cargo bench -p lowrank --bench train -- --mode f32 --steps 6 --batch 4 --seq 256 --threads 2 [--dtype bf16]
//!
//! `scripts/bench/train.sh` runs both modes and the PEFT reference
//! (`scripts/bench/peft_train.py`, f32 and bf16 autocast) one after another and
//! prints them side by side. Peak RSS is per process, so each mode needs its own run.
//!
//! One step is what `Trainer::run` does for one micro-batch, without clipping, metrics or
//! checkpoints: `forward_backward` over `batch` sequences of `seq` random token ids (every
//! position but the first is a target, like `labels=input_ids` in transformers), the gradients
//! of every adapter variable, `AdamW::step`. The adapter is LoRA r 16, alpha 32 on q, k, v, o,
//! gate, up and down of every block, PEFT's init (`B = 0`), f32, no dropout — the reference's
//! setup. The figure is the median step time over all steps after the first (tokens/s =
//! batch·seq / median); peak RSS is `VmHWM` from `/proc/self/status` at the end.
//!
//! Other modes: `--mode nf4 --model HF_DIR` (a full-precision HF directory quantised to NF4 at
//! load), `--checkpoint 1` (gradient checkpointing), `--dora 1` (DoRA instead of LoRA).
//!
//! stdout: a header comment and one whitespace-separated row
//! `mode tokens/s median_step_s peak_rss_mib load_rss_mib weight_bytes/param` (resident frozen
//! weight bytes over the model's parameter count); each step's time and loss go to stderr.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

/// The CLI's process setup (threads, allocator), so the bench runs as `lowrank train` does.
#[path = "../../lowrank-cli/src/process.rs"]
mod process;
use lowrank::adapter::{ActiveAdapter, Adapter, AdapterConfig};
use lowrank::model::{LoadOptions, Model};
use lowrank::train::{collect_grads, forward_backward, AdamW, AdamWConfig, TrainSeq};
use rand::{Rng, SeedableRng};

/// The adapter under test: the reference's `LoraConfig`.
const LORA_CONFIG: &str = r#"{"peft_type":"LORA","r":16,"lora_alpha":32,"lora_dropout":0.0,"target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]}"#;
/// The reference's learning rate.
const LR: f64 = 2e-4;

/// How the frozen weights are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The GGUF's Q4_1 blocks, quantised matmul.
    Q4_1,
    /// Dequantised to f32 at load.
    F32,
    /// A full-precision model (`--model`, an HF directory) quantised to NF4 at load (QLoRA).
    Nf4,
}

impl Mode {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "q4_1" => Ok(Mode::Q4_1),
            "f32" => Ok(Mode::F32),
            "nf4" => Ok(Mode::Nf4),
            _ => bail!("--mode {s}: expected q4_1, f32 or nf4"),
        }
    }

    /// Its label in the table.
    fn label(self) -> &'static str {
        match self {
            Mode::Q4_1 => "gguf-q4_1",
            Mode::F32 => "gguf-f32",
            Mode::Nf4 => "nf4",
        }
    }
}

/// What to run; every field has a command-line flag of the same name.
#[derive(Clone, Debug)]
struct Settings {
    /// Frozen weights as loaded or dequantised.
    mode: Mode,
    /// Optimizer steps; the first is warm-up, the median is over the rest.
    steps: usize,
    /// Sequences per step `B`.
    batch: usize,
    /// Tokens per sequence `T`.
    seq: usize,
    /// Worker threads (sets `RAYON_NUM_THREADS`; default: what the CLI's `process::configure` picks).
    threads: Option<usize>,
    /// Rows of logits materialised at a time in the loss (the CLI's value).
    loss_chunk: usize,
    /// Seed of the token ids and the adapter init.
    seed: u64,
    /// The model (default: the default model's GGUF); nf4 needs a full-precision HF directory.
    model: Option<std::path::PathBuf>,
    /// Gradient checkpointing of every k-th block (`--checkpoint 1`: all; 0: off).
    checkpoint: usize,
    /// DoRA instead of LoRA (`--dora 1`).
    dora: bool,
    /// Precision of the frozen-weight products (`--dtype bf16|f32`, as `lowrank train --dtype`).
    precision: lowrank::kernels::Precision,
}

impl Settings {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self> {
        let mut s = Settings {
            mode: Mode::F32,
            steps: 6,
            batch: 4,
            seq: 256,
            threads: None,
            loss_chunk: 512,
            seed: 0,
            model: None,
            precision: lowrank::kernels::Precision::F32,
            checkpoint: 0,
            dora: false,
        };
        let mut args = args.peekable();
        while let Some(flag) = args.next() {
            // `cargo bench` appends `--bench`; a filter word may follow. Neither applies here.
            if flag == "--bench" || !flag.starts_with("--") {
                continue;
            }
            let value = args.next().with_context(|| format!("{flag} needs a value"))?;
            let num = || value.parse::<usize>().with_context(|| format!("{flag} {value}: not a count"));
            match flag.as_str() {
                "--mode" => s.mode = Mode::parse(&value)?,
                "--steps" => s.steps = num()?,
                "--batch" => s.batch = num()?,
                "--seq" => s.seq = num()?,
                "--threads" => s.threads = Some(num()?),
                "--loss-chunk" => s.loss_chunk = num()?,
                "--seed" => s.seed = num()? as u64,
                "--model" => s.model = Some(value.clone().into()),
                "--checkpoint" => s.checkpoint = num()?,
                "--dora" => s.dora = num()? != 0,
                "--dtype" => {
                    s.precision = match value.as_str() {
                        "bf16" => lowrank::kernels::Precision::Bf16,
                        "f32" => lowrank::kernels::Precision::F32,
                        other => bail!("--dtype {other}: expected bf16 or f32"),
                    }
                }
                _ => bail!("unknown flag {flag} (known: --mode --steps --batch --seq --threads --loss-chunk --seed --model --checkpoint --dora --dtype)"),
            }
        }
        ensure!(s.steps >= 2, "--steps must be at least 2 (the first step is not counted)");
        ensure!(s.batch > 0 && s.seq > 1 && s.loss_chunk > 0, "batch, loss-chunk must be positive and seq above 1");
        ensure!(s.threads != Some(0), "--threads must be positive");
        Ok(s)
    }
}

/// A field of `/proc/self/status` in MiB (`VmHWM`: peak resident set, `VmRSS`: current).
fn proc_status_mib(field: &str) -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line =
        status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field} in /proc/self/status"))?;
    // `VmHWM:	  123456 kB`
    let kib: f64 = line[field.len()..]
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("reading `{line}`"))?;
    Ok(kib / 1024.0)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let s = Settings::parse(std::env::args().skip(1))?;
    // Before any tensor work: an explicit thread count first, then the library's defaults.
    if let Some(n) = s.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    process::configure();
    lowrank::kernels::set_matmul_precision(s.precision)?;
    lowrank::threads::run(|| run(&s))
}

/// The measurement, on a compute thread as the CLI runs it.
fn run(s: &Settings) -> Result<()> {
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();

    let gguf = match &s.model {
        Some(p) => p.clone(),
        None if s.mode == Mode::Nf4 => bail!(
            "--mode nf4 needs --model: a full-precision HF directory (e.g. ~/.cache/lowrank-reference/smollm2-hf)"
        ),
        None => lowrank_home::default_model_gguf().context("fetching the default model")?,
    };
    let quantize = (s.mode == Mode::Nf4).then_some(lowrank::model::Quantize::Nf4);
    let opts = LoadOptions { dequantize: s.mode == Mode::F32, quantize, ..Default::default() };
    let model = Model::from_path(&gguf, &opts).with_context(|| format!("loading {}", gguf.display()))?;
    let lora_config = if s.dora {
        LORA_CONFIG.replace(r#""peft_type":"LORA""#, r#""peft_type":"LORA","use_dora":true"#)
    } else {
        LORA_CONFIG.to_string()
    };
    let config = AdapterConfig::from_json(&lora_config, Path::new("bench-lora"))?;
    let initial = Adapter::init("bench-lora", config, &model, s.seed)?;
    ensure!(
        initial.num_layers() == 7 * model.config().num_layers,
        "expected 7 adapted projections per block, got {}",
        initial.num_layers()
    );
    let (adapter, named) = initial.to_trainable(model.modules(), None)?;
    let vars: Vec<_> = named.into_iter().map(|(_, v)| v).collect();
    let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let active = [ActiveAdapter { adapter: Arc::new(adapter), weight: 1.0 }];
    let load_rss = proc_status_mib("VmRSS")?;
    let label = format!(
        "{}{}{}",
        s.mode.label(),
        if s.dora { "+dora" } else { "" },
        match s.checkpoint {
            0 => String::new(),
            1 => "+ckpt".into(),
            k => format!("+ckpt/{k}"),
        }
    );
    eprintln!(
        "{label}: {} ({} weight bytes), {trainable} trainable parameters, {threads} threads, RSS after load {load_rss:.0} MiB",
        gguf.display(),
        model.weight_bytes()
    );

    // B sequences of T random ids, fresh each step (as the reference draws them); every
    // position but the first is a target.
    let vocab = model.config().vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed);
    let targets: Vec<bool> = (0..s.seq).map(|t| t > 0).collect(); // [T]
    let mut times = Vec::with_capacity(s.steps);
    for step in 0..s.steps {
        let ids: Vec<Vec<u32>> =
            (0..s.batch).map(|_| (0..s.seq).map(|_| rng.random_range(0..vocab)).collect()).collect(); // [B, T]
        let seqs: Vec<TrainSeq> = ids.iter().map(|ids| TrainSeq { ids, targets: &targets }).collect();
        let t0 = Instant::now();
        let out = forward_backward(&model, &active, &seqs, s.loss_chunk, 1.0, s.checkpoint)?;
        let grads = collect_grads(&out.grads, &vars)?;
        opt.step(&grads, LR)?;
        times.push(t0.elapsed().as_secs_f64());
        eprintln!("  step {step} loss {:.3} {:.2}s (RSS {:.0} MiB)", out.loss, times[step], proc_status_mib("VmRSS")?);
    }
    let med = median(times[1..].to_vec());
    let peak = proc_status_mib("VmHWM")?;

    println!(
        "# lowrank (candle CPU) LoRA training: batch {} x {} tokens, r 16 alpha 32 on q,k,v,o,gate,up,down, f32 adapter, AdamW; median of {} steps after 1 warm-up, {threads} threads",
        s.batch,
        s.seq,
        s.steps - 1
    );
    let bytes_per_param = model.weight_bytes() as f64 / model.config().num_parameters() as f64;
    println!(
        "{:<16} {:>10} {:>14} {:>14} {:>14} {:>16}",
        "mode", "tokens/s", "median_step_s", "peak_rss_mib", "load_rss_mib", "weight_bytes/param"
    );
    println!(
        "{:<16} {:>10.1} {:>14.3} {:>14.0} {:>14.0} {:>16.3}",
        label,
        (s.batch * s.seq) as f64 / med,
        med,
        peak,
        load_rss,
        bytes_per_param
    );
    Ok(())
}

//! Generation throughput of the default model (SmolLM2-135M-Instruct): prompt processing
//! (prefill) and greedy decode tokens/s, without an adapter and with a LoRA adapter, for the
//! GGUF as loaded (Q4_1, quantised matmul) and dequantised to f32.
//!
//!     cargo bench -p lowrank --bench generate
//!     cargo bench -p lowrank --bench generate -- --reps 9 --threads 2 --batch 8 --hf-dir DIR
//!     cargo bench -p lowrank --bench generate -- --modes gguf-q4_1   # one mode only
//!
//! `scripts/bench/generate.sh` runs this and the transformers + PEFT reference
//! (`scripts/bench/transformers_generate.py`) and compares them; both print the same table.
//!
//! One repetition: a fresh cache, one forward over the prompt (timed: prefill), then `decode`
//! single-token forwards, each feeding back the argmax of the last (timed: decode; EOS ignored).
//! Batch decode: `batch` sequences, each with its own cache, prefilled together (untimed), then
//! `decode` forwards of one token per sequence (aggregate tokens/s). Every figure is the median
//! over `reps` repetitions after `warmup`; without and with the adapter alternate repetition by
//! repetition, so their ratio is fair on a machine whose load drifts. The table goes to stdout (whitespace-separated, no
//! spaces inside a field, so scripts can read it); each repetition's timings go to stderr.
//!
//! The adapter is LoRA r = 16, alpha = 32 on all seven projections of every block, with `A` and
//! `B` both random (PEFT's `init_lora_weights=False`), so its update is really computed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use lowrank::adapter::{plan, ActiveAdapter, Adapter, AdapterConfig, AdapterLayer, LoraInit, LoraLayer};
use lowrank::model::{KvCache, LoadOptions, Model, SeqInput};
use rand::Rng;

/// The adapter under test, as PEFT would write it.
const LORA_CONFIG: &str = r#"{"peft_type":"LORA","r":16,"lora_alpha":32,"target_modules":"all-linear"}"#;
/// Its label in the table.
const LORA_LABEL: &str = "lora-r16-all";
/// Vocabulary size of SmolLM2; prompt ids stay below it.
const PROMPT_VOCAB: u64 = 49152;

/// What to run; every field has a command-line flag of the same name.
#[derive(Clone, Debug)]
struct Settings {
    /// Timed repetitions (the median is reported).
    reps: usize,
    /// Untimed repetitions first.
    warmup: usize,
    /// Prompt length `T`.
    prompt: usize,
    /// Decoded tokens per repetition.
    decode: usize,
    /// Sequences decoded together for the batch figure (0: skip it).
    batch: usize,
    /// Worker threads (sets `RAYON_NUM_THREADS`, which candle's CPU kernels read).
    threads: usize,
    /// Also measure this HF directory (f32 safetensors) as a third mode.
    hf_dir: Option<PathBuf>,
    /// Modes to measure (`--modes gguf-q4_1,gguf-f32`); empty: all of them.
    modes: Vec<String>,
    /// Precision of the frozen-weight products (`--dtype bf16|f32`, as `lowrank generate --dtype`:
    /// prefill and batches of more than 16 rows).
    precision: lowrank::kernels::Precision,
}

impl Settings {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self> {
        let mut s = Settings {
            reps: 5,
            warmup: 1,
            prompt: 128,
            decode: 64,
            batch: 8,
            threads: 2,
            hf_dir: None,
            modes: Vec::new(),
            precision: lowrank::kernels::Precision::F32,
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
                "--reps" => s.reps = num()?,
                "--warmup" => s.warmup = num()?,
                "--prompt" => s.prompt = num()?,
                "--decode" => s.decode = num()?,
                "--batch" => s.batch = num()?,
                "--threads" => s.threads = num()?,
                "--hf-dir" => s.hf_dir = Some(PathBuf::from(value)),
                "--modes" => s.modes = value.split(',').map(str::to_owned).collect(),
                "--dtype" => {
                    s.precision = match value.as_str() {
                        "bf16" => lowrank::kernels::Precision::Bf16,
                        "f32" => lowrank::kernels::Precision::F32,
                        other => bail!("--dtype {other}: expected bf16 or f32"),
                    }
                }
                _ => bail!(
                    "unknown flag {flag} (known: --reps --warmup --prompt --decode --batch --threads --hf-dir --modes --dtype)"
                ),
            }
        }
        ensure!(
            s.reps > 0 && s.prompt > 0 && s.decode > 0 && s.threads > 0,
            "reps, prompt, decode and threads must be positive"
        );
        Ok(s)
    }
}

/// Medians of one (mode, adapter) row, tokens/s.
struct Row {
    prefill: f64,
    decode: f64,
    batch_decode: Option<f64>,
}

/// The prompt of sequence `seq`: a fixed pseudo-random walk over the vocabulary, shared with
/// the Python reference (`prompt_ids` there).
fn prompt_ids(seq: usize, len: usize) -> Vec<u32> {
    (0..len as u64).map(|i| ((1000 + 7919 * i + 104_729 * seq as u64) % PROMPT_VOCAB) as u32).collect()
}

/// A LoRA adapter with random `A` and `B` for every module the config targets: PEFT's init
/// (`A` kaiming-uniform), then `B` uniform in `±1/√r` instead of zero.
fn random_lora(model: &Model, seed: u64, device: &Device) -> Result<Adapter> {
    let path = Path::new("bench-lora");
    let config = AdapterConfig::from_json(LORA_CONFIG, path)?;
    let table = model.modules();
    let mut rng = LoraLayer::rng(seed);
    let mut layers: Vec<Option<Box<dyn AdapterLayer>>> = Vec::with_capacity(table.len());
    for (m, p) in table.modules().iter().zip(plan(&config, table, path)?) {
        let Some(p) = p else {
            layers.push(None);
            continue;
        };
        let mut layer =
            LoraLayer::init(p.r, m.in_features, m.out_features, p.scale, LoraInit::Kaiming, &mut rng, device)?; // A [r, K]
        let bound = 1.0 / (p.r as f32).sqrt();
        let b: Vec<f32> = (0..m.out_features * p.r).map(|_| rng.random_range(-bound..bound)).collect();
        layer.b = Tensor::from_vec(b, (m.out_features, p.r), device)?; // [M, r]
        layers.push(Some(Box::new(layer)));
    }
    let adapter = Adapter::new(LORA_LABEL.into(), config, layers);
    ensure!(
        adapter.num_layers() == 7 * model.config().num_layers,
        "expected 7 adapted projections per block, got {}",
        adapter.num_layers()
    );
    Ok(adapter)
}

/// `logits: [B, V]` → the argmax of each row.
fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(1)?.to_vec1::<u32>()?)
}

/// One repetition for one sequence: (prefill seconds, decode seconds).
fn run_single(model: &Model, prompt: &[u32], adapters: &[ActiveAdapter], decode: usize) -> Result<(f64, f64)> {
    let mut cache = [model.new_cache()];
    let t0 = Instant::now();
    let logits = model.forward_last(&[SeqInput { tokens: prompt, adapters }], Some(&mut cache))?; // [1, V]
    let mut next = argmax(&logits)?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..decode {
        let logits = model.forward_last(&[SeqInput { tokens: &next, adapters }], Some(&mut cache))?; // [1, V]
        next = argmax(&logits)?;
    }
    Ok((prefill, t1.elapsed().as_secs_f64()))
}

/// One repetition of batch decode: seconds for `decode` steps of `prompts.len()` sequences.
fn run_batch(model: &Model, prompts: &[Vec<u32>], adapters: &[ActiveAdapter], decode: usize) -> Result<f64> {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let seqs: Vec<SeqInput> = prompts.iter().map(|p| SeqInput { tokens: p, adapters }).collect();
    let mut next = argmax(&model.forward_last(&seqs, Some(&mut caches))?)?; // [B]
    let t0 = Instant::now();
    for _ in 0..decode {
        let seqs: Vec<SeqInput> = next.iter().map(|t| SeqInput { tokens: std::slice::from_ref(t), adapters }).collect();
        next = argmax(&model.forward_last(&seqs, Some(&mut caches))?)?; // [B, V] -> [B]
    }
    Ok(t0.elapsed().as_secs_f64())
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

fn fmt_secs(xs: &[f64]) -> String {
    xs.iter().map(|x| format!("{:.3}", x)).collect::<Vec<_>>().join(" ")
}

/// Warm-up, then `reps` timed repetitions of every figure for each variant (label, adapters).
/// The variants alternate within each repetition, so a change in machine load during the run
/// hits all of them alike and their ratio stays fair.
fn measure(s: &Settings, model: &Model, variants: &[(&str, &[ActiveAdapter])]) -> Result<Vec<Row>> {
    let prompt = prompt_ids(0, s.prompt);
    let n = variants.len();
    let (mut pre, mut dec) = (vec![Vec::new(); n], vec![Vec::new(); n]);
    for i in 0..s.warmup + s.reps {
        for (v, (_, adapters)) in variants.iter().enumerate() {
            let (p, d) = run_single(model, &prompt, adapters, s.decode)?;
            if i >= s.warmup {
                pre[v].push(p);
                dec[v].push(d);
            }
        }
    }
    let prompts: Vec<Vec<u32>> = (0..s.batch).map(|b| prompt_ids(b, s.prompt)).collect();
    let mut bd = vec![Vec::new(); n];
    for i in 0..if s.batch > 0 { s.warmup + s.reps } else { 0 } {
        for (v, (_, adapters)) in variants.iter().enumerate() {
            let t = run_batch(model, &prompts, adapters, s.decode)?;
            if i >= s.warmup {
                bd[v].push(t);
            }
        }
    }
    let mut rows = Vec::with_capacity(n);
    for (v, (label, _)) in variants.iter().enumerate() {
        eprintln!("  {label}: prefill s [{}]  decode s [{}]", fmt_secs(&pre[v]), fmt_secs(&dec[v]));
        if s.batch > 0 {
            eprintln!("  {label}: batch-{} decode s [{}]", s.batch, fmt_secs(&bd[v]));
        }
        rows.push(Row {
            prefill: s.prompt as f64 / median(pre[v].clone()),
            decode: s.decode as f64 / median(dec[v].clone()),
            batch_decode: (s.batch > 0).then(|| (s.batch * s.decode) as f64 / median(bd[v].clone())),
        });
    }
    Ok(rows)
}

/// Checks that the adapter changes the logits (so the "with adapter" rows measure real work).
fn check_adapter_computes(model: &Model, adapters: &[ActiveAdapter]) -> Result<f32> {
    let prompt = prompt_ids(0, 8);
    let base = model.forward_last(&[SeqInput { tokens: &prompt, adapters: &[] }], None)?;
    let lora = model.forward_last(&[SeqInput { tokens: &prompt, adapters }], None)?;
    let diff = (base - lora)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    ensure!(diff > 0.0, "the adapter does not change the logits");
    Ok(diff)
}

fn print_header(s: &Settings) {
    println!(
        "# lowrank (candle CPU): prompt {} tokens, decode {} tokens (greedy, EOS ignored), median of {} after {} warm-up, {} threads",
        s.prompt, s.decode, s.reps, s.warmup, s.threads
    );
    println!(
        "{:<12} {:<14} {:>14} {:>14} {:>20}",
        "mode",
        "adapter",
        "prefill_tok/s",
        "decode_tok/s",
        format!("batch{}_decode_tok/s", s.batch)
    );
}

fn fmt_opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |x| format!("{x:.digits$}"))
}

fn print_rows(mode: &str, none: &Row, lora: &Row) {
    for (adapter, r) in [("none", none), (LORA_LABEL, lora)] {
        println!(
            "{:<12} {:<14} {:>14.1} {:>14.2} {:>20}",
            mode,
            adapter,
            r.prefill,
            r.decode,
            fmt_opt(r.batch_decode, 2)
        );
    }
    let batch_ratio = none.batch_decode.zip(lora.batch_decode).map(|(n, l)| l / n);
    println!(
        "{:<12} {:<14} {:>14.3} {:>14.3} {:>20}",
        mode,
        "ratio_lora/none",
        lora.prefill / none.prefill,
        lora.decode / none.decode,
        fmt_opt(batch_ratio, 3)
    );
}

fn main() -> Result<()> {
    let s = Settings::parse(std::env::args().skip(1))?;
    // Before candle's first kernel creates the rayon pool (and reads the variable).
    std::env::set_var("RAYON_NUM_THREADS", s.threads.to_string());
    lowrank::kernels::set_matmul_precision(s.precision)?;
    let gguf = lowrank_home::default_model_gguf().context("fetching the default model")?;
    let mut modes: Vec<(&str, PathBuf, bool)> = vec![("gguf-q4_1", gguf.clone(), false), ("gguf-f32", gguf, true)];
    if let Some(dir) = &s.hf_dir {
        modes.push(("hf-f32", dir.clone(), false));
    }
    if let Some(unknown) = s.modes.iter().find(|m| !modes.iter().any(|(known, ..)| known == m)) {
        bail!("--modes: no mode {unknown} (known: {})", modes.iter().map(|m| m.0).collect::<Vec<_>>().join(", "));
    }
    modes.retain(|(mode, ..)| s.modes.is_empty() || s.modes.iter().any(|m| m == mode));
    let mut results = Vec::new();
    for (mode, path, dequantize) in modes {
        let opts = LoadOptions { dequantize, ..Default::default() };
        let model = Model::from_path(&path, &opts).with_context(|| format!("loading {}", path.display()))?;
        let device = model.device().clone();
        let adapter = Arc::new(random_lora(&model, 0, &device)?);
        let lora = [ActiveAdapter { adapter, weight: 1.0 }];
        let diff = check_adapter_computes(&model, &lora)?;
        eprintln!(
            "{mode}: {} ({} weight bytes); adapter changes logits by up to {diff:.3}",
            path.display(),
            model.weight_bytes()
        );
        // On a worker of the pool, as the CLI and the server drive the model (`threads::run`).
        let rows = lowrank::threads::run(|| measure(&s, &model, &[("none", &[]), (LORA_LABEL, &lora)]))?;
        let [none, with] = <[Row; 2]>::try_from(rows).map_err(|_| anyhow!("two variants give two rows"))?;
        results.push((mode, none, with));
    }
    print_header(&s);
    for (mode, none, with) in &results {
        print_rows(mode, none, with);
    }
    Ok(())
}

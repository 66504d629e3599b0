//! `lowrank train`: fine-tune a LoRA adapter on JSONL data.
//!
//! Three layers: [`TrainArgs`] (flags, also the keys of `--config FILE.toml`) → [`Settings`]
//! (flags over file over defaults, destructured so no flag is ignored) → the run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use lowrank::adapter::{ActiveAdapter, Adapter, AdapterConfig, LoraInit, LoraSpec, ModuleSelector};
use lowrank::bundle::ModelBundle;
use lowrank::chat::ChatTemplate;
use lowrank::data::{load_jsonl, DataOptions, Dataset, Example, Examples};
use lowrank::kernels::{bf16_available, set_matmul_precision, Precision};
use lowrank::model::LoadOptions;
use lowrank::tokenizer::Tokenizer;
use lowrank::train::{metrics, AdamWConfig, ResidualBase, RunEnd, Schedule, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};

use super::common::{load_options, memory, mib, model_path, DeviceArg, DtypeArg, QuantizeArg};
use super::example::{self, ExampleTask};
use super::progress::Progress;

#[derive(Args, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML file whose keys are these flags' names (with `_`); flags override it
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Model: HF directory or .gguf [default: SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data, JSONL ({"text"}, {"prompt","completion"} or {"messages"}) [default: the shipped example task]
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which shipped example task to train on when no --data is given [default: dates]
    #[arg(long, value_enum, value_name = "NAME", conflicts_with = "data")]
    example: Option<ExampleTask>,
    /// Held-out JSONL for evaluation
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Hold out this fraction of --data for evaluation instead
    #[arg(long)]
    eval_split: Option<f64>,
    /// Output directory (must not exist, or be the run being resumed)
    #[arg(long)]
    output: Option<PathBuf>,
    /// Optimizer steps (or give --epochs) [default for the example tasks: dates 60, roman 150]
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<usize>,
    /// Passes over the data (instead of --steps)
    #[arg(long)]
    epochs: Option<f64>,
    /// Sequences per micro-batch [default: 4; 8 for the roman example]
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1]
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Peak learning rate [default: 2e-4; 1e-3 for the example tasks]
    #[arg(long)]
    lr: Option<f64>,
    /// LoRA rank [default: 16]
    #[arg(long)]
    rank: Option<usize>,
    /// LoRA alpha [default: 2 × rank]
    #[arg(long)]
    alpha: Option<f64>,
    /// LoRA dropout [default: 0]
    #[arg(long)]
    dropout: Option<f64>,
    /// Modules to adapt: comma-separated names, or all-linear [default: all-linear]
    #[arg(long)]
    target_modules: Option<String>,
    /// Scale by alpha/sqrt(rank) (rsLoRA)
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    rslora: Option<bool>,
    /// DoRA: a trained magnitude per output row on top of the low-rank direction update
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    dora: Option<bool>,
    /// How A (and B) start: kaiming (uniform ±1/√in, B = 0; PEFT's default), gaussian (N(0, 1/r)),
    /// pissa (top-r SVD of W) or olora (QR of W); pissa and olora train on the residual base and
    /// save the adapter converted to plain LoRA of rank 2r for the original base [default: kaiming]
    #[arg(long, value_enum)]
    init: Option<InitArg>,
    /// LoRA+: B (and DoRA magnitudes) learn at lr × this ratio (PEFT's loraplus_lr_ratio, e.g. 16)
    #[arg(long)]
    lora_plus_ratio: Option<f64>,
    /// Recompute every K-th block's activations in the backward pass instead of keeping them
    /// (K = 1 when given alone: every block, least memory; 2: half the blocks)
    #[arg(long, value_name = "K", num_args = 0..=1, default_missing_value = "1")]
    gradient_checkpointing: Option<usize>,
    /// Longest sequence in tokens; longer rows are truncated [default: 512]
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Train on prompt tokens too, not only completions / assistant turns
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    train_on_prompt: Option<bool>,
    /// Seed for init, data order and dropout [default: 0]
    #[arg(long)]
    seed: Option<u64>,
    /// Learning-rate schedule [default: cosine]
    #[arg(long, value_enum)]
    schedule: Option<ScheduleArg>,
    /// Linear warmup steps [default: 0; 10 for the example tasks]
    #[arg(long)]
    warmup: Option<usize>,
    /// AdamW weight decay [default: 0]
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Clip the global gradient norm (0 disables) [default: 1.0]
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Checkpoint every N steps [default: 50]
    #[arg(long)]
    save_every: Option<usize>,
    /// Evaluate every N steps [default: 25]
    #[arg(long)]
    eval_every: Option<usize>,
    /// Continue the run in this directory (its settings are reused; flags may not change them)
    #[arg(long)]
    #[serde(skip)]
    resume: Option<PathBuf>,
    /// Dequantise a GGUF base to f32 at load
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    dequantize: Option<bool>,
    /// Quantise a full-precision base's projections at load (QLoRA)
    #[arg(long, value_enum)]
    quantize: Option<QuantizeArg>,
    /// Device
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
    /// Precision of the products with the frozen weights: bf16 (operands rounded to bf16, sums
    /// in f32, as PyTorch's CPU autocast; the adapter, its gradients, the optimizer, norms and
    /// the loss stay f32) or f32 (exact) [default: bf16 where the CPU has AVX-512-BF16, else f32]
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
}

/// Runs written before `--dtype` existed multiplied in f32.
fn f32_dtype() -> DtypeArg {
    DtypeArg::F32
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum ScheduleArg {
    Constant,
    Linear,
    Cosine,
}

impl From<ScheduleArg> for Schedule {
    fn from(s: ScheduleArg) -> Self {
        match s {
            ScheduleArg::Constant => Schedule::Constant,
            ScheduleArg::Linear => Schedule::Linear,
            ScheduleArg::Cosine => Schedule::Cosine,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum InitArg {
    Kaiming,
    Gaussian,
    Pissa,
    Olora,
}

impl From<InitArg> for LoraInit {
    fn from(i: InitArg) -> Self {
        match i {
            InitArg::Kaiming => LoraInit::Kaiming,
            InitArg::Gaussian => LoraInit::Gaussian,
            InitArg::Pissa => LoraInit::Pissa,
            InitArg::Olora => LoraInit::Olora,
        }
    }
}

/// Refuses options no run can use before anything is loaded or allocated: a rank past any
/// projection's width is refused again against the model's own modules.
fn check_numbers(adapter: &LoraSpec, train: &TrainConfig) -> Result<()> {
    if adapter.r == 0 || adapter.r > 65_536 {
        bail!("--rank {}: expected 1 to 65536 (and at most the widest targeted projection)", adapter.r);
    }
    let a = adapter.lora_alpha;
    if !(a.is_finite() && a > 0.0 && a <= lowrank::adapter::MAX_ALPHA) {
        bail!("--alpha {a}: expected a positive number up to {:e}", lowrank::adapter::MAX_ALPHA);
    }
    if !(0.0..1.0).contains(&adapter.lora_dropout) {
        bail!("--dropout {}: expected a probability in [0, 1)", adapter.lora_dropout);
    }
    if !(train.lr.is_finite() && train.lr > 0.0 && train.lr <= 10.0) {
        bail!("--lr {}: expected a positive learning rate (at most 10)", train.lr);
    }
    if train.batch_size == 0 || train.grad_accum == 0 {
        bail!("--batch-size and --grad-accum must be at least 1");
    }
    if !(train.adamw.weight_decay.is_finite() && train.adamw.weight_decay >= 0.0) {
        bail!("--weight-decay {}: expected a finite number >= 0", train.adamw.weight_decay);
    }
    if train.max_grad_norm.is_some_and(|n| !n.is_finite()) {
        bail!("--max-grad-norm must be finite");
    }
    Ok(())
}

/// The resolved settings of a run, written to `OUT/lowrank_train.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    pub model: PathBuf,
    pub data: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub eval_split: Option<f64>,
    pub output: PathBuf,
    pub epochs: Option<f64>,
    pub max_seq_len: usize,
    pub train_on_prompt: bool,
    pub dequantize: bool,
    #[serde(default)]
    pub quantize: Option<QuantizeArg>,
    pub device: DeviceArg,
    #[serde(default = "f32_dtype")]
    pub dtype: DtypeArg,
    pub adapter: LoraSpec,
    pub train: TrainConfig,
    /// The shipped example task trained on, if any: show before/after answers at the end.
    #[serde(default, deserialize_with = "example::deserialize_task")]
    pub example: Option<ExampleTask>,
}

const SETTINGS_FILE: &str = "lowrank_train.json";

impl Settings {
    fn resolve(args: TrainArgs) -> Result<Self> {
        // A resumed run starts from its saved settings; a config file from its keys.
        let file = match &args.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                toml::from_str::<TrainArgs>(&text).with_context(|| format!("parsing {}", p.display()))?
            }
            None => TrainArgs::default(),
        };
        let saved: Option<Settings> = match &args.resume {
            Some(dir) => {
                let p = dir.join(SETTINGS_FILE);
                let text = std::fs::read_to_string(&p).with_context(|| {
                    format!("reading {} (is {} a lowrank train output?)", p.display(), dir.display())
                })?;
                Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?)
            }
            None => None,
        };
        if let Some(s) = saved {
            return s.overridden_by(args);
        }
        let TrainArgs {
            config: _,
            model,
            data,
            example,
            eval_data,
            eval_split,
            output,
            steps,
            epochs,
            batch_size,
            grad_accum,
            lr,
            rank,
            alpha,
            dropout,
            target_modules,
            rslora,
            dora,
            init,
            lora_plus_ratio,
            gradient_checkpointing,
            max_seq_len,
            train_on_prompt,
            seed,
            schedule,
            warmup,
            weight_decay,
            max_grad_norm,
            save_every,
            eval_every,
            resume: _,
            dequantize,
            quantize,
            device,
            dtype,
        } = args;
        // No --data: a shipped example task, on the default model or the one given.
        let example = match (data.as_ref().or(file.data.as_ref()), example.or(file.example)) {
            (Some(_), Some(task)) => {
                bail!("--example {} trains on a shipped task; it cannot be combined with --data", task.name())
            }
            (Some(_), None) => None,
            (None, task) => Some(task.unwrap_or_default()),
        };
        let d = example::defaults(example);
        let (data, eval_data) = match (data.or(file.data), example) {
            (Some(p), _) => (p, eval_data.or(file.eval_data)),
            (None, task) => {
                if eval_data.is_some() || file.eval_data.is_some() {
                    bail!("--eval-data needs --data (the example task brings its own held-out set)");
                }
                let (train, eval) = task.unwrap_or_default().write_dataset()?;
                (train, Some(eval))
            }
        };
        let rank = rank.or(file.rank).unwrap_or(16);
        let targets = target_modules.or(file.target_modules).unwrap_or_else(|| "all-linear".into());
        let target_modules = if targets == "all-linear" {
            ModuleSelector::Pattern(targets)
        } else {
            ModuleSelector::List(targets.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
        };
        let adapter = LoraSpec {
            r: rank,
            lora_alpha: alpha.or(file.alpha).unwrap_or(2.0 * rank as f64),
            lora_dropout: dropout.or(file.dropout).unwrap_or(0.0),
            target_modules,
            use_rslora: rslora.or(file.rslora).unwrap_or(false),
            use_dora: dora.or(file.dora).unwrap_or(false),
            init_lora_weights: init.or(file.init).unwrap_or(InitArg::Kaiming).into(),
            base_model_name_or_path: model.as_ref().or(file.model.as_ref()).map(|p| p.display().to_string()),
        };
        let max_grad_norm = max_grad_norm.or(file.max_grad_norm).unwrap_or(1.0);
        let lora_plus_ratio = lora_plus_ratio.or(file.lora_plus_ratio);
        if let Some(r) = lora_plus_ratio.filter(|r| !(r.is_finite() && *r > 0.0)) {
            bail!("--lora-plus-ratio {r}: expected a positive number (PEFT's loraplus_lr_ratio, e.g. 16)");
        }
        let train = TrainConfig {
            steps: steps.or(file.steps).unwrap_or(0),
            batch_size: batch_size.or(file.batch_size).unwrap_or(d.batch_size),
            grad_accum: grad_accum.or(file.grad_accum).unwrap_or(1),
            lr: lr.or(file.lr).unwrap_or(d.lr),
            schedule: schedule.or(file.schedule).map(Into::into).unwrap_or(Schedule::Cosine),
            warmup: warmup.or(file.warmup).unwrap_or(d.warmup),
            adamw: AdamWConfig {
                weight_decay: weight_decay.or(file.weight_decay).unwrap_or(0.0),
                ..Default::default()
            },
            max_grad_norm: (max_grad_norm > 0.0).then_some(max_grad_norm),
            seed: seed.or(file.seed).unwrap_or(0),
            save_every: Some(save_every.or(file.save_every).unwrap_or(50)),
            eval_every: Some(eval_every.or(file.eval_every).unwrap_or(25)),
            loss_chunk: 512,
            lora_plus_ratio,
            gradient_checkpointing: gradient_checkpointing.or(file.gradient_checkpointing).unwrap_or(0),
        };
        check_numbers(&adapter, &train)?;
        let steps_or_epochs = train.steps > 0 || epochs.or(file.epochs).is_some();
        let mut s = Settings {
            model: model_path(model.or(file.model).as_deref())?,
            data,
            eval_data,
            eval_split: eval_split.or(file.eval_split),
            output: match output.or(file.output) {
                Some(o) => o,
                None => match example {
                    Some(task) => task.default_output()?,
                    None => bail!("--output is required"),
                },
            },
            epochs: epochs.or(file.epochs),
            max_seq_len: max_seq_len.or(file.max_seq_len).unwrap_or(512),
            train_on_prompt: train_on_prompt.or(file.train_on_prompt).unwrap_or(false),
            dequantize: dequantize.or(file.dequantize).unwrap_or(false),
            quantize: quantize.or(file.quantize),
            device: device.or(file.device).unwrap_or_default(),
            dtype: dtype.or(file.dtype).unwrap_or(if bf16_available() { DtypeArg::Bf16 } else { DtypeArg::F32 }),
            adapter,
            train,
            example,
        };
        if !steps_or_epochs {
            if example.is_some() {
                s.train.steps = d.steps;
            } else {
                bail!("give --steps or --epochs");
            }
        }
        Ok(s)
    }

    /// A resumed run: only flags that do not change the result may be given.
    fn overridden_by(mut self, args: TrainArgs) -> Result<Self> {
        let TrainArgs { save_every, eval_every, device, output, .. } = &args;
        if let Some(n) = save_every {
            self.train.save_every = Some(*n);
        }
        if let Some(n) = eval_every {
            self.train.eval_every = Some(*n);
        }
        if let Some(d) = device {
            self.device = *d;
        }
        if let Some(o) = output {
            if o != &self.output {
                bail!("--resume continues in {}; --output cannot change it", self.output.display());
            }
        }
        let changed = args.model.is_some()
            || args.data.is_some()
            || args.example.is_some()
            || args.steps.is_some()
            || args.lr.is_some()
            || args.rank.is_some()
            || args.dora.is_some()
            || args.batch_size.is_some()
            || args.seed.is_some()
            || args.dtype.is_some();
        if changed {
            bail!(
                "--resume reuses the run's own settings ({}); drop the other training flags",
                self.output.join(SETTINGS_FILE).display()
            );
        }
        Ok(self)
    }
}

fn load_data<'a>(
    s: &Settings,
    tokenizer: &'a Tokenizer,
    tpl: Option<&'a ChatTemplate>,
) -> Result<(Dataset<'a>, Option<Dataset<'a>>)> {
    let opts = DataOptions { max_seq_len: s.max_seq_len, train_on_prompt: s.train_on_prompt };
    let train = load_jsonl(&s.data, tokenizer, tpl, &opts).with_context(|| format!("loading {}", s.data.display()))?;
    let report = |name: &str, d: &Dataset| {
        eprintln!(
            "{name}: {} rows ({:?}), {} tokens, {} targets; {} truncated at {}, {} dropped (no target tokens)",
            d.len(),
            d.stats.format,
            d.stats.tokens,
            d.stats.target_tokens,
            d.stats.truncated,
            s.max_seq_len,
            d.stats.dropped_no_targets
        );
    };
    report("train", &train);
    if let Some(hint) = train.stats.boundary_hint() {
        eprintln!("---> HINT: {hint}");
    }
    let (train, eval) = match (&s.eval_data, s.eval_split) {
        (Some(p), _) => {
            let eval = load_jsonl(p, tokenizer, tpl, &opts).with_context(|| format!("loading {}", p.display()))?;
            report("eval", &eval);
            (train, Some(eval))
        }
        (None, Some(f)) => {
            let (t, e) = train.split(f, s.train.seed)?;
            eprintln!("split: {} rows for training, {} held out", t.len(), e.len());
            (t, Some(e))
        }
        (None, None) => (train, None),
    };
    Ok((train, eval))
}

pub fn run(args: TrainArgs) -> Result<()> {
    let resume = args.resume.clone();
    let mut s = Settings::resolve(args)?;
    if resume.is_none()
        && s.output.exists()
        && std::fs::read_dir(&s.output).map(|mut d| d.next().is_some()).unwrap_or(true)
    {
        bail!(
            "output directory {} already exists and is not empty (use --resume {0} to continue it)",
            s.output.display()
        );
    }
    set_matmul_precision(s.dtype.into()).context("--dtype bf16")?;
    // In bf16 the frozen projections are rounded to bf16 by every product that matters: hold
    // them so (an f32 base's take half the memory).
    let opts =
        LoadOptions { frozen_bf16: s.dtype == DtypeArg::Bf16, ..load_options(s.device, s.dequantize, s.quantize)? };
    let mut bundle =
        ModelBundle::open(&s.model, &opts).with_context(|| format!("loading model {}", s.model.display()))?;
    let (train, eval) = load_data(&s, &bundle.tokenizer, bundle.chat_template.as_ref())?;
    if let Some(epochs) = s.epochs {
        let per_epoch = train.len().div_ceil(s.train.batch_size * s.train.grad_accum);
        s.train.steps = ((per_epoch as f64 * epochs).ceil() as usize).max(1);
    }
    // The initial adapter before anything is written: a config it cannot start from leaves no output.
    let adapter_cfg = AdapterConfig::new_lora(&s.adapter)?;
    let start = Arc::new(Adapter::init("adapter", adapter_cfg, &bundle.model, s.train.seed)?);
    std::fs::create_dir_all(&s.output).with_context(|| format!("creating {}", s.output.display()))?;
    let settings_json = serde_json::to_vec_pretty(&s)?;
    lowrank::staging::write_atomic(&s.output.join(SETTINGS_FILE), &settings_json)?;

    let before = match s.example {
        Some(task) if resume.is_none() => Some(example::exact_match(task, &bundle, &[])?),
        _ => None,
    };
    // PiSSA / OLoRA train on the residual base; the result is converted back for the original.
    let residual = ResidualBase::enter(&mut bundle.model, &start).context("writing the residual base")?;
    let model = &bundle.model;
    let mut trainer = match &resume {
        Some(dir) => Trainer::resume(model, s.train.clone(), &s.output, dir)?,
        None => Trainer::new(model, &start, s.train.clone(), &s.output)?,
    };
    let trainable = trainer.adapter().num_parameters();
    let total = model.config().num_parameters();
    eprintln!(
        "training {} of {} parameters ({:.3}%): rank {}, {} modules; {} steps of {} × {} sequences, {} products{}",
        trainable,
        total,
        100.0 * trainable as f64 / total as f64,
        s.adapter.r,
        trainer.adapter().num_layers(),
        s.train.steps,
        s.train.batch_size,
        s.train.grad_accum,
        Precision::from(s.dtype),
        if trainer.step() > 0 { format!(", resuming at step {}", trainer.step()) } else { String::new() }
    );

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    let mut progress = Progress::new(stop, trainer.step(), s.train.steps);
    let end = match &eval {
        Some(eval) => trainer.run(&train, eval, &mut progress),
        None => trainer.run(&train, &[] as &[Example], &mut progress),
    };
    progress.finish();
    let history = metrics::read(&s.output.join("metrics.jsonl"))?;
    lowrank::staging::write_atomic(&s.output.join("loss.svg"), metrics::loss_svg(&history).as_bytes())?;
    match end? {
        RunEnd::Stopped => {
            eprintln!(
                "stopped at step {}; checkpoint saved. Continue with: lowrank train --resume {}",
                trainer.step(),
                s.output.display()
            );
            return Ok(());
        }
        RunEnd::Finished => {}
    }
    let trained = trainer.adapter().clone();
    drop(trainer);
    let trained = match residual {
        Some(r) => Arc::new(r.leave(&mut bundle.model, &trained).context("restoring the original base")?),
        None => trained,
    };
    trained.save_peft_into(&s.output, bundle.model.modules())?;
    if let Some((_, peak)) = memory() {
        eprintln!("peak resident memory {:.0} MiB", mib(peak));
    }
    eprintln!(
        "adapter written to {} (PEFT format); metrics.jsonl, loss.svg and {SETTINGS_FILE} beside it",
        s.output.display()
    );
    if let Some(task) = s.example {
        // The adapter as written (plain tensors, no training graph), as a user would load it.
        let trained = Adapter::load_peft(&s.output, bundle.model.modules(), bundle.model.device())?;
        let after = example::exact_match(task, &bundle, &[ActiveAdapter { adapter: Arc::new(trained), weight: 1.0 }])?;
        example::report(before.as_ref(), &after);
    }
    Ok(())
}

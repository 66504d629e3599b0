//! `lowrank generate`: text from a model with optional adapters, streamed to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use lowrank::bundle::ModelBundle;
use lowrank::chat::Message;
use lowrank::generate::{generate, GenerateOptions, SamplingParams};

use super::common::{
    load_adapters, load_options, memory, mib, model_path, AdapterSpec, DeviceArg, DtypeArg, QuantizeArg,
};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: an HF directory or a .gguf file [default: SmolLM2-135M-Instruct, fetched once]
    #[arg(long)]
    model: Option<PathBuf>,
    /// PEFT adapter directory, `DIR` or `DIR:WEIGHT`; repeat to apply several at once
    #[arg(long = "adapter", value_name = "DIR[:WEIGHT]")]
    adapters: Vec<AdapterSpec>,
    /// Raw prompt, tokenized as is
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    prompt: Option<String>,
    /// A user message, rendered through the model's chat template
    #[arg(long)]
    chat: Option<String>,
    /// System message for --chat
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Maximum number of new tokens
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass
    #[arg(long)]
    top_p: Option<f32>,
    /// Keep only the K most likely tokens
    #[arg(long)]
    top_k: Option<usize>,
    /// Random seed for sampling
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this string appears (repeatable); it is not printed
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Device
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Dequantise a GGUF model to f32 at load (exact numerics, more memory)
    #[arg(long)]
    dequantize: bool,
    /// Quantise a full-precision base's projections at load (to run a QLoRA adapter on the 4-bit base
    /// it was trained on)
    #[arg(long, value_enum, conflicts_with = "dequantize")]
    quantize: Option<QuantizeArg>,
    /// Fold the adapters into the weights first: no per-token adapter cost (the adapted weights
    /// of a quantized base become f32)
    #[arg(long, requires = "adapters")]
    merge: bool,
    /// Precision of the products with the frozen weights in the prompt's forward pass: f32
    /// (exact, as transformers) or bf16 (bf16 operands, f32 sums; needs AVX-512-BF16). Decoding a
    /// token at a time stays f32 either way.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    /// Print load time, memory and speed to stderr
    #[arg(long, short)]
    verbose: bool,
}

/// Settings resolved from the arguments; destructured so a new flag cannot be ignored.
struct Settings {
    model: PathBuf,
    adapters: Vec<AdapterSpec>,
    input: Input,
    options: GenerateOptions,
    device: DeviceArg,
    dequantize: bool,
    quantize: Option<QuantizeArg>,
    merge: bool,
    dtype: DtypeArg,
    verbose: bool,
}

enum Input {
    Raw(String),
    Chat { system: Option<String>, user: String },
}

impl Settings {
    fn resolve(args: GenerateArgs) -> Result<Self> {
        let GenerateArgs {
            model,
            adapters,
            prompt,
            chat,
            system,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            device,
            dequantize,
            quantize,
            merge,
            dtype,
            verbose,
        } = args;
        let input = match (prompt, chat) {
            (Some(p), None) => Input::Raw(p),
            (None, Some(user)) => Input::Chat { system, user },
            _ => bail!("give exactly one of --prompt and --chat"),
        };
        Ok(Self {
            model: model_path(model.as_deref())?,
            adapters,
            input,
            options: GenerateOptions {
                max_new_tokens,
                sampling: SamplingParams { temperature, top_k, top_p, seed },
                stop,
            },
            device,
            dequantize,
            quantize,
            merge,
            dtype,
            verbose,
        })
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let Settings { model, adapters, input, options, device, dequantize, quantize, merge, dtype, verbose } =
        Settings::resolve(args)?;
    lowrank::kernels::set_matmul_precision(dtype.into()).context("--dtype bf16")?;
    let opts = load_options(device, dequantize, quantize)?;
    let mut bundle = ModelBundle::open(&model, &opts).with_context(|| format!("loading model {}", model.display()))?;
    let mut active = load_adapters(&adapters, bundle.model.modules(), &opts.device)?;
    if verbose {
        let rss = memory().map(|(r, _)| format!(", resident {:.0} MiB", mib(r))).unwrap_or_default();
        eprintln!(
            "loaded {} in {:.2}s (weights {:.0} MiB{rss})",
            model.display(),
            bundle.load_secs,
            mib(bundle.model.weight_bytes() as u64)
        );
        for a in &active {
            eprintln!(
                "adapter {} (weight {}): {} modules, {} parameters",
                a.adapter.name,
                a.weight,
                a.adapter.num_layers(),
                a.adapter.num_parameters()
            );
        }
    }
    if merge {
        bundle.model.merge(&active).context("merging the adapters")?;
        active.clear();
    }
    let prompt_ids = match &input {
        Input::Raw(text) => lowrank::prompt::text_ids(&bundle.tokenizer, text)?,
        Input::Chat { system, user } => {
            let template = bundle
                .chat_template
                .as_ref()
                .context("this model has no chat template; use --prompt instead of --chat")?;
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(Message { role: "system".into(), content: s.clone() });
            }
            messages.push(Message { role: "user".into(), content: user.clone() });
            lowrank::prompt::chat_ids(&bundle.tokenizer, template, &messages)?
        }
    };
    let mut out = std::io::stdout().lock();
    let g = generate(&bundle.model, &bundle.tokenizer, &active, &prompt_ids, &options, |piece| {
        out.write_all(piece.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| lowrank::Error::io("writing", "stdout", e))
    })?;
    writeln!(out)?;
    if verbose {
        let decoded = g.tokens.len().saturating_sub(1);
        eprintln!(
            "prompt {} tokens in {:.3}s ({:.1} tok/s); generated {} tokens, decode {:.1} tok/s; finish: {:?}",
            g.prompt_tokens,
            g.prefill_secs,
            g.prompt_tokens as f64 / g.prefill_secs.max(1e-9),
            g.tokens.len(),
            decoded as f64 / g.decode_secs.max(1e-9),
            g.finish
        );
        eprintln!("generated ids: {:?}", g.tokens);
        if let Some((rss, peak)) = memory() {
            eprintln!("memory: resident {:.0} MiB, peak {:.0} MiB", mib(rss), mib(peak));
        }
    }
    Ok(())
}

//! `lowrank serve`: one base model, many adapters, behind an OpenAI-compatible HTTP API.
//!
//! `api.rs` OpenAI's shapes and errors; `adapters.rs` adapters by name; `routes.rs` the
//! endpoints. The batching itself is the library's [`lowrank::serve::Engine`].

mod adapters;
mod api;
mod routes;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use clap::Args;
use lowrank::bundle::ModelBundle;
use lowrank::serve::{Engine, EngineConfig, Metrics};

use super::common::{load_options, model_path, DeviceArg, QuantizeArg};
use adapters::Registry;
use routes::{router, AppState, Ready};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Base model: an HF directory or a .gguf file [default: SmolLM2-135M-Instruct, fetched once]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Name the base model answers to in `model` [default: the model's file or directory name]
    #[arg(long)]
    served_model_name: Option<String>,
    /// An adapter to preload, `NAME=DIR` (repeatable); never evicted
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// A directory whose subdirectories are adapters, loaded on first use by name
    #[arg(long)]
    adapters_dir: Option<PathBuf>,
    /// Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (paths inside --adapters-dir only)
    #[arg(long)]
    allow_runtime_adapters: bool,
    /// Most adapters loaded at once; the least recently used idle one is evicted for a new one
    #[arg(long, default_value_t = 32)]
    max_adapters: usize,
    /// Refuse adapters of a higher rank
    #[arg(long)]
    max_rank: Option<usize>,
    /// Address to listen on (loopback by default)
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port, printed at start)
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Most sequences in one forward pass
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Most requests waiting for the batch; more get HTTP 429
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// KV-cache budget in token positions (prompt + max_tokens, summed over running requests)
    #[arg(long, default_value_t = 65536)]
    kv_budget: usize,
    /// Quantise a full-precision base's projections at load (serve QLoRA adapters on the 4-bit
    /// base they were trained on)
    #[arg(long, value_enum)]
    quantize: Option<QuantizeArg>,
    /// Device
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let ServeArgs {
        model,
        served_model_name,
        adapters,
        adapters_dir,
        allow_runtime_adapters,
        max_adapters,
        max_rank,
        host,
        port,
        max_batch,
        max_queue,
        kv_budget,
        quantize,
        device,
    } = args;
    let path = model_path(model.as_deref())?;
    let base = served_model_name
        .unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "base".into()));
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(AppState { ready: OnceLock::new(), metrics: metrics.clone(), allow_runtime_adapters });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (failed_tx, mut failed) = tokio::sync::mpsc::unbounded_channel::<()>();
    let served = rt.block_on(async {
        // Listen first: while the model loads, requests get 503 and /health says "loading".
        let listener = tokio::net::TcpListener::bind((host.as_str(), port))
            .await
            .with_context(|| format!("listening on {host}:{port}"))?;
        let addr = listener.local_addr()?;
        eprintln!("lowrank serve: loading {base}; listening on http://{addr}/v1");
        let loader = {
            let state = state.clone();
            std::thread::spawn(move || {
                let load = || -> Result<(Engine, std::thread::JoinHandle<()>)> {
                    let opts = load_options(device, false, quantize)?;
                    let bundle =
                        ModelBundle::open(&path, &opts).with_context(|| format!("loading model {}", path.display()))?;
                    let registry = Registry::new(
                        base.clone(),
                        bundle.model.modules().clone(),
                        opts.device.clone(),
                        adapters_dir.as_deref(),
                        max_adapters,
                        max_rank,
                    )?;
                    for spec in &adapters {
                        let Some((name, dir)) = spec.split_once('=') else {
                            bail!("--adapter {spec}: expected NAME=DIR")
                        };
                        registry
                            .load(name, dir.as_ref(), true)
                            .map_err(|e| anyhow::anyhow!("--adapter {spec}: {}", e.message))?;
                    }
                    let (tokenizer, chat) = (bundle.tokenizer.clone(), bundle.chat_template.clone());
                    let config = EngineConfig { max_batch, max_queue, kv_budget_tokens: kv_budget };
                    let (engine, worker) = Engine::start(bundle, config, metrics)?;
                    let n = registry.names().len();
                    let _ = state.ready.set(Ready { engine: engine.clone(), registry, tokenizer, chat });
                    eprintln!("lowrank serve: ready: {base} with {n} adapters on http://{addr}/v1");
                    Ok((engine, worker))
                };
                let out = load();
                if out.is_err() {
                    let _ = failed_tx.send(()); // stop serving; the error is returned below
                }
                out
            })
        };
        let shutdown = {
            let state = state.clone();
            async move {
                tokio::select! {
                    _ = shutdown_signal() => {},
                    Some(()) = failed.recv() => {},
                }
                if let Some(r) = state.ready.get() {
                    eprintln!("lowrank serve: shutting down; finishing {} requests", r.engine.in_flight());
                    r.engine.drain();
                }
            }
        };
        axum::serve(listener, router(state.clone())).with_graceful_shutdown(shutdown).await.context("serving")?;
        Ok::<_, anyhow::Error>(loader)
    })?;
    // The server has stopped: the engine finishes what it holds, then its thread ends.
    let (engine, worker) = served.join().map_err(|_| anyhow::anyhow!("the loading thread panicked"))??;
    drop(state);
    drop(engine);
    let _ = worker.join();
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

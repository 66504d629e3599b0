//! `lowrank serve`: one base model, many adapters, behind an OpenAI-compatible HTTP API.
//!
//! `api.rs` OpenAI's shapes and errors; `adapters.rs` adapters by name; `routes.rs` the
//! endpoints. The batching itself is the library's [`lowrank::serve::Engine`].

mod adapters;
mod api;
mod http;
mod routes;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use clap::Args;
use lowrank::bundle::ModelBundle;
use lowrank::serve::{Engine, EngineConfig, Metrics};

use super::common::{load_options, model_path, DeviceArg, DtypeArg, QuantizeArg};
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
    /// Require `Authorization: Bearer KEY` on every /v1/* endpoint (/health and /metrics stay open)
    #[arg(long, env = "LOWRANK_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
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
    /// Most open connections; more are answered 503 and closed [default: 512, or less to stay
    /// under the process's open-file limit]
    #[arg(long)]
    max_connections: Option<usize>,
    /// Seconds a client has to send a request's headers (and between requests on a kept-alive
    /// connection) before the connection is closed
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Seconds a request may take, reading its body included, before it gets 408 and is cancelled
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
    /// Seconds in-flight requests get to finish after SIGTERM / Ctrl-C; then they are cancelled
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Quantise a full-precision base's projections at load (serve QLoRA adapters on the 4-bit
    /// base they were trained on)
    #[arg(long, value_enum)]
    quantize: Option<QuantizeArg>,
    /// Device
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Precision of the products with the frozen weights in prompt forward passes and batches
    /// of more than 16 rows: f32 (exact) or bf16 (bf16 operands, f32 sums; needs AVX-512-BF16)
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
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
        api_key,
        port,
        max_batch,
        max_queue,
        kv_budget,
        max_connections,
        header_timeout,
        request_timeout,
        shutdown_timeout,
        quantize,
        device,
        dtype,
    } = args;
    // Process-wide, before the engine's threads start.
    lowrank::kernels::set_matmul_precision(dtype.into()).context("--dtype bf16")?;
    let secs = std::time::Duration::from_secs;
    let limits = http::Limits {
        connections: max_connections.unwrap_or_else(default_connections),
        headers: secs(header_timeout.max(1)),
        request: secs(request_timeout.max(1)),
        shutdown: secs(shutdown_timeout),
    };
    let path = model_path(model.as_deref())?;
    let base = served_model_name
        .unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "base".into()));
    let metrics = Arc::new(Metrics::default());
    let api_key = api_key.filter(|k| !k.is_empty());
    let loopback = host.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(host == "localhost");
    if api_key.is_none() && !loopback {
        eprintln!(
            "warning: serving on {host} without --api-key: anyone who can reach this address can use the model \
             (set --api-key or LOWRANK_API_KEY)"
        );
    }
    let state =
        Arc::new(AppState { ready: OnceLock::new(), metrics: metrics.clone(), allow_runtime_adapters, api_key });
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
                let out = catching(load);
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
        let app = router(state.clone()).layer(axum::middleware::from_fn_with_state(limits.request, http::deadline));
        http::serve(listener, app, limits, shutdown).await;
        Ok::<_, anyhow::Error>(loader)
    })?;
    // The server has stopped: the engine finishes what it holds, then its thread ends.
    let (engine, worker) = served.join().map_err(|_| anyhow::anyhow!("the loading thread panicked"))??;
    drop(state);
    drop(engine);
    let _ = worker.join();
    Ok(())
}

/// `load()`, a panic in it turned into its error: a loader that panics stops the server with the
/// message like any other load error, instead of leaving it "loading" for ever.
fn catching<T>(load: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(anyhow::anyhow!("loading the model panicked: {what}"))
    })
}

/// 512 connections, or fewer to leave 64 of the process's open files for the model, adapters and
/// logs.
fn default_connections() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    let files = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 { limit.rlim_cur } else { 1024 };
    (files.saturating_sub(64) as usize).clamp(16, 512)
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_panicking_loader_is_an_error() {
        let e = super::catching::<()>(|| panic!("index out of bounds")).unwrap_err();
        assert!(e.to_string().contains("panicked: index out of bounds"), "{e}");
        assert_eq!(super::catching(|| Ok(3)).unwrap(), 3);
    }
}

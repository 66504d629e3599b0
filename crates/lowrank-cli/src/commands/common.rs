//! Arguments and helpers shared by subcommands.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::ValueEnum;
use lowrank::adapter::{ActiveAdapter, Adapter};
use lowrank::model::{LoadOptions, ModuleTable, Quantize};

/// `--dtype`: the precision of the products with the frozen weights.
#[derive(clap::ValueEnum, Clone, Copy, Debug, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DtypeArg {
    /// f32 operands: exact.
    F32,
    /// bf16 operands, f32 sums (AVX-512-BF16).
    Bf16,
}

impl From<DtypeArg> for lowrank::kernels::Precision {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => lowrank::kernels::Precision::F32,
            DtypeArg::Bf16 => lowrank::kernels::Precision::Bf16,
        }
    }
}

/// Where tensors live.
#[derive(Clone, Copy, Debug, Default, PartialEq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceArg {
    /// The CPU.
    #[default]
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

impl DeviceArg {
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda => {
                Device::new_cuda(0).context("opening CUDA device 0 (is this build made with --features cuda?)")
            }
        }
    }
}

/// `DIR` or `DIR:WEIGHT`.
#[derive(Clone, Debug)]
pub struct AdapterSpec {
    pub dir: PathBuf,
    pub weight: f64,
}

impl std::str::FromStr for AdapterSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some((dir, w)) = s.rsplit_once(':') {
            if let Ok(weight) = w.parse::<f64>() {
                if !weight.is_finite() {
                    return Err(format!("adapter weight `{w}` is not finite"));
                }
                return Ok(Self { dir: dir.into(), weight });
            }
        }
        Ok(Self { dir: s.into(), weight: 1.0 })
    }
}

/// The model path, or the default model (fetched on first use). A name on the Hugging Face Hub
/// (`org/name[@revision]`, `org/name/file.gguf`) that is not a local path is found in the HF
/// cache, or downloaded into it.
pub fn model_path(arg: Option<&Path>) -> Result<PathBuf> {
    match arg {
        Some(p) => local_or_hub(p),
        None => {
            let p = lowrank_home::default_model_gguf().context("getting the default model")?;
            Ok(p)
        }
    }
}

/// `p` itself when it exists (or names no Hub repo), else its Hub repo's directory or file.
pub fn local_or_hub(p: &Path) -> Result<PathBuf> {
    let hub = p.to_str().filter(|_| !p.exists()).and_then(lowrank_home::hub::HubRef::parse);
    match hub {
        Some(r) => {
            lowrank_home::hub::resolve(&r).with_context(|| format!("getting {} from the Hugging Face Hub", p.display()))
        }
        None => Ok(p.to_path_buf()),
    }
}

/// A quantisation applied to a full-precision base at load.
#[derive(Clone, Copy, Debug, PartialEq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantizeArg {
    /// NF4: 4-bit NormalFloat, blocks of 64, double-quantised maxima (bitsandbytes' QLoRA format)
    Nf4,
}

pub fn load_options(device: DeviceArg, dequantize: bool, quantize: Option<QuantizeArg>) -> Result<LoadOptions> {
    let quantize = quantize.map(|QuantizeArg::Nf4| Quantize::Nf4);
    Ok(LoadOptions { device: device.device()?, dequantize, quantize, frozen_bf16: false })
}

/// Loads each `--adapter` against the model's modules.
pub fn load_adapters(specs: &[AdapterSpec], table: &ModuleTable, device: &Device) -> Result<Vec<ActiveAdapter>> {
    specs
        .iter()
        .map(|s| {
            let dir = local_or_hub(&s.dir)?;
            let a = Adapter::load_peft(&dir, table, device)
                .with_context(|| format!("loading adapter {}", s.dir.display()))?;
            Ok(ActiveAdapter { adapter: Arc::new(a), weight: s.weight })
        })
        .collect()
}

/// Resident and peak resident memory of this process in bytes (Linux `/proc/self/status`).
pub fn memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

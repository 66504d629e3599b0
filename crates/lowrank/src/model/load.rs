//! Opening a model from a path: an HF directory or a `.gguf` file.

use std::path::Path;

use candle_core::Device;

use super::config::ModelConfig;
use super::gguf::GgufFile;
use super::hf::SafetensorsDir;
use super::transformer::Model;
use crate::{Error, Result};

/// The on-disk form of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// `config.json` + safetensors.
    HfDir,
    /// One GGUF file.
    Gguf,
}

/// How to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where the weights go.
    pub device: Device,
    /// Dequantise GGUF matrices to f32 (exact reference numerics; ~8x the memory of Q4).
    pub dequantize: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dequantize: false }
    }
}

/// Which format `path` is in.
pub fn detect_format(path: &Path) -> Result<ModelFormat> {
    if path.is_dir() {
        if path.join("config.json").exists() {
            return Ok(ModelFormat::HfDir);
        }
        return Err(Error::Config(format!("{} is a directory without config.json (expected an HF model directory)", path.display())));
    }
    if !path.exists() {
        return Err(Error::io("opening", path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory")));
    }
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    std::io::Read::read_exact(&mut f, &mut magic).map_err(|e| Error::io("reading", path, e))?;
    if &magic == b"GGUF" {
        Ok(ModelFormat::Gguf)
    } else {
        Err(Error::Config(format!("{} is neither an HF model directory nor a GGUF file", path.display())))
    }
}

impl Model {
    /// Loads the model at `path` (HF directory or GGUF file).
    pub fn from_path(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let model = match detect_format(path)? {
            ModelFormat::HfDir => {
                let cfg = ModelConfig::from_hf_file(&path.join("config.json"))?;
                let st = SafetensorsDir::open(path, &opts.device)?;
                Model::load(cfg, &st, &opts.device)?
            }
            ModelFormat::Gguf => {
                let mut g = GgufFile::open(path, &opts.device, opts.dequantize)?;
                let cfg = g.config()?;
                Model::load(cfg, &g, &opts.device)?
            }
        };
        Ok(model)
    }
}

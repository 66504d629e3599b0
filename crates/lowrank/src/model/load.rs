//! Opening a model from a path: an HF directory or a `.gguf` file.

use std::path::Path;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use super::gguf::GgufFile;
use super::transformer::Model;
use super::weights::WeightSource;
use crate::formats::SafetensorsDir;
use crate::weights::{FrozenWeight, Nf4Tensor};
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
    /// Quantise the projection weights of a full-precision base at load.
    pub quantize: Option<Quantize>,
    /// Keep the projection weights of an f32 base in bf16, on the CPU: half their memory, and the
    /// same products on the bf16 engine, which rounds its operands to bf16 anyway (`lowrank train
    /// --dtype bf16`). Products too small for the engine then use their bf16 values.
    pub frozen_bf16: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dequantize: false, quantize: None, frozen_bf16: false }
    }
}

impl LoadOptions {
    /// Whether a GGUF file should be opened dequantised: a quantized GGUF is refused by
    /// `quantize`, not dequantised and quantised again.
    pub fn gguf_dequantize(&self) -> bool {
        self.dequantize && self.quantize.is_none()
    }
}

/// A format the frozen projections can be quantised to at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantize {
    /// QLoRA's NF4 (blocks of 64, double-quantised maxima), on the CPU.
    Nf4,
}

/// A weight source whose projection matrices (`*_proj.weight`) pass through `map` (name, the
/// stored matrix, the source); embeddings, the LM head, norms and biases pass through as they
/// are. One matrix is converted at a time.
struct ProjectionSource<'a, F> {
    src: &'a dyn WeightSource,
    map: F,
}

impl<F: Fn(&str, FrozenWeight, &dyn WeightSource) -> Result<FrozenWeight>> WeightSource for ProjectionSource<'_, F> {
    fn describe(&self) -> String {
        self.src.describe()
    }

    fn contains(&self, name: &str) -> bool {
        self.src.contains(name)
    }

    fn dense(&self, name: &str) -> Result<Tensor> {
        self.src.dense(name)
    }

    fn matrix(&self, name: &str) -> Result<FrozenWeight> {
        let w = self.src.matrix(name)?;
        if name.ends_with("_proj.weight") {
            (self.map)(name, w, self.src)
        } else {
            Ok(w)
        }
    }
}

/// A projection quantised to NF4; refused if it is stored quantized already.
fn to_nf4(name: &str, w: FrozenWeight, src: &dyn WeightSource) -> Result<FrozenWeight> {
    match w {
        FrozenWeight::Dense(t) => Ok(FrozenWeight::Nf4(Arc::new(Nf4Tensor::quantize(&t).map_err(|e| Error::Config(format!("{name}: {e}")))?))),
        other => Err(Error::Config(format!(
            "{} stores `{name}` as {}: it is already quantized, so --quantize nf4 would quantize it twice (use it as it is, or a full-precision base)",
            src.describe(),
            other.dtype_name()
        ))),
    }
}

/// An f32 projection on the CPU rounded to bf16; any other passes through.
fn to_bf16(_: &str, w: FrozenWeight, _: &dyn WeightSource) -> Result<FrozenWeight> {
    match w {
        FrozenWeight::Dense(t) if t.dtype() == DType::F32 && t.device().is_cpu() => {
            Ok(FrozenWeight::Dense(t.to_dtype(DType::BF16)?))
        }
        other => Ok(other),
    }
}

/// The text model's weights in a multimodal checkpoint, asked for under PEFT's module paths
/// (`model.language_model.…`, [`ModelConfig::module_root`]): found so, or where checkpoints store
/// them (`language_model.model.…`, as transformers writes Gemma 3's). The vision tower's are
/// never asked for.
struct LanguageModelSource<'a>(&'a dyn WeightSource);

impl LanguageModelSource<'_> {
    fn stored(&self, name: &str) -> String {
        match name.strip_prefix("model.language_model.") {
            Some(rest) if !self.0.contains(name) => format!("language_model.model.{rest}"),
            _ => name.to_string(),
        }
    }
}

impl WeightSource for LanguageModelSource<'_> {
    fn describe(&self) -> String {
        self.0.describe()
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains(&self.stored(name))
    }

    fn dense(&self, name: &str) -> Result<Tensor> {
        self.0.dense(&self.stored(name))
    }

    fn matrix(&self, name: &str) -> Result<FrozenWeight> {
        self.0.matrix(&self.stored(name))
    }
}

/// Which format `path` is in.
pub fn detect_format(path: &Path) -> Result<ModelFormat> {
    if path.is_dir() {
        if path.join("config.json").exists() {
            return Ok(ModelFormat::HfDir);
        }
        return Err(Error::Config(format!(
            "{} is a directory without config.json (expected an HF model directory)",
            path.display()
        )));
    }
    if !path.exists() {
        return Err(Error::io(
            "opening",
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
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
                if cfg.language_model {
                    Self::load_with(cfg, &LanguageModelSource(&st), opts)?
                } else {
                    Self::load_with(cfg, &st, opts)?
                }
            }
            ModelFormat::Gguf => {
                let mut g = GgufFile::open(path, &opts.device, opts.gguf_dequantize())?;
                let cfg = g.config()?;
                Self::load_with(cfg, &g, opts)?
            }
        };
        Ok(model)
    }

    /// [`Model::load`], with the projections quantised as `opts.quantize` asks, or held in bf16
    /// as `opts.frozen_bf16` does.
    pub fn load_with(cfg: ModelConfig, src: &dyn WeightSource, opts: &LoadOptions) -> Result<Self> {
        match opts.quantize {
            None if opts.frozen_bf16 && opts.device.is_cpu() => {
                Model::load(cfg, &ProjectionSource { src, map: to_bf16 }, &opts.device)
            }
            None => Model::load(cfg, src, &opts.device),
            Some(Quantize::Nf4) if !opts.device.is_cpu() => {
                Err(Error::Config("--quantize nf4 runs on the CPU only".into()))
            }
            Some(Quantize::Nf4) => Model::load(cfg, &ProjectionSource { src, map: to_nf4 }, &opts.device),
        }
    }
}

//! GGUF model files (llama.cpp's format), read into HF names and layout.
//!
//! llama.cpp's converter permutes the rows of `attn_q`/`attn_k` for interleaved RoPE; we undo it
//! so every module is in HF layout and a PEFT adapter's `lora_B` rows land on the right heads.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::{Family, ModelConfig};
use super::weights::WeightSource;
use crate::formats::gguf_names::{permutes_qk, to_gguf, unpermute_rows, Qk, LONG_FACTORS, ROPE_FREQS, SHORT_FACTORS};
use crate::ops::{longrope_attention_factor, Activation, RopeScaling};
use crate::weights::FrozenWeight;
use crate::{Error, Result};

/// An open GGUF file: metadata, tensor directory and a reader for tensor data.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: Mutex<BufReader<File>>,
    device: Device,
    /// Dequantise every matrix to f32 at load (exact reference numerics, more memory).
    dequantize: bool,
    /// `general.architecture`: which tensor names and conventions the converter used.
    arch: String,
    heads: (usize, usize),
}

impl GgufFile {
    /// Opens and parses the header of `path`.
    pub fn open(path: &Path, device: &Device, dequantize: bool) -> Result<Self> {
        let (content, reader) = crate::formats::read_gguf(path)?;
        let mut g = Self {
            path: path.into(),
            content,
            reader: Mutex::new(reader),
            device: device.clone(),
            dequantize,
            arch: String::new(),
            heads: (0, 0),
        };
        g.arch = g.architecture()?;
        Ok(g)
    }

    /// The parsed metadata.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, dtypes and shapes as stored (GGUF names).
    pub fn tensor_infos(&self) -> Vec<(String, GgmlDType, Vec<usize>)> {
        let mut v: Vec<_> =
            self.content.tensor_infos.iter().map(|(n, i)| (n.clone(), i.ggml_dtype, i.shape.dims().to_vec())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::Gguf { path: self.path.clone(), message: message.into() }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String> {
        Ok(self.meta_str("general.architecture")?.to_string())
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_str(&self, key: &str) -> Result<&str> {
        match self.meta(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(self.err(format!("metadata `{key}` is not a string"))),
            None => Err(self.err(format!("metadata `{key}` is missing"))),
        }
    }

    fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => v
                .to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                .map(|x| Some(x as usize))
                .map_err(|_| self.err(format!("metadata `{key}` is not an integer"))),
        }
    }

    fn meta_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .or_else(|_| v.to_f64().map(|x| x as f32))
                .map(Some)
                .map_err(|_| self.err(format!("metadata `{key}` is not a number"))),
        }
    }

    /// The model configuration from `<arch>.*` metadata.
    pub fn config(&mut self) -> Result<ModelConfig> {
        let arch = self.architecture()?;
        let family = match arch.as_str() {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3" => Family::Gemma3,
            "phi3" => Family::Phi3,
            other => {
                return Err(self.err(format!(
                    "architecture `{other}` is not supported (supported: llama, qwen2, qwen3, gemma2, gemma3, phi3; \
                     Mistral GGUFs use `llama`)"
                )))
            }
        };
        let req = |s: &Self, k: &str| -> Result<usize> {
            s.meta_usize(&format!("{arch}.{k}"))?.ok_or_else(|| s.err(format!("metadata `{arch}.{k}` is missing")))
        };
        let hidden_size = req(self, "embedding_length")?;
        let num_layers = req(self, "block_count")?;
        let num_heads = req(self, "attention.head_count")?;
        let num_kv_heads = self.meta_usize(&format!("{arch}.attention.head_count_kv"))?.unwrap_or(num_heads);
        let head_dim =
            self.meta_usize(&format!("{arch}.attention.key_length"))?.unwrap_or(hidden_size / num_heads.max(1));
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| self.err("tensor `token_embd.weight` is missing"))?;
        let vocab_size = embd.shape.dims().first().copied().unwrap_or(0);
        let vector = |s: &Self, name: &str| -> Result<Vec<f32>> {
            Ok(s.read_tensor(name)?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let rope_scaling = if self.content.tensor_infos.contains_key(ROPE_FREQS) {
            RopeScaling::Factors(vector(self, ROPE_FREQS)?)
        } else if family == Family::Phi3 && self.content.tensor_infos.contains_key(LONG_FACTORS) {
            self.longrope(&arch, vector(self, SHORT_FACTORS)?, vector(self, LONG_FACTORS)?)?
        } else {
            match self.meta(&format!("{arch}.rope.scaling.type")) {
                Some(Value::String(s)) if s == "linear" => RopeScaling::Linear {
                    factor: self.meta_f32(&format!("{arch}.rope.scaling.factor"))?.unwrap_or(1.0),
                },
                Some(Value::String(s)) if s != "none" => {
                    return Err(self.err(format!("rope scaling type `{s}` is not supported")))
                }
                _ => RopeScaling::None,
            }
        };
        let gemma = family.is_gemma();
        let (sliding_window, sliding_layers) = self.sliding_layers(&arch, family, num_layers)?;
        let rope_theta = self.meta_f32(&format!("{arch}.rope.freq_base"))?.unwrap_or(10000.0);
        // llama.cpp: the sliding layers' base from `rope.freq_base_swa` (Gemma 3: 10000 when
        // absent, unscaled; Gemma 2: the global RoPE when absent).
        let swa_base = self.meta_f32(&format!("{arch}.rope.freq_base_swa"))?;
        let sliding_rope = match family {
            Family::Gemma3 if sliding_window.is_some() => Some((swa_base.unwrap_or(10000.0), RopeScaling::None)),
            Family::Gemma2 => swa_base.map(|b| (b, rope_scaling.clone())),
            _ => None,
        };
        // llama.cpp scales scores by 1/√head_dim, and Gemma's 27B models by 1/√(hidden/heads):
        // what their query_pre_attn_scalar says, which the GGUF does not carry.
        let big = matches!((family, num_layers), (Family::Gemma2, 46) | (Family::Gemma3, 62));
        let scale_dim = if big { hidden_size / num_heads.max(1) } else { head_dim };
        let cap = |key: &str, default: Option<f64>| -> Result<Option<f64>> {
            Ok(self.meta_f32(&format!("{arch}.{key}"))?.map(|c| c as f64).or(default).filter(|c| *c != 0.0))
        };
        let (attn_softcap, final_softcap) = match family {
            Family::Gemma2 => (cap("attn_logit_softcapping", Some(50.0))?, cap("final_logit_softcapping", Some(30.0))?),
            Family::Gemma3 => (None, cap("final_logit_softcapping", None)?),
            _ => (None, None),
        };
        let cfg = ModelConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: req(self, "feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            // Via the shortest decimal, so 1e-5 stays 1e-5 (not 9.99999974e-6) when written back out.
            rms_norm_eps: self
                .meta_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"))?
                .map_or(1e-5, |e| e.to_string().parse().unwrap_or(e as f64)),
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.meta_usize(&format!("{arch}.context_length"))?.unwrap_or(4096),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            qkv_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            o_bias: self.content.tensor_infos.contains_key("blk.0.attn_output.bias"),
            mlp_bias: self.content.tensor_infos.contains_key("blk.0.ffn_up.bias"),
            sliding_window,
            sliding_layers,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
            attn_scale: (scale_dim as f64).powf(-0.5),
            attn_softcap,
            final_softcap,
            sliding_rope,
            // llama.cpp's n_rot: the rotated leading dimensions of each head (Phi-3: partial).
            rotary_dim: self.meta_usize(&format!("{arch}.rope.dimension_count"))?.unwrap_or(head_dim),
            fused_projections: family == Family::Phi3,
            language_model: false,
        };
        cfg.validate()?;
        self.heads = (num_heads, num_kv_heads);
        Ok(cfg)
    }

    /// Phi-3's LongRoPE from the converter's `rope_factors_{short,long}` tensors, the original
    /// context and the attention factor it wrote (computed as transformers does when absent).
    fn longrope(&self, arch: &str, short_factor: Vec<f32>, long_factor: Vec<f32>) -> Result<RopeScaling> {
        let key = format!("{arch}.rope.scaling.original_context_length");
        let original = self.meta_usize(&key)?.ok_or_else(|| self.err(format!("LongRoPE without `{key}`")))?;
        let max = self.meta_usize(&format!("{arch}.context_length"))?.unwrap_or(original);
        let attention_factor = match self.meta_f32(&format!("{arch}.rope.scaling.attn_factor"))? {
            Some(a) => a,
            None => longrope_attention_factor(max as f64 / original as f64, original) as f32,
        };
        Ok(RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings: original,
            attention_factor,
        })
    }

    /// The sliding window and its layers as llama.cpp reads them (none but Gemma's) for Gemma: the window from
    /// `attention.sliding_window` (Gemma 2: 4096 when absent; Gemma 3: none when absent or 0),
    /// the layers from `attention.sliding_window_pattern`, an array of per-layer flags or a period
    /// `n` (layer `l` slides unless `l % n == n - 1`), by default 2 (Gemma 2) or 6 (Gemma 3).
    fn sliding_layers(&self, arch: &str, family: Family, n: usize) -> Result<(Option<usize>, Vec<bool>)> {
        let default_period = match family {
            Family::Gemma2 => 2,
            Family::Gemma3 => 6,
            // Phi-3: llama.cpp ignores `attention.sliding_window` ("Phi SWA is currently disabled",
            // llama.cpp#13676) and attends to the whole context, so the file runs without one here.
            _ => return Ok((None, vec![false; n])),
        };
        let window = self.meta_usize(&format!("{arch}.attention.sliding_window"))?;
        let window = if family == Family::Gemma2 { Some(window.unwrap_or(4096)) } else { window };
        let Some(window) = window.filter(|&w| w > 0) else { return Ok((None, vec![false; n])) };
        let key = format!("{arch}.attention.sliding_window_pattern");
        let layers = match self.meta(&key) {
            Some(Value::Array(flags)) => {
                let flags: Vec<bool> = flags.iter().filter_map(|v| v.to_bool().ok()).collect();
                if flags.len() != n {
                    return Err(self.err(format!("`{key}` has {} boolean entries for {n} layers", flags.len())));
                }
                flags
            }
            _ => {
                let period = self.meta_usize(&key)?.unwrap_or(default_period);
                (0..n).map(|l| period == 0 || l % period < period - 1).collect()
            }
        };
        Ok((Some(window).filter(|_| layers.contains(&true)), layers))
    }

    fn read_tensor(&self, gguf_name: &str) -> Result<QTensor> {
        let mut reader = self.reader.lock().map_err(|_| self.err("reader poisoned by an earlier panic"))?;
        self.content
            .tensor(&mut *reader, gguf_name, &self.device)
            .map_err(|e| self.err(format!("reading tensor `{gguf_name}`: {e}")))
    }

    /// The GGUF name of an HF tensor name, and how many heads its rows are permuted over.
    fn gguf_name(&self, hf: &str) -> Option<(String, Option<usize>)> {
        let (name, qk) = to_gguf(hf, &self.arch)?;
        // Only the llama architecture's converter permutes q/k rows.
        let heads = match (permutes_qk(&self.arch), qk) {
            (true, Some(Qk::Q)) => Some(self.heads.0),
            (true, Some(Qk::K)) => Some(self.heads.1),
            _ => None,
        };
        Some((name, heads))
    }

    fn lookup(&self, hf: &str) -> Result<(String, Option<usize>)> {
        self.gguf_name(hf)
            .filter(|(g, _)| self.content.tensor_infos.contains_key(g))
            .ok_or_else(|| Error::MissingWeight { name: hf.into(), source_desc: self.describe() })
    }
}

/// Row index in GGUF layout of HF row `r` (inverse of the converter's permutation).
fn gguf_row(r: usize, head_dim: usize) -> usize {
    let (h, within) = (r / head_dim, r % head_dim);
    let half = head_dim / 2;
    let (j, i) = (within / half, within % half);
    h * head_dim + 2 * i + j
}

/// Undoes the permutation on a quantized `[rows, cols]` tensor by moving whole rows of blocks.
fn unpermute_quant(q: &QTensor, heads: usize) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let data = q.data()?;
    let row_bytes = cols / q.dtype().block_size() * q.dtype().type_size();
    // Each head's rows come in two halves: rows must split into 2·heads equal parts.
    if heads == 0 || row_bytes * rows != data.len() || rows % (2 * heads) != 0 {
        return Err(Error::Config(format!(
            "cannot un-permute quantized tensor {:?}: its rows do not split into 2 x {heads} heads",
            q.shape()
        )));
    }
    let head_dim = rows / heads;
    let mut out = vec![0u8; data.len()];
    for r in 0..rows {
        let g = gguf_row(r, head_dim);
        out[r * row_bytes..(r + 1) * row_bytes].copy_from_slice(&data[g * row_bytes..(g + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &q.device(), q.dtype())?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

impl WeightSource for GgufFile {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn contains(&self, name: &str) -> bool {
        self.lookup(name).is_ok()
    }

    fn dense(&self, name: &str) -> Result<Tensor> {
        let (g, heads) = self.lookup(name)?;
        let t = self.read_tensor(&g)?.dequantize(&self.device)?.to_dtype(DType::F32)?;
        match heads {
            Some(h) => unpermute_rows(&t, h),
            None => Ok(t),
        }
    }

    fn norms_plus_one(&self) -> bool {
        matches!(self.arch.as_str(), "gemma2" | "gemma3")
    }

    fn matrix(&self, name: &str) -> Result<FrozenWeight> {
        let (g, heads) = self.lookup(name)?;
        let q = self.read_tensor(&g)?;
        let dense = self.dequantize || matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if dense {
            let t = q.dequantize(&self.device)?.to_dtype(DType::F32)?;
            return Ok(FrozenWeight::Dense(match heads {
                Some(h) => unpermute_rows(&t, h)?,
                None => t,
            }));
        }
        let q = match heads {
            Some(h) => unpermute_quant(&q, h)?,
            None => q,
        };
        Ok(FrozenWeight::Quant(Arc::new(q)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_map_inverts_the_converter_permutation() -> Result<()> {
        // The converter: w.reshape(heads, 2, D/2, cols).swapaxes(1, 2).reshape(w.shape)
        let (heads, d, cols) = (2usize, 8usize, 3usize);
        let hf = Tensor::arange(0f32, (heads * d * cols) as f32, &Device::Cpu)?.reshape((heads * d, cols))?;
        let gguf = hf.reshape((heads, 2, d / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((heads * d, cols))?;
        let back = unpermute_rows(&gguf, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        for r in 0..heads * d {
            assert_eq!(gguf.get(gguf_row(r, d))?.to_vec1::<f32>()?, hf.get(r)?.to_vec1::<f32>()?);
        }
        Ok(())
    }
}

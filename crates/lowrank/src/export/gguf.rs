//! A merged model as a llama.cpp GGUF model file: the source GGUF's metadata (architecture
//! hyperparameters, tokenizer, chat template) with llama.cpp's tensor names, q/k rows in its
//! order, norms in f32 and matrices in the chosen type.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};

use super::hf::check_finite;
use crate::model::gguf_names::{permute_rows, permutes_qk, to_gguf};
use crate::model::{GgufFile, Model};
use crate::staging::{Existing, Staged};
use crate::{Error, Result};

/// Writes `model` (merge adapters first) as a GGUF file at `out`, matrices in `dtype` (F32, F16,
/// BF16, Q8_0 or Q4_0), with the metadata of the GGUF it was loaded from.
pub fn write_gguf_model(model: &Model, source: &GgufFile, out: &Path, dtype: GgmlDType, check: bool, existing: Existing) -> Result<()> {
    let file_type = match dtype {
        GgmlDType::F32 => 0u32,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q8_0 => 7,
        GgmlDType::BF16 => 32,
        other => return Err(Error::InvalidArgument(format!("GGUF export writes f32, f16, bf16, q8_0 or q4_0, not {other:?}"))),
    };
    let arch = source.architecture()?;
    let staged = Staged::file(out, existing)?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (hf, t) in model.named_weights()? {
        let (name, qk) = to_gguf(&hf).ok_or_else(|| Error::Export(format!("llama.cpp has no tensor name for `{hf}`")))?;
        let t = match qk.filter(|_| permutes_qk(&arch)) {
            Some(qk) => permute_rows(&t, qk.heads(model.config()))?,
            None => t,
        };
        // Vectors (norms, biases) stay f32, as llama.cpp's converter keeps them; so does a matrix
        // whose rows do not split into the type's blocks.
        let ty = if t.rank() == 1 || t.dim(1)? % dtype.block_size() != 0 { GgmlDType::F32 } else { dtype };
        let q = QTensor::quantize(&t, ty)?;
        if check {
            check_finite(&hf, &q.dequantize(&candle_core::Device::Cpu)?)?;
        }
        tensors.push((name, q));
    }
    let mut metadata: HashMap<String, Value> = source.metadata().clone();
    metadata.insert("general.file_type".into(), Value::U32(file_type));
    let mut keys: Vec<&String> = metadata.keys().collect();
    keys.sort();
    let meta: Vec<(&str, &Value)> = keys.iter().map(|k| (k.as_str(), &metadata[*k])).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_gguf_file(staged.path(), &meta, &refs)?;
    staged.commit()
}

/// Writes a GGUF file (candle's writer) at `path` and syncs it.
pub(crate) fn write_gguf_file(path: &Path, metadata: &[(&str, &Value)], tensors: &[(&str, &QTensor)]) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io("creating", path, e))?;
    let mut w = std::io::BufWriter::new(file);
    candle_core::quantized::gguf_file::write(&mut w, metadata, tensors).map_err(|e| Error::io("writing", path, std::io::Error::other(e.to_string())))?;
    let file = w.into_inner().map_err(|e| Error::io("writing", path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io("syncing", path, e))
}

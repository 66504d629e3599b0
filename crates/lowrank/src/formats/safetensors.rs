//! Safetensors files, memory-mapped: an HF model directory's one file or its shards
//! (`model.safetensors.index.json`), or any list of files (an adapter's weights).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// The safetensors files of one HF model directory, memory-mapped.
pub struct SafetensorsDir {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
    device: Device,
}

impl SafetensorsDir {
    /// Opens `dir/model.safetensors` or the shards listed in `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io("reading", &index_path, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Json { path: index_path.clone(), source: e })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Safetensors {
                path: index_path.clone(),
                message: "no `weight_map` object".into(),
            })?;
            let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
            // Shards are files beside the index, nothing else.
            if let Some(bad) = shards.iter().find(|s| s.is_empty() || s.starts_with('.') || s.contains(['/', '\\'])) {
                return Err(Error::Safetensors {
                    path: index_path.clone(),
                    message: format!("shard `{bad}` is not a file name in this directory"),
                });
            }
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        Self::open_files(&paths, device)
    }

    /// Opens the given safetensors files; every tensor name must be unique across them.
    pub fn open_files(paths: &[PathBuf], device: &Device) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
            // SAFETY: the map is read-only; a file changed underneath us is the user's race, and
            // safetensors validates the header and every tensor's byte range against the length.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("memory-mapping", path, e))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| Error::Safetensors { path: path.clone(), message: e.to_string() })?;
            for name in st.names() {
                if index.insert(name.to_string(), files.len()).is_some() {
                    return Err(Error::Safetensors {
                        path: path.clone(),
                        message: format!("tensor `{name}` appears in more than one shard"),
                    });
                }
            }
            files.push((path.clone(), mmap));
        }
        Ok(Self { files, index, device: device.clone() })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    /// A tensor converted to f32 on the device.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        Ok(self.load_stored(name)?.to_dtype(DType::F32)?)
    }

    /// A tensor in its stored dtype (f32, f16, bf16 or f64) on the device.
    pub fn load_stored(&self, name: &str) -> Result<Tensor> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| Error::MissingWeight { name: name.into(), source_desc: self.describe() })?;
        let (path, mmap) = &self.files[i];
        let err = |message: String| Error::Safetensors { path: path.clone(), message };
        let st = SafeTensors::deserialize(mmap).map_err(|e| err(e.to_string()))?;
        let view = st.tensor(name).map_err(|e| err(e.to_string()))?;
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            other => return Err(err(format!("tensor `{name}` has unsupported dtype {other:?}"))),
        };
        Ok(Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &self.device)?)
    }

    /// The files, for messages: the one path, or how many shards in which directory.
    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [(p, _)] => p.display().to_string(),
            files => format!(
                "{} safetensors shards in {}",
                files.len(),
                files[0].0.parent().unwrap_or(Path::new(".")).display()
            ),
        }
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Dtype and shape of a tensor, without loading it.
    pub fn info(&self, name: &str) -> Option<(String, Vec<usize>)> {
        let &i = self.index.get(name)?;
        let st = SafeTensors::deserialize(&self.files[i].1).ok()?;
        let view = st.tensor(name).ok()?;
        Some((format!("{:?}", view.dtype()).to_lowercase(), view.shape().to_vec()))
    }
}

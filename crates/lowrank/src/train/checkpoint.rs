//! Checkpoints: everything needed to continue a run to the result an uninterrupted run gives.
//!
//! `OUT/checkpoints/step-000050/` holds the adapter (a PEFT directory), the optimizer state
//! (`optimizer.safetensors`) and `state.json` (step, config). Each is written under a temporary
//! name and renamed; `OUT/checkpoints/latest` names the newest complete one and is itself
//! replaced atomically, so a crash at any moment leaves the previous checkpoint usable.
//! The data position and the dropout masks are functions of the step, so no RNG state is stored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::optim::AdamW;
use crate::adapter::Adapter;
use crate::model::ModuleTable;
use crate::{Error, Result};

/// `state.json` of a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps completed.
    pub step: usize,
    /// The run's configuration.
    pub config: TrainConfig,
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_name(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("renaming into", path, e)
    })
}

fn tmp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Saves a checkpoint for `step` under `out/checkpoints/` and points `latest` at it.
pub fn save(out: &Path, state: &CheckpointState, adapter: &Adapter, table: &ModuleTable, opt: &AdamW) -> Result<PathBuf> {
    let root = out.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(|e| Error::io("creating", &root, e))?;
    let name = format!("step-{:06}", state.step);
    let dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
        adapter.save_peft(&tmp.join("adapter"), table)?;
        let (tensors, _) = opt.state();
        let map: HashMap<String, Tensor> = tensors.into_iter().collect();
        candle_core::safetensors::save(&map, tmp.join("optimizer.safetensors"))?;
        let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Json { path: tmp.join("state.json"), source: e })?;
        std::fs::write(tmp.join("state.json"), json).map_err(|e| Error::io("writing", tmp.join("state.json"), e))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io("replacing", &dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io("renaming into", &dir, e))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    write_atomic(&root.join("latest"), name.as_bytes())?;
    // Keep the newest two complete checkpoints.
    let mut old: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| Error::io("listing", &root, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")) && *p != dir)
        .collect();
    old.sort();
    for p in old.iter().rev().skip(1) {
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(dir)
}

/// A checkpoint read back.
pub struct Loaded {
    /// Its directory.
    pub dir: PathBuf,
    /// `state.json`.
    pub state: CheckpointState,
    /// The adapter as saved.
    pub adapter: Adapter,
    /// Optimizer tensors.
    pub optimizer: HashMap<String, Tensor>,
}

/// Reads the newest checkpoint of the run in `out` (or `out` itself when it is a checkpoint).
pub fn load(out: &Path, table: &ModuleTable, device: &Device) -> Result<Loaded> {
    let dir = if out.join("state.json").exists() {
        out.to_path_buf()
    } else {
        let latest = out.join("checkpoints/latest");
        let name = std::fs::read_to_string(&latest).map_err(|e| Error::io("reading", &latest, e))?;
        out.join("checkpoints").join(name.trim())
    };
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io("reading", &state_path, e))?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| Error::Json { path: state_path, source: e })?;
    let adapter = Adapter::load_peft(&dir.join("adapter"), table, device)?;
    let optimizer = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)?;
    Ok(Loaded { dir, state, adapter, optimizer })
}

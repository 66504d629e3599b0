//! Checkpoints: everything needed to continue a run to the result an uninterrupted run gives.
//!
//! `OUT/checkpoints/step-000050/` holds the adapter (a PEFT directory), the optimizer state
//! (`optimizer.safetensors`) and `state.json` (step, config), written into a temporary sibling
//! and renamed into place whole ([`crate::staging`]); `OUT/checkpoints/latest` names the newest
//! complete one and is itself replaced atomically, so a crash at any moment leaves the previous
//! checkpoint usable.
//! The data position and the dropout masks are functions of the step, so no RNG state is stored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::optim::AdamW;
use crate::adapter::Adapter;
use crate::export::write_safetensors;
use crate::model::ModuleTable;
use crate::staging::{write_atomic, write_synced, Existing, Staged};
use crate::{Error, Result};

/// `state.json` of a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps completed.
    pub step: usize,
    /// The run's configuration.
    pub config: TrainConfig,
}

/// Saves a checkpoint for `step` under `out/checkpoints/` and points `latest` at it.
pub fn save(
    out: &Path,
    state: &CheckpointState,
    adapter: &Adapter,
    table: &ModuleTable,
    opt: &AdamW,
) -> Result<PathBuf> {
    let root = out.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(|e| Error::io("creating", &root, e))?;
    let name = format!("step-{:06}", state.step);
    let dir = root.join(&name);
    let staged = Staged::dir(&dir, Existing::Replace)?;
    adapter.save_peft(&staged.path().join("adapter"), table)?;
    let (tensors, _) = opt.state();
    write_safetensors(&staged.path().join("optimizer.safetensors"), &tensors.iter().collect::<Vec<_>>())?;
    let state_path = staged.path().join("state.json");
    let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Json { path: state_path.clone(), source: e })?;
    write_synced(&state_path, &json)?;
    staged.commit()?;
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
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| Error::Json { path: state_path, source: e })?;
    let adapter = Adapter::load_peft(&dir.join("adapter"), table, device)?;
    let optimizer = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)?;
    Ok(Loaded { dir, state, adapter, optimizer })
}

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

/// Saves a checkpoint for `step` under `out/checkpoints/` and points `latest` at it; then keeps
/// the newest two by step number. A step saved already (a stop, then the final save) is kept as
/// it is: the state is the same, and replacing it would leave a moment with no checkpoint at all.
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
    if !dir.join("state.json").is_file() {
        let staged = Staged::dir(&dir, Existing::Replace)?;
        adapter.save_peft(&staged.path().join("adapter"), table)?;
        let (tensors, _) = opt.state();
        write_safetensors(&staged.path().join("optimizer.safetensors"), &tensors.iter().collect::<Vec<_>>())?;
        let state_path = staged.path().join("state.json");
        let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Json { path: state_path.clone(), source: e })?;
        write_synced(&state_path, &json)?;
        staged.commit()?; // synced: files, the directory, then its parent
    }
    write_atomic(&root.join("latest"), name.as_bytes())?;
    // Only now, with `latest` on disk naming the new one, the older ones go.
    prune(&root, state.step)?;
    Ok(dir)
}

/// Removes the checkpoints in `root` older than `step` but the newest of them, by step number
/// (`step-1000000` is newer than `step-999999`, whatever the text order).
fn prune(root: &Path, step: usize) -> Result<()> {
    let mut old: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .map_err(|e| Error::io("listing", root, e))?
        .flatten()
        .filter_map(|e| step_of(&e.file_name().to_string_lossy()).map(|s| (s, e.path())))
        .filter(|(s, _)| *s < step)
        .collect();
    old.sort();
    for (_, p) in old.iter().rev().skip(1) {
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(())
}

/// The step of a checkpoint directory name `step-NNNNNN`.
fn step_of(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("step-")?;
    digits.bytes().all(|b| b.is_ascii_digit()).then(|| digits.parse().ok()).flatten()
}

/// Removes what a crash can leave in `root`: staging directories (`.step-NNNNNN.tmp-…`, and
/// their `.old` sides) that were never renamed into place.
fn remove_stale(root: &Path) {
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-") && name.contains(".tmp-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
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
        let root = out.join("checkpoints");
        let latest = root.join("latest");
        let name = std::fs::read_to_string(&latest).map_err(|e| Error::io("reading", &latest, e))?;
        let name = name.trim();
        // `latest` names a directory beside it, nothing else.
        if step_of(name).is_none() {
            return Err(Error::Config(format!("{} names `{name}`, not a step-NNNNNN checkpoint", latest.display())));
        }
        remove_stale(&root);
        root.join(name)
    };
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io("reading", &state_path, e))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| Error::Json { path: state_path, source: e })?;
    let adapter = Adapter::load_peft(&dir.join("adapter"), table, device)?;
    let optimizer = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)?;
    Ok(Loaded { dir, state, adapter, optimizer })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_goes_by_step_number_and_stale_staging_is_removed() -> Result<()> {
        let root = std::env::temp_dir().join(format!("lowrank-ck-{}", std::process::id()));
        for name in ["step-999998", "step-999999", "step-1000000", ".step-1000001.tmp-7", "notes"] {
            std::fs::create_dir_all(root.join(name)).map_err(|e| Error::io("creating", &root, e))?;
        }
        prune(&root, 1_000_000)?;
        remove_stale(&root);
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .map_err(|e| Error::io("listing", &root, e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["notes", "step-1000000", "step-999999"]);
        assert_eq!((step_of("step-000050"), step_of("step-../x"), step_of("step-")), (Some(50), None, None));
        std::fs::remove_dir_all(&root).map_err(|e| Error::io("removing", &root, e))
    }
}

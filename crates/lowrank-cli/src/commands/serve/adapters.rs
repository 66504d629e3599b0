//! The adapters a server knows by name: preloaded ones, ones loaded on first use from
//! `--adapters-dir`, and (when allowed) ones loaded and unloaded at run time. Requests hold their
//! adapter by reference count, so one unloaded or evicted mid-request finishes on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Device;
use lowrank::adapter::{ActiveAdapter, Adapter};
use lowrank::model::ModuleTable;

use super::api::ApiError;

struct Entry {
    adapter: Arc<Adapter>,
    /// Given on the command line: never evicted.
    pinned: bool,
    last_used: Instant,
}

/// Adapters by name.
pub struct Registry {
    base: String,
    table: ModuleTable,
    device: Device,
    /// Canonical `--adapters-dir`.
    dir: Option<PathBuf>,
    max_adapters: usize,
    max_rank: Option<usize>,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Registry {
    pub fn new(
        base: String,
        table: ModuleTable,
        device: Device,
        dir: Option<&Path>,
        max_adapters: usize,
        max_rank: Option<usize>,
    ) -> anyhow::Result<Self> {
        let dir = match dir {
            Some(d) => Some(d.canonicalize().map_err(|e| anyhow::anyhow!("--adapters-dir {}: {e}", d.display()))?),
            None => None,
        };
        Ok(Self {
            base,
            table,
            device,
            dir,
            max_adapters: max_adapters.max(1),
            max_rank,
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// The base model's name.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Names of the loaded adapters, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The adapters a request for `model` runs with (none for the base); loads an adapter from
    /// `--adapters-dir` on first use. Blocking (reads files).
    pub fn resolve(&self, model: &str) -> Result<Vec<ActiveAdapter>, ApiError> {
        if model == self.base {
            return Ok(Vec::new());
        }
        if let Some(e) = self.lock().get_mut(model) {
            e.last_used = Instant::now();
            return Ok(vec![ActiveAdapter { adapter: e.adapter.clone(), weight: 1.0 }]);
        }
        let Some(path) = self.dir.as_ref().and_then(|d| name_in_dir(d, model)) else {
            return Err(ApiError::not_found(model));
        };
        let adapter = self.load(model, &path, false)?;
        Ok(vec![ActiveAdapter { adapter, weight: 1.0 }])
    }

    /// Loads the adapter at `path` under `name` (`pinned`: never evicted).
    pub fn load(&self, name: &str, path: &Path, pinned: bool) -> Result<Arc<Adapter>, ApiError> {
        if !plain_name(name) || name == self.base {
            let shown: String = name.chars().take(64).collect();
            return Err(ApiError::bad_request(format!(
                "`{shown}` cannot name an adapter: a name is 1 to {MAX_NAME} bytes without `/`, `\\` or control \
                 characters, does not start with `.`, and is not the base model's"
            )));
        }
        let mut adapter = Adapter::load_peft(path, &self.table, &self.device)
            .map_err(|e| ApiError::bad_request(format!("loading adapter `{name}`: {e}")))?;
        if let Some(max) = self.max_rank {
            let rank = adapter.config.rank_pattern.values().copied().fold(adapter.config.r, usize::max);
            if rank > max {
                return Err(ApiError::bad_request(format!(
                    "adapter `{name}` has rank {rank}; this server takes at most --max-rank {max}"
                )));
            }
        }
        adapter.name = name.to_string();
        let adapter = Arc::new(adapter);
        let mut entries = self.lock();
        if let Some(e) = entries.get(name) {
            return Ok(e.adapter.clone()); // loaded meanwhile by another request
        }
        if entries.len() >= self.max_adapters {
            // Evict the least recently used adapter that is neither pinned nor in use.
            let victim = entries
                .iter()
                .filter(|(_, e)| !e.pinned && Arc::strong_count(&e.adapter) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(n, _)| n.clone());
            match victim {
                Some(v) => {
                    entries.remove(&v);
                }
                None => {
                    return Err(ApiError::unavailable(format!(
                        "all {} adapter slots hold adapters in use or given on the command line; retry later",
                        self.max_adapters
                    )))
                }
            }
        }
        entries.insert(name.to_string(), Entry { adapter: adapter.clone(), pinned, last_used: Instant::now() });
        Ok(adapter)
    }

    /// Loads `lora_path` at run time; it must be a directory directly inside `--adapters-dir`.
    pub fn load_runtime(&self, name: &str, lora_path: &str) -> Result<(), ApiError> {
        let Some(dir) = &self.dir else {
            return Err(ApiError::forbidden(
                "run-time loading needs --adapters-dir: adapters load only from inside it",
            ));
        };
        let requested = Path::new(lora_path);
        let inside =
            requested.canonicalize().ok().filter(|p| p.parent() == Some(dir.as_path()) && p.is_dir()).ok_or_else(
                || {
                    ApiError::bad_request(format!(
                        "lora_path `{lora_path}` is not a directory directly inside the adapters directory"
                    ))
                },
            )?;
        if self.lock().contains_key(name) {
            return Err(ApiError::bad_request(format!("an adapter named `{name}` is already loaded")));
        }
        self.load(name, &inside, false).map(|_| ())
    }

    /// Removes `name`; requests running on it finish on it. An adapter given on the command line
    /// stays (409).
    pub fn unload(&self, name: &str) -> Result<(), ApiError> {
        let mut entries = self.lock();
        match entries.get(name) {
            Some(e) if e.pinned => Err(ApiError::conflict(format!(
                "`{name}` was given with --adapter when the server started and cannot be unloaded"
            ))),
            Some(_) => {
                entries.remove(name);
                Ok(())
            }
            None => Err(ApiError::not_found(name)),
        }
    }
}

/// Longest model or adapter name taken, in bytes (longer ones are refused before anything
/// stores them).
pub const MAX_NAME: usize = 256;

/// Whether `name` can name an adapter: at most [`MAX_NAME`] bytes of printable characters, no
/// path separator, not hidden (so neither `..`). The same rule for every way an adapter is named.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && !name.chars().any(|c| c == '/' || c == '\\' || c.is_control())
}

/// `dir/name` when `name` is a plain name ([`plain_name`]) and that directory, symlinks resolved,
/// lies directly inside `dir`.
fn name_in_dir(dir: &Path, name: &str) -> Option<PathBuf> {
    if !plain_name(name) {
        return None;
    }
    let p = dir.join(name).canonicalize().ok()?;
    (p.parent() == Some(dir) && p.is_dir()).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::name_in_dir;

    #[test]
    fn only_plain_directories_inside_the_dir_are_names() {
        let tmp = std::env::temp_dir().join(format!("lowrank-names-{}", std::process::id()));
        let dir = tmp.join("adapters");
        std::fs::create_dir_all(dir.join("good")).unwrap();
        std::fs::create_dir_all(tmp.join("outside")).unwrap();
        std::os::unix::fs::symlink(tmp.join("outside"), dir.join("escape")).unwrap();
        std::fs::write(dir.join("file"), b"x").unwrap();
        let dir = dir.canonicalize().unwrap();
        assert!(name_in_dir(&dir, "good").is_some());
        let long = "x".repeat(super::MAX_NAME + 1);
        for bad in
            ["", "..", "../outside", "/etc", "escape", "file", ".hidden", "good/../good", "missing", "a\nb", &long]
        {
            assert!(name_in_dir(&dir, bad).is_none(), "`{bad}` accepted");
        }
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}

//! Outputs that are never left half-written: everything goes into a hidden temporary sibling of
//! the target, is synced, and is renamed into place only when complete. A failure (an error, a
//! full disk) removes the temporary; the target is untouched until the final rename.
//!
//! The one home for durable writes: adapters, merged models, GGUF exports, checkpoints, a run's
//! settings and metrics, the fetched default model. [`write_atomic`] is the one-call form for a
//! file whose bytes are in memory; [`Staged`] for a directory or a file written by other code.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// What to do when the target already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Refuse: an error names the target.
    Refuse,
    /// Accept an existing empty directory (it is replaced); refuse anything else.
    ReplaceEmptyDir,
    /// Replace it (`--force`): the old one is removed only after the new one is in place.
    Replace,
}

/// A directory or file being written; renamed to its target by [`Staged::commit`], removed if
/// dropped uncommitted.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    target: PathBuf,
    existing: Existing,
    done: bool,
}

impl Staged {
    /// Starts writing the directory `target` (checked against `existing` now, so a refused
    /// output fails before any work). Files go into [`Staged::path`].
    pub fn dir(target: &Path, existing: Existing) -> Result<Self> {
        let s = Self::new(target, existing)?;
        std::fs::create_dir(&s.tmp).map_err(|e| Error::io("creating", &s.tmp, e))?;
        Ok(s)
    }

    /// Starts writing the file `target`; write it at [`Staged::path`].
    pub fn file(target: &Path, existing: Existing) -> Result<Self> {
        Self::new(target, existing)
    }

    fn new(target: &Path, existing: Existing) -> Result<Self> {
        check_target(target, existing)?;
        let parent = parent_of(target);
        std::fs::create_dir_all(&parent).map_err(|e| Error::io("creating", &parent, e))?;
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "output".into());
        let tmp = parent.join(format!(".{name}.tmp-{}", unique_suffix()));
        Ok(Self { tmp, target: target.into(), existing, done: false })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the finished output into place (replacing the old target if allowed). A file
    /// replaces an old file in one rename, so a reader sees the old or the new one, never none.
    pub fn commit(mut self) -> Result<()> {
        check_target(&self.target, self.existing)?;
        if !self.tmp.is_dir() && !self.target.is_dir() {
            std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io("renaming into place", &self.target, e))?;
            self.done = true;
            sync_dir(&parent_of(&self.target));
            return Ok(());
        }
        // The directory's own entries reach the disk before it is renamed into place.
        sync_dir(&self.tmp);
        let old = self.target.exists().then(|| self.tmp.with_extension("old"));
        if let Some(old) = &old {
            std::fs::rename(&self.target, old).map_err(|e| Error::io("moving aside", &self.target, e))?;
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.target) {
            if let Some(old) = &old {
                let _ = std::fs::rename(old, &self.target); // put the old one back
            }
            return Err(Error::io("renaming into place", &self.target, e));
        }
        self.done = true;
        if let Some(old) = &old {
            let _ = remove(old);
        }
        sync_dir(&parent_of(&self.target));
        Ok(())
    }
}

/// Persists a rename in `dir` where the platform allows it.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A name part no other output (in this process or another) is using.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Writes the file `path` whole or not at all: `bytes` go into a temporary sibling, are synced,
/// and replace any old file in one rename. A directory at `path` is an error, never replaced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.is_dir() {
        let e = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "is a directory, not a file");
        return Err(Error::io("writing", path, e));
    }
    let staged = Staged::file(path, Existing::Replace)?;
    write_synced(staged.path(), bytes)?;
    staged.commit()
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = remove(&self.tmp);
        }
    }
}

fn check_target(target: &Path, existing: Existing) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(target) else { return Ok(()) };
    let empty_dir =
        meta.is_dir() && std::fs::read_dir(target).map_err(|e| Error::io("reading", target, e))?.next().is_none();
    match existing {
        Existing::Replace => Ok(()),
        Existing::ReplaceEmptyDir if empty_dir => Ok(()),
        _ => Err(Error::io(
            "writing",
            target,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists; choose a new path or pass --force to replace it",
            ),
        )),
    }
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn remove(p: &Path) -> std::io::Result<()> {
    if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
}

/// Writes `bytes` to a new file at `path` and syncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io("creating", path, e))?;
    f.write_all(bytes).map_err(|e| Error::io("writing", path, e))?;
    f.sync_all().map_err(|e| Error::io("syncing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_output_leaves_nothing_and_commit_replaces_only_when_allowed() -> Result<()> {
        let tmp = std::env::temp_dir().join(format!("lowrank-staging-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
        let out = tmp.join("out");
        {
            let s = Staged::dir(&out, Existing::Refuse)?;
            write_synced(&s.path().join("a"), b"1")?;
        } // dropped: a failed write
        assert!(!out.exists());
        assert_eq!(
            std::fs::read_dir(&tmp).map_err(|e| Error::io("reading", &tmp, e))?.count(),
            0,
            "temporary left behind"
        );

        let s = Staged::dir(&out, Existing::Refuse)?;
        write_synced(&s.path().join("a"), b"1")?;
        s.commit()?;
        assert_eq!(std::fs::read(out.join("a")).ok().as_deref(), Some(&b"1"[..]));
        assert!(Staged::dir(&out, Existing::Refuse).is_err());
        assert!(Staged::dir(&out, Existing::ReplaceEmptyDir).is_err());

        let s = Staged::dir(&out, Existing::Replace)?;
        write_synced(&s.path().join("b"), b"2")?;
        s.commit()?;
        assert!(out.join("b").exists() && !out.join("a").exists());
        assert_eq!(
            std::fs::read_dir(&tmp).map_err(|e| Error::io("reading", &tmp, e))?.count(),
            1,
            "old output left behind"
        );
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("removing", &tmp, e))
    }

    #[test]
    fn write_atomic_replaces_a_file_and_leaves_no_temporary() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lowrank-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
        let file = dir.join("settings.json");
        write_atomic(&file, b"old")?;
        write_atomic(&file, b"new")?;
        assert_eq!(std::fs::read(&file).ok().as_deref(), Some(&b"new"[..]));
        assert_eq!(std::fs::read_dir(&dir).map_err(|e| Error::io("reading", &dir, e))?.count(), 1);
        // A directory in the way is an error, and nothing is left behind.
        assert!(write_atomic(&dir, b"x").is_err());
        assert_eq!(std::fs::read_dir(&dir).map_err(|e| Error::io("reading", &dir, e))?.count(), 1);
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io("removing", &dir, e))
    }
}

//! Outputs that are never left half-written: everything goes into a hidden temporary sibling of
//! the target, is synced, and is renamed into place only when complete. A failure (an error, a
//! full disk) removes the temporary; the target is untouched until the final rename.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

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
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let tmp = parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
        Ok(Self { tmp, target: target.into(), existing, done: false })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the finished output into place (replacing the old target if allowed).
    pub fn commit(mut self) -> Result<()> {
        check_target(&self.target, self.existing)?;
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
        if let Ok(d) = File::open(parent_of(&self.target)) {
            let _ = d.sync_all(); // persist the rename where the platform allows it
        }
        Ok(())
    }
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
    let empty_dir = meta.is_dir() && std::fs::read_dir(target).map_err(|e| Error::io("reading", target, e))?.next().is_none();
    match existing {
        Existing::Replace => Ok(()),
        Existing::ReplaceEmptyDir if empty_dir => Ok(()),
        _ => Err(Error::io(
            "writing",
            target,
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists; choose a new path or pass --force to replace it"),
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
        assert_eq!(std::fs::read_dir(&tmp).map_err(|e| Error::io("reading", &tmp, e))?.count(), 0, "temporary left behind");

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
        assert_eq!(std::fs::read_dir(&tmp).map_err(|e| Error::io("reading", &tmp, e))?.count(), 1, "old output left behind");
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("removing", &tmp, e))
    }
}

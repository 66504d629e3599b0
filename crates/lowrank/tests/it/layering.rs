//! The module layering, checked on the source: adapters never reach into the model (the model
//! applies them through `AdapterLayer`; a new adapter sees it as an `adapter::Base`), the leaves
//! (`module_table`, `formats`) depend on neither, CPU kernels depend on no op or weight format and
//! weight formats on no op, and no folder's files import each other in a
//! cycle (`ops/linear.rs` ↔ `ops/lora_linear.rs`, `tokenizer/byte_level.rs` ↔ `tokenizer/gguf.rs`
//! once did).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, with its text.
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((path.clone(), std::fs::read_to_string(&path).unwrap()));
        }
    }
    out
}

/// The code of a file without comment lines and without its `#[cfg(test)]` module.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or(text);
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

#[test]
fn adapters_and_leaves_do_not_import_the_model() {
    let rules: [(&str, &[&str]); 6] = [
        ("adapter", &["crate::model"]),
        ("kernels", &["crate::ops", "crate::weights", "crate::model", "crate::adapter"]),
        ("weights", &["crate::ops", "crate::model", "crate::adapter"]),
        ("formats", &["crate::model", "crate::adapter"]),
        ("module_table.rs", &["crate::model", "crate::adapter"]),
        ("prompt.rs", &["crate::model", "crate::adapter", "crate::generate"]),
    ];
    for (part, banned) in rules {
        let path = src().join(part);
        let files =
            if path.is_dir() { sources(&path) } else { vec![(path.clone(), std::fs::read_to_string(&path).unwrap())] };
        for (file, text) in files {
            for b in banned {
                assert!(!code(&text).contains(b), "{} uses {b}", file.display());
            }
        }
    }
}

/// Process setup and fetching belong to the binary (`lowrank-cli/src/process.rs`) and to
/// `lowrank-home`: the library starts no process, sets no environment variable, installs no
/// signal disposition and tunes no allocator.
#[test]
fn the_library_does_no_process_setup() {
    for (file, text) in sources(&src()) {
        for banned in ["Command::new", "set_var(", "libc::signal", "mallopt"] {
            assert!(!code(&text).contains(banned), "{} uses {banned}", file.display());
        }
    }
}

#[test]
fn no_folder_has_an_import_cycle_between_its_files() {
    let reexport = regex::Regex::new(r"use (\w+)::(?:\{([^}]*)\}|(\w+));").unwrap();
    let named = regex::Regex::new(r"super::(?:\{([^}]*)\}|(\w+))").unwrap();
    let folders = ["adapter", "data", "export", "formats", "generate", "kernels", "model", "ops", "serve"];
    for folder in folders.into_iter().chain(["tokenizer", "train", "weights"]) {
        let dir = src().join(folder);
        let files: BTreeMap<String, String> = sources(&dir)
            .into_iter()
            .filter(|(p, _)| p.parent() == Some(dir.as_path()))
            .map(|(p, t)| (p.file_stem().unwrap().to_string_lossy().into_owned(), code(&t)))
            .collect();
        // Items that mod.rs re-exports, by the file they come from (`pub use linear::FrozenLinear`).
        let mut owner: BTreeMap<String, String> = BTreeMap::new();
        for c in reexport.captures_iter(files.get("mod").map_or("", String::as_str)) {
            let items = c.get(2).or(c.get(3)).map_or("", |m| m.as_str());
            for item in items.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                owner.insert(item.to_string(), c[1].to_string());
            }
        }
        // file → the sibling files it names through `super::`, directly or through a re-export.
        let edges: BTreeMap<&str, BTreeSet<String>> = files
            .iter()
            .filter(|(name, _)| name.as_str() != "mod")
            .map(|(name, text)| {
                let mut uses = BTreeSet::new();
                for c in named.captures_iter(text) {
                    let list = c.get(1).or(c.get(2)).map_or("", |m| m.as_str());
                    for item in list.split(',').map(|i| i.trim().split("::").next().unwrap_or("").trim()) {
                        let file =
                            if files.contains_key(item) { Some(item.to_string()) } else { owner.get(item).cloned() };
                        uses.extend(file.filter(|f| f != name && f != "mod"));
                    }
                }
                (name.as_str(), uses)
            })
            .collect();
        for start in edges.keys() {
            let mut stack = vec![(start.to_string(), vec![start.to_string()])];
            while let Some((at, path)) = stack.pop() {
                for next in edges.get(at.as_str()).into_iter().flatten() {
                    assert!(next != start, "{folder}/: import cycle {} → {next}", path.join(" → "));
                    if !path.contains(next) {
                        stack.push((next.clone(), [path.clone(), vec![next.clone()]].concat()));
                    }
                }
            }
        }
    }
}

//! `--model org/name` and `--adapter org/name`: found in a Hugging Face cache laid out exactly as
//! huggingface_hub lays it out (blobs, snapshot symlinks, refs), and downloaded into it from a
//! local server that answers under the Hub's URL scheme, started and stopped by the test.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lowrank/tests/fixtures/models").join(rel)
}

/// `lowrank args` with the HF environment given (and none inherited).
fn lowrank(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lowrank"));
    for k in ["HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE"] {
        c.env_remove(k);
    }
    c.args(args).envs(env.iter().copied()).output().expect("running lowrank")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The files of a fixture directory, by name.
fn files_of(dir: &Path) -> HashMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

/// A content hash to stand for the Hub's etag (the blob's name in the cache).
fn etag(data: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    format!("{:016x}{:08x}", h.finish(), data.len())
}

/// Lays `files` out as huggingface_hub does: `blobs/<etag>`, `snapshots/<commit>/<file>` as a
/// relative symlink to the blob, `refs/main` holding the commit.
fn cache_repo(cache: &Path, repo: &str, files: &HashMap<String, Vec<u8>>) {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = root.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    for (name, data) in files {
        let tag = etag(data);
        std::fs::write(root.join("blobs").join(&tag), data).unwrap();
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&tag), snapshot.join(name)).unwrap();
    }
    std::fs::write(root.join("refs/main"), COMMIT).unwrap();
}

/// Answers `GET /api/models/{repo}/revision/{rev}` (the file list) and
/// `GET /{repo}/resolve/{rev}/{file}` (with `Range`, `x-repo-commit` and `etag`), as the Hub does.
struct HubServer {
    addr: String,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    fn start(repos: HashMap<String, HashMap<String, Vec<u8>>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, requests) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (stop2, requests2) = (stop.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(s) = stream {
                    answer(s, &repos, &requests2);
                }
            }
        });
        Self { addr, stop, requests, thread: Some(thread) }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr); // wakes the accept loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(stream: TcpStream, repos: &HashMap<String, HashMap<String, Vec<u8>>>, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_string());
    }
    let Some(first) = head.first().cloned() else { return };
    log.lock().unwrap().push(head.join("\n"));
    let path = first.split(' ').nth(1).unwrap_or("").to_string();
    let range = head.iter().find_map(|h| h.to_ascii_lowercase().strip_prefix("range: bytes=").map(str::to_string));
    let mut out = stream;
    let reply = |out: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]| {
        let mut r = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
        for (k, v) in headers {
            r.push_str(&format!("{k}: {v}\r\n"));
        }
        r.push_str("\r\n");
        let _ = out.write_all(r.as_bytes());
        let _ = out.write_all(body);
    };
    for (repo, files) in repos {
        if path.starts_with(&format!("/api/models/{repo}/revision/")) {
            let siblings: Vec<_> = files.keys().map(|f| serde_json::json!({"rfilename": f})).collect();
            let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
            return reply(&mut out, "200 OK", &[("Content-Type", "application/json".into())], body.as_bytes());
        }
        if let Some(rest) = path.strip_prefix(&format!("/{repo}/resolve/")) {
            let file = rest.split_once('/').map(|(_, f)| f).unwrap_or("");
            let Some(data) = files.get(file) else { break };
            let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
                Some((a, b)) => {
                    let a: usize = a.parse().unwrap_or(0);
                    let b: usize = if b.is_empty() { data.len() - 1 } else { b.parse().unwrap_or(data.len() - 1) };
                    (a, b.min(data.len() - 1))
                }
                None => (0, data.len() - 1),
            };
            let headers = [
                ("x-repo-commit", COMMIT.to_string()),
                ("etag", format!("\"{}\"", etag(data))),
                ("Content-Range", format!("bytes {start}-{end}/{}", data.len())),
            ];
            return reply(&mut out, "206 Partial Content", &headers, &data[start..=end]);
        }
    }
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    reply(&mut out, "404 Not Found", &[], b"not found");
}

fn answer_of(model: &str, adapter: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut args = vec!["generate", "--model", model, "--prompt", "the the", "--max-new-tokens", "8"];
    if let Some(a) = adapter {
        args.extend(["--adapter", a]);
    }
    lowrank(&args, env)
}

#[test]
fn a_model_in_the_hf_cache_is_used_offline_by_name_and_revision() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    cache_repo(&cache, "tiny-org/tiny-qwen3", &files_of(&fixture("qwen3/model")));
    cache_repo(&cache, "tiny-org/tiny-qwen3-lora", &files_of(&fixture("qwen3/adapters/qv")));
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];

    let local =
        answer_of(fixture("qwen3/model").to_str().unwrap(), Some(fixture("qwen3/adapters/qv").to_str().unwrap()), &[]);
    assert!(local.status.success(), "{}", text(&local.stderr));
    for model in ["tiny-org/tiny-qwen3", &format!("tiny-org/tiny-qwen3@{COMMIT}")] {
        let r = answer_of(model, Some("tiny-org/tiny-qwen3-lora"), &env);
        assert!(r.status.success(), "{model}: {}", text(&r.stderr));
        assert_eq!(text(&r.stdout), text(&local.stdout), "{model}");
    }
    // HF_HOME/hub is the cache when HF_HUB_CACHE is not set.
    let r = lowrank(
        &["inspect", "tiny-org/tiny-qwen3"],
        &[("HF_HOME", tmp.path().to_str().unwrap()), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(r.status.success() && text(&r.stdout).contains("qwen3"), "{}", text(&r.stderr));

    // Not cached, offline: an error that names the repo and why.
    let r = lowrank(&["inspect", "tiny-org/absent"], &env);
    let err = text(&r.stderr);
    assert!(!r.status.success() && err.contains("tiny-org/absent") && err.contains("HF_HUB_OFFLINE"), "{err}");
    let r = lowrank(&["inspect", "tiny-org/tiny-qwen3@v2"], &env);
    assert!(!r.status.success() && text(&r.stderr).contains("v2"), "{}", text(&r.stderr));
}

#[test]
fn an_absent_model_is_downloaded_into_the_hf_cache_from_the_endpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let mut model = files_of(&fixture("qwen3/model"));
    model.insert("pytorch_model.bin".into(), b"not wanted".to_vec());
    let repos = HashMap::from([
        ("tiny-org/tiny-qwen3".to_string(), model),
        ("tiny-org/tiny-qwen3-lora".to_string(), files_of(&fixture("qwen3/adapters/qv"))),
    ]);
    let server = HubServer::start(repos);
    let endpoint = server.endpoint();
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_ENDPOINT", endpoint.as_str()), ("HF_TOKEN", "hf_test")];

    let r = answer_of("tiny-org/tiny-qwen3", Some("tiny-org/tiny-qwen3-lora"), &env);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let local =
        answer_of(fixture("qwen3/model").to_str().unwrap(), Some(fixture("qwen3/adapters/qv").to_str().unwrap()), &[]);
    assert_eq!(text(&r.stdout), text(&local.stdout));

    // Laid out as huggingface_hub would: refs/main, the snapshot, no file lowrank does not read.
    let root = cache.join("models--tiny-org--tiny-qwen3");
    assert_eq!(std::fs::read_to_string(root.join("refs/main")).unwrap().trim(), COMMIT);
    let snapshot = root.join("snapshots").join(COMMIT);
    assert!(snapshot.join("config.json").is_file() && snapshot.join("model.safetensors").is_file());
    assert!(!snapshot.join("pytorch_model.bin").exists());
    let requests = server.requests.lock().unwrap().clone();
    let asked = |path: &str| requests.iter().any(|r| r.starts_with(&format!("GET {path} ")));
    assert!(asked("/api/models/tiny-org/tiny-qwen3/revision/main"), "{requests:?}");
    assert!(asked("/tiny-org/tiny-qwen3/resolve/main/model.safetensors"), "{requests:?}");
    assert!(asked("/tiny-org/tiny-qwen3-lora/resolve/main/adapter_model.safetensors"), "{requests:?}");
    assert!(!asked("/tiny-org/tiny-qwen3/resolve/main/pytorch_model.bin"), "{requests:?}");
    assert!(requests.iter().all(|r| r.to_ascii_lowercase().contains("authorization: bearer hf_test")), "{requests:?}");

    // The server gone, the cache answers; offline too.
    drop(server);
    let again = answer_of("tiny-org/tiny-qwen3", Some("tiny-org/tiny-qwen3-lora"), &env);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(text(&again.stdout), text(&local.stdout));
}

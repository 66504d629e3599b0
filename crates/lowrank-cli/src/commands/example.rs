//! The shipped example task (`examples/data/`): the main job trains the default model on it and
//! shows exact-match accuracy on its held-out part before and after.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lowrank::adapter::ActiveAdapter;
use lowrank::bundle::ModelBundle;
use lowrank::chat::Message;
use lowrank::generate::greedy_batch;

const TRAIN: &str = include_str!("../../../../examples/data/train.jsonl");
const EVAL: &str = include_str!("../../../../examples/data/eval.jsonl");

/// Hyper-parameter defaults: the example run's, or the general ones.
pub struct Defaults {
    pub lr: f64,
    pub warmup: usize,
    pub steps: usize,
}

pub fn defaults(example: bool) -> Defaults {
    if example {
        Defaults { lr: 1e-3, warmup: 10, steps: 60 }
    } else {
        Defaults { lr: 2e-4, warmup: 0, steps: 0 }
    }
}

/// Writes the embedded dataset into the cache and returns (train, eval) paths.
pub fn write_dataset() -> Result<(PathBuf, PathBuf)> {
    let dir = lowrank::home::home_dir()?.join("example-data");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (train, eval) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    lowrank::train::checkpoint::write_atomic(&train, TRAIN.as_bytes())?;
    lowrank::train::checkpoint::write_atomic(&eval, EVAL.as_bytes())?;
    Ok((train, eval))
}

/// `<home>/runs/example-<unix seconds>`.
pub fn default_output() -> Result<PathBuf> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(lowrank::home::home_dir()?.join("runs").join(format!("example-{secs}")))
}

/// Held-out accuracy: how many answers equal the reference exactly (after trimming).
pub struct ExactMatch {
    pub correct: usize,
    pub total: usize,
    /// (question, reference, answer) of the first few rows.
    pub samples: Vec<(String, String, String)>,
}

pub fn exact_match(bundle: &ModelBundle, adapters: &[ActiveAdapter]) -> Result<ExactMatch> {
    let template = bundle.chat_template.as_ref().context("the model has no chat template")?;
    let mut prompts = Vec::new();
    let mut rows = Vec::new();
    for (i, line) in EVAL.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("example eval line {}", i + 1))?;
        let mut msgs: Vec<Message> = serde_json::from_value(v["messages"].clone()).with_context(|| format!("example eval line {}", i + 1))?;
        let answer = msgs.pop().context("example eval row without messages")?;
        let question = msgs.last().map(|m| m.content.clone()).unwrap_or_default();
        prompts.push(bundle.tokenizer.encode(&template.render(&msgs, true)?, false)?);
        rows.push((question, answer.content));
    }
    let max_new = rows.iter().map(|(_, a)| bundle.tokenizer.encode(a, false).map(|t| t.len()).unwrap_or(16)).max().unwrap_or(16) + 4;
    let t = std::time::Instant::now();
    let outs = greedy_batch(&bundle.model, adapters, &prompts, max_new, bundle.tokenizer.eos_token_ids())?;
    eprintln!("answered {} held-out questions in {:.1}s", prompts.len(), t.elapsed().as_secs_f64());
    let mut correct = 0;
    let mut samples = Vec::new();
    for ((q, reference), ids) in rows.into_iter().zip(outs) {
        let answer = bundle.tokenizer.decode(&ids, true)?.trim().to_string();
        correct += usize::from(answer == reference.trim());
        if samples.len() < 3 {
            samples.push((q, reference, answer));
        }
    }
    Ok(ExactMatch { correct, total: prompts.len(), samples })
}

/// Prints the before/after comparison to stdout.
pub fn report(before: Option<&ExactMatch>, after: &ExactMatch) {
    let pct = |m: &ExactMatch| 100.0 * m.correct as f64 / m.total.max(1) as f64;
    if let Some(b) = before {
        println!("held-out exact match: before {}/{} ({:.0}%), after {}/{} ({:.0}%)", b.correct, b.total, pct(b), after.correct, after.total, pct(after));
    } else {
        println!("held-out exact match after training: {}/{} ({:.0}%)", after.correct, after.total, pct(after));
    }
    for (i, (q, reference, answer)) in after.samples.iter().enumerate() {
        println!("\nQ: {q}\nexpected: {reference}");
        if let Some(b) = before {
            println!("before:   {}", b.samples[i].2);
        }
        println!("after:    {answer}");
    }
}

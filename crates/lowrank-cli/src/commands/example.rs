//! The shipped example tasks (`examples/NAME/`): the main job trains the default model on one and
//! shows exact-match accuracy on its held-out part before and after.
//!
//! - `dates` (default): a date in words → `YYYY-MM-DD`, chat `messages` rows; a format to learn.
//! - `roman`: an integer → its Roman numeral, `prompt` + `completion` rows whose prompts end in
//!   whitespace; a compositional skill, and the rows where encoding the prompt apart from the
//!   completion matters.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lowrank::adapter::ActiveAdapter;
use lowrank::bundle::ModelBundle;
use lowrank::chat::Message;
use lowrank::generate::greedy_batch;
use serde::{Deserialize, Serialize};

/// A shipped example task.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExampleTask {
    /// Dates in words → YYYY-MM-DD (chat rows; 400 train, 100 held out)
    #[default]
    Dates,
    /// Integers → Roman numerals (prompt/completion rows ending in whitespace; 800 train, 100 held out)
    Roman,
}

/// Hyper-parameter defaults: an example task's, or the general ones.
pub struct Defaults {
    pub lr: f64,
    pub warmup: usize,
    pub steps: usize,
    pub batch_size: usize,
}

pub fn defaults(example: Option<ExampleTask>) -> Defaults {
    match example {
        Some(ExampleTask::Dates) => Defaults { lr: 1e-3, warmup: 10, steps: 60, batch_size: 4 },
        Some(ExampleTask::Roman) => Defaults { lr: 1e-3, warmup: 10, steps: 150, batch_size: 8 },
        None => Defaults { lr: 2e-4, warmup: 0, steps: 0, batch_size: 4 },
    }
}

impl ExampleTask {
    /// The name `--example` takes, and the folder under `examples/`.
    pub fn name(self) -> &'static str {
        match self {
            ExampleTask::Dates => "dates",
            ExampleTask::Roman => "roman",
        }
    }

    /// The (train, eval) JSONL files, built into the binary.
    fn files(self) -> (&'static str, &'static str) {
        match self {
            ExampleTask::Dates => (
                include_str!("../../../../examples/dates/train.jsonl"),
                include_str!("../../../../examples/dates/eval.jsonl"),
            ),
            ExampleTask::Roman => (
                include_str!("../../../../examples/roman/train.jsonl"),
                include_str!("../../../../examples/roman/eval.jsonl"),
            ),
        }
    }

    /// Writes the embedded dataset into the cache and returns (train, eval) paths.
    pub fn write_dataset(self) -> Result<(PathBuf, PathBuf)> {
        let dir = lowrank_home::home_dir()?.join("example-data").join(self.name());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (train, eval) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
        let (train_rows, eval_rows) = self.files();
        lowrank::staging::write_atomic(&train, train_rows.as_bytes())?;
        lowrank::staging::write_atomic(&eval, eval_rows.as_bytes())?;
        Ok((train, eval))
    }

    /// `<home>/runs/example-NAME-<unix seconds>`.
    pub fn default_output(self) -> Result<PathBuf> {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Ok(lowrank_home::home_dir()?.join("runs").join(format!("example-{}-{secs}", self.name())))
    }
}

/// A `dates` resume file from before `--example NAME` said `"example": true`; read it as dates.
pub fn deserialize_task<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<ExampleTask>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Saved {
        Old(bool),
        New(Option<ExampleTask>),
    }
    Ok(match Saved::deserialize(d)? {
        Saved::Old(true) => Some(ExampleTask::Dates),
        Saved::Old(false) => None,
        Saved::New(task) => task,
    })
}

/// One held-out row: a conversation whose last turn is the reference answer, or a raw prompt and
/// its completion.
#[derive(Deserialize)]
#[serde(untagged)]
enum EvalRow {
    Chat { messages: Vec<Message> },
    Raw { prompt: String, completion: String },
}

/// Held-out accuracy: how many answers equal the reference exactly (after trimming).
pub struct ExactMatch {
    pub correct: usize,
    pub total: usize,
    /// (question, reference, answer) of the first few rows.
    pub samples: Vec<(String, String, String)>,
}

/// Greedy answers to the task's held-out prompts, encoded as `generate` and the server encode them
/// ([`lowrank::prompt`]), scored by exact match.
pub fn exact_match(task: ExampleTask, bundle: &ModelBundle, adapters: &[ActiveAdapter]) -> Result<ExactMatch> {
    let tok = &bundle.tokenizer;
    let mut prompts = Vec::new();
    let mut rows = Vec::new();
    for (i, line) in task.files().1.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let row: EvalRow =
            serde_json::from_str(line).with_context(|| format!("{} eval line {}", task.name(), i + 1))?;
        let (ids, question, reference) = match row {
            EvalRow::Chat { mut messages } => {
                let template = bundle.chat_template.as_ref().context("the model has no chat template")?;
                let answer = messages.pop().context("example eval row without messages")?;
                let question = messages.last().map(|m| m.content.clone()).unwrap_or_default();
                (lowrank::prompt::chat_ids(tok, template, &messages)?, question, answer.content)
            }
            EvalRow::Raw { prompt, completion } => (lowrank::prompt::text_ids(tok, &prompt)?, prompt, completion),
        };
        prompts.push(ids);
        rows.push((question, reference));
    }
    let max_new = rows.iter().map(|(_, a)| tok.encode(a, false).map(|t| t.len()).unwrap_or(16)).max().unwrap_or(16) + 4;
    let t = std::time::Instant::now();
    let outs = greedy_batch(&bundle.model, tok, adapters, &prompts, max_new)?;
    eprintln!("answered {} held-out questions in {:.1}s", prompts.len(), t.elapsed().as_secs_f64());
    let mut correct = 0;
    let mut samples = Vec::new();
    for ((q, reference), ids) in rows.into_iter().zip(outs) {
        let answer = tok.decode(&ids, true)?.trim().to_string();
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
        println!(
            "held-out exact match: before {}/{} ({:.0}%), after {}/{} ({:.0}%)",
            b.correct,
            b.total,
            pct(b),
            after.correct,
            after.total,
            pct(after)
        );
    } else {
        println!("held-out exact match after training: {}/{} ({:.0}%)", after.correct, after.total, pct(after));
    }
    for (i, (q, reference, answer)) in after.samples.iter().enumerate() {
        println!("\nQ: {}\nexpected: {reference}", q.trim_end());
        if let Some(b) = before {
            println!("before:   {}", b.samples[i].2);
        }
        println!("after:    {answer}");
    }
}

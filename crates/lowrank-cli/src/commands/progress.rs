//! Training progress on stderr: an indicatif bar redrawn in place on a terminal, one line per step
//! in logs (indicatif draws nothing when stderr is not a terminal).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use lowrank::train::{Observer, StepMetrics};

/// The training loop's observer: draws progress and relays Ctrl-C.
pub struct Progress {
    stop: Arc<AtomicBool>,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Progress from `first_step` on of `total` steps (a resumed run's ETA counts only its own
    /// steps); `stop` set (by Ctrl-C) makes the loop checkpoint and return.
    pub fn new(stop: Arc<AtomicBool>, first_step: usize, total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let style = ProgressStyle::with_template("[{bar:24}] {msg}  eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("#>-");
            let bar = ProgressBar::new(total as u64).with_style(style);
            bar.set_position(first_step as u64);
            bar.reset_eta();
            bar
        });
        Self { stop, bar }
    }

    /// Clears the bar, so the next message starts on its own line.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

impl Observer for Progress {
    fn on_step(&mut self, m: &StepMetrics, total: usize) {
        let eval = m.eval_loss.map(|e| format!("  eval {e:.4}")).unwrap_or_default();
        let stats = format!(
            "step {:>5}/{total}  loss {:.4}{eval}  lr {:.2e}  |g| {:.3}  {:.0} tok/s",
            m.step, m.loss, m.lr, m.grad_norm, m.tokens_per_s
        );
        match &self.bar {
            None => eprintln!("{stats}"),
            Some(bar) => {
                bar.set_position(m.step as u64);
                bar.set_message(stats.clone());
                if m.eval_loss.is_some() {
                    bar.println(stats); // eval steps keep their line above the bar
                }
            }
        }
    }

    fn should_stop(&mut self) -> bool {
        let stop = self.stop.load(Ordering::SeqCst);
        if stop {
            self.finish();
        }
        stop
    }
}

//! Training progress on stderr: a bar redrawn in place on a terminal, one line per step in logs.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use lowrank::train::{Observer, StepMetrics};

/// Bar width in characters.
const WIDTH: usize = 24;

/// The training loop's observer: draws progress and relays Ctrl-C.
pub struct Progress {
    stop: Arc<AtomicBool>,
    started: Instant,
    first_step: usize,
    tty: bool,
    /// A bar is on screen without its newline.
    open: bool,
}

impl Progress {
    /// Progress from `first_step` on (a resumed run's ETA counts only its own steps); `stop`
    /// set (by Ctrl-C) makes the loop checkpoint and return.
    pub fn new(stop: Arc<AtomicBool>, first_step: usize) -> Self {
        Self { stop, started: Instant::now(), first_step, tty: std::io::stderr().is_terminal(), open: false }
    }

    /// Ends a bar left on screen, so the next message starts on its own line.
    pub fn finish(&mut self) {
        if self.open {
            eprintln!();
            self.open = false;
        }
    }
}

impl Observer for Progress {
    fn on_step(&mut self, m: &StepMetrics, total: usize) {
        let done = (m.step - self.first_step).max(1) as f64;
        let eta = self.started.elapsed().as_secs_f64() / done * total.saturating_sub(m.step) as f64;
        let eval = m.eval_loss.map(|e| format!("  eval {e:.4}")).unwrap_or_default();
        let stats = format!(
            "step {:>5}/{total}  loss {:.4}{eval}  lr {:.2e}  |g| {:.3}  {:.0} tok/s  eta {}",
            m.step,
            m.loss,
            m.lr,
            m.grad_norm,
            m.tokens_per_s,
            clock(eta)
        );
        if !self.tty {
            eprintln!("{stats}");
            return;
        }
        let filled = (WIDTH * m.step / total.max(1)).min(WIDTH);
        let mut err = std::io::stderr().lock();
        // Carriage return + erase line: redraw in place. Eval steps keep their line.
        let _ = write!(err, "\r\x1b[K[{}{}] {stats}", "#".repeat(filled), "-".repeat(WIDTH - filled));
        if m.eval_loss.is_some() || m.step >= total {
            let _ = writeln!(err);
            self.open = false;
        } else {
            self.open = true;
        }
        let _ = err.flush();
    }

    fn should_stop(&mut self) -> bool {
        let stop = self.stop.load(Ordering::SeqCst);
        if stop {
            self.finish();
        }
        stop
    }
}

/// Seconds as `1h02m03s`, `2m03s` or `3s`.
fn clock(secs: f64) -> String {
    let s = secs.round().max(0.0) as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::clock;

    #[test]
    fn clock_reads_like_a_clock() {
        assert_eq!(clock(3.4), "3s");
        assert_eq!(clock(123.0), "2m03s");
        assert_eq!(clock(3723.0), "1h02m03s");
    }
}

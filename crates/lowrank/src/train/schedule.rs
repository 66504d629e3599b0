//! Learning-rate schedules: a pure function of the step.

/// The shape of the learning rate over training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant after warmup.
    Constant,
    /// Linear decay to 0 after warmup.
    Linear,
    /// Cosine decay to 0 after warmup.
    Cosine,
}

/// The learning rate at optimizer step `step` (0-based) of `total`, with `warmup` linear warmup
/// steps, exactly as transformers' `get_*_schedule_with_warmup` (so step 0 of a warmup has lr 0).
pub fn lr_at(schedule: Schedule, base: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup as f64;
    }
    let decay = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        assert_eq!(lr_at(Schedule::Cosine, 1.0, 0, 100, 10), 0.0);
        assert!((lr_at(Schedule::Cosine, 1.0, 9, 100, 10) - 0.9).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 10, 100, 10) - 1.0).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 55, 100, 10) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Linear, 1.0, 55, 100, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 2.0, 99, 100, 0), 2.0);
        assert!(lr_at(Schedule::Linear, 1.0, 100, 100, 0).abs() < 1e-12);
    }
}

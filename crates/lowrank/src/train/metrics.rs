//! What a run records: one JSON line per logged step in `metrics.jsonl`, and a loss-curve picture
//! (`loss.svg`) drawn from it.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer step (1-based: after this many updates).
    pub step: usize,
    /// Mean training loss of the step.
    pub loss: f64,
    /// Held-out loss, on steps where it was measured.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    /// Learning rate used for the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens per second over the step.
    pub tokens_per_s: f64,
}

/// Appends one line to `path`.
pub fn append(path: &Path, m: &StepMetrics) -> Result<()> {
    let mut f =
        std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io("opening", path, e))?;
    let line = serde_json::to_string(m).map_err(|e| Error::Json { path: path.into(), source: e })?;
    writeln!(f, "{line}").map_err(|e| Error::io("writing", path, e))
}

/// Reads every line of `path` (missing file: none).
pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(vec![]) };
    // A crash mid-append leaves a last line without its newline: that line is dropped.
    let whole = match text.rfind('\n') {
        Some(i) if !text.ends_with('\n') => &text[..=i],
        None if !text.is_empty() => "",
        _ => text.as_str(),
    };
    whole
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| Error::Json { path: path.into(), source: e }))
        .collect()
}

/// Keeps only the lines up to `step` (used when resuming from a checkpoint), as they were
/// written: re-serialising them could change a float's last digit.
pub fn truncate(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept = read(path)?.iter().filter(|m| m.step <= step).count();
    let mut out = String::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()).take(kept) {
        out.push_str(line);
        out.push('\n');
    }
    crate::staging::write_atomic(path, out.as_bytes())
}

/// Draws training and eval loss against step as an SVG line chart.
pub fn loss_svg(metrics: &[StepMetrics]) -> String {
    let (w, h, pad) = (640.0, 360.0, 48.0);
    let train: Vec<(f64, f64)> = metrics.iter().map(|m| (m.step as f64, m.loss)).collect();
    let eval: Vec<(f64, f64)> = metrics.iter().filter_map(|m| m.eval_loss.map(|e| (m.step as f64, e))).collect();
    let all = train.iter().chain(&eval).filter(|p| p.1.is_finite());
    let (mut x1, mut y0, mut y1) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    if y1 - y0 < 1e-9 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| pad + (x / x1) * (w - 2.0 * pad);
    let py = |y: f64| h - pad - (y - y0) / (y1 - y0) * (h - 2.0 * pad);
    let line = |pts: &[(f64, f64)], color: &str| -> String {
        let d: Vec<String> =
            pts.iter().filter(|p| p.1.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        format!(r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, d.join(" "))
    };
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    s += &format!(r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    s += &format!(r#"<line x1="{pad}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/>"#, h - pad, w - pad);
    s += &format!(r#"<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{}" stroke="black"/>"#, h - pad);
    s += &format!(r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#, w / 2.0, h - 12.0);
    s += &format!(r#"<text x="{pad}" y="{}" text-anchor="start">{y1:.3}</text>"#, pad - 8.0);
    s += &format!(r#"<text x="{pad}" y="{}" text-anchor="start">{y0:.3}</text>"#, h - pad + 16.0);
    s += &format!(r#"<text x="{}" y="{}" text-anchor="end">{x1}</text>"#, w - pad, h - pad + 16.0);
    s += &line(&train, "#1f77b4");
    s += &line(&eval, "#d62728");
    s += &format!(
        r##"<text x="{0}" y="20" fill="#1f77b4">train loss</text><text x="{1}" y="20" fill="#d62728">eval loss</text>"##,
        pad,
        pad + 100.0
    );
    s + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_both_curves_and_survives_nan() {
        let m =
            |step, loss, eval_loss| StepMetrics { step, loss, eval_loss, lr: 0.1, grad_norm: 1.0, tokens_per_s: 1.0 };
        let svg = loss_svg(&[m(1, 3.0, None), m(2, f64::NAN, None), m(3, 2.0, Some(2.5))]);
        assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("eval loss"));
        assert!(!svg.contains("NaN"));
    }
}

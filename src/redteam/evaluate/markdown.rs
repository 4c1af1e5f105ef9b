//! report.json, report.md and the summary charts (certified accuracy, accuracy per
//! preset) of an evaluation.

use std::path::Path;

use super::EvaluationReport;
use crate::redteam::RedTeamError;
use crate::redteam::charts;

/// The certified-accuracy and accuracy-per-preset charts; returns the files written.
pub(super) fn summary_charts(report: &EvaluationReport, out: &Path) -> Vec<String> {
    let mut written = Vec::new();
    if !report.certified.is_empty() {
        let curves: Vec<charts::Curve> = report
            .certified
            .iter()
            .map(|c| charts::Curve {
                label: format!("σ = {} (n = {}, α = {})", c.sigma, c.samples, c.alpha),
                points: c.curve.clone(),
            })
            .collect();
        let path = "charts/certified_accuracy.png";
        match charts::certified_accuracy_chart(
            &out.join(path),
            "Certified accuracy against L2 radius (CERTIFY, raw model)",
            &curves,
        ) {
            Ok(()) => written.push(path.to_string()),
            Err(e) => eprintln!("no certified-accuracy chart: {e}"),
        }
    }
    if report.whitebox.iter().any(|r| r.norm == "linf") {
        let path = "charts/whitebox_robust_accuracy.png";
        match whitebox_chart(&report.whitebox, &out.join(path)) {
            Ok(()) => written.push(path.to_string()),
            Err(e) => eprintln!("no white-box chart: {e}"),
        }
    }
    let mut groups = Vec::new();
    for clean in &report.clean {
        let mut bars = vec![("clean".to_string(), clean.defended_correct as f64 / clean.total.max(1) as f64)];
        for a in report.adaptive.iter().filter(|a| a.preset == clean.preset) {
            let eps = format!("{:.0}/255", a.epsilon * 255.0);
            bars.push((format!("transfer {eps}"), a.transfer_correct as f64 / a.images.max(1) as f64));
            bars.push((format!("{} {eps}", a.attack), a.adaptive_correct as f64 / a.images.max(1) as f64));
        }
        groups.push(charts::AccuracyBars { group: clean.preset.clone(), bars });
    }
    if !groups.is_empty() {
        let path = "charts/accuracy.png";
        match charts::accuracy_bars_chart(
            &out.join(path),
            "Defended top-1 accuracy: clean, transfer and adaptive attacks",
            &groups,
        ) {
            Ok(()) => written.push(path.to_string()),
            Err(e) => eprintln!("no accuracy chart: {e}"),
        }
    }
    written
}

/// Robust accuracy against the L∞ radius, one curve per preset (worst case over the
/// white-box and the transfer attack) and its transfer-only curve, from white-box rows
/// that may come from several runs (`pandaguard chart` merges reports split by radius or
/// preset). A preset measured twice at one radius keeps its first row.
pub fn whitebox_chart(rows: &[super::WhiteBoxRow], path: &Path) -> Result<(), charts::ChartError> {
    let mut curves: Vec<charts::Curve> = Vec::new();
    for row in rows.iter().filter(|r| r.norm == "linf") {
        for (suffix, robust) in [("", row.robust), (", transfer only", row.transfer_robust)] {
            let label = format!("{}{suffix}", row.preset);
            let point = (f64::from(row.epsilon) * 255.0, robust as f64 / row.photos.max(1) as f64);
            match curves.iter_mut().find(|c| c.label == label) {
                Some(curve) if curve.points.iter().any(|p| (p.0 - point.0).abs() < 1e-6) => {}
                Some(curve) => curve.points.push(point),
                None => curves.push(charts::Curve { label, points: vec![(0.0, 1.0), point] }),
            }
        }
    }
    for curve in &mut curves {
        curve.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    charts::accuracy_curves_chart(
        path,
        "Robust accuracy against L∞ radius (photos raw gets right; 3 fresh draws each)",
        ("ε (L∞, /255)", "robust accuracy"),
        &curves,
    )
}

fn percent(part: usize, whole: usize) -> String {
    if whole == 0 { "–".into() } else { format!("{part}/{whole} ({:.0}%)", 100.0 * part as f64 / whole as f64) }
}

pub(super) fn write(report: &EvaluationReport, out: &Path) -> Result<(), RedTeamError> {
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| RedTeamError::Invalid(format!("cannot serialise the report: {e}")))?;
    let path = out.join("report.json");
    std::fs::write(&path, json).map_err(RedTeamError::io(path))?;
    let mut md = String::new();
    md.push_str(&format!(
        "# Robustness report\n\nModel `{}`, {} labelled photos, seed {}. Threat model: L∞ perturbations of the model-input image (ε per value in [0,1] units), score-based black-box attacks (untargeted) with at most {} queries against the raw model (transfer) and the budgets below against the defended pipeline (adaptive). Abstentions count as errors.\n\n",
        report.model, report.images, report.seed, report.queries
    ));
    md.push_str("## Clean photos\n\n| preset | raw top-1 | defended top-1 | abstained | suspicious | p50 latency ms | p50 ORT alone ms | ratio | views/inference | rows |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for c in &report.clean {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.3} | {:.1}% | {:.0} |\n",
            c.preset,
            percent(c.raw_correct, c.total),
            percent(c.defended_correct, c.total),
            c.abstained,
            percent(c.suspicious, c.total),
            c.median_latency_ms,
            c.median_inference_ms,
            c.latency_ratio,
            100.0 * c.views_share,
            c.median_rows
        ));
    }
    md.push_str("\n## Attacks on the raw model\n\n| attack | ε | fooled raw | median queries |\n|---|---|---|---|\n");
    for a in &report.attacks {
        md.push_str(&format!(
            "| {} | {:.0}/255 | {} | {:.0} |\n",
            a.attack,
            a.epsilon * 255.0,
            percent(a.fooled, a.attacked),
            a.median_queries
        ));
    }
    md.push_str("\n## Transfer: adversarial photos (that fool raw) sent to the defended pipeline\n\n| preset | attack | ε | recovered true label | abstained | suspicious | per defense (correct) |\n|---|---|---|---|---|---|---|\n");
    for t in &report.transfer {
        let per: Vec<String> = t.per_defense.iter().map(|(n, c)| format!("{n} {c}/{}", t.adversarial)).collect();
        md.push_str(&format!(
            "| {} | {} | {:.0}/255 | {} | {} | {} | {} |\n",
            t.preset,
            t.attack,
            t.epsilon * 255.0,
            percent(t.recovered, t.adversarial),
            t.abstained,
            percent(t.suspicious, t.adversarial),
            per.join(", ")
        ));
    }
    if !report.adaptive.is_empty() {
        md.push_str("\n## Adaptive attacks beside transfer, on the same photos\n\nThe adaptive attacker queries the defended pipeline itself, averages each query over `eot` draws of the defense's randomness (EOT) — fresh draws on every answer, or the same `eot` seeds for every candidate when the noise column says fixed (the API lets a client choose `seed`) — and Square starts from the transfer example; a photo counts as robust only when the defended answer is right on both the transfer and the adaptive example (judged with fresh seeds). Abstentions count as errors.\n\n| preset | attack | ε | photos | clean defended | transfer robust | adaptive robust | queries × EOT | noise | median queries to success | abstained | suspicious | minutes |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for a in &report.adaptive {
            md.push_str(&format!(
                "| {} | {} | {:.0}/255 | {} | {} | {} | {} | {} × {} | {} | {} | {} | {} | {:.1} |\n",
                a.preset,
                a.attack,
                a.epsilon * 255.0,
                a.images,
                percent(a.clean_correct, a.images),
                percent(a.transfer_correct, a.images),
                percent(a.adaptive_correct, a.images),
                a.queries,
                a.eot,
                if a.fixed_noise { "fixed" } else { "fresh" },
                if a.median_queries.is_nan() { "–".to_string() } else { format!("{:.0}", a.median_queries) },
                a.abstained,
                a.suspicious,
                a.seconds / 60.0
            ));
        }
    }
    if !report.whitebox.is_empty() {
        md.push_str("\n## White-box attacks beside transfer, on the photos the raw model gets right\n\nThe attacker has the weights and the code: gradients of the served ONNX files (models/gradients, JAX) through a differentiable copy of each preset — resizes as linear maps, the noisy views drawn afresh every step (EOT, `eot` draws per noisy term), the mean probabilities the preset combines, smoothing's vote replaced by its mean softmax (BPDA). The attacks run in turn until one succeeds; transfer = PGD on the raw model alone. Every verdict is the real pipeline's on the written 8-bit PNG with fresh noise, `draws` times: robust = right on every draw against both attacks. Abstentions count as errors.\n\n| preset | norm | ε | photos | robust (worst case) | white-box robust | transfer robust | attacks | steps × EOT | draws | median steps to success | s per photo | rows per step |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for r in &report.whitebox {
            let radius =
                if r.norm == "linf" { format!("{:.0}/255", r.epsilon * 255.0) } else { format!("{}", r.epsilon) };
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} × {} | {} | {} | {:.1} | {:.1} |\n",
                r.preset,
                r.norm,
                radius,
                r.photos,
                percent(r.robust, r.photos),
                percent(r.whitebox_robust, r.photos),
                percent(r.transfer_robust, r.photos),
                r.attacks.join(", "),
                r.steps,
                r.eot,
                r.judge_draws,
                if r.median_steps.is_nan() { "–".to_string() } else { format!("{:.0}", r.median_steps) },
                r.seconds_per_photo,
                r.rows_per_step
            ));
        }
    }
    if !report.certified.is_empty() {
        md.push_str("\n## Certified accuracy (randomized smoothing on the raw model, CERTIFY)\n\nCertified = CERTIFY returned the true class with a radius at least r (L2, in [0,1] model-input pixel units, 3×H×W values). The largest certifiable radius is σ·Φ⁻¹(α^(1/n)) for these n and α.\n\n| σ | n0 | n | α | max radius | certified at r=0 | r ≥ 0.25·max | r ≥ 0.5·max | abstained |\n|---|---|---|---|---|---|---|---|---|\n");
        for c in &report.certified {
            let at = |fraction: f64| c.radii.iter().filter(|r| r.is_some_and(|r| r >= fraction * c.max_radius)).count();
            md.push_str(&format!(
                "| {} | {} | {} | {} | {:.3} | {} | {} | {} | {} |\n",
                c.sigma,
                c.selection_samples,
                c.samples,
                c.alpha,
                c.max_radius,
                percent(c.certified_correct, c.images),
                percent(at(0.25), c.images),
                percent(at(0.5), c.images),
                c.abstained
            ));
        }
    }
    if !report.charts.is_empty() {
        md.push_str("\n## Charts\n\n");
        for chart in &report.charts {
            md.push_str(&format!("![{chart}]({chart})\n\n"));
        }
    }
    if !report.calibration.is_empty() {
        md.push_str("\n## Squeeze-score calibration on clean variants\n\n| preset | variants | raw≠defended | threshold (score's 95th percentile) | flagged at threshold |\n|---|---|---|---|---|\n");
        for c in &report.calibration {
            md.push_str(&format!(
                "| {} | {} | {} | {:.3} | {:.1}% |\n",
                c.preset,
                c.images,
                c.disagreements,
                c.threshold,
                100.0 * c.false_positive_rate
            ));
        }
    }
    let path = out.join("report.md");
    std::fs::write(&path, md).map_err(RedTeamError::io(path))
}

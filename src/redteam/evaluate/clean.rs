//! Clean photos: accuracy and cost of every preset, and the suspicion threshold's
//! calibration on clean variants.

use std::time::{Duration, Instant};

use super::{Calibration, CleanResult, Evaluator, Tally, clean_variants, median, png_bytes};
use crate::pipeline::Outcome;
use crate::redteam::RedTeamError;
use crate::redteam::oracle::oracle_error;

/// Writes the clean PNGs (and their variants) and measures every preset on them.
pub(super) fn measure(ev: &Evaluator<'_>) -> Result<Vec<CleanResult>, RedTeamError> {
    for (sample, png) in ev.samples.iter().zip(&ev.clean_png) {
        let stem = sample.stem();
        ev.write(&format!("clean/{stem}.png"), png)?;
        for (v, variant) in clean_variants(sample, &ev.raw)?.iter().enumerate() {
            ev.write(&format!("clean/{stem}_v{v}.png"), &png_bytes(variant)?)?;
        }
    }
    let mut results = Vec::new();
    for preset in &ev.options.presets {
        let mut answers = Vec::new();
        for (index, (sample, png)) in ev.samples.iter().zip(&ev.clean_png).enumerate() {
            answers.push((sample.class_id, ev.preset(png.clone(), preset, ev.options.seed + index as u64)?));
        }
        let outcomes: Vec<&Outcome> = answers.iter().map(|(_, a)| a).collect();
        let (latency, inference, rows) = cost(ev, &outcomes)?;
        let views_share = median(
            outcomes.iter().map(|a| a.cost.views.as_secs_f64() / a.cost.inference.as_secs_f64().max(1e-12)).collect(),
        );
        let tally = Tally::of(&answers);
        eprintln!(
            "clean {preset}: raw {}/{n}, defended {}/{n}",
            tally.raw_correct,
            tally.defended_correct,
            n = answers.len()
        );
        results.push(CleanResult {
            preset: preset.clone(),
            raw_correct: tally.raw_correct,
            defended_correct: tally.defended_correct,
            abstained: tally.abstained,
            suspicious: tally.suspicious,
            total: answers.len(),
            per_defense: tally.per_defense,
            median_latency_ms: latency,
            median_inference_ms: inference,
            median_rows: rows,
            latency_ratio: latency / inference.max(f64::EPSILON),
            views_share,
        });
    }
    Ok(results)
}

/// Median total latency, median ORT time of the same batches run alone, median rows (ms).
fn cost(ev: &Evaluator<'_>, outcomes: &[&Outcome]) -> Result<(f64, f64, f64), RedTeamError> {
    let mut latencies = Vec::new();
    let mut inference = Vec::new();
    let mut rows = Vec::new();
    let registry = ev.pipeline.registry();
    for outcome in outcomes {
        latencies.push(outcome.cost.total.as_secs_f64() * 1e3);
        rows.push(outcome.cost.rows as f64);
        let mut alone = Duration::ZERO;
        for (name, count) in &outcome.cost.batches {
            let model =
                registry.get(name).ok_or_else(|| RedTeamError::Invalid(format!("unknown model {name} in a batch")))?;
            let input = vec![0.0f32; count * model.card.row_len()];
            let deadline = Instant::now() + Duration::from_secs(60);
            let output = ev
                .runtime
                .block_on(model.engine.infer(input, *count, deadline))
                .map_err(|e| oracle_error(crate::pipeline::PipelineError::engine(name, e, 60_000)))?;
            alone += output.inference_time;
        }
        inference.push(alone.as_secs_f64() * 1e3);
    }
    Ok((median(latencies), median(inference), median(rows)))
}

/// The squeeze threshold at which the score test alone flags 5% of clean images:
/// the 95th percentile of the score over the clean variants. (Raw/defended
/// disagreements are flagged whatever the threshold; the combined rate is reported.)
pub(super) fn calibrate(ev: &Evaluator<'_>) -> Result<Vec<Calibration>, RedTeamError> {
    let mut results = Vec::new();
    for preset in &ev.options.presets {
        let mut scores = Vec::new();
        let mut disagreements = 0;
        for (index, sample) in ev.samples.iter().enumerate() {
            for variant in clean_variants(sample, &ev.raw)? {
                let outcome = ev.preset(png_bytes(&variant)?, preset, ev.options.seed + index as u64)?;
                let disagree = outcome.defended.class_id != Some(outcome.raw_class());
                disagreements += usize::from(disagree);
                scores.push((disagree, outcome.squeeze_score));
            }
        }
        let total = scores.len();
        let mut sorted: Vec<f32> = scores.iter().map(|(_, s)| *s).collect();
        sorted.sort_by(f32::total_cmp);
        let threshold = sorted.get(((total as f64 * 0.95).ceil() as usize).saturating_sub(1)).copied().unwrap_or(2.0);
        let flagged = scores.iter().filter(|(d, s)| *d || *s > threshold).count();
        results.push(Calibration {
            preset: preset.clone(),
            images: total,
            disagreements,
            threshold,
            false_positive_rate: flagged as f64 / total.max(1) as f64,
        });
    }
    Ok(results)
}

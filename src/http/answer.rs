//! The JSON answer of `/classify`, built from a pipeline [`Outcome`]: probabilities
//! ranked into top-k lists with labels, durations in milliseconds.

use std::time::Duration;

use super::ApiError;
use crate::api::{ClassScore, ClassifyResponse, DefendedPrediction, DefenseReport, Prediction, Timing};
use crate::model::Labels;
use crate::pipeline::{Cost, Outcome};
use crate::prediction::{argmax, top_indices};

/// The answer for `outcome`, with `top_k` classes listed per prediction.
pub fn classify_response(outcome: &Outcome, request_id: String, top_k: usize) -> ClassifyResponse {
    let labels = &outcome.model.labels;
    let defended = &outcome.defended;
    ClassifyResponse {
        request_id,
        model: outcome.model.card.name.clone(),
        raw: prediction(&outcome.raw, labels, top_k),
        defended: DefendedPrediction {
            class_id: defended.class_id,
            label: defended.class_id.map(|c| labels.name(c).to_string()),
            confidence: defended.confidence(),
            top_k: ranked(&defended.probabilities, labels, top_k),
            abstained: defended.abstained(),
            method: defended.method.clone(),
        },
        defenses: outcome
            .defenses
            .iter()
            .map(|d| DefenseReport {
                name: d.name.to_string(),
                class_id: d.class_id,
                label: d.class_id.map(|c| labels.name(c).to_string()),
                confidence: d.confidence,
                abstained: d.abstained,
                views: d.views,
                details: d.details.clone(),
            })
            .collect(),
        suspicious: outcome.suspicious,
        squeeze_score: outcome.squeeze_score,
        preset: outcome.preset.clone(),
        seed: outcome.seed,
        rows: outcome.cost.rows,
        timing_ms: timing(&outcome.cost),
        query_attack: None,
    }
}

/// The most probable `k` classes, most probable first.
pub fn ranked(probabilities: &[f32], labels: &Labels, k: usize) -> Vec<ClassScore> {
    top_indices(probabilities, k)
        .into_iter()
        .map(|i| ClassScore { class_id: i, label: labels.name(i).to_string(), probability: probabilities[i] })
        .collect()
}

fn prediction(probabilities: &[f32], labels: &Labels, k: usize) -> Prediction {
    let class_id = argmax(probabilities);
    Prediction {
        class_id,
        label: labels.name(class_id).to_string(),
        confidence: probabilities.get(class_id).copied().unwrap_or(0.0),
        top_k: ranked(probabilities, labels, k),
    }
}

fn timing(cost: &Cost) -> Timing {
    Timing {
        decode: millis(cost.decode),
        preprocess: millis(cost.preprocess),
        views: millis(cost.views),
        queue: millis(cost.queue),
        inference: millis(cost.inference),
        total: millis(cost.total),
    }
}

/// Milliseconds with microsecond resolution.
fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

/// The answer of `attack_detection.action = "degrade"` for a detected query: labels
/// and class ids only. Left out: `confidence` of `raw`, `defended` and every defense,
/// `probability` of every top-k entry, each defense's `details` (member confidences),
/// and `squeeze_score` (a distance between probability vectors). A score-based attack
/// (Square, NES) then has nothing to climb; a decision-based one still sees labels.
pub fn without_scores(answer: &ClassifyResponse) -> Result<serde_json::Value, ApiError> {
    let mut value = serde_json::to_value(answer).map_err(|e| ApiError::Internal(format!("answer to JSON: {e}")))?;
    let Some(object) = value.as_object_mut() else { return Ok(value) };
    object.remove("squeeze_score");
    for key in ["raw", "defended"] {
        if let Some(prediction) = object.get_mut(key).and_then(|v| v.as_object_mut()) {
            strip_prediction(prediction);
        }
    }
    if let Some(defenses) = object.get_mut("defenses").and_then(|v| v.as_array_mut()) {
        for defense in defenses.iter_mut().filter_map(|d| d.as_object_mut()) {
            defense.remove("details");
            strip_prediction(defense);
        }
    }
    Ok(value)
}

fn strip_prediction(prediction: &mut serde_json::Map<String, serde_json::Value>) {
    prediction.remove("confidence");
    if let Some(top) = prediction.get_mut("top_k").and_then(|v| v.as_array_mut()) {
        for entry in top.iter_mut().filter_map(|e| e.as_object_mut()) {
            entry.remove("probability");
        }
    }
}

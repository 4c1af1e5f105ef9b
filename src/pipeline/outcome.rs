//! What a classification produced, before anyone turns it into JSON: the raw and
//! defended probabilities, each defense's answer, the judgement, and the cost.

use std::sync::Arc;
use std::time::Duration;

use crate::defense::{Defended, DefenseOutcome};
use crate::model::LoadedModel;

#[derive(Debug, Clone)]
pub struct Outcome {
    /// The model of the raw answer (its labels name every class of the outcome).
    pub model: Arc<LoadedModel>,
    /// The raw model's probabilities on the plain view.
    pub raw: Vec<f32>,
    /// Each defense's answer, in the order the request listed them.
    pub defenses: Vec<DefenseOutcome>,
    /// The combination of the defenses (the raw answer when there are none).
    pub defended: Defended,
    /// L1 distance between the raw and defended probabilities, 0 to 2.
    pub squeeze_score: f32,
    /// Raw and defended disagree, or the squeeze score is over the threshold.
    pub suspicious: bool,
    /// The preset the defenses came from, or "custom".
    pub preset: String,
    /// Seed of the defenses' random views.
    pub seed: u64,
    pub cost: Cost,
}

impl Outcome {
    /// The raw answer's class.
    pub fn raw_class(&self) -> usize {
        crate::prediction::argmax(&self.raw)
    }
}

/// Time and rows spent on a request, accumulated across rounds.
#[derive(Debug, Clone, Default)]
pub struct Cost {
    /// Model inputs run, over all models and rounds.
    pub rows: usize,
    /// (model, rows) of each engine submission.
    pub batches: Vec<(String, usize)>,
    /// Bytes to RGB pixels.
    pub decode: Duration,
    /// Resizing to each model's input.
    pub preprocess: Duration,
    /// Building the defenses' views.
    pub views: Duration,
    /// Waiting for a batch slot (the raw model's, summed over rounds).
    pub queue: Duration,
    /// ONNX Runtime time of the batches its rows ran in, summed over models and rounds.
    pub inference: Duration,
    /// Arrival to outcome.
    pub total: Duration,
}

impl Cost {
    /// Each stage as (name, duration), in the order a request takes them.
    pub fn stages(&self) -> [(&'static str, Duration); 6] {
        [
            ("decode", self.decode),
            ("preprocess", self.preprocess),
            ("views", self.views),
            ("queue", self.queue),
            ("inference", self.inference),
            ("total", self.total),
        ]
    }

    pub(super) fn record(&self) {
        for (stage, duration) in self.stages() {
            metrics::histogram!("pandaguard_stage_seconds", "stage" => stage).record(duration.as_secs_f64());
        }
    }
}

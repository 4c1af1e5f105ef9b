//! The JSON shapes of the public API, shared by the HTTP server, the offline CLI
//! and clients (the red-team tool parses them back).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::defense::report::{DefendedPrediction, DefenseReport};
use crate::model::ModelCard;

/// The answer to `POST /classify`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClassifyResponse {
    /// Echo of the `x-request-id` header, or a generated id.
    pub request_id: String,
    /// Model that produced `raw`.
    pub model: String,
    /// The undefended prediction: the model on the plain input.
    pub raw: Prediction,
    /// The defenses' combined prediction (equal to `raw` with `defense=none`).
    pub defended: DefendedPrediction,
    /// Each defense's own prediction and details, in the order they ran.
    pub defenses: Vec<DefenseReport>,
    /// True when raw and defended disagree (or the defenses abstain), or when
    /// `squeeze_score` exceeds the configured threshold.
    pub suspicious: bool,
    /// L1 distance between the raw and defended probability vectors, 0 to 2.
    pub squeeze_score: f32,
    /// The defense preset used, or "custom" for a list of defenses.
    pub preset: String,
    /// Seed of the random views; send it back as `seed` to reproduce this answer.
    pub seed: u64,
    /// Model inputs run for this request, over all models and rounds.
    pub rows: usize,
    /// Where the time went, in milliseconds.
    pub timing_ms: Timing,
    /// Each engine submission as (model, rows), for cost measurements; not sent.
    #[serde(skip)]
    pub batches: Vec<(String, usize)>,
    /// The defended probability vector over all classes (empty when abstaining), for
    /// in-process attacks; clients see `defended.top_k`.
    #[serde(skip)]
    pub defended_probabilities: Vec<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Prediction {
    pub class_id: usize,
    pub label: String,
    /// Probability of `class_id`.
    pub confidence: f32,
    /// The most probable classes, most probable first.
    pub top_k: Vec<ClassScore>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClassScore {
    pub class_id: usize,
    pub label: String,
    pub probability: f32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Timing {
    /// Bytes to RGB pixels.
    pub decode: f64,
    /// Resize and crop to each model's input.
    pub preprocess: f64,
    /// Building the defenses' views (noise, blur, crops).
    pub views: f64,
    /// Waiting for a batch slot (the raw model's, summed over rounds).
    pub queue: f64,
    /// ONNX Runtime time of the batches this request's rows ran in, summed over
    /// models (which run concurrently) and rounds.
    pub inference: f64,
    /// Arrival to answer.
    pub total: f64,
}

/// Every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_image`, `overloaded`.
    pub code: String,
    pub message: String,
}

/// The answer to `GET /models`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelsResponse {
    pub default: String,
    pub models: Vec<ModelInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelInfo {
    pub name: String,
    /// Rows admitted and waiting or running right now.
    pub queued_rows: usize,
    pub card: ModelCard,
}

/// The answer of the health endpoints.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `live`, `ready` or `not_ready`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

//! The JSON shapes of the public API, shared by the HTTP server, the offline CLI
//! and clients (the red-team tool parses them back). Only types: `http/answer.rs`
//! builds them from a pipeline `Outcome`. Every field is sent; a client that parses
//! an answer into these types gets all of it.
//!
//! Owns: the wire format. Must not import: the pipeline, the engine, axum.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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
    /// Query-attack detection's verdict on this request; present only when
    /// `attack_detection.action = "flag"`. (Under `degrade`, a detected query's answer
    /// leaves out every score: `confidence` and `probability` everywhere,
    /// `defenses[].details` and `squeeze_score`; labels and class ids stay.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_attack: Option<QueryAttackReport>,
}

/// How this query compares with the same client's recent ones.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QueryAttackReport {
    /// At least `attack_detection.match_threshold` of the query's fingerprint hashes
    /// were in the client's window: the pattern of a black-box query attack.
    pub detected: bool,
    /// Fingerprint hashes of this query already seen in the client's window.
    pub matches: usize,
    /// Earlier queries of the client it was compared with.
    pub window: usize,
}

/// The combined answer of the defenses.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DefendedPrediction {
    /// `null` when the defended classifier abstains.
    pub class_id: Option<usize>,
    pub label: Option<String>,
    /// Combined probability of `class_id` (0 when abstaining).
    pub confidence: f32,
    pub top_k: Vec<ClassScore>,
    pub abstained: bool,
    /// How the answer was formed, e.g. "mean of smooth, blur, saccade, ensemble".
    pub method: String,
}

/// One defense's own answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DefenseReport {
    /// The defense's name (`smooth`, `blur`, `saccade`, `ensemble`, ...).
    pub name: String,
    pub class_id: Option<usize>,
    pub label: Option<String>,
    pub confidence: f32,
    pub abstained: bool,
    /// Model inputs this defense added to the request.
    pub views: usize,
    /// What the defense reports about its views: one of the `*Details` schemas
    /// (SmoothDetails, BlurDetails, SaccadeDetails, EnsembleDetails), by `name`.
    #[schema(value_type = Object)]
    pub details: Box<serde_json::value::RawValue>,
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

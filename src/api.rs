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
    /// The query is nearly identical to `attack_detection.close_queries` of the client's
    /// recent queries, or alike to `alike_queries` of them: the pattern of a black-box
    /// query attack.
    pub detected: bool,
    /// The most fingerprint hashes this query shares with one of the client's recent queries.
    pub matches: usize,
    /// Recent queries sharing at least `match_threshold` hashes with it (alike).
    pub alike: usize,
    /// Recent queries sharing at least `close_match_threshold` hashes with it (nearly identical).
    pub close: usize,
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

/// The answer of `GET /info`: what a client (the web page) needs to know before it
/// sends anything: models, presets, limits.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InfoResponse {
    pub default_model: String,
    pub default_preset: String,
    pub models: Vec<InfoModel>,
    pub presets: Vec<InfoPreset>,
    /// Defenses a request may list in `defense=` (e.g. `smooth,blur`).
    pub defenses: Vec<String>,
    pub limits: InfoLimits,
    /// False when the server refuses a client `seed` (`defense.allow_client_seed`).
    pub allow_client_seed: bool,
    pub explore: InfoExplore,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InfoModel {
    pub name: String,
    pub input: InfoInput,
    pub num_classes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InfoInput {
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InfoPreset {
    pub name: String,
    pub defenses: Vec<String>,
    /// Model rows the preset runs per image with the default model (first round: smoothing
    /// may add rounds); null when it cannot run here.
    pub rows: Option<usize>,
    /// Why a request naming this preset would be refused here (e.g. its models are not
    /// loaded); null when it runs.
    pub unavailable: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InfoLimits {
    pub max_body_bytes: usize,
    pub max_width: u32,
    pub max_height: u32,
    pub max_pixels: u64,
    pub default_top_k: usize,
    pub max_top_k: usize,
    /// Content types `POST /classify` takes as a raw body (and `multipart/form-data`).
    pub content_types: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InfoExplore {
    pub enabled: bool,
    pub max_grid: usize,
    pub default_grid: usize,
    pub max_rows: usize,
}

/// The answer of `GET /samples`: labelled photos the server offers for trying it out.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SamplesResponse {
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sample {
    /// File name, fetched from `GET /samples/{file}`.
    pub file: String,
    /// The photo's true class (ImageNet id) and its name in the default model's labels.
    pub class_id: usize,
    pub label: String,
}

/// The answer of `POST /explore`: a decision map.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExploreResponse {
    pub request_id: String,
    pub model: String,
    pub preset: String,
    /// Cells per side.
    pub grid: usize,
    /// Half the map's side along each axis in L2 units (the axes are unit L2 directions).
    pub radius_l2: f32,
    /// The same along x in L∞ units.
    pub radius_linf: f32,
    pub axes: ExploreAxes,
    /// The adversarial example on the x axis (y = 0), or `null` when none was given or
    /// found (then both axes are random).
    pub adversarial: Option<ExplorePoint>,
    /// The raw model's label of the image itself: the label whose probability the
    /// `true_probability` grids hold.
    pub true_class: ExploreClass,
    /// Every label on either map.
    pub classes: Vec<ExploreClass>,
    pub raw: ExploreGrid,
    pub defended: ExploreGrid,
    /// Model rows run for the map.
    pub rows: usize,
    /// The seed every cell's defenses used.
    pub seed: u64,
    pub timing_ms: ExploreTiming,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExploreAxes {
    pub x: ExploreAxis,
    pub y: ExploreAxis,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExploreAxis {
    /// `toward_adversarial`, `random` or `random_orthogonal`.
    pub direction: String,
    /// L∞ change of one L2 unit along this axis.
    pub linf_per_unit: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExplorePoint {
    pub x: f32,
    pub y: f32,
    /// `given` (sent as `toward`) or `attack` (found by a short Square Attack on the raw model).
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExploreClass {
    pub class_id: usize,
    pub label: String,
}

/// One classifier's labels over the grid, row by row from the bottom (y = -radius),
/// each row from x = -radius to +radius.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExploreGrid {
    /// Class ids; -1 where the classifier abstained.
    pub labels: Vec<i64>,
    /// Probability of `true_class` per cell (`null` when abstaining without scores).
    pub true_probability: Vec<Option<f32>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExploreTiming {
    pub total: f64,
}

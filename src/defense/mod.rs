//! Defenses against adversarial examples.
//!
//! Owns: the [`Defense`] trait and the registry of defenses ([`Defenses`]), each
//! defense's views and prediction, their combination into the defended answer.
//! Must not import: `http`, axum, the engine (a defense sees rows of probabilities,
//! never a session or a queue), `api` (its answers are domain values; `http` turns
//! them into JSON).
//!
//! A defense is a pair of pure functions spread over rounds: image → views (model
//! input rows, seeded) and the model's probabilities on those rows → a prediction
//! with details. The pipeline puts the raw view and every defense's views of a round
//! through the engine together (one submission per model), hands each defense its
//! rows back, and asks for another round until every defense is done (only adaptive
//! smoothing takes more than one).
//!
//! - `smooth`: randomized smoothing, PREDICT with adaptive sampling, CERTIFY.
//! - `blur`: a Gaussian blur view and a median-filter view (feature squeezing).
//! - `saccade`: crops at the most informative places, foveated, plus the full view.
//! - `ensemble`: the plain view (and noisy views) through several models.
//!
//! Adding a defense: one file implementing [`Defense`] and one line in
//! [`Defenses::standard`] (docs/architecture.md, "Adding a defense").

pub mod blur;
pub mod combine;
pub mod ensemble;
pub mod filters;
pub mod saccade;
pub mod settings;
pub mod smooth;
pub mod views;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;
use utoipa::openapi::{RefOr, Schema};

pub use combine::{Defended, combine, mean_probabilities, squeeze_score};
pub use settings::{DefenseConfig, DefenseLimits, DefenseSettings, SettingsError};
pub use views::{Outputs, RowRange, Source, Views};

use crate::imaging::ResizeError;
use crate::model::{Labels, LoadedModel, ModelRegistry};
use crate::prediction::argmax;

/// One kind of defense. Implementations are stateless; a request's state lives in the
/// [`DefenseRun`] that [`Defense::start`] returns.
pub trait Defense: Send + Sync {
    /// The name used in `defense=` lists, presets and answers.
    fn name(&self) -> &'static str;

    /// The `/classify` query parameters this defense reads. A request that sets a
    /// parameter none of its defenses reads is refused (it would be silently ignored).
    fn parameters(&self) -> &'static [&'static str];

    /// The parameter that sets how many rows it needs, named when a request needs
    /// more rows than `engine.max_rows_per_request`.
    fn row_parameter(&self) -> Option<&'static str> {
        None
    }

    /// Checks the settings it reads against the limits.
    fn check(&self, settings: &DefenseSettings, limits: &DefenseLimits) -> Result<(), SettingsError>;

    /// Starts one request (before the image is decoded): resolves the models it needs
    /// and says how many rows its first round takes.
    fn start(&self, request: &Request<'_>) -> Result<Box<dyn DefenseRun>, DefenseError>;

    /// The OpenAPI schemas of its `details` (and of the types they refer to), as
    /// [`schemas_of`] gives them.
    fn details_schemas(&self) -> Vec<(String, RefOr<Schema>)>;
}

/// A type's schema and every schema it refers to, named as the document refers to them.
pub fn schemas_of<T: ToSchema>() -> Vec<(String, RefOr<Schema>)> {
    let mut schemas = vec![(T::name().into_owned(), T::schema())];
    T::schemas(&mut schemas);
    schemas
}

/// What a defense knows about the request it starts.
pub struct Request<'a> {
    pub settings: &'a DefenseSettings,
    /// The model of the raw prediction.
    pub raw: &'a Arc<LoadedModel>,
    pub registry: &'a ModelRegistry,
}

impl Request<'_> {
    /// The labels every model of the request shares (the raw model's).
    pub fn labels(&self) -> &Labels {
        &self.raw.labels
    }
}

/// One defense working on one request, round by round.
pub trait DefenseRun: Send + Sync {
    /// Every model whose input image its views are made from.
    fn models(&self) -> Vec<Arc<LoadedModel>>;

    /// Rows of its next round per model, not counting plain views (which are shared),
    /// at most what `views` will add; empty when it is done. Known before the image
    /// is decoded, so the first round can be admitted before any expensive work.
    fn next_rows(&self) -> Vec<(Arc<LoadedModel>, usize)>;

    /// The models whose plain view its first round uses.
    fn plain_models(&self) -> Vec<Arc<LoadedModel>> {
        Vec::new()
    }

    /// Adds the views of its next round. CPU work: called on a blocking thread.
    fn views(&mut self, source: &Source, views: &mut Views) -> Result<(), DefenseError>;

    /// Takes the round's outputs (read by the ranges `views` got).
    fn observe(&mut self, outputs: &Outputs);

    /// Its answer, once `next_rows` is empty.
    fn finish(self: Box<Self>) -> DefenseOutcome;
}

/// A defense's answer for one request.
#[derive(Debug, Clone)]
pub struct DefenseOutcome {
    pub name: &'static str,
    /// `None` when it abstains.
    pub class_id: Option<usize>,
    /// Its probability of `class_id` (0 when abstaining).
    pub confidence: f32,
    pub abstained: bool,
    /// What it contributes to the combination; empty when it has nothing to say.
    pub probabilities: Vec<f32>,
    /// Model inputs it added to the request.
    pub views: usize,
    /// Its own report (the schema from `Defense::details_schemas`), as JSON.
    pub details: Box<RawValue>,
}

impl DefenseOutcome {
    /// The answer of a defense that always answers: the top class of `probabilities`.
    pub fn from_probabilities(
        name: &'static str,
        probabilities: Vec<f32>,
        views: usize,
        details: &impl Serialize,
    ) -> Self {
        let class_id = argmax(&probabilities);
        DefenseOutcome {
            name,
            class_id: Some(class_id),
            confidence: probabilities.get(class_id).copied().unwrap_or(0.0),
            abstained: false,
            probabilities,
            views,
            details: to_json(details),
        }
    }
}

/// Details as JSON text; the detail types are plain structs of numbers and strings,
/// whose serialisation cannot fail (a failure would give `null`, never a panic).
pub fn to_json(details: &impl Serialize) -> Box<RawValue> {
    serde_json::value::to_raw_value(details).unwrap_or_else(|_| null())
}

/// JSON `null`, for outcomes without details.
pub fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_string()).unwrap_or_default()
}

/// Why a defense could not start or build its views.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DefenseError {
    #[error("unknown model {name:?}; loaded models: {}", known.join(", "))]
    UnknownModel { parameter: &'static str, name: String, known: Vec<String> },
    #[error("{name} has other classes than {raw}")]
    IncompatibleModel { parameter: &'static str, name: String, raw: String },
    /// An ensemble of every loaded model of a precision, with none of them loaded.
    #[error(
        "the ensemble combines the loaded {precision} models and none is loaded (loaded: {}); add them to \
         models.load (int8 variants are named <model>-int8)",
        loaded.join(", ")
    )]
    NoMembers { precision: crate::model::Precision, loaded: Vec<String> },
    #[error(transparent)]
    Resize(#[from] ResizeError),
    /// A defense asked for the image of a model it did not name in `models()`.
    #[error("a defense used model {0} without planning for it")]
    Unplanned(String),
}

/// A single view's top class, as defenses report their views.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ViewPrediction {
    pub class_id: usize,
    pub label: String,
    pub confidence: f32,
}

impl ViewPrediction {
    pub fn from_probabilities(probabilities: &[f32], labels: &Labels) -> Self {
        let class_id = argmax(probabilities);
        ViewPrediction {
            class_id,
            label: labels.name(class_id).to_string(),
            confidence: probabilities.get(class_id).copied().unwrap_or(0.0),
        }
    }
}

/// The defenses a pipeline knows, by name.
#[derive(Clone)]
pub struct Defenses(Vec<Arc<dyn Defense>>);

impl Defenses {
    /// The shipped defenses. Registering a new one is one line here.
    pub fn standard() -> Self {
        Defenses(Vec::new()).with(smooth::Smooth).with(blur::Blur).with(saccade::Saccade).with(ensemble::Ensemble)
    }

    /// Adds a defense (a later one with the same name replaces the earlier).
    pub fn with(mut self, defense: impl Defense + 'static) -> Self {
        self.0.retain(|d| d.name() != defense.name());
        self.0.push(Arc::new(defense));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Defense>> {
        self.0.iter().find(|d| d.name() == name)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|d| d.name()).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Defense>> {
        self.0.iter()
    }
}

impl std::fmt::Debug for Defenses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

//! Defenses against adversarial examples.
//!
//! Every defense is a pair of pure functions: image → views (model input tensors)
//! and the model's outputs on those views → a prediction with details. The pipeline
//! (`crate::pipeline`) puts the raw view and every defense's views of a request
//! through the engine together, then hands each defense its rows back.
//!
//! - `smooth`: randomized smoothing, PREDICT with adaptive sampling, CERTIFY.
//! - `blur`: a Gaussian blur view and a median-filter view (feature squeezing).
//! - `saccade`: crops at the most informative places, foveated, plus the full view.
//! - `ensemble`: the plain view through several models.
//!
//! The defended answer averages the probability vectors of the defenses that did not
//! abstain; `suspicious` compares it with the raw answer.

pub mod blur;
pub mod ensemble;
pub mod filters;
pub mod report;
pub mod saccade;
pub mod settings;
pub mod smooth;

pub use report::{DefendedPrediction, DefenseReport};
pub use settings::{DefenseConfig, DefenseKind, DefenseLimits, DefenseSettings};

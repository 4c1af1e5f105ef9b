//! Decision maps: the labels of the raw model and of a defended preset on a 2-D slice
//! of input space around an image, spanned by the direction toward an adversarial
//! example and a random orthogonal one. The picture of the project's idea: does the
//! adversarial point sit on a thin speckle that the defense smooths away, or in a
//! region the defense gets wrong too? Served by `POST /explore` and drawn by
//! `pandaguard map`.
//!
//! Owns: the slice geometry (`slice.rs`), computing a map through the pipeline
//! (`run.rs`: every cell admitted and batched like a `/classify` request), the PNG
//! (`chart.rs`). Must not import: `http`/axum.

mod chart;
mod run;
mod slice;

pub use chart::{class_colour, contour, draw_map};
pub use run::{AdversarialSource, DecisionMap, MapRequest, SideMap, check, decision_map, planned_rows};
pub use slice::{Direction, Slice, coordinates};

use crate::pipeline::PipelineError;

#[derive(Debug, thiserror::Error)]
pub enum ExploreError {
    #[error("{0}")]
    Invalid(String),
    #[error("invalid parameter `{name}`: {message}")]
    Param { name: &'static str, message: String },
    #[error(transparent)]
    Pipeline(PipelineError),
    #[error("the map did not finish within its time limit of {ms} ms (explore.timeout_ms)")]
    Timeout { ms: u64 },
    #[error("{0}")]
    Failed(String),
}

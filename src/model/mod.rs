//! Models: their cards, labels, and the registry of loaded models with their engines.
//!
//! Owns: reading and checking model cards and files (`LoadError` names the file and
//! the fix), starting one engine per model. Must not import: `http`, the pipeline,
//! `defense`.

mod card;
mod labels;
mod registry;

pub use card::{
    Accuracy, CardError, INT8_SUFFIX, InputSpec, Int8Variant, Interpolation, ModelCard, OutputKind, OutputSpec,
    Precision, ResizePolicy,
};
pub use labels::{Labels, LabelsError};
pub use registry::{LoadError, LoadedModel, ModelRegistry, sha256_file};

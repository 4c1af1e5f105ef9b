//! Models: their cards, labels, and the registry of loaded models with their engines.

mod card;
mod labels;
mod registry;

pub use card::{Accuracy, CardError, InputSpec, Interpolation, ModelCard, OutputSpec, ResizePolicy};
pub use labels::Labels;
pub use registry::{LoadedModel, ModelRegistry, sha256_file};

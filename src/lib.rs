//! pandaguard: an image-classification server that answers with the raw prediction
//! and one defended against adversarial examples.
//!
//! Reading order, following a request:
//! - [`http`]: routes and handlers (`POST /classify` in `http/classify.rs`).
//! - [`pipeline`]: bytes → image → model input → engine → prediction.
//! - [`imaging`]: decoding under limits, resizing, normalizing.
//! - [`engine`]: per-model batching queue and the ONNX Runtime session that owns a thread.
//! - [`model`]: model cards, labels, the registry of loaded models.
//! - [`config`], [`runtime`] (finding ONNX Runtime), [`telemetry`], [`cli`].

pub mod api;
pub mod attack;
pub mod cli;
pub mod config;
pub mod defense;
pub mod engine;
pub mod error;
pub mod http;
pub mod imaging;
pub mod model;
pub mod params;
pub mod pipeline;
pub mod prediction;
pub mod redteam;
pub mod runtime;
pub mod stats;
pub mod telemetry;

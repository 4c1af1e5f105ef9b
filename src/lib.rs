//! pandaguard: an image-classification server that answers with the raw prediction
//! and one defended against adversarial examples.
//!
//! Reading order, following a request from the socket to the answer (each module's
//! first comment says what it owns and what it must not import):
//! 1. [`http`]: routes, handlers, middleware, the error enum mapped to statuses, the
//!    JSON answer built from an outcome (`POST /classify` is `http/classify.rs`).
//! 2. [`params`]: the query parameters, one struct, resolved against presets and limits.
//! 3. [`pipeline`]: bytes → image → views → engine → per-defense answers → [`pipeline::Outcome`].
//! 4. [`imaging`]: decoding under limits, resizing, normalizing.
//! 5. [`defense`]: the `Defense` trait and the defenses (views, predictions, combination);
//!    [`stats`] holds smoothing's statistics, [`prediction`] softmax and ranking.
//! 6. [`engine`]: per-model batching queue and the ONNX Runtime session on its own thread.
//! 7. [`model`]: model cards, labels, the registry of loaded models.
//! 8. [`api`]: the JSON types of the API (the wire format, shared with clients).
//!
//! On the request path beside the pipeline: [`detect`] (fingerprints of each client's
//! recent queries, the store they live in, and the policy against query attacks;
//! `http/classify.rs` calls it between decoding and inference).
//!
//! Beside the request path: [`attack`] (Square, NES, EOT against an oracle; PGD and
//! APGD on a differentiable copy of a preset, with gradients of the served ONNX files
//! from models/gradients) and [`redteam`] (oracles, white-box runs, the `attack` and
//! `evaluate` commands, charts) — used by the CLI, never by the server; [`explore`]
//! (decision maps: `POST /explore` and `pandaguard map`); [`config`], [`runtime`]
//! (finding ONNX Runtime), [`telemetry`], [`cli`].

pub mod api;
pub mod attack;
pub mod cli;
pub mod config;
pub mod defense;
pub mod detect;
pub mod engine;
pub mod explore;
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

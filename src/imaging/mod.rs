//! The image pipeline: bytes → decoded RGB8 image → model-sized image → model input
//! row (normalized NCHW floats). Pure functions; no I/O, no async.
//!
//! Owns: decoding untrusted bytes under limits (`DecodeError`), resizing and cropping
//! as a model card says, normalization. Must not import: `http`, the pipeline, the
//! engine, `defense`.

mod decode;
mod preprocess;

pub use decode::{DecodeError, DecodeLimits, decode};
pub use preprocess::{ModelImage, Region, ResizeError, fit_to_input, push_normalized_pixels, resize_region};

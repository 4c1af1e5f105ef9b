//! The image pipeline: bytes → decoded RGB8 image → model-sized image → model input
//! row (normalized NCHW floats). Pure functions; no I/O, no async.

mod decode;
mod preprocess;

pub use decode::{DecodeError, DecodeLimits, decode};
pub use preprocess::{ModelImage, Region, ResizeError, fit_to_input, resize_region};

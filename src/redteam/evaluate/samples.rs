//! The labelled photos an evaluation runs on, at the raw model's input size, and the
//! clean variants (crops, mirror images) used to calibrate the suspicion threshold.

use std::path::Path;

use image::RgbImage;

use crate::imaging::{DecodeLimits, ModelImage, Region, decode, fit_to_input, resize_region};
use crate::model::LoadedModel;
use crate::redteam::RedTeamError;
use crate::redteam::oracle::as_png;

/// A labelled photo at the raw model's input size.
pub struct Sample {
    pub file: String,
    pub class_id: usize,
    /// The decoded photo (for calibration variants).
    pub photo: RgbImage,
    /// The model-input image the attacks perturb.
    pub clean: ModelImage,
}

impl Sample {
    /// The file name without its extension, for the names of files written about it.
    pub fn stem(&self) -> &str {
        self.file.trim_end_matches(".jpg")
    }
}

/// Reads `labels` (CSV `file,class_id` with a header) and the first `max_images` photos
/// it names from `images`.
pub fn load_samples(
    images: &Path,
    labels: &Path,
    max_images: usize,
    raw: &LoadedModel,
    limits: &DecodeLimits,
) -> Result<Vec<Sample>, RedTeamError> {
    let text = std::fs::read_to_string(labels).map_err(RedTeamError::io(labels))?;
    let bad = |line: &str| RedTeamError::Invalid(format!("{}: bad line {line:?}", labels.display()));
    let mut samples = Vec::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()).take(max_images) {
        let (file, class) = line.split_once(',').ok_or_else(|| bad(line))?;
        let class_id: usize = class.trim().parse().map_err(|_| bad(line))?;
        let path = images.join(file.trim());
        let bytes = std::fs::read(&path).map_err(RedTeamError::io(&path))?;
        let photo = decode(&bytes, limits).map_err(|source| RedTeamError::Decode { path: path.clone(), source })?;
        let clean = ModelImage::from_rgb(&fit_to_input(&photo, &raw.card.input)?);
        samples.push(Sample { file: file.trim().to_string(), class_id, photo, clean });
    }
    if samples.is_empty() {
        return Err(RedTeamError::Invalid(format!("no labelled images in {}", labels.display())));
    }
    Ok(samples)
}

/// The image as a lossless PNG (what the service is sent).
pub fn png_bytes(image: &ModelImage) -> Result<Vec<u8>, RedTeamError> {
    Ok(as_png(image)?)
}

/// Clean variants of a photo that are not the evaluation image itself: the whole
/// photo and a tighter centre crop, each also mirrored, at the model's input size.
pub fn clean_variants(sample: &Sample, raw: &LoadedModel) -> Result<Vec<ModelImage>, RedTeamError> {
    let spec = &raw.card.input;
    let (w, h) = (sample.photo.width() as f64, sample.photo.height() as f64);
    let mut variants = Vec::new();
    for fraction in [1.0, 0.75] {
        let side = w.min(h) * fraction;
        let region = Region { left: (w - side) / 2.0, top: (h - side) / 2.0, width: side, height: side };
        let crop = resize_region(&sample.photo, Some(region), spec.width, spec.height, spec.interpolation)?;
        variants.push(ModelImage::from_rgb(&image::imageops::flip_horizontal(&crop)));
        variants.push(ModelImage::from_rgb(&crop));
    }
    Ok(variants)
}

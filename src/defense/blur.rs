//! `blur`: feature squeezing (Xu et al. 2018). Two deterministic views of the
//! model-input image: a Gaussian blur and a median filter, which wash out
//! high-frequency adversarial "speckles" while keeping the object.

use super::filters::{gaussian_blur, median_filter};
use super::report::{BlurDetails, DefenseDetails, DefenseReport, ViewPrediction, mean_probabilities};
use super::settings::DefenseSettings;
use crate::imaging::ModelImage;
use crate::model::Labels;
use crate::prediction::argmax;

/// The two views: [Gaussian blur, median filter].
pub fn views(base: &ModelImage, settings: &DefenseSettings) -> [ModelImage; 2] {
    [gaussian_blur(base, settings.blur_sigma), median_filter(base, settings.median_radius as usize)]
}

/// The answer: the mean of the two views' probabilities.
pub fn report(gaussian: &[f32], median: &[f32], settings: &DefenseSettings, labels: &Labels) -> DefenseReport {
    let probabilities = mean_probabilities([gaussian, median]);
    let class_id = argmax(&probabilities);
    DefenseReport {
        name: "blur".into(),
        class_id: Some(class_id),
        label: Some(labels.name(class_id).to_string()),
        confidence: probabilities[class_id],
        abstained: false,
        views: 2,
        details: DefenseDetails::Blur(BlurDetails {
            blur_sigma: settings.blur_sigma,
            median_radius: settings.median_radius,
            gaussian: ViewPrediction::from_probabilities(gaussian, labels),
            median: ViewPrediction::from_probabilities(median, labels),
        }),
        probabilities,
    }
}

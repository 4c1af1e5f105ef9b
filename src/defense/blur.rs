//! `blur`: feature squeezing (Xu et al. 2018). Two deterministic views of the
//! model-input image: a Gaussian blur and a median filter, which wash out
//! high-frequency adversarial "speckles" while keeping the object.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::{RefOr, Schema};

use super::filters::{gaussian_blur, median_filter};
use super::settings::within;
use super::{
    Defense, DefenseError, DefenseLimits, DefenseOutcome, DefenseRun, DefenseSettings, Outputs, Request, RowRange,
    SettingsError, Source, ViewPrediction, Views, mean_probabilities,
};
use crate::imaging::ModelImage;
use crate::model::{Labels, LoadedModel};

pub struct Blur;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BlurDetails {
    pub blur_sigma: f32,
    pub median_radius: u32,
    pub gaussian: ViewPrediction,
    pub median: ViewPrediction,
}

/// The two views: [Gaussian blur, median filter].
pub fn squeezed_views(base: &ModelImage, blur_sigma: f32, median_radius: u32) -> [ModelImage; 2] {
    [gaussian_blur(base, blur_sigma), median_filter(base, median_radius as usize)]
}

impl Defense for Blur {
    fn name(&self) -> &'static str {
        "blur"
    }

    fn parameters(&self) -> &'static [&'static str] {
        &["blur_sigma"]
    }

    fn check(&self, s: &DefenseSettings, l: &DefenseLimits) -> Result<(), SettingsError> {
        within(s.blur_sigma > 0.0 && s.blur_sigma <= l.max_blur_sigma, "blur_sigma", || {
            format!("(0, {}]", l.max_blur_sigma)
        })?;
        within((1..=3).contains(&s.median_radius), "median_radius", || "[1, 3]".into())
    }

    fn start(&self, request: &Request<'_>) -> Result<Box<dyn DefenseRun>, DefenseError> {
        Ok(Box::new(BlurRun {
            model: Arc::clone(request.raw),
            labels: request.labels().clone(),
            blur_sigma: request.settings.blur_sigma,
            median_radius: request.settings.median_radius,
            rows: None,
            outputs: None,
        }))
    }

    fn details_schemas(&self) -> Vec<(String, RefOr<Schema>)> {
        super::schemas_of::<BlurDetails>()
    }
}

struct BlurRun {
    model: Arc<LoadedModel>,
    labels: Labels,
    blur_sigma: f32,
    median_radius: u32,
    rows: Option<RowRange>,
    /// (Gaussian, median) probabilities.
    outputs: Option<(Vec<f32>, Vec<f32>)>,
}

impl DefenseRun for BlurRun {
    fn models(&self) -> Vec<Arc<LoadedModel>> {
        vec![Arc::clone(&self.model)]
    }

    fn next_rows(&self) -> Vec<(Arc<LoadedModel>, usize)> {
        if self.rows.is_some() { Vec::new() } else { vec![(Arc::clone(&self.model), 2)] }
    }

    fn views(&mut self, source: &Source, views: &mut Views) -> Result<(), DefenseError> {
        let base = source.base(&self.model)?;
        self.rows = Some(views.push(&self.model, &squeezed_views(base, self.blur_sigma, self.median_radius)));
        Ok(())
    }

    fn observe(&mut self, outputs: &Outputs) {
        if let Some(range) = self.rows {
            if let [gaussian, median] = outputs.rows(range) {
                self.outputs = Some((gaussian.clone(), median.clone()));
            }
        }
    }

    fn finish(self: Box<Self>) -> DefenseOutcome {
        let (gaussian, median) = self.outputs.unwrap_or_default();
        let details = BlurDetails {
            blur_sigma: self.blur_sigma,
            median_radius: self.median_radius,
            gaussian: ViewPrediction::from_probabilities(&gaussian, &self.labels),
            median: ViewPrediction::from_probabilities(&median, &self.labels),
        };
        let probabilities = mean_probabilities([gaussian.as_slice(), median.as_slice()]);
        DefenseOutcome::from_probabilities("blur", probabilities, 2, &details)
    }
}

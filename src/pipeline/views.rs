//! Image → views: every model input row a request needs, grouped by model, with
//! where each defense's rows sit. Runs on a blocking thread.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;

use crate::defense::saccade::{self, Fixation};
use crate::defense::smooth::{self, Noise};
use crate::defense::{DefenseKind, DefenseSettings, blur};
use crate::error::ApiError;
use crate::imaging::{ModelImage, fit_to_input};
use crate::model::LoadedModel;

/// What to build.
pub struct ViewRequest {
    pub settings: DefenseSettings,
    pub seed: u64,
    /// Model of the raw prediction; smooth, blur and saccade views go through it.
    pub raw: Arc<LoadedModel>,
    /// Ensemble members other than the raw model (each gets its own plain view and
    /// `ensemble_samples` noisy views).
    pub others: Vec<Arc<LoadedModel>>,
    /// The raw model is an ensemble member too (named in `models`).
    pub raw_in_ensemble: bool,
    /// PREDICT's first round of noisy samples.
    pub first_round: usize,
}

/// Rows for one model, back to back.
pub struct ModelBatch {
    pub model: Arc<LoadedModel>,
    pub rows: Vec<f32>,
    pub count: usize,
}

impl ModelBatch {
    fn new(model: Arc<LoadedModel>) -> Self {
        let capacity = model.card.row_len();
        Self { model, rows: Vec::with_capacity(capacity), count: 0 }
    }

    /// Appends views and returns their row range.
    fn push(&mut self, views: &[ModelImage]) -> Range<usize> {
        let start = self.count;
        for view in views {
            view.push_normalized(&self.model.card.input, &mut self.rows);
        }
        self.count += views.len();
        start..self.count
    }

    fn push_noise(&mut self, base: &ModelImage, noise: Noise, first: u64, count: usize) -> Range<usize> {
        let start = self.count;
        smooth::push_noisy_rows(base, &self.model.card.input, noise, first, count, &mut self.rows);
        self.count += count;
        start..self.count
    }
}

/// Row ranges of each defense in the raw model's batch (the raw view is row 0).
#[derive(Debug, Clone, Default)]
pub struct Layout {
    pub blur: Option<Range<usize>>,
    /// The crops; the saccade's full view is the raw row.
    pub saccade: Option<Range<usize>>,
    /// PREDICT's first round.
    pub smooth: Option<Range<usize>>,
    /// CERTIFY's selection samples.
    pub selection: Option<Range<usize>>,
    /// The raw model's noisy views as an ensemble member.
    pub ensemble: Option<Range<usize>>,
}

pub struct Views {
    /// The raw model's batch first, then one per other ensemble member.
    pub batches: Vec<ModelBatch>,
    pub layout: Layout,
    pub fixations: Vec<Fixation>,
    /// The raw model's input image, kept for further smoothing rounds.
    pub base: ModelImage,
    /// Resizing to each model's input.
    pub preprocess_time: Duration,
    /// Building the defenses' views.
    pub views_time: Duration,
}

pub fn build(image: &RgbImage, request: &ViewRequest) -> Result<Views, ApiError> {
    let started = Instant::now();
    let settings = &request.settings;
    let runs = |kind| settings.defenses.contains(&kind);
    let spec = &request.raw.card.input;
    let base = ModelImage::from_rgb(&fit_to_input(image, spec).map_err(ApiError::Internal)?);
    let mut raw_batch = ModelBatch::new(Arc::clone(&request.raw));
    raw_batch.push(std::slice::from_ref(&base));
    let mut member_bases = Vec::with_capacity(request.others.len());
    for model in &request.others {
        member_bases.push(ModelImage::from_rgb(&fit_to_input(image, &model.card.input).map_err(ApiError::Internal)?));
    }
    let preprocess_time = started.elapsed();

    // Ensemble members: the plain view, then noisy views from a stream of their own
    // (member m draws rows numbered from (m + 1) << 44, never shared with smoothing).
    let member_noise = |member: usize| (noise(settings, request.seed), ((member as u64) + 1) << 44);
    let member_samples = settings.ensemble_samples as usize;
    let mut others = Vec::with_capacity(request.others.len());
    for (member, (model, view)) in request.others.iter().zip(&member_bases).enumerate() {
        let mut batch = ModelBatch::new(Arc::clone(model));
        batch.push(std::slice::from_ref(view));
        let (noise, first) = member_noise(member + 1);
        batch.push_noise(view, noise, first, member_samples);
        others.push(batch);
    }

    let mut layout = Layout::default();
    let mut fixations = Vec::new();
    if runs(DefenseKind::Blur) {
        layout.blur = Some(raw_batch.push(&blur::views(&base, settings)));
    }
    if runs(DefenseKind::Saccade) && settings.fixations > 0 {
        fixations = saccade::fixations(image, settings.fixations as usize, &settings.scales);
        let crops = saccade::saccade_views(image, spec, &fixations, settings.blur_sigma).map_err(ApiError::Internal)?;
        layout.saccade = Some(raw_batch.push(&crops));
    }
    if runs(DefenseKind::Smooth) {
        let noise = noise(settings, request.seed);
        layout.smooth = Some(raw_batch.push_noise(&base, noise, 0, request.first_round));
        if settings.certify {
            let count = settings.selection_samples as usize;
            layout.selection = Some(raw_batch.push_noise(&base, noise, smooth::selection_index(0), count));
        }
    }
    if request.raw_in_ensemble && member_samples > 0 {
        let (noise, first) = member_noise(0);
        layout.ensemble = Some(raw_batch.push_noise(&base, noise, first, member_samples));
    }
    let views_time = started.elapsed() - preprocess_time;

    let mut batches = vec![raw_batch];
    batches.extend(others);
    Ok(Views { batches, layout, fixations, base, preprocess_time, views_time })
}

pub fn noise(settings: &DefenseSettings, seed: u64) -> Noise {
    Noise { sigma: settings.sigma, denoise_sigma: settings.denoise_sigma, seed }
}

/// More noisy rows for a later smoothing round, numbered from `first`.
pub fn noisy_batch(model: &Arc<LoadedModel>, base: &ModelImage, noise: Noise, first: u64, count: usize) -> ModelBatch {
    let mut batch = ModelBatch::new(Arc::clone(model));
    batch.push_noise(base, noise, first, count);
    batch
}

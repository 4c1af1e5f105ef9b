//! The rows a request sends to the models, as the defenses build them: one batch per
//! model per round, each defense remembering where its rows sit, and the outputs
//! handed back by the same addresses. Pure data; the pipeline submits the batches.

use std::sync::{Arc, OnceLock};

use half::slice::HalfFloatSliceExt;
use image::RgbImage;

use super::DefenseError;
use super::smooth::{self, NoiseLevel};
use crate::engine::Rows;
use crate::imaging::{ModelImage, ResizeError, fit_to_input, push_normalized_pixels};
use crate::model::LoadedModel;

/// What views are made from: the decoded image, its fit to each model's input
/// (resized once per model and request, before any defense runs), and the seed of
/// every random choice the defenses make for this request.
pub struct Source {
    pub image: RgbImage,
    /// The first model's fit (the raw model's), then the others'.
    first: FittedImage,
    others: Vec<FittedImage>,
    pub seed: u64,
}

/// A model's fit of the image, as 8-bit pixels and, once a defense asks for it, as
/// floats in [0, 1] (a plain view is normalized from the pixels directly, so a
/// request without noise or blur never makes the float image).
struct FittedImage {
    model: Arc<LoadedModel>,
    pixels: RgbImage,
    base: OnceLock<ModelImage>,
}

impl FittedImage {
    fn new((model, pixels): (Arc<LoadedModel>, RgbImage)) -> Self {
        Self { model, pixels, base: OnceLock::new() }
    }
}

/// Each model's fit of an image: the first model's (what a content-derived seed is
/// computed from), then the others', each model once.
pub struct Fitted {
    first: (Arc<LoadedModel>, RgbImage),
    others: Vec<(Arc<LoadedModel>, RgbImage)>,
}

impl Fitted {
    /// Fits `image` to the input of every model in `models` (duplicates once; at least one).
    pub fn new(image: &RgbImage, models: &[Arc<LoadedModel>]) -> Result<Self, ResizeError> {
        let Some((first, rest)) = models.split_first() else {
            return Err(ResizeError("no model to fit the image to".into()));
        };
        let mut others: Vec<(Arc<LoadedModel>, RgbImage)> = Vec::with_capacity(rest.len());
        for model in rest {
            if !Arc::ptr_eq(model, first) && !others.iter().any(|(m, _)| Arc::ptr_eq(m, model)) {
                others.push((Arc::clone(model), fit_to_input(image, &model.card.input)?));
            }
        }
        Ok(Fitted { first: (Arc::clone(first), fit_to_input(image, &first.card.input)?), others })
    }

    /// The first model's fit.
    pub fn first(&self) -> &RgbImage {
        &self.first.1
    }
}

impl Source {
    pub fn new(image: RgbImage, fitted: Fitted, seed: u64) -> Self {
        let first = FittedImage::new(fitted.first);
        let others = fitted.others.into_iter().map(FittedImage::new).collect();
        Self { image, first, others, seed }
    }

    /// The first model's fit as 8-bit pixels (the raw model's input).
    pub fn first(&self) -> &RgbImage {
        &self.first.pixels
    }

    /// The image at `model`'s input size, in [0, 1] pixel units. Every model a
    /// defense names in `DefenseRun::models` is there; another is a bug in the defense,
    /// answered as an internal error rather than a panic.
    pub fn base(&self, model: &Arc<LoadedModel>) -> Result<&ModelImage, DefenseError> {
        let fitted = self.fitted(model)?;
        Ok(fitted.base.get_or_init(|| ModelImage::from_rgb(&fitted.pixels)))
    }

    fn fitted(&self, model: &Arc<LoadedModel>) -> Result<&FittedImage, DefenseError> {
        std::iter::once(&self.first)
            .chain(&self.others)
            .find(|f| Arc::ptr_eq(&f.model, model))
            .ok_or_else(|| DefenseError::Unplanned(model.card.name.clone()))
    }
}

/// Where some rows of a round sit: a model's batch and a range of its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRange {
    slot: usize,
    start: usize,
    len: usize,
}

impl RowRange {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One model's rows of a round: normalized model inputs back to back.
pub struct ModelBatch {
    pub model: Arc<LoadedModel>,
    pub rows: Rows,
    pub count: usize,
    /// The row of the plain (unmodified) view, when some defense asked for it.
    plain: Option<usize>,
}

/// The views of one round, grouped by model in the order the models first appear.
#[derive(Default)]
pub struct Views {
    batches: Vec<ModelBatch>,
}

impl Views {
    fn slot(&mut self, model: &Arc<LoadedModel>) -> usize {
        if let Some(slot) = self.batches.iter().position(|b| Arc::ptr_eq(&b.model, model)) {
            return slot;
        }
        self.batches.push(ModelBatch { model: Arc::clone(model), rows: Rows::new(), count: 0, plain: None });
        self.batches.len() - 1
    }

    fn grow(&mut self, slot: usize, count: usize) -> RowRange {
        let batch = &mut self.batches[slot];
        let start = batch.count;
        batch.count += count;
        RowRange { slot, start, len: count }
    }

    /// The plain view of `model` (its fit of the image, unchanged): one row per model
    /// and round however many defenses use it, so the raw row doubles as the
    /// ensemble's and the saccade's full view.
    pub fn plain(&mut self, source: &Source, model: &Arc<LoadedModel>) -> Result<RowRange, DefenseError> {
        let slot = self.slot(model);
        if let Some(start) = self.batches[slot].plain {
            return Ok(RowRange { slot, start, len: 1 });
        }
        let pixels = &source.fitted(model)?.pixels;
        self.batches[slot].rows.push_full_with(|rows| push_normalized_pixels(pixels, &model.card.input, rows));
        let range = self.grow(slot, 1);
        self.batches[slot].plain = Some(range.start);
        Ok(range)
    }

    /// Appends views (already at `model`'s input size).
    pub fn push(&mut self, model: &Arc<LoadedModel>, views: &[ModelImage]) -> RowRange {
        let slot = self.slot(model);
        self.batches[slot].rows.push_full_with(|rows| {
            for view in views {
                view.push_normalized(&model.card.input, rows);
            }
        });
        self.grow(slot, views.len())
    }

    /// Appends `count` noisy views of `model`'s base image, numbered from `first`
    /// in the request's noise stream (so rows do not depend on how they are split in
    /// rounds, and the same seed always gives the same rows).
    ///
    /// They wait in the engine queue at half precision (most of a busy server's
    /// memory is queued noisy rows). The rounding, far below a pixel step, happens
    /// after the noise is drawn: it is part of the base classifier the noise is fed
    /// to, so smoothing's certificate (which holds for any base classifier) stands.
    pub fn push_noise(
        &mut self,
        source: &Source,
        model: &Arc<LoadedModel>,
        noise: NoiseLevel,
        first: u64,
        count: usize,
    ) -> Result<RowRange, DefenseError> {
        let base = source.base(model)?;
        let slot = self.slot(model);
        let noise = noise.seeded(source.seed);
        let spec = &model.card.input;
        self.batches[slot].rows.push_half_with(count * base.data.len(), |half| {
            smooth::fill_noisy_rows(base, spec, noise, first, half, |row, stored| stored.convert_from_f32_slice(row));
        });
        Ok(self.grow(slot, count))
    }

    pub fn is_empty(&self) -> bool {
        self.batches.iter().all(|b| b.count == 0)
    }

    /// The batches to submit, one per model.
    pub fn into_batches(self) -> Vec<ModelBatch> {
        self.batches
    }
}

/// The outputs of a round as probability rows, addressed like the views were.
pub struct Outputs {
    slots: Vec<Vec<Vec<f32>>>,
}

impl Outputs {
    /// Probability rows per batch, in the order of `Views::into_batches`.
    pub fn new(slots: Vec<Vec<Vec<f32>>>) -> Self {
        Self { slots }
    }

    /// The probabilities of the rows in `range` (empty when the round had none).
    pub fn rows(&self, range: RowRange) -> &[Vec<f32>] {
        self.slots.get(range.slot).and_then(|rows| rows.get(range.start..range.start + range.len)).unwrap_or(&[])
    }

    /// The single row of a one-row range (the plain view), or an empty slice.
    pub fn row(&self, range: RowRange) -> &[f32] {
        self.rows(range).first().map_or(&[], Vec::as_slice)
    }
}

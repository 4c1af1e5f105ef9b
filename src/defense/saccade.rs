//! Where to look: "simulated saccades".
//!
//! Regions of the photo are ranked by local entropy (the Shannon entropy of the grey
//! levels in a window around each point, on a small downscaled copy); the strongest
//! peaks, spread apart by non-maximum suppression, become fixations. Each fixation is
//! looked at through a square crop resized to the model input, sharp around the
//! fixation point and increasingly blurred away from it (a fovea).
//!
//! Defaults used by [`fixations`]:
//! - the entropy map's longer side is at most [`ENTROPY_MAP_SIDE`] = 128 px: enough
//!   to place crops that are at least a quarter of the image side, and cheap;
//! - the window is 1/8 of the map's longer side, made odd (17 px on a 128 px map,
//!   about 68 px of a 512 px photo): 289 samples fill a 16-bin histogram well,
//!   and the window is still smaller than the smallest crops worth taking;
//! - [`ENTROPY_BINS`] = 16 grey levels: more bins than the window can populate would
//!   make the entropy measure sample size instead of texture;
//! - peaks are sought at least half a window in from the map's edges, where the
//!   window is whole (other pixels only if too few peaks are found);
//! - the suppression radius is half the side of the smallest requested crop, so the
//!   smallest crops of two fixations overlap by at most half.

use std::sync::Arc;

use image::RgbImage;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::{RefOr, Schema};

use super::filters::{foveate, gaussian_blur_into};
use super::settings::within;
use super::{
    Defense, DefenseError, DefenseLimits, DefenseOutcome, DefenseRun, DefenseSettings, Outputs, Request, RowRange,
    SettingsError, Source, ViewPrediction, Views, mean_probabilities,
};
use crate::imaging::{ModelImage, Region, ResizeError, resize_region};
use crate::model::{InputSpec, Labels, LoadedModel};

/// Longer side of the entropy map used by [`fixations`], in pixels.
pub const ENTROPY_MAP_SIDE: u32 = 128;
/// Number of grey levels in the entropy histograms used by [`fixations`].
pub const ENTROPY_BINS: usize = 16;
/// Within this fraction of the view side (the shorter one, for a non-square model
/// input) from the fixation point a view is sharp.
pub const FOVEA_SHARP_FRACTION: f32 = 0.2;
/// Beyond this fraction of the view side from the fixation point a view is fully
/// blurred. 0.6 leaves the middle of the view's edges mostly (84%) blurred and its
/// corners fully, when the fixation is at the centre.
pub const FOVEA_BLUR_FRACTION: f32 = 0.6;

/// A place to look: centre and crop side in pixels of the original image, and the
/// local entropy (bits) that made it interesting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fixation {
    pub x: f64,
    pub y: f64,
    pub size: f64,
    pub entropy: f32,
}

/// Local grey-level entropy (bits) of a downscaled image, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct EntropyMap {
    pub width: usize,
    pub height: usize,
    /// Original pixels per map pixel.
    pub scale: f64,
    pub values: Vec<f32>,
}

impl EntropyMap {
    /// The centre of map pixel `index` in original-image coordinates.
    fn to_original(&self, index: usize) -> (f64, f64) {
        let (x, y) = (index % self.width, index / self.width);
        ((x as f64 + 0.5) * self.scale, (y as f64 + 0.5) * self.scale)
    }
}

/// The entropy map of `image`: grey levels (BT.601 luma), area-averaged down so the
/// longer side is at most `max_side`, quantized to `bins` levels (1 to 256); each
/// value is the entropy of the histogram of the levels in the `window` × `window`
/// neighbourhood (an even window grows by one to be centred), truncated at the
/// borders. Sliding histograms make it O(pixels × bins), whatever the window.
pub fn entropy_map(image: &RgbImage, max_side: u32, window: u32, bins: usize) -> EntropyMap {
    let (width, height, scale, grey) = downscaled_grey(image, max_side);
    let bins = bins.clamp(1, 256);
    // (g · bins) / 256 < bins ≤ 256, so a level always fits in a u8.
    let levels: Vec<u8> = grey.iter().map(|&g| ((usize::from(g) * bins) >> 8) as u8).collect();
    let values = windowed_entropy(&levels, width, height, window as usize / 2, bins);
    EntropyMap { width, height, scale, values }
}

/// Grey levels of `image` with the longer side at most `max_side`: (width, height,
/// original pixels per output pixel, levels). Each output pixel is the mean of the
/// source pixels whose row and column fall in it: area averaging, so no aliasing,
/// with no way to fail. The source rows of one output row are first summed channel
/// by channel (a contiguous, vectorizable add); columns and luma come after, on data
/// already reduced by the row band's height.
fn downscaled_grey(image: &RgbImage, max_side: u32) -> (usize, usize, f64, Vec<u8>) {
    let (width, height) = (image.width() as usize, image.height() as usize);
    if width == 0 || height == 0 {
        return (0, 0, 1.0, Vec::new());
    }
    let scale = (width.max(height) as f64 / f64::from(max_side.max(1))).max(1.0);
    let out_width = ((width as f64 / scale).round() as usize).clamp(1, width);
    let out_height = ((height as f64 / scale).round() as usize).clamp(1, height);
    // Source x belongs to output column x · out_width / width, so output column c
    // starts at ceil(c · width / out_width); the same for rows.
    let bounds =
        |out_len: usize, len: usize| -> Vec<usize> { (0..=out_len).map(|c| (c * len).div_ceil(out_len)).collect() };
    let (column_bounds, row_bounds) = (bounds(out_width, width), bounds(out_height, height));
    let row = |y: usize| &image.as_raw()[3 * width * y..3 * width * (y + 1)];
    let mut band_sums = vec![0u32; 3 * width];
    let mut grey = Vec::with_capacity(out_width * out_height);
    for band in row_bounds.windows(2) {
        band_sums.fill(0);
        for y in band[0]..band[1] {
            band_sums.iter_mut().zip(row(y)).for_each(|(sum, &value)| *sum += u32::from(value));
        }
        for columns in column_bounds.windows(2) {
            let mut rgb = [0u64; 3];
            for pixel in band_sums[3 * columns[0]..3 * columns[1]].chunks_exact(3) {
                rgb.iter_mut().zip(pixel).for_each(|(sum, &value)| *sum += u64::from(value));
            }
            let count = ((band[1] - band[0]) * (columns[1] - columns[0])) as u64;
            grey.push(luma(rgb, count));
        }
    }
    (out_width, out_height, scale, grey)
}

/// BT.601 luma of the mean of `count` pixels whose channels sum to `rgb`, in 8-bit
/// fixed point (the weights sum to 256), rounded.
fn luma(rgb: [u64; 3], count: u64) -> u8 {
    let weighted = 77 * rgb[0] + 150 * rgb[1] + 29 * rgb[2];
    let denominator = 256 * count;
    ((weighted + denominator / 2) / denominator) as u8
}

/// Entropy (bits) of the levels in the (2·half + 1)² window around each pixel,
/// truncated at the borders, in O(pixels × bins) (Perreault & Hébert's median-filter
/// scheme): one histogram per column covers the window's rows and moves down one row
/// at a time (two updates per column per row); along a row the window histogram adds
/// the column entering and subtracts the column leaving. With n samples and counts c,
/// the entropy is (n·log2 n − Σ c·log2 c) / n, the c·log2 c coming from a table.
fn windowed_entropy(levels: &[u8], width: usize, height: usize, half: usize, bins: usize) -> Vec<f32> {
    let mut values = vec![0.0f32; width * height];
    if values.is_empty() {
        return values;
    }
    let most_samples = (2 * half + 1).min(width) * (2 * half + 1).min(height);
    let count_log_count: Vec<f64> = (0..=most_samples).map(|c| c as f64 * (c as f64).log2().max(0.0)).collect();
    let row = |y: usize| &levels[y * width..(y + 1) * width];
    // Column x's histogram is column_histograms[x * bins..(x + 1) * bins].
    let mut column_histograms = vec![0u32; width * bins];
    let add_row = |histograms: &mut [u32], y: usize| {
        histograms
            .chunks_exact_mut(bins)
            .zip(row(y))
            .for_each(|(histogram, &level)| histogram[usize::from(level)] += 1);
    };
    let remove_row = |histograms: &mut [u32], y: usize| {
        histograms
            .chunks_exact_mut(bins)
            .zip(row(y))
            .for_each(|(histogram, &level)| histogram[usize::from(level)] -= 1);
    };
    (0..=half.min(height - 1)).for_each(|y| add_row(&mut column_histograms, y));
    let mut window = vec![0u32; bins];
    for (y, out_row) in values.chunks_exact_mut(width).enumerate() {
        if y > half {
            remove_row(&mut column_histograms, y - half - 1);
        }
        if y > 0 && y + half < height {
            add_row(&mut column_histograms, y + half);
        }
        let column_histogram = |x: usize| &column_histograms[x * bins..(x + 1) * bins];
        let window_rows = (y + half).min(height - 1) + 1 - y.saturating_sub(half);
        window.fill(0);
        for x in 0..=half.min(width - 1) {
            window.iter_mut().zip(column_histogram(x)).for_each(|(w, &c)| *w += c);
        }
        for (x, value) in out_row.iter_mut().enumerate() {
            let window_columns = (x + half).min(width - 1) + 1 - x.saturating_sub(half);
            let samples = window_rows * window_columns;
            let sum_count_log_count: f64 = window.iter().map(|&c| count_log_count[c as usize]).sum();
            // Rounding can leave a hair below zero where the entropy is exactly zero.
            *value = ((count_log_count[samples] - sum_count_log_count) / samples as f64).max(0.0) as f32;
            if x >= half {
                window.iter_mut().zip(column_histogram(x - half)).for_each(|(w, &c)| *w -= c);
            }
            if x + half + 1 < width {
                window.iter_mut().zip(column_histogram(x + half + 1)).for_each(|(w, &c)| *w += c);
            }
        }
    }
    values
}

/// Where to look in `image`: the `count` strongest entropy peaks, spread apart by
/// non-maximum suppression, each with one crop per scale (crop side = scale × the
/// image's shorter side). Returns count × scales.len() fixations (fewer only if the
/// entropy map has fewer than `count` pixels), strongest first, the scales of a peak
/// in the order given. Deterministic. See the module documentation for the defaults.
pub fn fixations(image: &RgbImage, count: usize, scales: &[f64]) -> Vec<Fixation> {
    let (width, height) = image.dimensions();
    if count == 0 || scales.is_empty() || width == 0 || height == 0 {
        return Vec::new();
    }
    let map_side = width.max(height).min(ENTROPY_MAP_SIDE);
    let window = (map_side / 8).max(3) | 1;
    let map = entropy_map(image, ENTROPY_MAP_SIDE, window, ENTROPY_BINS);
    let shorter_side = f64::from(width.min(height));
    let radius = suppression_radius(shorter_side, scales) / map.scale;
    pick_peaks(&map, count, radius, window as usize / 2)
        .into_iter()
        .flat_map(|index| {
            let (x, y) = map.to_original(index);
            let entropy = map.values[index];
            scales.iter().map(move |&scale| Fixation { x, y, size: scale * shorter_side, entropy })
        })
        .collect()
}

/// Half the side of the smallest crop requested, in original pixels (0 when no scale
/// is a positive number).
fn suppression_radius(shorter_side: f64, scales: &[f64]) -> f64 {
    let smallest = scales.iter().copied().filter(|s| s.is_finite() && *s > 0.0).fold(f64::INFINITY, f64::min);
    if smallest.is_finite() { smallest * shorter_side / 2.0 } else { 0.0 }
}

/// Indices of up to `count` map pixels, highest entropy first. Local maxima (not
/// below any of the 8 neighbours, and above at least one, so flat plateaus do not
/// count) at least `margin` pixels in from the edges are taken first, strongest
/// first; a candidate within `radius` map pixels of one already taken is suppressed.
/// (Near the edges the entropy comes from a truncated window, and a fixation there
/// puts most of its fovea outside the image.) Should that give fewer than `count`
/// (a flat map, or a radius too large for the image), all other pixels are tried too
/// and then the radius is halved, down to half a pixel, which only forbids repeats.
fn pick_peaks(map: &EntropyMap, count: usize, radius: f64, margin: usize) -> Vec<usize> {
    let values = &map.values;
    // The index breaks ties, so the order (and the result) is fully determined.
    let strongest_first = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let inside_margin = |index: usize| {
        let (x, y) = (index % map.width, index / map.width);
        (margin..map.width.saturating_sub(margin)).contains(&x)
            && (margin..map.height.saturating_sub(margin)).contains(&y)
    };
    let (mut candidates, mut others): (Vec<usize>, Vec<usize>) =
        (0..values.len()).partition(|&i| inside_margin(i) && is_peak(map, i));
    candidates.sort_unstable_by(strongest_first);
    let mut picked: Vec<usize> = Vec::with_capacity(count);
    let mut radius = radius.max(0.5);
    suppress_around_picks(map, &candidates, count, radius, &mut picked);
    if picked.len() < count {
        // Rare (a photo has hundreds of peaks), so the other pixels are sorted only now.
        others.sort_unstable_by(strongest_first);
        candidates.append(&mut others);
        suppress_around_picks(map, &candidates, count, radius, &mut picked);
    }
    while picked.len() < count && radius > 0.5 {
        radius = (radius / 2.0).max(0.5);
        suppress_around_picks(map, &candidates, count, radius, &mut picked);
    }
    // Later rounds may add stronger pixels than earlier ones: restore entropy order.
    picked.sort_by(strongest_first);
    picked
}

/// Greedy non-maximum suppression: goes through `candidates` in order, keeping each
/// one at least `radius` map pixels from all kept so far, until `picked` has `count`.
fn suppress_around_picks(map: &EntropyMap, candidates: &[usize], count: usize, radius: f64, picked: &mut Vec<usize>) {
    let position = |index: usize| ((index % map.width) as f64, (index / map.width) as f64);
    for &candidate in candidates {
        if picked.len() >= count {
            return;
        }
        let (x, y) = position(candidate);
        let far_enough = |&p: &usize| {
            let (px, py) = position(p);
            (x - px).powi(2) + (y - py).powi(2) >= radius * radius
        };
        if picked.iter().all(far_enough) {
            picked.push(candidate);
        }
    }
}

/// Whether map pixel `index` is a local maximum: not below any of its neighbours
/// and above at least one. Coordinates are clamped at the borders, which only
/// compares the pixel with itself (never below, never above).
fn is_peak(map: &EntropyMap, index: usize) -> bool {
    let (width, height) = (map.width, map.height);
    let (x, y) = (index % width, index / width);
    let centre = map.values[index];
    let (mut not_below, mut above_one) = (true, false);
    for ny in [y.saturating_sub(1), y, (y + 1).min(height - 1)] {
        for nx in [x.saturating_sub(1), x, (x + 1).min(width - 1)] {
            let neighbour = map.values[ny * width + nx];
            not_below &= centre >= neighbour;
            above_one |= centre > neighbour;
        }
    }
    not_below && above_one
}

/// The square crop of side `fixation.size` centred on the fixation, shifted (not
/// shrunk) to lie inside the image; a side larger than the image's shorter side is
/// clamped to it.
pub fn crop_region(image_width: u32, image_height: u32, fixation: &Fixation) -> Region {
    let (width, height) = (f64::from(image_width), f64::from(image_height));
    let side = fixation.size.max(1.0).min(width.min(height));
    // max before min (not clamp): a NaN centre lands at the top-left corner, no panic.
    let left = (fixation.x - side / 2.0).max(0.0).min(width - side);
    let top = (fixation.y - side / 2.0).max(0.0).min(height - side);
    Region { left, top, width: side, height: side }
}

/// One foveated view per fixation: the fixation's crop resized to the model input,
/// sharp within [`FOVEA_SHARP_FRACTION`] of the view side of the fixation point,
/// blurred (Gaussian, `blur_sigma` view pixels) beyond [`FOVEA_BLUR_FRACTION`], with
/// a smooth blend between. The fixation point is the centre of the view unless its
/// crop was shifted at a border; the fovea follows the point, not the crop centre.
pub fn saccade_views(
    image: &RgbImage,
    spec: &InputSpec,
    fixations: &[Fixation],
    blur_sigma: f32,
) -> Result<Vec<ModelImage>, ResizeError> {
    let (width, height) = image.dimensions();
    let view_side = spec.width.min(spec.height) as f32;
    let (sharp_radius, blur_radius) = (FOVEA_SHARP_FRACTION * view_side, FOVEA_BLUR_FRACTION * view_side);
    let mut blurred = ModelImage { width: 0, height: 0, data: Vec::new() };
    fixations
        .iter()
        .map(|fixation| {
            let region = crop_region(width, height, fixation);
            let crop = resize_region(image, Some(region), spec.width, spec.height, spec.interpolation)?;
            let sharp = ModelImage::from_rgb(&crop);
            gaussian_blur_into(&sharp, blur_sigma, &mut blurred);
            let centre = (
                ((fixation.x - region.left) / region.width * f64::from(spec.width)) as f32,
                ((fixation.y - region.top) / region.height * f64::from(spec.height)) as f32,
            );
            Ok(foveate(&sharp, &blurred, centre, sharp_radius, blur_radius))
        })
        .collect()
}

pub struct Saccade;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SaccadeDetails {
    /// Where the model looked, most informative first, in original-image pixels.
    pub fixations: Vec<FixationReport>,
    /// The whole image (the raw view).
    pub full_view: ViewPrediction,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FixationReport {
    /// Centre of the crop, original-image pixels.
    pub x: f64,
    pub y: f64,
    /// Side of the square crop, original-image pixels.
    pub size: f64,
    /// Local grey-level entropy (bits) that ranked this place.
    pub entropy: f32,
    pub class_id: usize,
    pub label: String,
    pub confidence: f32,
}

impl Defense for Saccade {
    fn name(&self) -> &'static str {
        "saccade"
    }

    fn parameters(&self) -> &'static [&'static str] {
        &["fixations", "blur_sigma"]
    }

    fn row_parameter(&self) -> Option<&'static str> {
        Some("fixations")
    }

    fn check(&self, s: &DefenseSettings, l: &DefenseLimits) -> Result<(), SettingsError> {
        within(s.fixations <= l.max_fixations, "fixations", || format!("[0, {}]", l.max_fixations))?;
        within(s.blur_sigma > 0.0 && s.blur_sigma <= l.max_blur_sigma, "blur_sigma", || {
            format!("(0, {}]", l.max_blur_sigma)
        })?;
        within(!s.scales.is_empty() && s.scales.iter().all(|x| (0.1..=1.0).contains(x)), "scales", || {
            "[0.1, 1] (at least one)".into()
        })
    }

    fn start(&self, request: &Request<'_>) -> Result<Box<dyn DefenseRun>, DefenseError> {
        let settings = request.settings;
        Ok(Box::new(SaccadeRun {
            model: Arc::clone(request.raw),
            labels: request.labels().clone(),
            count: settings.fixations as usize,
            scales: settings.scales.clone(),
            blur_sigma: settings.blur_sigma,
            fixations: Vec::new(),
            full_view: None,
            crops: None,
            probabilities: None,
        }))
    }

    fn details_schemas(&self) -> Vec<(String, RefOr<Schema>)> {
        super::schemas_of::<SaccadeDetails>()
    }
}

struct SaccadeRun {
    model: Arc<LoadedModel>,
    labels: Labels,
    count: usize,
    scales: Vec<f64>,
    blur_sigma: f32,
    fixations: Vec<Fixation>,
    full_view: Option<RowRange>,
    crops: Option<RowRange>,
    /// (full view, crops) once observed.
    probabilities: Option<(Vec<f32>, Vec<Vec<f32>>)>,
}

impl DefenseRun for SaccadeRun {
    fn models(&self) -> Vec<Arc<LoadedModel>> {
        vec![Arc::clone(&self.model)]
    }

    fn plain_models(&self) -> Vec<Arc<LoadedModel>> {
        self.models()
    }

    fn next_rows(&self) -> Vec<(Arc<LoadedModel>, usize)> {
        if self.probabilities.is_some() || self.count == 0 {
            return Vec::new();
        }
        vec![(Arc::clone(&self.model), self.count * self.scales.len())]
    }

    fn views(&mut self, source: &Source, views: &mut Views) -> Result<(), DefenseError> {
        self.full_view = Some(views.plain(source, &self.model)?);
        if self.count > 0 {
            self.fixations = fixations(&source.image, self.count, &self.scales);
            let crops = saccade_views(&source.image, &self.model.card.input, &self.fixations, self.blur_sigma)?;
            self.crops = Some(views.push(&self.model, &crops));
        }
        Ok(())
    }

    fn observe(&mut self, outputs: &Outputs) {
        let full_view = self.full_view.map(|r| outputs.row(r).to_vec()).unwrap_or_default();
        let crops = self.crops.map(|r| outputs.rows(r).to_vec()).unwrap_or_default();
        self.probabilities = Some((full_view, crops));
    }

    /// The saccade answer: the mean of the probabilities of every crop and of the full
    /// view. Probabilities rather than votes: with a handful of views votes tie often,
    /// and a confident look at the object should count for more than a glance at the
    /// background. Each fixation is reported with its own top class.
    fn finish(self: Box<Self>) -> DefenseOutcome {
        let (full_view, crops) = self.probabilities.unwrap_or_default();
        let probabilities = mean_probabilities(crops.iter().map(Vec::as_slice).chain([full_view.as_slice()]));
        let fixations = self
            .fixations
            .iter()
            .zip(&crops)
            .map(|(fixation, probabilities)| {
                let view = ViewPrediction::from_probabilities(probabilities, &self.labels);
                FixationReport {
                    x: fixation.x,
                    y: fixation.y,
                    size: fixation.size,
                    entropy: fixation.entropy,
                    class_id: view.class_id,
                    label: view.label,
                    confidence: view.confidence,
                }
            })
            .collect();
        let details =
            SaccadeDetails { fixations, full_view: ViewPrediction::from_probabilities(&full_view, &self.labels) };
        DefenseOutcome::from_probabilities("saccade", probabilities, crops.len() + 1, &details)
    }
}

#[cfg(test)]
mod tests {
    use image::Rgb;
    use rand::rngs::Xoshiro256PlusPlus;
    use rand::{RngExt, SeedableRng};

    use super::*;
    use crate::model::{Interpolation, ResizePolicy};

    /// The textured patch of [`patch_image`]: left, top, side.
    const PATCH: (u32, u32, u32) = (210, 150, 48);

    /// 320×240 flat grey with one 48×48 patch of colour noise.
    fn patch_image() -> RgbImage {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
        let (left, top, side) = PATCH;
        RgbImage::from_fn(320, 240, |x, y| {
            let inside = (left..left + side).contains(&x) && (top..top + side).contains(&y);
            if inside { Rgb([rng.random(), rng.random(), rng.random()]) } else { Rgb([128, 128, 128]) }
        })
    }

    fn photo(name: &str) -> RgbImage {
        let path = format!("{}/testdata/imagenet/{name}", env!("CARGO_MANIFEST_DIR"));
        image::open(&path).unwrap_or_else(|e| panic!("{path}: {e}")).to_rgb8()
    }

    fn spec(width: u32, height: u32) -> InputSpec {
        InputSpec {
            name: "input".into(),
            width,
            height,
            layout: "NCHW".into(),
            color: "RGB".into(),
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            resize: ResizePolicy::ShorterSideCenterCrop,
            crop_fraction: 0.875,
            interpolation: Interpolation::Bilinear,
        }
    }

    fn distance(a: &Fixation, b: &Fixation) -> f64 {
        (a.x - b.x).hypot(a.y - b.y)
    }

    /// Entropy of each truncated window by counting it from scratch.
    fn reference_entropy(levels: &[u8], width: usize, height: usize, half: usize, bins: usize) -> Vec<f32> {
        let mut values = Vec::new();
        for y in 0..height {
            for x in 0..width {
                let mut counts = vec![0usize; bins];
                for wy in y.saturating_sub(half)..=(y + half).min(height - 1) {
                    for wx in x.saturating_sub(half)..=(x + half).min(width - 1) {
                        counts[usize::from(levels[wy * width + wx])] += 1;
                    }
                }
                let total = counts.iter().sum::<usize>() as f64;
                let entropy: f64 =
                    counts.iter().filter(|&&c| c > 0).map(|&c| c as f64 / total).map(|p| -p * p.log2()).sum();
                values.push(entropy as f32);
            }
        }
        values
    }

    #[test]
    fn sliding_entropy_matches_counting_each_window() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(12);
        for (width, height, half, bins) in [(23, 17, 3, 8), (5, 9, 4, 16), (1, 6, 1, 4), (30, 2, 0, 8)] {
            let levels: Vec<u8> = (0..width * height).map(|_| rng.random_range(0..bins as u8)).collect();
            let got = windowed_entropy(&levels, width, height, half, bins);
            let want = reference_entropy(&levels, width, height, half, bins);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-5, "{width}×{height} half {half}: pixel {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn downscaling_averages_each_footprint() {
        // 6×3 → 2×1 (max side 2, scale 3): each output pixel is the mean of a 3×3 block.
        let image = RgbImage::from_fn(6, 3, |x, y| if x < 3 { Rgb([(10 * y) as u8; 3]) } else { Rgb([255, 0, 0]) });
        assert_eq!(downscaled_grey(&image, 2), (2, 1, 3.0, vec![10, 77]));
        // Uneven footprints: 5 columns into 2 take 3 and 2 source columns.
        let image = RgbImage::from_fn(5, 1, |x, _| Rgb([[0, 0, 90, 200, 100][x as usize]; 3]));
        assert_eq!(downscaled_grey(&image, 2), (2, 1, 2.5, vec![30, 150]));
    }

    #[test]
    fn entropy_map_is_downscaled_zero_on_flat_grey_and_high_on_noise() {
        let map = entropy_map(&patch_image(), 128, 17, 16);
        assert_eq!((map.width, map.height, map.scale), (128, 96, 2.5));
        assert_eq!(map.values[0], 0.0);
        let (left, top, side) = PATCH;
        let centre = ((f64::from(left + side / 2) / 2.5) as usize, (f64::from(top + side / 2) / 2.5) as usize);
        let at_centre = map.values[centre.1 * map.width + centre.0];
        assert!(at_centre > 2.5 && at_centre <= 4.0, "entropy at the patch centre: {at_centre}");
        // A small image is not upscaled.
        let small = entropy_map(&RgbImage::new(40, 30), 128, 5, 16);
        assert_eq!((small.width, small.height, small.scale), (40, 30, 1.0));
    }

    #[test]
    fn the_first_fixation_lands_on_the_textured_patch() {
        let found = fixations(&patch_image(), 4, &[0.5]);
        let (left, top, side) = PATCH;
        let first = found[0];
        assert!((f64::from(left)..f64::from(left + side)).contains(&first.x), "{first:?}");
        assert!((f64::from(top)..f64::from(top + side)).contains(&first.y), "{first:?}");
        assert!(found.iter().skip(1).all(|other| other.entropy < first.entropy), "{found:?}");
    }

    #[test]
    fn count_is_honoured_and_fixations_are_spread_out() {
        let image = patch_image();
        let scales = [0.75, 0.5];
        let found = fixations(&image, 4, &scales);
        assert_eq!(found.len(), 8);
        assert!(found.windows(2).all(|pair| pair[0].entropy >= pair[1].entropy), "{found:?}");
        // Each point comes once per scale, scales in the order given.
        for pair in found.chunks_exact(2) {
            assert_eq!((pair[0].x, pair[0].y), (pair[1].x, pair[1].y));
            assert_eq!((pair[0].size, pair[1].size), (180.0, 120.0));
        }
        let radius = suppression_radius(240.0, &scales);
        assert_eq!(radius, 60.0);
        let points: Vec<&Fixation> = found.iter().step_by(2).collect();
        for (i, a) in points.iter().enumerate() {
            for b in &points[i + 1..] {
                assert!(distance(a, b) >= radius - 1e-9, "{a:?} and {b:?} are closer than {radius}");
            }
        }
    }

    #[test]
    fn a_radius_too_large_for_the_image_is_relaxed_to_honour_the_count() {
        let found = fixations(&patch_image(), 6, &[1.0]);
        assert_eq!(found.len(), 6);
        for (i, a) in found.iter().enumerate() {
            assert!(found[i + 1..].iter().all(|b| distance(a, b) > 0.0), "repeated fixation {a:?}");
        }
        assert!(fixations(&patch_image(), 0, &[0.5]).is_empty());
        assert!(fixations(&patch_image(), 3, &[]).is_empty());
    }

    #[test]
    fn crop_region_stays_inside_the_image_at_corners() {
        let (width, height) = (320, 240);
        for (x, y) in [(0.0, 0.0), (320.0, 0.0), (0.0, 240.0), (320.0, 240.0), (5.0, 230.0), (160.0, 120.0)] {
            for size in [50.0, 120.0, 240.0, 1000.0] {
                let region = crop_region(width, height, &Fixation { x, y, size, entropy: 0.0 });
                let side = f64::min(size, 240.0);
                assert_eq!((region.width, region.height), (side, side));
                assert!(region.left >= 0.0 && region.left + region.width <= 320.0, "{region:?}");
                assert!(region.top >= 0.0 && region.top + region.height <= 240.0, "{region:?}");
            }
        }
        // Away from the borders the crop is centred on the fixation.
        let centred = crop_region(width, height, &Fixation { x: 160.0, y: 100.0, size: 80.0, entropy: 0.0 });
        assert_eq!(centred, Region { left: 120.0, top: 60.0, width: 80.0, height: 80.0 });
    }

    #[test]
    fn saccade_views_have_the_model_input_size_and_pixel_range() {
        let image = patch_image();
        let found = fixations(&image, 3, &[0.5]);
        for spec in [spec(224, 224), spec(64, 48)] {
            let views = saccade_views(&image, &spec, &found, 2.0).unwrap();
            assert_eq!(views.len(), 3);
            for view in &views {
                assert_eq!((view.width as u32, view.height as u32), (spec.width, spec.height));
                assert_eq!(view.data.len(), 3 * view.plane_len());
                assert!(view.data.iter().all(|v| (0.0..=1.0).contains(v)), "a value outside [0, 1]");
            }
        }
    }

    #[test]
    fn the_fovea_follows_the_fixation_when_the_crop_is_shifted() {
        let image = patch_image();
        let spec = spec(100, 100);
        // Crop 120×120 shifted to the top-left corner: the point (30, 30) lands at view (25, 25).
        let fixation = Fixation { x: 30.0, y: 30.0, size: 120.0, entropy: 0.0 };
        let view = &saccade_views(&image, &spec, &[fixation], 3.0).unwrap()[0];
        let region = crop_region(320, 240, &fixation);
        assert_eq!((region.left, region.top), (0.0, 0.0));
        let crop = resize_region(&image, Some(region), 100, 100, spec.interpolation).unwrap();
        let sharp = ModelImage::from_rgb(&crop);
        let blurred = crate::defense::filters::gaussian_blur(&sharp, 3.0);
        // Sharp within 0.2 · 100 of (25, 25), blurred beyond 0.6 · 100.
        for (x, y) in [(25, 25), (15, 35), (35, 15)] {
            let i = y * 100 + x;
            assert_eq!(view.data[i], sharp.data[i], "({x}, {y})");
        }
        let far = 95 * 100 + 95;
        assert!((view.data[far] - blurred.data[far]).abs() < 1e-6);
    }

    #[test]
    fn fixations_and_views_are_deterministic() {
        let image = photo("imagenet_00_243.jpg");
        let first = fixations(&image, 4, &[0.5, 0.8]);
        assert_eq!(first.len(), 8);
        assert_eq!(fixations(&image, 4, &[0.5, 0.8]), first);
        let spec = spec(224, 224);
        assert_eq!(
            saccade_views(&image, &spec, &first, 2.0).unwrap(),
            saccade_views(&image, &spec, &first, 2.0).unwrap()
        );
    }
}

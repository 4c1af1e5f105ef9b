//! `smooth`: randomized smoothing (Cohen, Rosenfeld & Kolter 2019).
//!
//! The smoothed classifier g(x) = argmax_c P[f(x + ε) = c], ε ~ N(0, σ²I), is estimated
//! by Monte Carlo: each view is the model-input image (pixels in [0, 1]) plus Gaussian
//! noise, clipped back to [0, 1] and optionally blurred ("denoised smoothing", Salman
//! et al. 2020). Clipping and blurring are part of the base classifier f, and Cohen's
//! guarantee holds for any base classifier, so the certificate is about the composed
//! pipeline: an L2 radius in the [0, 1] model-input pixel space (3 × H × W values).
//!
//! PREDICT draws samples in rounds (see `stats::predict_schedule`) and stops as soon as
//! the top-two binomial test settles; CERTIFY uses separate selection samples to pick
//! the class, then estimation samples for a Clopper–Pearson lower bound on pA.

use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::{RefOr, Schema};

use super::filters::gaussian_blur;
use super::settings::{DefenseLimits, DefenseSettings, SettingsError, within};
use super::{Defense, DefenseError, DefenseOutcome, DefenseRun, Outputs, Request, RowRange, Source, Views};
use crate::imaging::ModelImage;
use crate::model::{InputSpec, Labels, LoadedModel};
use crate::prediction::top_indices;
use crate::stats::{self, LookDecision, LookSchedule};

/// Selection samples are numbered from here, so they never share noise with estimation samples.
const SELECTION_STREAM: u64 = 1 << 40;

/// Rows drawn per round when CERTIFY tops up its estimation samples.
const CERTIFY_ROUND: u64 = 64;

/// How much noise a defense adds: the request's seed is not part of it (it comes with
/// the image, in the views' `Source`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseLevel {
    /// Standard deviation in [0, 1] pixel units.
    pub sigma: f32,
    /// Gaussian blur (pixels) applied after the noise; 0 = none.
    pub denoise_sigma: f32,
}

impl NoiseLevel {
    pub fn of(settings: &DefenseSettings) -> Self {
        NoiseLevel { sigma: settings.sigma, denoise_sigma: settings.denoise_sigma }
    }

    pub fn seeded(self, seed: u64) -> Noise {
        Noise { sigma: self.sigma, denoise_sigma: self.denoise_sigma, seed }
    }
}

/// The noise of one request's noisy views.
#[derive(Debug, Clone, Copy)]
pub struct Noise {
    /// Standard deviation in [0, 1] pixel units.
    pub sigma: f32,
    /// Gaussian blur (pixels) applied after the noise; 0 = none.
    pub denoise_sigma: f32,
    pub seed: u64,
}

/// Appends `count` noisy views of `base` as normalized model input rows (f32; see
/// [`fill_noisy_rows`]).
pub fn push_noisy_rows(
    base: &ModelImage,
    spec: &InputSpec,
    noise: Noise,
    first: u64,
    count: usize,
    out: &mut Vec<f32>,
) {
    let start = out.len();
    out.resize(start + count * base.data.len(), 0.0);
    fill_noisy_rows(base, spec, noise, first, &mut out[start..], |row, stored| stored.copy_from_slice(row));
}

/// Fills `out` with noisy views of `base` as normalized model input rows, each drawn
/// into an f32 row and handed to `store` (which may narrow it, as the engine queue's
/// half precision does). View `i` (global index `first + i`) draws its noise from its
/// own generator seeded by (seed, index), so the rows do not depend on how they are
/// split across rounds or threads, and the same seed always gives the same rows.
pub fn fill_noisy_rows<T: Send>(
    base: &ModelImage,
    spec: &InputSpec,
    noise: Noise,
    first: u64,
    out: &mut [T],
    store: impl Fn(&[f32], &mut [T]) + Sync,
) {
    let row_len = base.data.len();
    let count = out.len() / row_len.max(1);
    // Noise generation is the costliest part of view building; split it across cores.
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(count.max(1));
    let per_thread = count.div_ceil(threads.max(1)).max(1);
    let store = &store;
    std::thread::scope(|scope| {
        for (chunk_index, chunk) in out.chunks_mut(per_thread * row_len).enumerate() {
            let first_row = first + (chunk_index * per_thread) as u64;
            scope.spawn(move || {
                let mut row = vec![0.0f32; row_len];
                for (i, stored) in chunk.chunks_mut(row_len).enumerate() {
                    noisy_row(base, spec, noise, first_row + i as u64, &mut row);
                    store(&row, stored);
                }
            });
        }
    });
}

fn noisy_row(base: &ModelImage, spec: &InputSpec, noise: Noise, index: u64, row: &mut [f32]) {
    let Noise { sigma, denoise_sigma, seed } = noise;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(row_seed(seed, index));
    let plane = base.plane_len();
    if denoise_sigma > 0.0 {
        let mut noisy = base.clone();
        for value in &mut noisy.data {
            let z: f32 = StandardNormal.sample(&mut rng);
            *value = (*value + sigma * z).clamp(0.0, 1.0);
        }
        let denoised = gaussian_blur(&noisy, denoise_sigma);
        for c in 0..3 {
            let (mean, inv_std) = (spec.mean[c], 1.0 / spec.std[c]);
            let source = &denoised.data[c * plane..(c + 1) * plane];
            for (out, x) in row[c * plane..(c + 1) * plane].iter_mut().zip(source) {
                *out = (x - mean) * inv_std;
            }
        }
        return;
    }
    // Noise, clip and normalize in one pass.
    for c in 0..3 {
        let (mean, inv_std) = (spec.mean[c], 1.0 / spec.std[c]);
        let source = &base.data[c * plane..(c + 1) * plane];
        for (out, x) in row[c * plane..(c + 1) * plane].iter_mut().zip(source) {
            let z: f32 = StandardNormal.sample(&mut rng);
            *out = ((x + sigma * z).clamp(0.0, 1.0) - mean) * inv_std;
        }
    }
}

/// SplitMix64 of (seed, index): independent-looking seeds for neighbouring rows.
fn row_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Row indices for the selection samples of CERTIFY.
pub fn selection_index(i: u64) -> u64 {
    SELECTION_STREAM + i
}

/// Votes of the base classifier, by class.
#[derive(Debug, Clone)]
pub struct Votes {
    counts: Vec<u64>,
    total: u64,
}

impl Votes {
    pub fn new(classes: usize) -> Self {
        Self { counts: vec![0; classes], total: 0 }
    }

    /// Adds one vote per row: the row's argmax.
    pub fn add_rows(&mut self, probabilities: &[Vec<f32>]) {
        for row in probabilities {
            if let Some(&top) = top_indices(row, 1).first() {
                self.counts[top] += 1;
                self.total += 1;
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn count(&self, class: usize) -> u64 {
        self.counts.get(class).copied().unwrap_or(0)
    }

    /// The two most voted classes with their counts.
    pub fn top_two(&self) -> ((usize, u64), (usize, u64)) {
        let as_f32: Vec<f32> = self.counts.iter().map(|&c| c as f32).collect();
        let top = top_indices(&as_f32, 2);
        let first = top.first().copied().unwrap_or(0);
        let second = top.get(1).copied().unwrap_or(first);
        ((first, self.count(first)), (second, self.count(second)))
    }

    /// Vote fractions, the smoothed classifier's estimated class probabilities.
    pub fn frequencies(&self) -> Vec<f32> {
        let total = self.total.max(1) as f32;
        self.counts.iter().map(|&c| c as f32 / total).collect()
    }

    /// The classes with votes, most voted first (at most `k`).
    pub fn ranked(&self, k: usize) -> Vec<(usize, u64)> {
        let as_f32: Vec<f32> = self.counts.iter().map(|&c| c as f32).collect();
        top_indices(&as_f32, k).into_iter().filter(|&c| self.counts[c] > 0).map(|c| (c, self.counts[c])).collect()
    }
}

/// Where PREDICT stands after the samples drawn so far.
#[derive(Debug, Clone)]
pub struct PredictState {
    pub schedule: LookSchedule,
    pub look: usize,
    pub votes: Votes,
    pub decision: Option<LookDecision>,
}

impl PredictState {
    pub fn new(max_samples: u64, alpha: f64, classes: usize) -> Self {
        Self {
            schedule: stats::predict_schedule(max_samples, alpha, 1),
            look: 0,
            votes: Votes::new(classes),
            decision: None,
        }
    }

    /// Samples to draw before the next look (0 when settled).
    pub fn next_round(&self) -> usize {
        if self.is_settled() {
            return 0;
        }
        let target = self.schedule.looks.get(self.look).copied().unwrap_or(0);
        target.saturating_sub(self.votes.total()) as usize
    }

    pub fn is_settled(&self) -> bool {
        matches!(self.decision, Some(LookDecision::Predict { .. } | LookDecision::Abstain { .. }))
    }

    /// Adds a round's votes and takes the look.
    pub fn observe(&mut self, probabilities: &[Vec<f32>]) {
        self.votes.add_rows(probabilities);
        let ((_, n_a), (_, n_b)) = self.votes.top_two();
        let decision = stats::predict_decision(&self.schedule, self.look, n_a, n_b);
        self.decision = Some(decision);
        if let LookDecision::Continue { .. } = decision {
            self.look += 1;
        }
    }

    /// The predicted class, or `None` when PREDICT abstains.
    pub fn prediction(&self) -> Option<usize> {
        match self.decision {
            Some(LookDecision::Predict { .. }) => Some(self.votes.top_two().0.0),
            _ => None,
        }
    }

    pub fn p_value(&self) -> f64 {
        match self.decision {
            Some(
                LookDecision::Predict { p_value }
                | LookDecision::Abstain { p_value }
                | LookDecision::Continue { p_value },
            ) => p_value,
            None => 1.0,
        }
    }
}

/// CERTIFY's outcome as reported to clients.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CertifyReport {
    /// Class picked from the selection samples (`null` if they had no votes).
    pub class_id: Option<usize>,
    pub label: Option<String>,
    /// Selection samples (n0) and estimation samples drawn (n, may stop early when hopeless).
    pub selection_samples: u64,
    pub estimation_samples: u64,
    /// Estimation samples that voted for `class_id`.
    pub count: u64,
    /// One-sided (1 − alpha) Clopper–Pearson lower bound on pA.
    pub p_lower: f64,
    /// Certified L2 radius σ·Φ⁻¹(p_lower) in [0,1] model-input pixel units; `null` = abstain (p_lower < 0.5).
    pub radius: Option<f64>,
    /// The largest radius these n and alpha allow (all samples agree).
    pub max_radius: f64,
    pub abstained: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SmoothDetails {
    pub sigma: f32,
    pub alpha: f64,
    pub denoise_sigma: f32,
    /// Noisy samples PREDICT drew (it stops as soon as its test settles).
    pub samples_used: u64,
    pub max_samples: u64,
    /// Looks taken at the data; each tested at alpha / planned looks (Bonferroni).
    pub looks: usize,
    pub planned_looks: Vec<u64>,
    /// Two-sided binomial test p-value of the top two counts at the last look.
    pub p_value: f64,
    /// Vote counts of the most voted classes.
    pub votes: Vec<VoteCount>,
    /// CERTIFY's result when `certify=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertifyReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VoteCount {
    pub class_id: usize,
    pub label: String,
    pub count: u64,
}

pub struct Smooth;

impl Defense for Smooth {
    fn name(&self) -> &'static str {
        "smooth"
    }

    fn parameters(&self) -> &'static [&'static str] {
        &["sigma", "samples", "alpha", "certify"]
    }

    fn row_parameter(&self) -> Option<&'static str> {
        Some("samples")
    }

    fn check(&self, s: &DefenseSettings, l: &DefenseLimits) -> Result<(), SettingsError> {
        within(s.sigma > 0.0 && s.sigma <= l.max_sigma, "sigma", || format!("(0, {}]", l.max_sigma))?;
        within((1..=l.max_samples).contains(&s.samples), "samples", || format!("[1, {}]", l.max_samples))?;
        within((l.min_alpha..=l.max_alpha).contains(&s.alpha), "alpha", || {
            format!("[{}, {}]", l.min_alpha, l.max_alpha)
        })?;
        within((1..=l.max_samples).contains(&s.selection_samples), "selection_samples", || {
            format!("[1, {}]", l.max_samples)
        })?;
        within((0.0..=l.max_blur_sigma).contains(&s.denoise_sigma), "denoise_sigma", || {
            format!("[0, {}]", l.max_blur_sigma)
        })
    }

    fn start(&self, request: &Request<'_>) -> Result<Box<dyn DefenseRun>, DefenseError> {
        let s = request.settings;
        let classes = request.raw.card.num_classes;
        Ok(Box::new(SmoothRun {
            model: Arc::clone(request.raw),
            labels: request.labels().clone(),
            noise: NoiseLevel::of(s),
            alpha: s.alpha,
            samples: u64::from(s.samples),
            selection_samples: if s.certify { u64::from(s.selection_samples) } else { 0 },
            predict: PredictState::new(u64::from(s.samples), s.alpha, classes),
            selection: None,
            certify: None,
            pending: None,
            round: 0,
        }))
    }

    fn details_schemas(&self) -> Vec<(String, RefOr<Schema>)> {
        super::schemas_of::<SmoothDetails>()
    }
}

/// CERTIFY's progress: the class the selection samples picked, and the estimation
/// samples drawn so far (PREDICT's samples are independent of the selection samples,
/// so they are its first estimation samples).
struct Certifying {
    class: Option<usize>,
    drawn: u64,
    count: u64,
}

/// Where the rows of the round in flight sit: estimation samples (PREDICT's or
/// CERTIFY's) and, in the first round, CERTIFY's selection samples.
struct Pending {
    rows: RowRange,
    selection: Option<RowRange>,
}

struct SmoothRun {
    model: Arc<LoadedModel>,
    labels: Labels,
    noise: NoiseLevel,
    alpha: f64,
    samples: u64,
    /// CERTIFY's n0 (0 = no CERTIFY).
    selection_samples: u64,
    predict: PredictState,
    /// Votes of the selection samples, after the first round.
    selection: Option<Votes>,
    certify: Option<Certifying>,
    pending: Option<Pending>,
    round: usize,
}

impl SmoothRun {
    /// The next round's estimation rows: (first row index, count); `None` when done.
    fn next_round(&self) -> Option<(u64, u64)> {
        let count = self.predict.next_round() as u64;
        if count > 0 {
            return Some((self.predict.votes.total(), count));
        }
        if self.selection_samples == 0 {
            return None;
        }
        // CERTIFY starts once PREDICT has settled (`start_certify`); without a class
        // from the selection samples it has nothing to estimate.
        match &self.certify {
            Some(Certifying { class: Some(_), drawn, count }) => self.certify_round(*drawn, *count),
            _ => None,
        }
    }

    /// CERTIFY tops up to `samples` estimation samples, stopping early only once the
    /// bound can no longer pass (then it abstains).
    fn certify_round(&self, drawn: u64, count: u64) -> Option<(u64, u64)> {
        let hopeless = stats::certify_futile(count, drawn, self.samples, self.alpha);
        (drawn < self.samples && !hopeless).then(|| (drawn, (self.samples - drawn).min(CERTIFY_ROUND)))
    }

    fn start_certify(&mut self) {
        if self.certify.is_none() && self.selection_samples > 0 && self.predict.is_settled() {
            let class = self.selection.as_ref().map(|v| v.top_two().0).filter(|(_, votes)| *votes > 0).map(|(c, _)| c);
            let drawn = self.predict.votes.total();
            let count = class.map_or(0, |c| self.predict.votes.count(c));
            self.certify = Some(Certifying { class, drawn, count });
        }
    }
}

impl DefenseRun for SmoothRun {
    fn models(&self) -> Vec<Arc<LoadedModel>> {
        vec![Arc::clone(&self.model)]
    }

    fn next_rows(&self) -> Vec<(Arc<LoadedModel>, usize)> {
        let selection = if self.round == 0 { self.selection_samples } else { 0 };
        let estimation = self.next_round().map_or(0, |(_, count)| count);
        match estimation + selection {
            0 => Vec::new(),
            rows => vec![(Arc::clone(&self.model), rows as usize)],
        }
    }

    fn views(&mut self, source: &Source, views: &mut Views) -> Result<(), DefenseError> {
        let (first, count) = self.next_round().unwrap_or((0, 0));
        let rows = views.push_noise(source, &self.model, self.noise, first, count as usize)?;
        let selection = if self.round == 0 && self.selection_samples > 0 {
            let count = self.selection_samples as usize;
            Some(views.push_noise(source, &self.model, self.noise, selection_index(0), count)?)
        } else {
            None
        };
        self.pending = Some(Pending { rows, selection });
        Ok(())
    }

    fn observe(&mut self, outputs: &Outputs) {
        let Some(Pending { rows, selection }) = self.pending.take() else { return };
        self.round += 1;
        if let Some(range) = selection {
            let mut votes = Votes::new(self.model.card.num_classes);
            votes.add_rows(outputs.rows(range));
            self.selection = Some(votes);
        }
        let rows = outputs.rows(rows);
        match &mut self.certify {
            Some(certifying) => {
                if let Some(class) = certifying.class {
                    let mut votes = Votes::new(self.model.card.num_classes);
                    votes.add_rows(rows);
                    certifying.count += votes.count(class);
                    certifying.drawn += rows.len() as u64;
                }
            }
            None if !rows.is_empty() || !self.predict.is_settled() => self.predict.observe(rows),
            None => {}
        }
        self.start_certify();
    }

    /// PREDICT's class (or an abstention) with the vote frequencies as its
    /// probability vector, and CERTIFY's result when it ran. Samples CERTIFY did not
    /// draw after a futile look count as votes against its class, so the bound over
    /// all `samples` stays valid (and below 0.5: abstain).
    fn finish(self: Box<Self>) -> DefenseOutcome {
        let certificate = self.certify.as_ref().map(|c| {
            let certificate = stats::certify(f64::from(self.noise.sigma), c.count, self.samples, self.alpha);
            let drawn = if c.class.is_some() { c.drawn } else { 0 };
            certify_report(c.class, &self.labels, self.selection_samples, drawn, certificate)
        });
        let state = &self.predict;
        let prediction = state.prediction();
        let probabilities = state.votes.frequencies();
        let extra = certificate.as_ref().map_or(0, |c| c.estimation_samples.saturating_sub(state.votes.total()));
        let views = (state.votes.total() + extra + self.selection_samples) as usize;
        let votes = state
            .votes
            .ranked(5)
            .into_iter()
            .map(|(class_id, count)| VoteCount { class_id, label: self.labels.name(class_id).to_string(), count })
            .collect();
        let details = SmoothDetails {
            sigma: self.noise.sigma,
            alpha: self.alpha,
            denoise_sigma: self.noise.denoise_sigma,
            samples_used: state.votes.total(),
            max_samples: self.samples,
            looks: state.look + 1,
            planned_looks: state.schedule.looks.clone(),
            p_value: state.p_value(),
            votes,
            certificate,
        };
        DefenseOutcome {
            name: "smooth",
            class_id: prediction,
            confidence: prediction.map_or(0.0, |c| probabilities[c]),
            abstained: prediction.is_none(),
            probabilities,
            views,
            details: super::to_json(&details),
        }
    }
}

fn certify_report(
    class: Option<usize>,
    labels: &Labels,
    selection_samples: u64,
    estimation_samples: u64,
    certificate: stats::Certificate,
) -> CertifyReport {
    CertifyReport {
        class_id: class,
        label: class.map(|c| labels.name(c).to_string()),
        selection_samples,
        estimation_samples,
        count: certificate.n_a,
        p_lower: certificate.p_lower,
        radius: certificate.radius,
        max_radius: certificate.max_radius,
        abstained: certificate.radius.is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Interpolation, ResizePolicy};

    fn spec() -> InputSpec {
        InputSpec {
            name: "input".into(),
            width: 8,
            height: 4,
            layout: "NCHW".into(),
            color: "RGB".into(),
            mean: [0.5; 3],
            std: [0.5; 3],
            resize: ResizePolicy::Stretch,
            crop_fraction: 1.0,
            interpolation: Interpolation::Bilinear,
        }
    }

    fn noise(sigma: f32, seed: u64) -> Noise {
        Noise { sigma, denoise_sigma: 0.0, seed }
    }

    fn base() -> ModelImage {
        ModelImage { width: 8, height: 4, data: (0..96).map(|i| i as f32 / 95.0).collect() }
    }

    #[test]
    fn noisy_rows_are_seeded_per_row_and_independent_of_how_they_are_split() {
        let (spec, base) = (spec(), base());
        let mut all_at_once = Vec::new();
        push_noisy_rows(&base, &spec, noise(0.1, 7), 0, 6, &mut all_at_once);
        let mut in_rounds = Vec::new();
        push_noisy_rows(&base, &spec, noise(0.1, 7), 0, 2, &mut in_rounds);
        push_noisy_rows(&base, &spec, noise(0.1, 7), 2, 4, &mut in_rounds);
        assert_eq!(all_at_once, in_rounds);
        let mut other_seed = Vec::new();
        push_noisy_rows(&base, &spec, noise(0.1, 8), 0, 6, &mut other_seed);
        assert_ne!(all_at_once, other_seed);
        // Rows differ from each other.
        assert_ne!(all_at_once[..96], all_at_once[96..192]);
    }

    #[test]
    fn noise_has_the_requested_spread_and_is_clipped_to_the_pixel_range() {
        let spec = spec();
        let grey = ModelImage { width: 8, height: 4, data: vec![0.5; 96] };
        let mut rows = Vec::new();
        push_noisy_rows(&grey, &spec, noise(0.1, 1), 0, 200, &mut rows);
        // Undo the normalization: x = row * std + mean.
        let pixels: Vec<f32> = rows.iter().map(|v| v * 0.5 + 0.5).collect();
        let mean = pixels.iter().sum::<f32>() / pixels.len() as f32;
        let var = pixels.iter().map(|p| (p - mean).powi(2)).sum::<f32>() / pixels.len() as f32;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
        assert!((var.sqrt() - 0.1).abs() < 0.005, "{}", var.sqrt());
        let mut wide = Vec::new();
        push_noisy_rows(&grey, &spec, noise(2.0, 1), 0, 10, &mut wide);
        assert!(wide.iter().all(|v| (-1.0..=1.0).contains(v)), "clipped pixels normalize into [-1, 1]");
    }

    #[test]
    fn predict_state_settles_early_on_unanimous_votes_and_abstains_on_a_tie() {
        let one_hot = |class: usize| {
            let mut p = vec![0.0f32; 3];
            p[class] = 1.0;
            p
        };
        let mut clean = PredictState::new(64, 0.001, 3);
        let mut drawn = 0;
        while clean.next_round() > 0 {
            let n = clean.next_round();
            drawn += n;
            clean.observe(&vec![one_hot(2); n]);
        }
        assert_eq!(clean.prediction(), Some(2));
        assert!(drawn < 64, "unanimous votes should settle before the maximum, used {drawn}");

        let mut tie = PredictState::new(64, 0.001, 3);
        while tie.next_round() > 0 {
            let n = tie.next_round();
            let rows: Vec<Vec<f32>> = (0..n).map(|i| one_hot(i % 2)).collect();
            tie.observe(&rows);
        }
        assert_eq!(tie.prediction(), None);
    }
}

//! A differentiable copy of what the server computes for a preset, for white-box attacks.
//!
//! The attacked image `x` is the raw model's input (planar RGB in [0, 1]). For every
//! member model the copy does what the pipeline does: fit `x` to the model's input
//! ([`Fit`]: the same resize-and-crop arithmetic as `imaging::fit_to_input`, as a
//! linear map), add N(0, σ²) noise and clip for the noisy views (a fresh draw every
//! step: Expectation over Transformation), normalize per card, softmax, and average the
//! views' probabilities with the weights the defenses give them ([`Term`]). The losses
//! are on that mean probability vector, never on one draw's logits.
//!
//! Differences from the server, on purpose (they only shape the gradient; every verdict
//! comes from the real pipeline on the 8-bit image):
//! - the resize is linear in floats, where the server rounds to 8 bits after it (at
//!   most one level in these upsampling resizes; straight-through, as BPDA does);
//! - randomized smoothing's vote (an argmax per noisy sample) is replaced by the mean
//!   softmax over the samples (BPDA with the "soft smoothed classifier" of Salman et
//!   al. 2019), and PREDICT's abstention is not modelled;
//! - a step uses `draws` noisy views per term (the server uses `samples`), weighted so
//!   that the estimate of the mean is unbiased.
//!
//! Blur, median filtering and saccades have no differentiable copy here: asking for one
//! is an error, so no number is ever reported for an attack that did not see the defense.

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus as StdRng;
use rand_distr::{Distribution, StandardNormal};

use super::gradient::Gradients;
use super::{AttackError, CHANNELS, Goal};
use crate::model::{InputSpec, Interpolation, ResizePolicy};

/// One axis of a resize: for every output index, (input index, weight) taps.
#[derive(Debug, Clone, PartialEq)]
struct AxisMap {
    inputs: usize,
    taps: Vec<Vec<(usize, f32)>>,
}

impl AxisMap {
    fn identity(n: usize) -> Self {
        Self { inputs: n, taps: (0..n).map(|i| vec![(i, 1.0)]).collect() }
    }

    /// Convolution resize weights from `inputs` to `resized` samples (Pillow's, which
    /// `fast_image_resize` follows), keeping outputs `offset..offset + outputs` (a crop).
    fn resize(inputs: usize, resized: usize, offset: usize, outputs: usize, filter: Interpolation) -> Self {
        let scale = inputs as f64 / resized as f64;
        let (support, kernel): (f64, fn(f64) -> f64) = match filter {
            Interpolation::Nearest => {
                let taps = (offset..offset + outputs)
                    .map(|i| vec![((((i as f64 + 0.5) * scale) as usize).min(inputs - 1), 1.0)])
                    .collect();
                return Self { inputs, taps };
            }
            Interpolation::Bilinear => (1.0, |x: f64| (1.0 - x.abs()).max(0.0)),
            Interpolation::Bicubic => (2.0, catmull_rom),
        };
        let filter_scale = scale.max(1.0);
        let support = support * filter_scale;
        let taps = (offset..offset + outputs)
            .map(|i| {
                let center = (i as f64 + 0.5) * scale;
                let first = ((center - support + 0.5).trunc() as i64).max(0) as usize;
                let last = ((center + support + 0.5).trunc() as i64).min(inputs as i64).max(first as i64) as usize;
                let mut taps: Vec<(usize, f64)> =
                    (first..last).map(|j| (j, kernel((j as f64 - center + 0.5) / filter_scale))).collect();
                let total: f64 = taps.iter().map(|t| t.1).sum();
                if total != 0.0 {
                    taps.iter_mut().for_each(|t| t.1 /= total);
                }
                taps.into_iter().filter(|t| t.1 != 0.0).map(|(j, w)| (j, w as f32)).collect()
            })
            .collect();
        Self { inputs, taps }
    }
}

fn catmull_rom(x: f64) -> f64 {
    let (a, x) = (-0.5, x.abs());
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Fitting an image of one size to a model's input, as a separable linear map.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    columns: AxisMap,
    rows: AxisMap,
}

impl Fit {
    /// The map `imaging::fit_to_input` applies to a `width`×`height` image (same
    /// arithmetic: untouched at the input size, else stretch or shorter side + centre crop).
    pub fn new(width: usize, height: usize, spec: &InputSpec) -> Self {
        let (out_w, out_h) = (spec.width as usize, spec.height as usize);
        if (width, height) == (out_w, out_h) {
            return Self { columns: AxisMap::identity(width), rows: AxisMap::identity(height) };
        }
        let filter = spec.interpolation;
        match spec.resize {
            ResizePolicy::Stretch => Self {
                columns: AxisMap::resize(width, out_w, 0, out_w, filter),
                rows: AxisMap::resize(height, out_h, 0, out_h, filter),
            },
            ResizePolicy::ShorterSideCenterCrop => {
                let target_short = (out_w.min(out_h) as f64 / spec.crop_fraction as f64).floor().max(1.0);
                let scale = target_short / width.min(height) as f64;
                let resized_w = ((width as f64 * scale).round() as usize).max(out_w);
                let resized_h = ((height as f64 * scale).round() as usize).max(out_h);
                Self {
                    columns: AxisMap::resize(width, resized_w, (resized_w - out_w) / 2, out_w, filter),
                    rows: AxisMap::resize(height, resized_h, (resized_h - out_h) / 2, out_h, filter),
                }
            }
        }
    }

    fn input_plane(&self) -> usize {
        self.columns.inputs * self.rows.inputs
    }

    fn output_plane(&self) -> usize {
        self.columns.taps.len() * self.rows.taps.len()
    }

    /// Planar RGB of the input size → planar RGB of the model's size.
    pub fn apply(&self, image: &[f32]) -> Vec<f32> {
        let (in_w, out_w, out_h) = (self.columns.inputs, self.columns.taps.len(), self.rows.taps.len());
        let mut out = Vec::with_capacity(CHANNELS * out_w * out_h);
        for plane in image.chunks_exact(self.input_plane()) {
            // Columns first (every input row), then rows.
            let mut wide = vec![0.0f32; self.rows.inputs * out_w];
            for (y, row) in plane.chunks_exact(in_w).enumerate() {
                for (x, taps) in self.columns.taps.iter().enumerate() {
                    wide[y * out_w + x] = taps.iter().map(|&(j, w)| row[j] * w).sum();
                }
            }
            for taps in &self.rows.taps {
                for x in 0..out_w {
                    out.push(taps.iter().map(|&(j, w)| wide[j * out_w + x] * w).sum());
                }
            }
        }
        out
    }

    /// The transpose: a gradient at the model's size → the gradient at the input size.
    pub fn transpose(&self, gradient: &[f32]) -> Vec<f32> {
        let (in_w, out_w) = (self.columns.inputs, self.columns.taps.len());
        let mut out = Vec::with_capacity(CHANNELS * self.input_plane());
        for plane in gradient.chunks_exact(self.output_plane()) {
            let mut wide = vec![0.0f32; self.rows.inputs * out_w];
            for (y, taps) in self.rows.taps.iter().enumerate() {
                for &(j, w) in taps {
                    for x in 0..out_w {
                        wide[j * out_w + x] += w * plane[y * out_w + x];
                    }
                }
            }
            let mut back = vec![0.0f32; self.input_plane()];
            for y in 0..self.rows.inputs {
                for (x, taps) in self.columns.taps.iter().enumerate() {
                    let g = wide[y * out_w + x];
                    for &(j, w) in taps {
                        back[y * in_w + j] += w * g;
                    }
                }
            }
            out.extend_from_slice(&back);
        }
        out
    }
}

/// A model of the copy: its name on the gradient server, its fit and normalization.
#[derive(Debug, Clone)]
pub struct SurrogateModel {
    pub name: String,
    pub fit: Fit,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Views of one model that enter the defended mean with one weight each: the plain
/// view, or `draws` noisy views per step standing for the server's noisy views.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Term {
    /// Index into the surrogate's models.
    pub model: usize,
    /// Noisy views (σ of the surrogate) or the plain view.
    pub noisy: bool,
    /// Weight of this term in the defended probabilities (all terms sum to 1).
    pub weight: f32,
}

/// The loss an attack maximizes, on the defended mean probabilities p̄ (ℓ = ln p̄).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Untargeted −ln p̄_y; targeted ln p̄_t.
    CrossEntropy,
    /// Croce & Hein's difference of logits ratio, on ℓ.
    Dlr,
    /// Carlini–Wagner margin on ℓ: untargeted max_{k≠y} ℓ_k − ℓ_y; targeted ℓ_t − max_{k≠t} ℓ_k.
    Margin,
}

/// The value and gradient of the loss at one point.
#[derive(Debug, Clone)]
pub struct Step {
    pub loss: f32,
    /// ∂loss/∂x, planar, the size of x.
    pub gradient: Vec<f32>,
    /// The defended mean probabilities the copy computed.
    pub probabilities: Vec<f32>,
    /// The copy's own verdict: the goal is reached on p̄.
    pub fooled: bool,
}

/// The differentiable defended pipeline.
pub struct Surrogate<G: Gradients> {
    gradients: G,
    models: Vec<SurrogateModel>,
    terms: Vec<Term>,
    sigma: f32,
    /// Noisy views per noisy term per step.
    draws: usize,
    rng: StdRng,
    /// Forward+backward passes, in rows, so far.
    pub rows: usize,
}

impl<G: Gradients> Surrogate<G> {
    pub fn new(
        gradients: G,
        models: Vec<SurrogateModel>,
        terms: Vec<Term>,
        sigma: f32,
        draws: usize,
        seed: u64,
    ) -> Result<Self, AttackError> {
        if terms.is_empty() || terms.iter().any(|t| t.model >= models.len()) {
            return Err(AttackError::Invalid("the surrogate has no terms or a term without a model".into()));
        }
        if terms.iter().any(|t| t.noisy) && (draws == 0 || sigma.is_nan() || sigma <= 0.0) {
            return Err(AttackError::Invalid("noisy terms need draws ≥ 1 and σ > 0".into()));
        }
        Ok(Self { gradients, models, terms, sigma, draws, rng: StdRng::seed_from_u64(seed), rows: 0 })
    }

    /// The gradient source (e.g. to reuse the server for another surrogate).
    pub fn into_gradients(self) -> G {
        self.gradients
    }

    /// Loss, gradient and p̄ at `x` under fresh noise.
    pub fn step(&mut self, x: &[f32], goal: Goal, loss: Loss) -> Result<Step, AttackError> {
        let mut mean: Vec<f32> = Vec::new();
        // Per model: (handle, softmax rows, row weights, clip masks of the noisy rows).
        let mut passes = Vec::new();
        for (index, model) in self.models.iter().enumerate() {
            let terms: Vec<&Term> = self.terms.iter().filter(|t| t.model == index).collect();
            if terms.is_empty() {
                continue;
            }
            let base = model.fit.apply(x);
            let plane = base.len() / CHANNELS;
            let mut input = Vec::new();
            let mut weights = Vec::new();
            let mut masks: Vec<Option<Vec<bool>>> = Vec::new();
            for term in terms {
                if !term.noisy {
                    push_normalized(&base, plane, model, &mut input);
                    weights.push(term.weight);
                    masks.push(None);
                    continue;
                }
                for _ in 0..self.draws {
                    let mut mask = Vec::with_capacity(base.len());
                    let noisy: Vec<f32> = base
                        .iter()
                        .map(|&v| {
                            let z: f32 = StandardNormal.sample(&mut self.rng);
                            let value = v + self.sigma * z;
                            mask.push(value > 0.0 && value < 1.0);
                            value.clamp(0.0, 1.0)
                        })
                        .collect();
                    push_normalized(&noisy, plane, model, &mut input);
                    weights.push(term.weight / self.draws as f32);
                    masks.push(Some(mask));
                }
            }
            let rows = weights.len();
            let (handle, logits) = self.gradients.forward(&model.name, &input, rows)?;
            let classes = logits.len() / rows;
            let softmax: Vec<Vec<f32>> = logits.chunks_exact(classes).map(softmax).collect();
            if mean.is_empty() {
                mean = vec![0.0; classes];
            }
            for (p, w) in softmax.iter().zip(&weights) {
                mean.iter_mut().zip(p).for_each(|(m, v)| *m += w * v);
            }
            self.rows += rows;
            passes.push((index, handle, softmax, weights, masks));
        }
        let (value, dmean) = loss_and_gradient(&mean, goal, loss)?;
        let mut gradient = vec![0.0f32; x.len()];
        for (index, handle, softmax, weights, masks) in passes {
            let model = &self.models[index];
            let mut cotangent = Vec::with_capacity(softmax.len() * dmean.len());
            for (p, w) in softmax.iter().zip(&weights) {
                let dot: f32 = p.iter().zip(&dmean).map(|(a, b)| a * b).sum();
                cotangent.extend(p.iter().zip(&dmean).map(|(pk, gk)| w * pk * (gk - dot)));
            }
            let input_gradient = self.gradients.backward(handle, &cotangent)?;
            let row_len = input_gradient.len() / softmax.len().max(1);
            let plane = row_len / CHANNELS;
            let mut at_base = vec![0.0f32; row_len];
            for (row, mask) in input_gradient.chunks_exact(row_len).zip(&masks) {
                for (i, g) in row.iter().enumerate() {
                    let inside = mask.as_ref().is_none_or(|m| m[i]);
                    if inside {
                        at_base[i] += g / model.std[i / plane];
                    }
                }
            }
            gradient.iter_mut().zip(model.fit.transpose(&at_base)).for_each(|(a, b)| *a += b);
        }
        let top = crate::prediction::argmax(&mean);
        let fooled = match goal {
            Goal::Untargeted { true_class } => top != true_class,
            Goal::Targeted { target } => top == target,
        };
        if gradient.iter().any(|g| !g.is_finite()) {
            return Err(AttackError::Gradient("the gradient has non-finite values".into()));
        }
        Ok(Step { loss: value, gradient, probabilities: mean, fooled })
    }
}

fn push_normalized(image: &[f32], plane: usize, model: &SurrogateModel, out: &mut Vec<f32>) {
    for (c, channel) in image.chunks_exact(plane).enumerate() {
        let (mean, inv) = (model.mean[c], 1.0 / model.std[c]);
        out.extend(channel.iter().map(|v| (v - mean) * inv));
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|z| (z - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    exp.iter().map(|e| e / total).collect()
}

/// Smallest probability the logarithms see (a class no view gives any mass).
const FLOOR: f32 = 1e-30;

/// The loss on p̄ and ∂loss/∂p̄.
pub fn loss_and_gradient(mean: &[f32], goal: Goal, loss: Loss) -> Result<(f32, Vec<f32>), AttackError> {
    let n = mean.len();
    let class = match goal {
        Goal::Untargeted { true_class } => true_class,
        Goal::Targeted { target } => target,
    };
    if n < 4 || class >= n {
        return Err(AttackError::Invalid(format!("class {class} of {n} probabilities")));
    }
    let p: Vec<f32> = mean.iter().map(|v| v.max(FLOOR)).collect();
    let l: Vec<f32> = p.iter().map(|v| v.ln()).collect();
    // ∂loss/∂ℓ, turned into ∂loss/∂p̄ at the end.
    let mut dl = vec![0.0f32; n];
    let untargeted = matches!(goal, Goal::Untargeted { .. });
    let other = (0..n).filter(|&k| k != class).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap_or(0);
    let value = match loss {
        Loss::CrossEntropy => {
            let sign = if untargeted { -1.0 } else { 1.0 };
            dl[class] = sign;
            sign * l[class]
        }
        Loss::Margin => {
            let sign = if untargeted { 1.0 } else { -1.0 };
            dl[other] += sign;
            dl[class] -= sign;
            sign * (l[other] - l[class])
        }
        Loss::Dlr => {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
            // Untargeted: −(ℓ_y − max_{k≠y} ℓ_k) / (ℓ_π1 − ℓ_π3);
            // targeted: −(max_{k≠t} ℓ_k − ℓ_t) / (ℓ_π1 − (ℓ_π3 + ℓ_π4)/2).
            let (a, scale_terms): (f32, Vec<(usize, f32)>) = if untargeted {
                (l[class] - l[other], vec![(order[0], 1.0), (order[2], -1.0)])
            } else {
                (l[other] - l[class], vec![(order[0], 1.0), (order[2], -0.5), (order[3], -0.5)])
            };
            let d: f32 = scale_terms.iter().map(|&(k, c)| c * l[k]).sum::<f32>() + 1e-12;
            let (top, bottom) = if untargeted { (class, other) } else { (other, class) };
            dl[top] -= 1.0 / d;
            dl[bottom] += 1.0 / d;
            for (k, c) in scale_terms {
                dl[k] += c * a / (d * d);
            }
            -a / d
        }
    };
    let gradient = dl.iter().zip(&p).map(|(g, pk)| g / pk).collect();
    Ok((value, gradient))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: u32, interpolation: Interpolation) -> InputSpec {
        InputSpec {
            name: "input".into(),
            width: size,
            height: size,
            layout: "NCHW".into(),
            color: "RGB".into(),
            mean: [0.5; 3],
            std: [0.5; 3],
            resize: ResizePolicy::ShorterSideCenterCrop,
            crop_fraction: 0.875,
            interpolation,
        }
    }

    fn photo(width: usize, height: usize) -> Vec<f32> {
        (0..CHANNELS * width * height)
            .map(|i| ((i * 7919 % 256) as f32 / 255.0 + (i % 13) as f32 / 40.0) % 1.0)
            .collect()
    }

    #[test]
    fn the_fit_matches_the_servers_resize_to_within_its_rounding() {
        // Bilinear, the shipped cards' filter. (Bicubic overshoots are clamped by the server
        // after each pass, so on a noise image the linear map is up to ~6 levels off there.)
        for (size, filter) in
            [(240, Interpolation::Bilinear), (260, Interpolation::Bilinear), (256, Interpolation::Bilinear)]
        {
            let spec = spec(size, filter);
            let (w, h) = (224, 224);
            let image = crate::imaging::ModelImage { width: w, height: h, data: photo(w, h) };
            let rgb = image.to_rgb();
            let quantized = crate::imaging::ModelImage::from_rgb(&rgb).data;
            let server = crate::imaging::ModelImage::from_rgb(&crate::imaging::fit_to_input(&rgb, &spec).unwrap());
            let ours = Fit::new(w, h, &spec).apply(&quantized);
            assert_eq!(ours.len(), server.data.len());
            // The server clamps to [0, 1] (bicubic overshoots at edges) and rounds
            let worst =
                ours.iter().zip(&server.data).map(|(a, b)| (a.clamp(0.0, 1.0) - b).abs()).fold(0.0f32, f32::max);
            // The server rounds to 8 bits (twice: one pass per axis); the linear map does not.
            assert!(worst <= 2.5 / 255.0, "{size} {filter:?}: max difference {}", worst * 255.0);
        }
    }

    #[test]
    fn the_transpose_is_the_adjoint_of_the_fit() {
        let fit = Fit::new(30, 20, &spec(24, Interpolation::Bilinear));
        let x = photo(30, 20);
        let g: Vec<f32> = (0..CHANNELS * 24 * 24).map(|i| ((i * 31) % 17) as f32 - 8.0).collect();
        let lhs: f64 = fit.apply(&x).iter().zip(&g).map(|(a, b)| f64::from(a * b)).sum();
        let rhs: f64 = x.iter().zip(fit.transpose(&g)).map(|(a, b)| f64::from(a * b)).sum();
        assert!((lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
    }

    #[test]
    fn loss_gradients_match_finite_differences() {
        let mut p: Vec<f32> = (0..10).map(|i| 1.0 + (i as f32 * 1.7).sin().abs()).collect();
        let total: f32 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= total);
        for goal in [Goal::Untargeted { true_class: 3 }, Goal::Targeted { target: 5 }] {
            for loss in [Loss::CrossEntropy, Loss::Margin, Loss::Dlr] {
                let (_, gradient) = loss_and_gradient(&p, goal, loss).unwrap();
                for k in 0..10 {
                    let h = 1e-4;
                    let mut up = p.clone();
                    up[k] += h;
                    let mut down = p.clone();
                    down[k] -= h;
                    let numeric = (loss_and_gradient(&up, goal, loss).unwrap().0
                        - loss_and_gradient(&down, goal, loss).unwrap().0)
                        / (2.0 * h);
                    assert!(
                        (numeric - gradient[k]).abs() <= 2e-2 * gradient[k].abs().max(1.0),
                        "{goal:?} {loss:?} class {k}: {numeric} vs {}",
                        gradient[k]
                    );
                }
            }
        }
    }
}

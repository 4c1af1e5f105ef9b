//! Adversarial attacks.
//!
//! Attacks work in the model-input space ([`ModelImage`]: planar RGB in [0, 1], before
//! mean/std normalization) against a black-box [`Oracle`] that returns class scores.

use crate::imaging::ModelImage;

pub mod eot;
pub mod nes;
pub mod square;

/// A black-box classifier: scores for a batch of images (model-input space, [0,1]).
/// Returns one score vector per image: LOG-probabilities or logits (the margin loss
/// only needs an order-preserving score; use log-softmax when the oracle gives probabilities).
pub trait Oracle {
    fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, String>;
}

/// What the attacker wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Any class but `true_class`.
    Untargeted { true_class: usize },
    /// Exactly `target`.
    Targeted { target: usize },
}

/// Margin loss (lower is better for the attacker; < 0 means success):
/// untargeted: s[y] - max_{k≠y} s[k]; targeted: max_{k≠t} s[k] - s[t].
///
/// Equal scores give 0 even when both are infinite (a log-probability of 0 is −∞).
/// A class index outside `scores` gives NaN; [`checked_margin`] reports it instead.
pub fn margin(goal: &Goal, scores: &[f32]) -> f32 {
    let class = match *goal {
        Goal::Untargeted { true_class } => true_class,
        Goal::Targeted { target } => target,
    };
    let Some(&own) = scores.get(class) else {
        return f32::NAN;
    };
    let best_other =
        scores.iter().enumerate().filter(|&(k, _)| k != class).map(|(_, &s)| s).fold(f32::NEG_INFINITY, f32::max);
    let (high, low) = match goal {
        Goal::Untargeted { .. } => (own, best_other),
        Goal::Targeted { .. } => (best_other, own),
    };
    if high == low { 0.0 } else { high - low }
}

/// [`margin`] for an oracle's answer, refusing answers an attack cannot use: fewer than
/// two classes, a class index out of range, NaN scores.
pub fn checked_margin(goal: &Goal, scores: &[f32]) -> Result<f32, String> {
    let class = match *goal {
        Goal::Untargeted { true_class } => true_class,
        Goal::Targeted { target } => target,
    };
    if scores.len() < 2 {
        return Err(format!("the oracle returned {} score(s); an attack needs at least 2 classes", scores.len()));
    }
    if class >= scores.len() {
        return Err(format!("class {class} is out of range for an oracle with {} classes", scores.len()));
    }
    if scores.iter().any(|s| s.is_nan()) {
        return Err("the oracle returned a NaN score".to_string());
    }
    Ok(margin(goal, scores))
}

/// Log-softmax of logits (numerically stable): turns logits into log-probabilities.
/// For an oracle that only gives probabilities, take `p.ln()` instead.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return logits.to_vec();
    }
    let log_sum = logits.iter().map(|&z| (z - max).exp()).sum::<f32>().ln() + max;
    logits.iter().map(|&z| z - log_sum).collect()
}

/// L∞ and L2 distances between two equally long value vectors (images in [0, 1] units).
/// The squares are summed in f64: 150,528 values of a 224×224 image lose precision in f32.
pub fn distances(a: &[f32], b: &[f32]) -> (f32, f32) {
    let (mut linf, mut l2_squared) = (0.0f32, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = (x - y).abs();
        linf = linf.max(d);
        l2_squared += f64::from(d) * f64::from(d);
    }
    (linf, l2_squared.sqrt() as f32)
}

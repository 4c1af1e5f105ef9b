//! Adversarial attacks.
//!
//! Owns: the attacks (Square, NES, HopSkipJump, EOT, the OARS-style evasive adapter),
//! what they share (the [`Oracle`] they query,
//! the threat model [`Norm`], the [`Goal`], the margin loss, the search state, input
//! validation, [`AttackOutcome`]) and the errors they end with. Must not import:
//! `http`, the pipeline, the engine — an attack only sees an oracle.
//!
//! Attacks work in the model-input space ([`ModelImage`]: planar RGB in [0, 1], before
//! mean/std normalization) against a black-box [`Oracle`] that returns class scores.

use serde::{Deserialize, Serialize};

use crate::imaging::ModelImage;

pub mod eot;
pub mod gradient;
pub mod hsja;
pub mod nes;
pub mod oars;
pub mod pgd;
pub mod square;
pub mod surrogate;
#[cfg(test)]
pub(crate) mod testing;

/// Planar RGB.
pub(crate) const CHANNELS: usize = 3;

/// A black-box classifier: scores for a batch of images (model-input space, [0,1]).
/// Returns one score vector per image: LOG-probabilities or logits (the margin loss
/// only needs an order-preserving score; use log-softmax when the oracle gives probabilities).
pub trait Oracle {
    fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError>;

    /// How hard the attacked system pushes back, ≥ 1 (1: not at all). An adapter that
    /// evades a stateful detector ([`oars::Evasive`]) raises it after refusals; attacks
    /// that can (HopSkipJump) scale their probe and step sizes by it, so that their
    /// queries stop looking like near-duplicates of each other.
    fn pressure(&self) -> f32 {
        1.0
    }
}

/// Why an oracle gave no scores. The kinds matter to an attacker: an overloaded
/// service is worth asking again later; a refused query never is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OracleError {
    /// The attacked system had no capacity (503 overloaded); retrying later may work.
    #[error("the attacked system is overloaded: {0}")]
    Overloaded(String),
    /// The attacked system refused the query itself (bad image or parameters).
    #[error("the attacked system refused the query: {0}")]
    Refused(String),
    /// It could not be reached, failed, or answered something unusable.
    #[error("{0}")]
    Failed(String),
    /// A stateful detector refused the query as part of a query attack (429
    /// `query_attack_detected`): this client is refused for a cooldown.
    #[error("the attacked system detected a query attack: {0}")]
    Detected(String),
    /// The oracle's own request budget is spent (refused requests count too): the
    /// attack should stop and return what it has.
    #[error("query budget exhausted: {0}")]
    Exhausted(String),
}

/// Why an attack stopped without an outcome.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AttackError {
    /// The image or the configuration cannot be attacked as asked.
    #[error("invalid attack input: {0}")]
    Invalid(String),
    #[error(transparent)]
    Oracle(#[from] OracleError),
    /// The gradient server failed or could not be reached.
    #[error("gradients: {0}")]
    Gradient(String),
    /// The oracle answered, but not with scores an attack can use.
    #[error("unusable oracle answer: {0}")]
    BadAnswer(String),
}

/// The threat model: the perturbation's norm is at most ε.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    Linf,
    L2,
}

/// What an attack found.
#[derive(Debug, Clone, PartialEq)]
pub struct AttackOutcome {
    /// The best image found: clip(image + δ, 0, 1) with δ in the ε-ball.
    pub adversarial: ModelImage,
    /// The margin of `adversarial` is negative (the goal is reached).
    pub success: bool,
    /// Images the oracle was shown.
    pub queries: usize,
    /// Margin loss of `adversarial` (see [`margin`]). A decision-based attack
    /// (HopSkipJump) has no scores: there it is the distance reached minus ε in the
    /// attack's norm (negative on success; +∞ when no misclassified point was found).
    pub margin: f32,
    /// Measured ‖adversarial − image‖∞.
    pub linf: f32,
    /// Measured ‖adversarial − image‖₂.
    pub l2: f32,
    /// (queries so far, best margin) at the first query and whenever the margin improves.
    pub margin_history: Vec<(usize, f32)>,
}

/// Checks that `image` is a planar RGB image in [0, 1] and ε a positive radius.
pub fn validate(image: &ModelImage, epsilon: f32) -> Result<(), AttackError> {
    let invalid = |message: String| Err(AttackError::Invalid(message));
    if image.width == 0 || image.height == 0 {
        return invalid(format!("cannot attack an empty {}×{} image", image.width, image.height));
    }
    let expected = image.width.checked_mul(image.height).and_then(|n| n.checked_mul(CHANNELS));
    if expected != Some(image.data.len()) {
        return invalid(format!(
            "image data has {} values; a {}×{} planar RGB image has {}",
            image.data.len(),
            image.width,
            image.height,
            CHANNELS * image.width * image.height
        ));
    }
    if image.data.iter().any(|v| !(0.0..=1.0).contains(v)) {
        return invalid("image values must lie in [0, 1] (model-input space)".to_string());
    }
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return invalid(format!("epsilon must be positive and finite, got {epsilon}"));
    }
    Ok(())
}

/// The search state every attack keeps: the best image so far (lowest margin) and
/// the query bookkeeping, with the progress callback called after every query.
pub struct Search<'a> {
    oracle: &'a mut dyn Oracle,
    goal: &'a Goal,
    progress: &'a mut dyn FnMut(usize, f32),
    pub width: usize,
    pub height: usize,
    /// Images shown to the oracle.
    pub queries: usize,
    /// The best image so far (empty before the first offer).
    pub best: Vec<f32>,
    pub best_margin: f32,
    pub history: Vec<(usize, f32)>,
}

impl<'a> Search<'a> {
    /// A search on images of `like`'s size.
    pub fn new(
        oracle: &'a mut dyn Oracle,
        goal: &'a Goal,
        progress: &'a mut dyn FnMut(usize, f32),
        like: &ModelImage,
    ) -> Self {
        Search {
            oracle,
            goal,
            progress,
            width: like.width,
            height: like.height,
            queries: 0,
            best: Vec::new(),
            best_margin: f32::INFINITY,
            history: Vec::new(),
        }
    }

    /// The search goes on while the goal is not reached and queries remain.
    pub fn running(&self, max_queries: usize) -> bool {
        self.best_margin >= 0.0 && self.queries < max_queries
    }

    fn image(&self, data: Vec<f32>) -> ModelImage {
        ModelImage { width: self.width, height: self.height, data }
    }

    /// Shows `candidate` to the oracle (one query). It becomes the best image if it is
    /// the first one or its margin is strictly lower than the best so far. Returns its margin.
    pub fn offer(&mut self, candidate: Vec<f32>) -> Result<f32, AttackError> {
        let image = self.image(candidate);
        let margin = self.score(std::slice::from_ref(&image))?[0];
        if self.history.is_empty() || margin < self.best_margin {
            self.best = image.data;
            self.best_margin = margin;
            self.history.push((self.queries, margin));
        }
        (self.progress)(self.queries, self.best_margin);
        Ok(margin)
    }

    /// Margins of `images`, shown to the oracle in one call (one query per image),
    /// without touching the best image; `progress` is called once per image.
    pub fn margins(&mut self, images: &[ModelImage]) -> Result<Vec<f32>, AttackError> {
        let margins = self.score(images)?;
        let first = self.queries - images.len();
        for query in first + 1..=self.queries {
            (self.progress)(query, self.best_margin);
        }
        Ok(margins)
    }

    /// The oracle's margins of `images`, counted as queries.
    fn score(&mut self, images: &[ModelImage]) -> Result<Vec<f32>, AttackError> {
        let scores = self.oracle.scores(images)?;
        if scores.len() != images.len() {
            return Err(AttackError::BadAnswer(format!("{} score vectors for {} images", scores.len(), images.len())));
        }
        let margins = scores.iter().map(|s| checked_margin(self.goal, s)).collect::<Result<Vec<_>, _>>()?;
        self.queries += images.len();
        Ok(margins)
    }

    /// The outcome: the best image, its margin and distances to `original`.
    pub fn finish(self, original: &[f32]) -> AttackOutcome {
        let (linf, l2) = distances(&self.best, original);
        AttackOutcome {
            success: self.best_margin < 0.0,
            queries: self.queries,
            margin: self.best_margin,
            linf,
            l2,
            margin_history: self.history,
            adversarial: ModelImage { width: self.width, height: self.height, data: self.best },
        }
    }
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

/// Refuses answers an attack cannot read: fewer than two classes, `class` out of range,
/// a NaN score.
pub(crate) fn check_scores(scores: &[f32], class: usize) -> Result<(), AttackError> {
    let bad = |message: String| Err(AttackError::BadAnswer(message));
    if scores.len() < 2 {
        return bad(format!("the oracle returned {} score(s); an attack needs at least 2 classes", scores.len()));
    }
    if class >= scores.len() {
        return bad(format!("class {class} is out of range for an oracle with {} classes", scores.len()));
    }
    if scores.iter().any(|s| s.is_nan()) {
        return bad("the oracle returned a NaN score".to_string());
    }
    Ok(())
}

/// [`margin`] for an oracle's answer, refusing answers an attack cannot use
/// ([`check_scores`]).
pub fn checked_margin(goal: &Goal, scores: &[f32]) -> Result<f32, AttackError> {
    let class = match *goal {
        Goal::Untargeted { true_class } => true_class,
        Goal::Targeted { target } => target,
    };
    check_scores(scores, class)?;
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

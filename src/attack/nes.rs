//! NES (Ilyas, Engstrom, Athalye, Lin 2018, "Black-box Adversarial Attacks with Limited
//! Queries and Information"): projected gradient descent on the margin loss with the
//! gradient estimated from scores alone by Natural Evolution Strategies.
//!
//! Each step estimates ∇L(x) of the margin loss L ([`checked_margin`]) by antithetic
//! Gaussian sampling, u_i ~ N(0, I):
//!
//! g = Σ_{i=1}^{n/2} (L(x + σu_i) − L(x − σu_i)) u_i / (n σ),
//!
//! with the n perturbed points sent to the oracle as ONE batch (that is how the engine
//! and the server amortise queries). Then, with momentum m ← μ m + (1 − μ) g:
//! - L∞: x ← Π(x − η sign(m)), Π the projection onto the ε-ball around the original
//!   intersected with [0, 1] (a projected sign step);
//! - L2: x ← Π(x − η m/‖m‖₂), Π rescaling the perturbation onto the ball of radius ε,
//!   then clipping to [0, 1] (which only shrinks the perturbation).
//!
//! Evaluating the iterate: after each step the new iterate is shown to the oracle on its
//! own (one query, a second oracle call per step). Putting it into the next step's batch
//! would cost exactly as many queries and save a round trip, but the attack would only
//! learn that the goal is reached after paying for a whole batch of n samples it no
//! longer needs; evaluating alone stops at the query that succeeds, so `queries` is
//! the exact cost to success (comparable with the Square Attack's). A step therefore
//! costs n + 1 queries; the attack stops on success or when the next step would exceed
//! `max_queries`, and returns the best (lowest margin) iterate.
//!
//! The perturbed points x ± σu are clipped to [0, 1] (the oracle's domain) but not
//! projected onto the ε-ball: they only probe the loss, they are never returned, and
//! projecting them would erase the gradient along coordinates that sit on the ball's
//! boundary (most of them, after a few L∞ steps). Everything runs in model-input space
//! (planar RGB in [0, 1]); every image shown to the oracle is one query.

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand_distr::{Distribution, StandardNormal};

use super::{AttackError, AttackOutcome, Goal, Norm, Oracle, Search, validate};
use crate::imaging::ModelImage;

/// Default number of perturbed images per step (25 antithetic pairs), as in the paper.
pub const DEFAULT_SAMPLES_PER_STEP: usize = 50;

/// Default finite-difference scale in [0, 1] units, as in the paper (ImageNet, σ = 0.001).
pub const DEFAULT_SIGMA: f32 = 0.001;

/// Default momentum μ.
pub const DEFAULT_MOMENTUM: f32 = 0.9;

#[derive(Debug, Clone, PartialEq)]
pub struct NesConfig {
    pub norm: Norm,
    /// Radius of the ball in model-input units ([0, 1] per channel value).
    pub epsilon: f32,
    /// Total oracle images: the evaluation of the original, the samples and the iterates.
    pub max_queries: usize,
    /// Perturbed images per gradient estimate: n/2 antithetic pairs, so n must be even
    /// and at least 2 ([`DEFAULT_SAMPLES_PER_STEP`]).
    pub samples_per_step: usize,
    /// Finite-difference scale σ in [0, 1] units ([`DEFAULT_SIGMA`]).
    pub sigma: f32,
    /// Step size η: the L∞ change of every value per step (sign step) or the L2 length
    /// of a step ([`NesConfig::default_learning_rate`]).
    pub learning_rate: f32,
    /// Momentum μ in [0, 1) ([`DEFAULT_MOMENTUM`]; 0 uses the fresh estimate only).
    pub momentum: f32,
    pub seed: u64,
}

impl NesConfig {
    /// A configuration with the defaults: 50 samples per step, σ = 0.001, μ = 0.9 and
    /// η from [`NesConfig::default_learning_rate`].
    pub fn new(norm: Norm, epsilon: f32, max_queries: usize, seed: u64) -> Self {
        Self {
            norm,
            epsilon,
            max_queries,
            samples_per_step: DEFAULT_SAMPLES_PER_STEP,
            sigma: DEFAULT_SIGMA,
            learning_rate: Self::default_learning_rate(norm, epsilon),
            momentum: DEFAULT_MOMENTUM,
            seed,
        }
    }

    /// ε/4 for both norms: four consistent steps cross the ball (from the centre to a
    /// face for L∞, to the sphere for L2), so the boundary, where a linear-ish loss is
    /// lowest, is reached after a handful of steps, while a sign flipped by a noisy
    /// estimate only moves a value by a quarter of the radius. The paper used ε/5
    /// (η = 0.01 at ε = 0.05); larger steps oscillate around the boundary, smaller ones
    /// spend more queries getting there (see the tests).
    pub fn default_learning_rate(norm: Norm, epsilon: f32) -> f32 {
        match norm {
            Norm::Linf | Norm::L2 => epsilon / 4.0,
        }
    }
}

/// Runs NES on `image` until the goal is reached (margin < 0) or the next step would
/// exceed `config.max_queries` images. `progress(queries, best_margin)` is called after
/// every query (for a batch, once per image when the batch returns). Deterministic for a
/// given seed (and a deterministic oracle).
pub fn nes_attack(
    oracle: &mut dyn Oracle,
    image: &ModelImage,
    goal: &Goal,
    config: &NesConfig,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<AttackOutcome, AttackError> {
    validate(image, config.epsilon)?;
    check(config)?;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
    let original = &image.data;
    let mut search = Search::new(oracle, goal, progress, image);

    let mut x = original.clone();
    search.offer(x.clone())?;
    let step_cost = config.samples_per_step + 1;
    let mut momentum = vec![0.0f32; x.len()];
    while search.best_margin >= 0.0 && search.queries + step_cost <= config.max_queries {
        let gradient = estimate_gradient(&mut search, &x, config.samples_per_step / 2, config.sigma, &mut rng)?;
        for (m, g) in momentum.iter_mut().zip(&gradient) {
            *m = config.momentum * *m + (1.0 - config.momentum) * g;
        }
        match config.norm {
            Norm::Linf => linf_step(&mut x, original, &momentum, config.learning_rate, config.epsilon),
            Norm::L2 => l2_step(&mut x, original, &momentum, config.learning_rate, config.epsilon),
        }
        search.offer(x.clone())?;
    }
    Ok(search.finish(original))
}

fn check(config: &NesConfig) -> Result<(), AttackError> {
    let invalid = |message: String| Err(AttackError::Invalid(message));
    if config.max_queries == 0 {
        return invalid("max_queries must be at least 1 (the original is evaluated first)".to_string());
    }
    if config.samples_per_step < 2 || config.samples_per_step % 2 != 0 {
        return invalid(format!(
            "samples_per_step must be even and at least 2 (antithetic pairs), got {}",
            config.samples_per_step
        ));
    }
    if !(config.sigma.is_finite() && config.sigma > 0.0) {
        return invalid(format!("sigma must be positive and finite, got {}", config.sigma));
    }
    if !(config.learning_rate.is_finite() && config.learning_rate > 0.0) {
        return invalid(format!("learning_rate must be positive and finite, got {}", config.learning_rate));
    }
    if !(0.0..1.0).contains(&config.momentum) {
        return invalid(format!("momentum must lie in [0, 1), got {}", config.momentum));
    }
    Ok(())
}

/// The antithetic NES estimate of ∇L at `x` from `pairs` Gaussian directions, the 2·pairs
/// points x ± σu (clipped to [0, 1]) queried in one batch. A pair whose difference is
/// not finite (infinite log-probabilities on both sides) contributes nothing.
fn estimate_gradient(
    search: &mut Search<'_>,
    x: &[f32],
    pairs: usize,
    sigma: f32,
    rng: &mut Xoshiro256PlusPlus,
) -> Result<Vec<f32>, AttackError> {
    let d = x.len();
    let directions: Vec<f32> = (0..pairs * d).map(|_| StandardNormal.sample(rng)).collect();
    let (width, height) = (search.width, search.height);
    let batch: Vec<ModelImage> = directions
        .chunks(d)
        .flat_map(|u| {
            [sigma, -sigma].map(|s| ModelImage {
                width,
                height,
                data: x.iter().zip(u).map(|(&xk, &uk)| (xk + s * uk).clamp(0.0, 1.0)).collect(),
            })
        })
        .collect();
    let margins = search.margins(&batch)?;

    let mut gradient = vec![0.0f32; d];
    for (u, pair) in directions.chunks(d).zip(margins.chunks(2)) {
        let difference = pair[0] - pair[1];
        if !difference.is_finite() {
            continue;
        }
        for (g, &uk) in gradient.iter_mut().zip(u) {
            *g += difference * uk;
        }
    }
    let scale = 1.0 / (2 * pairs) as f32 / sigma;
    gradient.iter_mut().for_each(|g| *g *= scale);
    Ok(gradient)
}

/// x ← clip(x − η sign(m), max(x₀ − ε, 0), min(x₀ + ε, 1)); a zero component stays put.
fn linf_step(x: &mut [f32], original: &[f32], momentum: &[f32], eta: f32, eps: f32) {
    for ((xk, &ok), &mk) in x.iter_mut().zip(original).zip(momentum) {
        let sign = if mk > 0.0 {
            1.0
        } else if mk < 0.0 {
            -1.0
        } else {
            0.0
        };
        let low = (ok - eps).max(0.0);
        let high = (ok + eps).min(1.0);
        *xk = (*xk - eta * sign).clamp(low, high);
    }
}

/// x ← clip(x₀ + Π_ε(x − η m/‖m‖₂ − x₀), 0, 1), Π_ε rescaling a perturbation longer than
/// ε onto the sphere; clipping only shrinks each |δ_k|, so the result stays in the ball.
/// A zero momentum leaves x unchanged.
fn l2_step(x: &mut [f32], original: &[f32], momentum: &[f32], eta: f32, eps: f32) {
    let m_norm = momentum.iter().map(|&m| f64::from(m) * f64::from(m)).sum::<f64>().sqrt();
    if m_norm == 0.0 {
        return;
    }
    let step = f64::from(eta) / m_norm;
    let delta: Vec<f64> = x
        .iter()
        .zip(original)
        .zip(momentum)
        .map(|((&xk, &ok), &mk)| f64::from(xk) - step * f64::from(mk) - f64::from(ok))
        .collect();
    let delta_norm = delta.iter().map(|d| d * d).sum::<f64>().sqrt();
    let shrink = if delta_norm > f64::from(eps) { f64::from(eps) / delta_norm } else { 1.0 };
    for ((xk, &ok), dk) in x.iter_mut().zip(original).zip(delta) {
        *xk = (f64::from(ok) + dk * shrink).clamp(0.0, 1.0) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::testing::{CLASSES, DIM, Linear, SIDE, input_for};
    use crate::attack::{OracleError, margin};

    fn input(seed: u64) -> (ModelImage, usize) {
        input_for(&Linear::new(1), seed)
    }

    fn run(oracle: &mut Linear, image: &ModelImage, goal: &Goal, config: &NesConfig) -> AttackOutcome {
        nes_attack(oracle, image, goal, config, &mut |_, _| {}).unwrap()
    }

    fn assert_in_box(image: &ModelImage) {
        assert!(image.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    fn distances(a: &ModelImage, b: &ModelImage) -> (f32, f32) {
        let linf = a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        let l2 = a.data.iter().zip(&b.data).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
        (linf, l2)
    }

    #[test]
    fn the_estimate_points_along_the_true_gradient() {
        let (image, y) = input(3);
        let goal = Goal::Untargeted { true_class: y };
        let mut oracle = Linear::new(1);
        let logits = oracle.logits(&image.data);
        // The margin's gradient at x: w_y − w_k for the runner-up k.
        let k = (0..CLASSES).filter(|&k| k != y).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
        let truth: Vec<f32> = oracle.weights[y].iter().zip(&oracle.weights[k]).map(|(a, b)| a - b).collect();
        let cosine = |g: &[f32]| {
            let dot: f32 = g.iter().zip(&truth).map(|(a, b)| a * b).sum();
            let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
            dot / (norm(g) * norm(&truth))
        };
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(4);
        let mut progress = |_, _| {};
        let mut search = Search {
            oracle: &mut oracle,
            goal: &goal,
            progress: &mut progress,
            width: SIDE,
            height: SIDE,
            queries: 0,
            best: Vec::new(),
            best_margin: f32::INFINITY,
            history: Vec::new(),
        };
        // For a linear loss E[g] = ∇L and the cosine grows like √(n / (n + d)).
        let few = estimate_gradient(&mut search, &image.data, 25, 0.001, &mut rng).unwrap();
        let many = estimate_gradient(&mut search, &image.data, 1000, 0.001, &mut rng).unwrap();
        assert_eq!(search.queries, 2050);
        let (few, many) = (cosine(&few), cosine(&many));
        assert!(few > 0.1 && many > 0.75 && many > few, "cosines {few} (n = 50), {many} (n = 2000)");
        // The scale is that of the gradient: |E[g]| = |∇L|, not off by 2 or σ.
        let long = estimate_gradient(&mut search, &image.data, 20_000, 0.001, &mut rng).unwrap();
        let ratio: f32 =
            long.iter().zip(&truth).map(|(a, b)| a * b).sum::<f32>() / truth.iter().map(|b| b * b).sum::<f32>();
        assert!((ratio - 1.0).abs() < 0.1, "projection ratio {ratio}");
        assert_eq!(oracle.batches, vec![50, 2000, 40_000]);
    }

    #[test]
    fn untargeted_linf_succeeds_inside_the_ball() {
        let (image, y) = input(3);
        let mut oracle = Linear::new(1);
        let eps_star = oracle.min_epsilon(&image.data, y, Norm::Linf);
        assert!(eps_star > 0.0 && 1.5 * eps_star < 0.3, "ε* = {eps_star}");
        let config = NesConfig::new(Norm::Linf, 1.5 * eps_star, 10_000, 7);
        let goal = Goal::Untargeted { true_class: y };
        let mut calls = Vec::new();
        let outcome = nes_attack(&mut oracle, &image, &goal, &config, &mut |q, m| calls.push((q, m))).unwrap();

        assert!(outcome.success && outcome.margin < 0.0, "margin {} after {}", outcome.margin, outcome.queries);
        assert!(outcome.queries < config.max_queries);
        assert_eq!(outcome.queries, oracle.seen);
        assert_ne!(oracle.predict(&outcome.adversarial.data), y);
        assert_eq!(margin(&goal, &oracle.logits(&outcome.adversarial.data)), outcome.margin);
        assert_in_box(&outcome.adversarial);
        let (linf, l2) = distances(&outcome.adversarial, &image);
        assert!(linf <= config.epsilon + 1e-6, "‖δ‖∞ = {linf} > ε = {}", config.epsilon);
        assert_eq!(outcome.linf, linf);
        assert!((outcome.l2 - l2).abs() < 1e-4);
        // One batch of 50 samples per step, each followed by the new iterate alone.
        let steps = (outcome.queries - 1) / 51;
        assert_eq!(outcome.queries, 1 + 51 * steps);
        let mut expected = vec![1];
        (0..steps).for_each(|_| expected.extend([50, 1]));
        assert_eq!(oracle.batches, expected);
        // progress after every query, with the best margin (non-increasing).
        assert_eq!(calls.len(), outcome.queries);
        assert!(calls.iter().enumerate().all(|(i, &(q, _))| q == i + 1));
        assert!(calls.windows(2).all(|w| w[1].1 <= w[0].1));
        assert_eq!(calls.last().copied(), Some((outcome.queries, outcome.margin)));
        // History: strictly improving, at iterate evaluations, ending at the returned margin.
        let history = &outcome.margin_history;
        assert_eq!(history[0].0, 1);
        assert!(history.iter().all(|&(q, _)| (q - 1) % 51 == 0));
        assert!(history.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 < w[0].1));
        assert_eq!(history.last().copied(), Some((outcome.queries, outcome.margin)));
    }

    #[test]
    fn linf_below_the_minimal_epsilon_cannot_succeed() {
        let (image, y) = input(3);
        let mut oracle = Linear::new(1);
        let eps_star = oracle.min_epsilon(&image.data, y, Norm::Linf);
        let config = NesConfig::new(Norm::Linf, 0.5 * eps_star, 1000, 7);
        let outcome = run(&mut oracle, &image, &Goal::Untargeted { true_class: y }, &config);
        assert!(!outcome.success && outcome.margin >= 0.0);
        // 1 + 19 steps of 51: a 20th step would exceed the budget.
        assert_eq!((outcome.queries, oracle.seen), (970, 970));
        assert_eq!(oracle.predict(&outcome.adversarial.data), y);
        assert!(outcome.linf <= config.epsilon + 1e-6);
        // The attack still made progress: the margin went down.
        let clean = margin(&Goal::Untargeted { true_class: y }, &oracle.logits(&image.data));
        assert!(outcome.margin < 0.8 * clean, "margin {} from {clean}", outcome.margin);
    }

    #[test]
    fn targeted_linf_reaches_the_target() {
        let (image, y) = input(3);
        let mut oracle = Linear::new(1);
        let target = (y + 1) % CLASSES;
        let eps = oracle.targeted_linf_epsilon(&image.data, y, target);

        let config = NesConfig::new(Norm::Linf, eps, 10_000, 11);
        let goal = Goal::Targeted { target };
        let outcome = run(&mut oracle, &image, &goal, &config);
        assert!(outcome.success, "margin {} after {}", outcome.margin, outcome.queries);
        assert_eq!(oracle.predict(&outcome.adversarial.data), target);
        assert_eq!(outcome.queries, oracle.seen);
        assert!(outcome.linf <= eps + 1e-6);
        assert_in_box(&outcome.adversarial);
    }

    #[test]
    fn untargeted_l2_succeeds_inside_the_ball() {
        let (image, y) = input(3);
        let mut oracle = Linear::new(1);
        let eps_star = oracle.min_epsilon(&image.data, y, Norm::L2);
        let eps = 2.0 * eps_star;
        let config = NesConfig::new(Norm::L2, eps, 10_000, 5);
        let outcome = run(&mut oracle, &image, &Goal::Untargeted { true_class: y }, &config);
        assert!(outcome.success, "margin {} after {}", outcome.margin, outcome.queries);
        assert_ne!(oracle.predict(&outcome.adversarial.data), y);
        assert_eq!(outcome.queries, oracle.seen);
        assert_in_box(&outcome.adversarial);
        let (_, l2) = distances(&outcome.adversarial, &image);
        assert!(l2 <= eps + 1e-4, "‖δ‖₂ = {l2} > ε = {eps}");
        assert!((outcome.l2 - l2).abs() < 1e-4);
        // Below ε* it cannot succeed, and stays in the ball.
        let config = NesConfig::new(Norm::L2, 0.5 * eps_star, 1000, 5);
        let outcome = run(&mut Linear::new(1), &image, &Goal::Untargeted { true_class: y }, &config);
        assert!(!outcome.success && outcome.l2 <= 0.5 * eps_star + 1e-4);
    }

    #[test]
    fn l2_stays_in_the_ball_when_clipping_bites() {
        // Values at the bounds: clipping cuts most of δ; the result must stay in the ball.
        let data: Vec<f32> = (0..DIM).map(|k| [0.0, 1.0, 0.5][k % 3]).collect();
        let image = ModelImage { width: SIDE, height: SIDE, data };
        let mut oracle = Linear::new(1);
        let y = oracle.predict(&image.data);
        let config = NesConfig::new(Norm::L2, 2.0, 520, 9);
        let outcome = run(&mut oracle, &image, &Goal::Untargeted { true_class: y }, &config);
        assert_in_box(&outcome.adversarial);
        assert!(outcome.l2 <= 2.0 + 1e-4 && outcome.l2 > 0.0, "‖δ‖₂ = {}", outcome.l2);
        assert_eq!(outcome.queries, oracle.seen);
    }

    #[test]
    fn same_seed_same_outcome_different_seed_differs() {
        let (image, y) = input(3);
        let goal = Goal::Untargeted { true_class: y };
        for norm in [Norm::Linf, Norm::L2] {
            let eps = 1.5 * Linear::new(1).min_epsilon(&image.data, y, norm);
            let attack = |seed| run(&mut Linear::new(1), &image, &goal, &NesConfig::new(norm, eps, 3000, seed));
            let (a, b, c) = (attack(1), attack(1), attack(2));
            assert_eq!(a, b);
            assert!(a.queries != c.queries || a.adversarial != c.adversarial);
        }
    }

    #[test]
    fn an_input_already_misclassified_costs_one_query() {
        let (image, y) = input(3);
        let other = (y + 1) % CLASSES;
        let mut oracle = Linear::new(1);
        let config = NesConfig::new(Norm::Linf, 0.05, 1000, 0);
        let outcome = run(&mut oracle, &image, &Goal::Untargeted { true_class: other }, &config);
        assert!(outcome.success && outcome.queries == 1 && outcome.adversarial == image);
        assert_eq!((outcome.linf, outcome.l2), (0.0, 0.0));
    }

    #[test]
    fn oracle_errors_and_bad_arguments_are_reported() {
        struct Failing;
        impl Oracle for Failing {
            fn scores(&mut self, _: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
                Err(OracleError::Failed("model offline".to_string()))
            }
        }
        /// Answers the first image only, however many it is shown.
        struct Short(Linear);
        impl Oracle for Short {
            fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
                Ok(vec![self.0.logits(&images[0].data)])
            }
        }
        let (image, y) = input(3);
        let goal = Goal::Untargeted { true_class: y };
        let config = NesConfig::new(Norm::Linf, 0.05, 1000, 0);
        let err = nes_attack(&mut Failing, &image, &goal, &config, &mut |_, _| {}).unwrap_err();
        assert_eq!(err, AttackError::Oracle(OracleError::Failed("model offline".into())));
        let err = nes_attack(&mut Short(Linear::new(1)), &image, &goal, &config, &mut |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("1 score vectors for 50 images"), "{err}");

        let bad = |config: NesConfig| nes_attack(&mut Linear::new(1), &image, &goal, &config, &mut |_, _| {});
        assert!(bad(config.clone()).is_ok());
        assert!(bad(NesConfig { epsilon: 0.0, ..config.clone() }).is_err());
        assert!(bad(NesConfig { epsilon: f32::NAN, ..config.clone() }).is_err());
        assert!(bad(NesConfig { max_queries: 0, ..config.clone() }).is_err());
        assert!(bad(NesConfig { samples_per_step: 0, ..config.clone() }).is_err());
        assert!(bad(NesConfig { samples_per_step: 7, ..config.clone() }).is_err());
        assert!(bad(NesConfig { sigma: 0.0, ..config.clone() }).is_err());
        assert!(bad(NesConfig { learning_rate: -1.0, ..config.clone() }).is_err());
        assert!(bad(NesConfig { momentum: 1.0, ..config.clone() }).is_err());
        let mut oracle = Linear::new(1);
        let short = ModelImage { width: SIDE, height: SIDE, data: vec![0.5; 10] };
        assert!(nes_attack(&mut oracle, &short, &goal, &config, &mut |_, _| {}).is_err());
        let outside = ModelImage { width: SIDE, height: SIDE, data: vec![1.5; DIM] };
        assert!(nes_attack(&mut oracle, &outside, &goal, &config, &mut |_, _| {}).is_err());
        let target = Goal::Targeted { target: CLASSES };
        assert!(nes_attack(&mut oracle, &image, &target, &config, &mut |_, _| {}).is_err());
    }
}

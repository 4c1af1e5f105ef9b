//! HopSkipJumpAttack (Chen, Jordan & Wainwright 2020, "HopSkipJumpAttack: A
//! Query-Efficient Decision-Based Attack"): an untargeted attack that sees only the
//! oracle's top-1 decision, never its scores.
//!
//! The attack walks along the decision boundary toward the original image x₀:
//! 1. **Start**: uniform random noise images until one is misclassified, then a binary
//!    search on the blend (1 − α)x₀ + α·noise for the smallest α that still is.
//! 2. **Binary search to the boundary** between x₀ and the current adversarial point
//!    (L2: on the blend; L∞: on the radius α of the box x₀ + clip(x − x₀, −α, α)), down
//!    to the paper's threshold θ = γ/d^{3/2} (L2) or γ/d² (L∞).
//! 3. **Gradient direction at the boundary point** x_b from n_t random unit directions
//!    u_b (Gaussian for L2, uniform for L∞), φ_b = +1 when x_b + δ_t u_b is
//!    misclassified, −1 otherwise, with the mean φ as a baseline:
//!    ĝ = Σ (φ_b − φ̄) u_b / n_t, and n_t = min(n₀√t, n_max) (the paper's schedule,
//!    n₀ = 100, n_max = 10,000); δ_t = √d·θ·‖x_b − x₀‖₂ (L2) or d·θ·‖x_b − x₀‖∞ (L∞),
//!    and 0.1 at the first iteration (no distance scale yet).
//! 4. **Geometric step search**: ξ = ‖x_b − x₀‖/√t, halved until x_b + ξ·v is still
//!    misclassified, with v = ĝ/‖ĝ‖₂ (L2) or sign(ĝ) (L∞); then back to step 2.
//!
//! Every image shown to the oracle is one query; the n_t gradient probes of a step go in
//! batches. The search stops when the budget would be exceeded, or (by default) as soon
//! as the boundary point is within ε of x₀, which is success: that point was answered
//! misclassified. The [`AttackOutcome`] of this attack has no margin loss (there are no
//! scores): its `margin` is the distance reached minus ε in the chosen norm (negative on
//! success) and `margin_history` records that value whenever the distance improves.

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use super::{AttackError, AttackOutcome, Goal, Norm, Oracle, OracleError, distances, validate};
use crate::imaging::ModelImage;

/// The paper's first sample count n₀ of the gradient estimate.
pub const DEFAULT_INIT_EVALS: usize = 100;
/// The paper's cap n_max on the gradient estimate's samples.
pub const DEFAULT_MAX_EVALS: usize = 10_000;
/// Random noise images tried for the start (ART and foolbox use 100).
pub const DEFAULT_INIT_TRIES: usize = 100;
/// Probe images per oracle call: the estimate at 224×224 with n_max samples would
/// otherwise hold 6 GB of directions at once.
const PROBE_CHUNK: usize = 100;

#[derive(Debug, Clone, PartialEq)]
pub struct HsjaConfig {
    pub norm: Norm,
    /// The radius that counts as success ([0, 1] units in `norm`).
    pub epsilon: f32,
    /// Images the oracle may be shown, in all.
    pub max_queries: usize,
    /// n₀ ([`DEFAULT_INIT_EVALS`]).
    pub init_evals: usize,
    /// n_max ([`DEFAULT_MAX_EVALS`]).
    pub max_evals: usize,
    /// Noise images tried for the start ([`DEFAULT_INIT_TRIES`]).
    pub init_tries: usize,
    /// γ of the binary-search threshold θ (the paper's 1.0).
    pub gamma: f32,
    /// Stop once within ε (true) or spend the whole budget shrinking the distance.
    pub stop_at_epsilon: bool,
    pub seed: u64,
}

impl HsjaConfig {
    pub fn new(norm: Norm, epsilon: f32, max_queries: usize, seed: u64) -> Self {
        Self {
            norm,
            epsilon,
            max_queries,
            init_evals: DEFAULT_INIT_EVALS,
            max_evals: DEFAULT_MAX_EVALS,
            init_tries: DEFAULT_INIT_TRIES,
            gamma: 1.0,
            stop_at_epsilon: true,
            seed,
        }
    }
}

fn check(config: &HsjaConfig, goal: &Goal) -> Result<usize, AttackError> {
    let invalid = |message: String| Err(AttackError::Invalid(message));
    let Goal::Untargeted { true_class } = *goal else {
        return invalid("HopSkipJump is implemented for untargeted attacks only".to_string());
    };
    if config.max_queries == 0 {
        return invalid("max_queries must be at least 1".to_string());
    }
    if config.init_evals == 0 || config.max_evals < config.init_evals {
        return invalid(format!(
            "init_evals must be at least 1 and at most max_evals, got {} and {}",
            config.init_evals, config.max_evals
        ));
    }
    if config.init_tries == 0 {
        return invalid("init_tries must be at least 1".to_string());
    }
    if !(config.gamma.is_finite() && config.gamma > 0.0) {
        return invalid(format!("gamma must be positive and finite, got {}", config.gamma));
    }
    Ok(true_class)
}

/// Why the search stopped early: the budget (return the best point) or an error.
enum Halt {
    Budget,
    Error(AttackError),
}

impl From<AttackError> for Halt {
    fn from(error: AttackError) -> Self {
        Halt::Error(error)
    }
}

/// The oracle reduced to its top-1 decision, with the query count and the budget.
struct Decisions<'a> {
    oracle: &'a mut dyn Oracle,
    progress: &'a mut dyn FnMut(usize, f32),
    true_class: usize,
    width: usize,
    height: usize,
    queries: usize,
    max_queries: usize,
    /// What progress reports: best distance − ε (∞ before the first adversarial point).
    best_margin: f32,
}

impl Decisions<'_> {
    fn remaining(&self) -> usize {
        self.max_queries - self.queries
    }

    /// Whether each image is misclassified. Sends nothing and halts when the batch does
    /// not fit in the budget; an oracle that ran out of requests also ends the search
    /// with its best point.
    fn adversarial(&mut self, batch: Vec<Vec<f32>>) -> Result<Vec<bool>, Halt> {
        if batch.len() > self.remaining() || batch.is_empty() {
            return Err(Halt::Budget);
        }
        let images: Vec<ModelImage> =
            batch.into_iter().map(|data| ModelImage { width: self.width, height: self.height, data }).collect();
        let scores = match self.oracle.scores(&images) {
            Ok(scores) => scores,
            Err(OracleError::Exhausted(_)) => return Err(Halt::Budget),
            Err(e) => return Err(AttackError::Oracle(e).into()),
        };
        if scores.len() != images.len() {
            let message = format!("{} score vectors for {} images", scores.len(), images.len());
            return Err(AttackError::BadAnswer(message).into());
        }
        let mut answers = Vec::with_capacity(images.len());
        for s in &scores {
            answers.push(top1(s, self.true_class)? != self.true_class);
            self.queries += 1;
            (self.progress)(self.queries, self.best_margin);
        }
        Ok(answers)
    }

    fn is_adversarial(&mut self, image: Vec<f32>) -> Result<bool, Halt> {
        Ok(self.adversarial(vec![image])?[0])
    }
}

/// The oracle's decision: the index of the highest score (the first one on a tie).
/// Answers an attack cannot read (fewer than two classes, the true class out of range,
/// NaN) are refused.
fn top1(scores: &[f32], true_class: usize) -> Result<usize, AttackError> {
    super::check_scores(scores, true_class)?;
    let mut best = 0;
    for (k, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = k;
        }
    }
    Ok(best)
}

/// ‖a − b‖ in `norm`.
fn distance(norm: Norm, a: &[f32], b: &[f32]) -> f32 {
    let (linf, l2) = distances(a, b);
    match norm {
        Norm::Linf => linf,
        Norm::L2 => l2,
    }
}

/// The point at `alpha` between x₀ and x: the blend (L2) or the box of radius α (L∞).
fn project(norm: Norm, original: &[f32], x: &[f32], alpha: f32) -> Vec<f32> {
    match norm {
        Norm::L2 => original.iter().zip(x).map(|(&o, &v)| (1.0 - alpha) * o + alpha * v).collect(),
        Norm::Linf => original.iter().zip(x).map(|(&o, &v)| o + (v - o).clamp(-alpha, alpha)).collect(),
    }
}

/// Runs HopSkipJump on `image` (untargeted only). `progress(queries, distance − ε)` is
/// called after every query. Deterministic for a given seed and a deterministic oracle.
pub fn hsja_attack(
    oracle: &mut dyn Oracle,
    image: &ModelImage,
    goal: &Goal,
    config: &HsjaConfig,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<AttackOutcome, AttackError> {
    validate(image, config.epsilon)?;
    let true_class = check(config, goal)?;
    let mut decisions = Decisions {
        oracle,
        progress,
        true_class,
        width: image.width,
        height: image.height,
        queries: 0,
        max_queries: config.max_queries,
        best_margin: f32::INFINITY,
    };
    let mut state = State { best: None, history: Vec::new() };
    match search(&mut decisions, &image.data, config, &mut state) {
        Ok(()) | Err(Halt::Budget) => {}
        Err(Halt::Error(e)) => return Err(e),
    }
    let original = &image.data;
    let (adversarial, distance_reached) = state.best.unwrap_or_else(|| (original.clone(), f32::INFINITY));
    let (linf, l2) = distances(&adversarial, original);
    let margin = distance_reached - config.epsilon;
    Ok(AttackOutcome {
        adversarial: ModelImage { width: image.width, height: image.height, data: adversarial },
        success: margin <= 0.0,
        queries: decisions.queries,
        margin,
        linf,
        l2,
        margin_history: state.history,
    })
}

/// The best (closest) misclassified point so far and the history of its distance − ε.
struct State {
    best: Option<(Vec<f32>, f32)>,
    history: Vec<(usize, f32)>,
}

impl State {
    /// Keeps `point` (answered misclassified) when it is the closest so far.
    fn offer(&mut self, decisions: &mut Decisions<'_>, point: &[f32], dist: f32, epsilon: f32) {
        if self.best.as_ref().is_none_or(|(_, d)| dist < *d) {
            self.best = Some((point.to_vec(), dist));
            decisions.best_margin = dist - epsilon;
            self.history.push((decisions.queries, dist - epsilon));
        }
    }
}

fn search(decisions: &mut Decisions<'_>, original: &[f32], config: &HsjaConfig, state: &mut State) -> Result<(), Halt> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
    let d = original.len() as f32;
    let theta = match config.norm {
        Norm::L2 => config.gamma / d.powf(1.5),
        Norm::Linf => config.gamma / (d * d),
    };
    let eps = config.epsilon;
    let done = |dist: f32| config.stop_at_epsilon && dist <= eps;

    let Some(noise) = initial_noise(decisions, original, config.init_tries, &mut rng)? else {
        return Ok(());
    };
    state.offer(decisions, &noise, distance(config.norm, &noise, original), eps);
    // The start: the closest blend of x₀ and the noise that is still misclassified (a
    // coarse search, as in the reference implementations; the boundary search refines it).
    let (mut low, mut high) = (0.0f32, 1.0f32);
    while high - low > 0.001 {
        let mid = 0.5 * (low + high);
        let blend = project(Norm::L2, original, &noise, mid);
        if decisions.is_adversarial(blend)? {
            high = mid;
        } else {
            low = mid;
        }
    }
    let mut current = project(Norm::L2, original, &noise, high);
    if high < 1.0 {
        state.offer(decisions, &current, distance(config.norm, &current, original), eps);
    }
    current = boundary(decisions, original, current, config.norm, theta)?;
    let mut dist = distance(config.norm, &current, original);
    state.offer(decisions, &current, dist, eps);

    let mut t = 1usize;
    while !done(dist) {
        // An evasive oracle that was refused asks for larger probes and steps, so that
        // queries stop being near-duplicates of each other (OARS); 1 otherwise.
        let pressure = decisions.oracle.pressure().max(1.0);
        let delta = pressure
            * if t == 1 {
                0.1
            } else {
                match config.norm {
                    Norm::L2 => d.sqrt() * theta * dist,
                    Norm::Linf => d * theta * dist,
                }
            };
        let samples = ((config.init_evals as f64 * (t as f64).sqrt()) as usize).min(config.max_evals);
        // A smaller estimate with what is left beats stopping with unused queries; two
        // probes are the least that can disagree.
        let samples = samples.min(decisions.remaining().saturating_sub(1));
        if samples < 2 {
            return Err(Halt::Budget);
        }
        let gradient = estimate_gradient(decisions, &current, config.norm, delta, samples, &mut rng)?;
        let direction = match config.norm {
            Norm::L2 => {
                let n = gradient.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>().sqrt();
                if n == 0.0 {
                    // Every probe gave the same answer and their mean is zero: try again.
                    t += 1;
                    continue;
                }
                gradient.iter().map(|&g| (f64::from(g) / n) as f32).collect::<Vec<_>>()
            }
            Norm::Linf => gradient.iter().map(|&g| super::pgd::sign(g)).collect(),
        };
        // Geometric step search: start at dist/√t, halve until still misclassified. A
        // step too small to change the point (below f32 resolution) gives up on this
        // direction and keeps the current point.
        let mut step = pressure * dist / (t as f32).sqrt();
        let stepped = loop {
            let candidate: Vec<f32> =
                current.iter().zip(&direction).map(|(&x, &v)| (x + step * v).clamp(0.0, 1.0)).collect();
            if decisions.is_adversarial(candidate.clone())? {
                break Some(candidate);
            }
            step /= 2.0;
            if step < 1e-7 {
                break None;
            }
        };
        if let Some(candidate) = stepped {
            current = boundary(decisions, original, candidate, config.norm, theta)?;
            dist = distance(config.norm, &current, original);
            state.offer(decisions, &current, dist, eps);
        }
        t += 1;
    }
    Ok(())
}

/// Uniform noise images, one query each, until one is misclassified.
fn initial_noise(
    decisions: &mut Decisions<'_>,
    original: &[f32],
    tries: usize,
    rng: &mut Xoshiro256PlusPlus,
) -> Result<Option<Vec<f32>>, Halt> {
    for _ in 0..tries {
        let noise: Vec<f32> = (0..original.len()).map(|_| rng.random_range(0.0f32..=1.0)).collect();
        if decisions.is_adversarial(noise.clone())? {
            return Ok(Some(noise));
        }
    }
    Ok(None)
}

/// Binary search between x₀ (correct) and `adversarial` (misclassified) for the boundary;
/// returns the misclassified end. Stops at the threshold θ (L∞: θ times the radius when
/// that is below 1, as the reference implementation does).
fn boundary(
    decisions: &mut Decisions<'_>,
    original: &[f32],
    adversarial: Vec<f32>,
    norm: Norm,
    theta: f32,
) -> Result<Vec<f32>, Halt> {
    let (mut low, mut high, threshold) = match norm {
        Norm::L2 => (0.0f32, 1.0f32, theta),
        Norm::Linf => {
            let radius = distance(Norm::Linf, &adversarial, original);
            (0.0, radius, theta * radius.min(1.0))
        }
    };
    let mut best = adversarial.clone();
    while high - low > threshold {
        let mid = 0.5 * (low + high);
        if mid <= low || mid >= high {
            break; // f32 cannot split the interval further
        }
        let point = project(norm, original, &adversarial, mid);
        // On the budget's end the last misclassified point is the answer.
        match decisions.is_adversarial(point.clone()) {
            Ok(true) => {
                high = mid;
                best = point;
            }
            Ok(false) => low = mid,
            Err(Halt::Budget) => return Ok(best),
            Err(e) => return Err(e),
        }
    }
    Ok(best)
}

/// ĝ at the boundary point `x` from `samples` probes x + δu (clipped to [0, 1]; u the
/// probe's actual unit-scaled offset after clipping), in chunks of [`PROBE_CHUNK`]
/// images. Streams Σ φu and Σ u so that the baseline φ̄ needs no stored directions:
/// Σ (φ − φ̄)u = Σ φu − φ̄ Σ u.
fn estimate_gradient(
    decisions: &mut Decisions<'_>,
    x: &[f32],
    norm: Norm,
    delta: f32,
    samples: usize,
    rng: &mut Xoshiro256PlusPlus,
) -> Result<Vec<f32>, Halt> {
    let dim = x.len();
    let mut sum_phi_u = vec![0.0f64; dim];
    let mut sum_u = vec![0.0f64; dim];
    let mut sum_phi = 0.0f64;
    let mut sent = 0;
    while sent < samples {
        let count = PROBE_CHUNK.min(samples - sent);
        let mut offsets = Vec::with_capacity(count);
        let mut probes = Vec::with_capacity(count);
        for _ in 0..count {
            let mut u: Vec<f32> = match norm {
                Norm::L2 => (0..dim).map(|_| StandardNormal.sample(rng)).collect(),
                Norm::Linf => (0..dim).map(|_| rng.random_range(-1.0f32..=1.0)).collect(),
            };
            let n = u.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt().max(1e-12);
            let probe: Vec<f32> =
                x.iter().zip(&u).map(|(&xk, &uk)| (xk + delta * (f64::from(uk) / n) as f32).clamp(0.0, 1.0)).collect();
            for ((uk, &pk), &xk) in u.iter_mut().zip(&probe).zip(x) {
                *uk = (pk - xk) / delta;
            }
            offsets.push(u);
            probes.push(probe);
        }
        let answers = decisions.adversarial(probes)?;
        for (u, adversarial) in offsets.iter().zip(answers) {
            let phi = if adversarial { 1.0 } else { -1.0 };
            sum_phi += phi;
            for ((a, b), &uk) in sum_phi_u.iter_mut().zip(sum_u.iter_mut()).zip(u) {
                *a += phi * f64::from(uk);
                *b += f64::from(uk);
            }
        }
        sent += count;
    }
    let n = samples as f64;
    let mean_phi = sum_phi / n;
    // All probes agreeing: the baseline would cancel everything; the paper then uses the
    // mean direction itself (toward the side they all fell on, or away from it).
    let gradient = if mean_phi == 1.0 {
        sum_u.iter().map(|&s| (s / n) as f32).collect()
    } else if mean_phi == -1.0 {
        sum_u.iter().map(|&s| (-s / n) as f32).collect()
    } else {
        sum_phi_u.iter().zip(&sum_u).map(|(&a, &b)| ((a - mean_phi * b) / n) as f32).collect()
    };
    Ok(gradient)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::testing::{CLASSES, DIM, Linear, SIDE, input_for};

    /// An input of `Linear::new(1)` whose class is not the class of mid-grey, the one
    /// most uniform noise images get (from `seed` on): the search starts from noise.
    fn input(seed: u64) -> (ModelImage, usize) {
        let model = Linear::new(1);
        let grey = model.predict(&[0.5; DIM]);
        (seed..).map(|s| input_for(&model, s)).find(|(_, y)| *y != grey).unwrap()
    }

    fn run(oracle: &mut dyn Oracle, image: &ModelImage, y: usize, config: &HsjaConfig) -> AttackOutcome {
        hsja_attack(oracle, image, &Goal::Untargeted { true_class: y }, config, &mut |_, _| {}).unwrap()
    }

    /// Only the top-1 decision of the linear model: 1 for the predicted class, 0 elsewhere.
    struct TopOne(Linear);

    impl Oracle for TopOne {
        fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
            Ok(images
                .iter()
                .map(|image| {
                    let class = self.0.predict(&image.data);
                    (0..CLASSES).map(|k| if k == class { 1.0 } else { 0.0 }).collect()
                })
                .collect())
        }
    }

    #[test]
    fn reaches_a_misclassified_point_within_epsilon_in_both_norms() {
        let (image, y) = input(3);
        for (norm, factor) in [(Norm::L2, 1.3), (Norm::Linf, 2.0)] {
            let mut oracle = Linear::new(1);
            let eps_star = oracle.min_epsilon(&image.data, y, norm);
            let config = HsjaConfig::new(norm, factor * eps_star, 5000, 7);
            let mut calls = 0;
            let goal = Goal::Untargeted { true_class: y };
            let outcome = hsja_attack(&mut oracle, &image, &goal, &config, &mut |_, _| calls += 1).unwrap();
            assert!(outcome.success, "{norm:?}: distance − ε = {} after {}", outcome.margin, outcome.queries);
            assert!(outcome.queries < config.max_queries, "{norm:?}: stops on success");
            assert_eq!((outcome.queries, oracle.seen, calls), (oracle.seen, outcome.queries, outcome.queries));
            assert_ne!(oracle.predict(&outcome.adversarial.data), y, "{norm:?}");
            assert!(outcome.adversarial.data.iter().all(|v| (0.0..=1.0).contains(v)));
            let reached = distance(norm, &outcome.adversarial.data, &image.data);
            assert!(reached <= config.epsilon, "{norm:?}: {reached} > ε {}", config.epsilon);
            assert!(reached >= eps_star * 0.999, "{norm:?}: {reached} below the minimal ε* {eps_star}");
            assert_eq!(outcome.margin, reached - config.epsilon);
            assert_eq!((outcome.linf, outcome.l2), distances(&outcome.adversarial.data, &image.data));
        }
    }

    #[test]
    fn distance_decreases_over_iterations_toward_the_minimum() {
        let (image, y) = input(5);
        for norm in [Norm::L2, Norm::Linf] {
            let mut oracle = Linear::new(1);
            let eps_star = oracle.min_epsilon(&image.data, y, norm);
            let mut config = HsjaConfig::new(norm, eps_star, 4000, 3);
            config.stop_at_epsilon = false;
            let outcome = run(&mut oracle, &image, y, &config);
            let history = &outcome.margin_history;
            assert!(history.len() >= 5, "{norm:?}: {history:?}");
            assert!(history.windows(2).all(|w| w[1].0 >= w[0].0 && w[1].1 < w[0].1), "{norm:?}: {history:?}");
            let first = history[0].1 + eps_star;
            let last = history[history.len() - 1].1 + eps_star;
            // From a noise image far away to near the closest boundary point.
            assert!(last < 0.25 * first, "{norm:?}: {first} -> {last}");
            assert!(last < 2.5 * eps_star, "{norm:?}: {last} vs ε* {eps_star}");
            assert_eq!((outcome.queries, oracle.seen), (oracle.seen, outcome.queries));
            assert!(outcome.queries <= config.max_queries);
        }
    }

    #[test]
    fn queries_are_counted_exactly_and_never_exceed_the_budget() {
        let (image, y) = input(3);
        for norm in [Norm::L2, Norm::Linf] {
            for budget in [1, 2, 7, 50, 333, 1000] {
                let mut oracle = Linear::new(1);
                let mut config = HsjaConfig::new(norm, 1e-6, budget, 1);
                config.stop_at_epsilon = false;
                let mut calls = Vec::new();
                let goal = Goal::Untargeted { true_class: y };
                let outcome = hsja_attack(&mut oracle, &image, &goal, &config, &mut |q, _| calls.push(q)).unwrap();
                assert_eq!(outcome.queries, oracle.seen, "{norm:?} budget {budget}");
                assert!(
                    outcome.queries <= budget && outcome.queries + 2 >= budget,
                    "{norm:?} {budget}: {}",
                    outcome.queries
                );
                assert_eq!(calls, (1..=outcome.queries).collect::<Vec<_>>());
                assert!(!outcome.success);
            }
        }
    }

    #[test]
    fn only_the_decision_matters() {
        // Full logits and a one-hot top-1 answer lead to the same search.
        let (image, y) = input(4);
        let config = HsjaConfig::new(Norm::L2, 0.01, 1500, 9);
        let full = run(&mut Linear::new(1), &image, y, &config);
        let decision = run(&mut TopOne(Linear::new(1)), &image, y, &config);
        assert_eq!(full, decision);
    }

    #[test]
    fn an_oracle_that_never_changes_its_mind_gives_no_adversarial() {
        struct Constant(usize);
        impl Oracle for Constant {
            fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
                self.0 += images.len();
                Ok(images.iter().map(|_| vec![1.0, 0.0, 0.0]).collect())
            }
        }
        let (image, _) = input(3);
        let mut oracle = Constant(0);
        let outcome = run(&mut oracle, &image, 0, &HsjaConfig::new(Norm::Linf, 0.1, 1000, 0));
        assert!(!outcome.success && outcome.margin.is_infinite());
        assert_eq!((outcome.queries, oracle.0), (DEFAULT_INIT_TRIES, DEFAULT_INIT_TRIES));
        assert_eq!(outcome.adversarial, image);
    }

    #[test]
    fn invalid_inputs_and_oracle_errors_are_reported() {
        let (image, y) = input(3);
        let goal = Goal::Untargeted { true_class: y };
        let config = HsjaConfig::new(Norm::L2, 0.5, 100, 0);
        let bad = |image: &ModelImage, goal: &Goal, config: &HsjaConfig| {
            hsja_attack(&mut Linear::new(1), image, goal, config, &mut |_, _| {}).unwrap_err()
        };
        let invalid = |e: AttackError| matches!(e, AttackError::Invalid(_));
        assert!(invalid(bad(&image, &goal, &HsjaConfig { epsilon: 0.0, ..config.clone() })));
        assert!(invalid(bad(&image, &goal, &HsjaConfig { epsilon: f32::NAN, ..config.clone() })));
        assert!(invalid(bad(&image, &goal, &HsjaConfig { max_queries: 0, ..config.clone() })));
        assert!(invalid(bad(&image, &goal, &HsjaConfig { init_evals: 0, ..config.clone() })));
        assert!(invalid(bad(&image, &goal, &HsjaConfig { max_evals: 10, ..config.clone() })));
        assert!(invalid(bad(&image, &goal, &HsjaConfig { init_tries: 0, ..config.clone() })));
        assert!(invalid(bad(&image, &goal, &HsjaConfig { gamma: -1.0, ..config.clone() })));
        assert!(invalid(bad(&image, &Goal::Targeted { target: 0 }, &config)));
        let short = ModelImage { width: SIDE, height: SIDE, data: vec![0.5; 10] };
        assert!(invalid(bad(&short, &goal, &config)));
        let bright = ModelImage { width: SIDE, height: SIDE, data: vec![1.5; DIM] };
        assert!(invalid(bad(&bright, &goal, &config)));
        // A class the oracle does not have, and an oracle that fails.
        let out_of_range = Goal::Untargeted { true_class: CLASSES };
        assert!(matches!(bad(&image, &out_of_range, &config), AttackError::BadAnswer(_)));
        struct Failing;
        impl Oracle for Failing {
            fn scores(&mut self, _: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
                Err(OracleError::Failed("model offline".to_string()))
            }
        }
        let err = hsja_attack(&mut Failing, &image, &goal, &config, &mut |_, _| {}).unwrap_err();
        assert_eq!(err, AttackError::Oracle(OracleError::Failed("model offline".into())));
    }
}

//! Square Attack (Andriushchenko, Croce, Flammarion, Hein 2020, "Square Attack: a
//! query-efficient black-box adversarial attack via random search"): a score-based
//! black-box attack that only needs the oracle's class scores.
//!
//! Random search over localized square-shaped updates, accepted when the margin loss
//! strictly improves, following the paper's reference implementation:
//! - L∞: vertical-stripe initialisation (±ε per channel and column); each step sets one
//!   random s×s window to a constant ±ε per channel (resampled until it changes the image).
//! - L2: a 5×5 grid of "meta pseudo-Gaussian" bumps with random signs, scaled to norm ε;
//!   each step moves the mass of a second random window into the first one, adds a new
//!   bump there, and rescales the whole perturbation to norm ε.
//!
//! The side s of the square follows the paper's piecewise-constant schedule for the
//! fraction p of pixels changed ([`p_selection`]). Everything runs in model-input space
//! (planar RGB in [0, 1]); every image shown to the oracle is one query.

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::{AttackError, AttackOutcome, CHANNELS, Goal, Norm, Oracle, Search, validate};
use crate::imaging::ModelImage;

/// Two clipped values closer than this count as unchanged (the reference uses 1e-7).
const UNCHANGED: f32 = 1e-7;

/// Bound on the L∞ resampling of an unchanged window (only reachable with a tiny ε).
const MAX_RESAMPLES: usize = 64;

/// The paper's initial fraction of pixels changed per step: 0.05 (L∞), 0.1 (L2).
pub fn default_p_init(norm: Norm) -> f32 {
    match norm {
        Norm::Linf => 0.05,
        Norm::L2 => 0.1,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SquareConfig {
    pub norm: Norm,
    /// Radius of the ball in model-input units ([0, 1] per channel value).
    pub epsilon: f32,
    /// Total oracle images, the initialisation included.
    pub max_queries: usize,
    /// Initial fraction of pixels changed per step ([`default_p_init`]).
    pub p_init: f32,
    pub seed: u64,
    /// A warm start in place of the random initialisation (projected onto the ε-ball
    /// around the image and [0, 1]): an adaptive attacker starts from the transfer
    /// example, so it is at least as strong as the transfer attack it builds on.
    pub start: Option<Vec<f32>>,
}

impl SquareConfig {
    /// A configuration with the paper's `p_init` for `norm`.
    pub fn new(norm: Norm, epsilon: f32, max_queries: usize, seed: u64) -> Self {
        Self { norm, epsilon, max_queries, p_init: default_p_init(norm), seed, start: None }
    }
}

/// The paper's piecewise-constant schedule for p, the fraction of pixels changed at
/// step `iteration` (0-based, after the initialisation) of `budget`: the iteration is
/// rescaled to a 10,000-step budget and p halves after 10, 50, 200, 500, 1000, 2000,
/// 4000, 6000 and 8000 steps.
pub fn p_selection(p_init: f32, iteration: usize, budget: usize) -> f32 {
    let scaled = (iteration as u128 * 10_000 / budget.max(1) as u128) as usize;
    let halvings = match scaled {
        0..=10 => 0,
        11..=50 => 1,
        51..=200 => 2,
        201..=500 => 3,
        501..=1000 => 4,
        1001..=2000 => 5,
        2001..=4000 => 6,
        4001..=6000 => 7,
        6001..=8000 => 8,
        8001..=10_000 => 9,
        // Beyond the budget the reference falls back to p_init.
        _ => 0,
    };
    p_init / (1u32 << halvings) as f32
}

/// Runs the Square Attack on `image` until the goal is reached (margin < 0) or
/// `config.max_queries` images have been shown to `oracle`. `progress(queries,
/// best_margin)` is called after every query. Deterministic for a given seed.
pub fn square_attack(
    oracle: &mut dyn Oracle,
    image: &ModelImage,
    goal: &Goal,
    config: &SquareConfig,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<AttackOutcome, AttackError> {
    validate(image, config.epsilon)?;
    if !(config.p_init > 0.0 && config.p_init <= 1.0) {
        return Err(AttackError::Invalid(format!("p_init must lie in (0, 1], got {}", config.p_init)));
    }
    if config.start.as_ref().is_some_and(|start| start.len() != image.data.len()) {
        return Err(AttackError::Invalid("the warm start must have the image's size".to_string()));
    }
    if config.max_queries == 0 {
        return Err(AttackError::Invalid("max_queries must be at least 1 (the initialisation is a query)".into()));
    }
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
    let mut search = Search::new(oracle, goal, progress, image);
    match config.norm {
        Norm::Linf => linf_attack(&mut search, &image.data, config, &mut rng)?,
        Norm::L2 => l2_attack(&mut search, &image.data, config, &mut rng)?,
    }
    Ok(search.finish(&image.data))
}

/// Side of the square changing a fraction `p` of the H·W pixel positions.
fn square_side(p: f32, height: usize, width: usize) -> usize {
    let side = (f64::from(p) * (height * width) as f64).sqrt().round() as usize;
    side.max(1)
}

fn random_sign(rng: &mut Xoshiro256PlusPlus) -> f32 {
    if rng.random::<bool>() { 1.0 } else { -1.0 }
}

fn linf_attack(
    search: &mut Search<'_>,
    x: &[f32],
    config: &SquareConfig,
    rng: &mut Xoshiro256PlusPlus,
) -> Result<(), AttackError> {
    let (h, w, eps) = (search.height, search.width, config.epsilon);
    let plane = h * w;

    match &config.start {
        // Projected onto the ball; window updates then overwrite it with ±ε squares.
        Some(start) => {
            let init = x.iter().zip(start).map(|(&x, &s)| s.clamp(x - eps, x + eps).clamp(0.0, 1.0)).collect();
            search.offer(init)?;
        }
        None => {
            // Vertical stripes: δ[c, :, j] = ±ε, one sign per channel and column.
            let mut init = vec![0.0f32; x.len()];
            for c in 0..CHANNELS {
                for j in 0..w {
                    let delta = random_sign(rng) * eps;
                    for i in 0..h {
                        let k = c * plane + i * w + j;
                        init[k] = (x[k] + delta).clamp(0.0, 1.0);
                    }
                }
            }
            search.offer(init)?;
        }
    }

    let mut iteration = 0;
    while search.running(config.max_queries) {
        let p = p_selection(config.p_init, iteration, config.max_queries);
        iteration += 1;
        let s = square_side(p, h, w).min(h).min(w);
        let top = rng.random_range(0..=h - s);
        let left = rng.random_range(0..=w - s);

        // A constant ±ε per channel on the window, resampled while the clipped result
        // equals the current best window in every value (as the reference does).
        let mut candidate = search.best.clone();
        for _ in 0..MAX_RESAMPLES {
            let mut changed = false;
            for c in 0..CHANNELS {
                let delta = random_sign(rng) * eps;
                for i in top..top + s {
                    for j in left..left + s {
                        let k = c * plane + i * w + j;
                        candidate[k] = (x[k] + delta).clamp(0.0, 1.0);
                        changed |= (candidate[k] - search.best[k]).abs() >= UNCHANGED;
                    }
                }
            }
            if changed {
                break;
            }
        }
        search.offer(candidate)?;
    }
    Ok(())
}

/// The reference's `pseudo_gaussian_pert_rectangles`: concentric rectangles around the
/// centre, ring r weighted 1/(r+1)², normalized to unit L2 norm. Row-major rows × cols.
fn pseudo_gaussian_rectangles(rows: usize, cols: usize) -> Vec<f32> {
    let mut delta = vec![0.0f32; rows * cols];
    let (rc, cc) = (rows / 2 + 1, cols / 2 + 1);
    let (mut r_start, mut c_start) = (rc as isize - 1, cc as isize - 1);
    for ring in 0..rc.max(cc) {
        let extent = 2 * ring as isize + 1;
        let (r0, r1) = (r_start.max(0) as usize, ((r_start + extent).max(0) as usize).min(rows));
        let (c0, c1) = (c_start.max(0) as usize, ((c_start + extent).max(0) as usize).min(cols));
        let weight = 1.0 / ((ring + 1) * (ring + 1)) as f32;
        for r in r0..r1 {
            for v in &mut delta[r * cols + c0..r * cols + c1.max(c0)] {
                *v += weight;
            }
        }
        r_start -= 1;
        c_start -= 1;
    }
    normalize(&mut delta);
    delta
}

/// The reference's `meta_pseudo_gaussian_pert` (two sub-squares): a positive bump on the
/// top half and a negative one on the bottom half, unit L2 norm, transposed with
/// probability ½. Row-major s × s.
fn meta_pseudo_gaussian(s: usize, rng: &mut Xoshiro256PlusPlus) -> Vec<f32> {
    let half = s / 2;
    let mut delta = pseudo_gaussian_rectangles(half, s);
    delta.extend(pseudo_gaussian_rectangles(s - half, s).into_iter().map(|v| -v));
    normalize(&mut delta);
    if rng.random::<f32>() > 0.5 {
        let mut transposed = vec![0.0f32; s * s];
        for i in 0..s {
            for j in 0..s {
                transposed[j * s + i] = delta[i * s + j];
            }
        }
        delta = transposed;
    }
    delta
}

fn norm2(values: impl Iterator<Item = f32>) -> f64 {
    values.map(|v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
}

/// Scales `values` to unit L2 norm (left as is when zero).
fn normalize(values: &mut [f32]) {
    let norm = norm2(values.iter().copied());
    if norm > 0.0 {
        values.iter_mut().for_each(|v| *v = (f64::from(*v) / norm) as f32);
    }
}

/// clip(x + δ·ε/‖δ‖₂, 0, 1): the perturbation rescaled onto the sphere of radius ε, then
/// clipped (clipping only shrinks each |δ_k|, so the result stays in the ball).
fn project_l2(x: &[f32], delta: &[f32], eps: f32) -> Vec<f32> {
    let norm = norm2(delta.iter().copied());
    let scale = if norm > 0.0 { f64::from(eps) / norm } else { 0.0 };
    x.iter().zip(delta).map(|(&xk, &dk)| (f64::from(xk) + f64::from(dk) * scale).clamp(0.0, 1.0) as f32).collect()
}

/// An s×s window of the H×W plane.
#[derive(Clone, Copy)]
struct Window {
    top: usize,
    left: usize,
    side: usize,
}

impl Window {
    fn random(side: usize, h: usize, w: usize, rng: &mut Xoshiro256PlusPlus) -> Self {
        Window { top: rng.random_range(0..=h - side), left: rng.random_range(0..=w - side), side }
    }

    fn contains(&self, i: usize, j: usize) -> bool {
        (self.top..self.top + self.side).contains(&i) && (self.left..self.left + self.side).contains(&j)
    }

    /// Plane offsets (row-major within the window).
    fn offsets(&self, w: usize) -> impl Iterator<Item = usize> + '_ {
        (self.top..self.top + self.side).flat_map(move |i| (self.left..self.left + self.side).map(move |j| i * w + j))
    }
}

fn l2_attack(
    search: &mut Search<'_>,
    x: &[f32],
    config: &SquareConfig,
    rng: &mut Xoshiro256PlusPlus,
) -> Result<(), AttackError> {
    let (h, w, eps) = (search.height, search.width, config.epsilon);
    let plane = h * w;

    // Initialisation: a grid of bumps of side min(H, W)/5 with a random sign per bump and
    // channel, centred in the image (the reference's 5×5 grid on square images; on other
    // shapes the grid is as many whole bumps as fit along each side), scaled to norm ε.
    let s0 = (h.min(w) / 5).max(1);
    let (tiles_h, tiles_w) = (h / s0, w / s0);
    let (pad_h, pad_w) = ((h - tiles_h * s0) / 2, (w - tiles_w * s0) / 2);
    let mut delta = vec![0.0f32; x.len()];
    for th in 0..tiles_h {
        for tw in 0..tiles_w {
            let bump = meta_pseudo_gaussian(s0, rng);
            let tile = Window { top: pad_h + th * s0, left: pad_w + tw * s0, side: s0 };
            for c in 0..CHANNELS {
                let sign = random_sign(rng);
                for (k, &b) in tile.offsets(w).zip(&bump) {
                    delta[c * plane + k] += sign * b;
                }
            }
        }
    }
    if let Some(start) = &config.start {
        delta = start.iter().zip(x).map(|(s, x)| s - x).collect();
    }
    search.offer(project_l2(x, &delta, eps))?;

    let mut iteration = 0;
    while search.running(config.max_queries) {
        let p = p_selection(config.p_init, iteration, config.max_queries);
        iteration += 1;
        // The reference: at least 3, odd (a centred bump), here also at most min(H, W).
        let mut s = square_side(p, h, w).max(3);
        if s % 2 == 0 {
            s += 1;
        }
        let s = s.min(h).min(w);
        let window_1 = Window::random(s, h, w, rng);
        let window_2 = Window::random(s, h, w, rng);

        // δ as the clipped best image's distance from x (as the reference keeps it).
        let mut delta: Vec<f32> = search.best.iter().zip(x).map(|(a, b)| a - b).collect();
        let image_norm_sq = norm2(delta.iter().copied()).powi(2);
        // Budget left in the ball, shared equally by the channels.
        let spare_sq = (f64::from(eps).powi(2) - image_norm_sq).max(0.0) / CHANNELS as f64;

        let bump = meta_pseudo_gaussian(s, rng);
        for c in 0..CHANNELS {
            let channel = &mut delta[c * plane..(c + 1) * plane];
            let window_1_norm = norm2(window_1.offsets(w).map(|k| channel[k]));
            // Mass on window 1 ∪ window 2 (each pixel counted once).
            let union_sq: f64 = norm2(window_2.offsets(w).map(|k| channel[k])).powi(2)
                + window_1
                    .offsets(w)
                    .filter(|&k| !window_2.contains(k / w, k % w))
                    .map(|k| f64::from(channel[k]).powi(2))
                    .sum::<f64>();

            // A new bump with a random sign plus the old window-1 content (unit norm each),
            // scaled to carry window 2's mass and the spare budget into window 1.
            let sign = random_sign(rng);
            let mut update: Vec<f32> = window_1
                .offsets(w)
                .zip(&bump)
                .map(|(k, &b)| sign * b + (f64::from(channel[k]) / (1e-10 + window_1_norm)) as f32)
                .collect();
            normalize(&mut update);
            let target = (spare_sq + union_sq).sqrt();
            for k in window_2.offsets(w) {
                channel[k] = 0.0;
            }
            for (k, u) in window_1.offsets(w).zip(update) {
                channel[k] = (f64::from(u) * target) as f32;
            }
        }
        if let Some(start) = &config.start {
            delta = start.iter().zip(x).map(|(s, x)| s - x).collect();
        }
        search.offer(project_l2(x, &delta, eps))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::testing::{CLASSES, DIM, Linear, SIDE, input_for};
    use crate::attack::{OracleError, checked_margin, margin};

    /// An input and its class under `Linear::new(1)`.
    fn input(seed: u64) -> (ModelImage, usize) {
        input_for(&Linear::new(1), seed)
    }

    fn run(oracle: &mut Linear, image: &ModelImage, goal: &Goal, config: &SquareConfig) -> AttackOutcome {
        square_attack(oracle, image, goal, config, &mut |_, _| {}).unwrap()
    }

    fn assert_in_box(image: &ModelImage) {
        assert!(image.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn margin_sign_conventions() {
        let scores = [2.0, 5.0, 1.0];
        // Class 1 is predicted: untargeted against 1 fails (> 0), against 0 succeeds (< 0).
        assert_eq!(margin(&Goal::Untargeted { true_class: 1 }, &scores), 3.0);
        assert_eq!(margin(&Goal::Untargeted { true_class: 0 }, &scores), -3.0);
        // Targeted: reached for the predicted class, not for another.
        assert_eq!(margin(&Goal::Targeted { target: 1 }, &scores), -3.0);
        assert_eq!(margin(&Goal::Targeted { target: 2 }, &scores), 4.0);
        // Log-probabilities of 0 (−∞) on both sides: a tie, not NaN.
        let log_probs = [0.0, f32::NEG_INFINITY, f32::NEG_INFINITY];
        assert_eq!(margin(&Goal::Untargeted { true_class: 1 }, &log_probs), f32::NEG_INFINITY);
        assert_eq!(margin(&Goal::Targeted { target: 0 }, &log_probs), f32::NEG_INFINITY);
        assert_eq!(margin(&Goal::Targeted { target: 1 }, &[f32::NEG_INFINITY; 3]), 0.0);
        assert!(margin(&Goal::Targeted { target: 3 }, &scores).is_nan());
        assert!(checked_margin(&Goal::Targeted { target: 3 }, &scores).is_err());
        assert!(checked_margin(&Goal::Untargeted { true_class: 0 }, &[1.0]).is_err());
        assert!(checked_margin(&Goal::Untargeted { true_class: 0 }, &[1.0, f32::NAN]).is_err());
        // log-softmax keeps the order and gives log-probabilities.
        let log_p = crate::attack::log_softmax(&scores);
        assert!((log_p.iter().map(|v| v.exp()).sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(margin(&Goal::Untargeted { true_class: 1 }, &log_p).signum(), 1.0);
    }

    #[test]
    fn p_selection_follows_the_paper_schedule() {
        let at = |i| p_selection(0.8, i, 10_000);
        assert_eq!((at(0), at(10), at(11), at(50), at(51)), (0.8, 0.8, 0.4, 0.4, 0.2));
        assert_eq!((at(200), at(201), at(500), at(501), at(1000)), (0.2, 0.1, 0.1, 0.05, 0.05));
        assert_eq!((at(1001), at(2001), at(4001), at(6001), at(8001)), (0.025, 0.0125, 0.00625, 0.003125, 0.0015625));
        // Rescaled to the budget: step 100 of 1000 is step 1000 of 10,000.
        assert_eq!(p_selection(0.8, 100, 1000), 0.05);
        assert_eq!(p_selection(0.8, 101, 1000), 0.025);
    }

    #[test]
    fn untargeted_linf_succeeds_inside_the_ball() {
        let (image, y) = input(3);
        let mut oracle = Linear::new(1);
        let eps_star = oracle.min_epsilon(&image.data, y, Norm::Linf);
        assert!(eps_star > 0.0 && 1.5 * eps_star < 0.3, "ε* = {eps_star}");
        let config = SquareConfig::new(Norm::Linf, 1.5 * eps_star, 10_000, 7);
        let mut calls = Vec::new();
        let goal = Goal::Untargeted { true_class: y };
        let outcome = square_attack(&mut oracle, &image, &goal, &config, &mut |q, m| calls.push((q, m))).unwrap();

        assert!(outcome.success && outcome.margin < 0.0, "margin {} after {}", outcome.margin, outcome.queries);
        assert!(outcome.queries < config.max_queries);
        assert_eq!(outcome.queries, oracle.seen);
        assert_ne!(oracle.predict(&outcome.adversarial.data), y);
        assert_eq!(margin(&goal, &oracle.logits(&outcome.adversarial.data)), outcome.margin);
        assert_in_box(&outcome.adversarial);
        let linf = outcome.adversarial.data.iter().zip(&image.data).map(|(a, x)| (a - x).abs()).fold(0.0, f32::max);
        assert!(linf <= config.epsilon + 1e-6);
        assert_eq!(outcome.linf, linf);
        // progress after every query, with the best margin (non-increasing).
        assert_eq!(calls.len(), outcome.queries);
        assert!(calls.iter().enumerate().all(|(i, &(q, _))| q == i + 1));
        assert!(calls.windows(2).all(|w| w[1].1 <= w[0].1));
        // History: strictly improving, ending at the returned margin.
        let history = &outcome.margin_history;
        assert_eq!(history[0].0, 1);
        assert!(history.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 < w[0].1));
        assert_eq!(history.last().copied(), Some((outcome.queries, outcome.margin)));
    }

    #[test]
    fn linf_below_the_minimal_epsilon_cannot_succeed() {
        let (image, y) = input(3);
        let mut oracle = Linear::new(1);
        let eps_star = oracle.min_epsilon(&image.data, y, Norm::Linf);
        let config = SquareConfig::new(Norm::Linf, 0.5 * eps_star, 400, 7);
        let outcome = run(&mut oracle, &image, &Goal::Untargeted { true_class: y }, &config);
        assert!(!outcome.success && outcome.margin >= 0.0);
        assert_eq!((outcome.queries, oracle.seen), (400, 400));
        assert_eq!(oracle.predict(&outcome.adversarial.data), y);
        assert!(outcome.linf <= config.epsilon + 1e-6);
    }

    #[test]
    fn targeted_linf_reaches_the_target() {
        let (image, y) = input(3);
        let mut oracle = Linear::new(1);
        let target = (y + 1) % CLASSES;
        let eps = oracle.targeted_linf_epsilon(&image.data, y, target);

        let config = SquareConfig::new(Norm::Linf, eps, 10_000, 11);
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
        let config = SquareConfig::new(Norm::L2, eps, 10_000, 5);
        let outcome = run(&mut oracle, &image, &Goal::Untargeted { true_class: y }, &config);
        assert!(outcome.success, "margin {} after {}", outcome.margin, outcome.queries);
        assert_ne!(oracle.predict(&outcome.adversarial.data), y);
        assert_eq!(outcome.queries, oracle.seen);
        assert_in_box(&outcome.adversarial);
        let l2 = outcome.adversarial.data.iter().zip(&image.data).map(|(a, x)| (a - x) * (a - x)).sum::<f32>().sqrt();
        assert!(l2 <= eps + 1e-4, "‖δ‖₂ = {l2} > ε = {eps}");
        assert!((outcome.l2 - l2).abs() < 1e-4);
        // Random perturbations of the same norm do not succeed: the search found a direction.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(99);
        for _ in 0..20 {
            let scale = eps / (DIM as f32).sqrt();
            let noisy: Vec<f32> = image.data.iter().map(|x| x + random_sign(&mut rng) * scale).collect();
            assert_eq!(oracle.predict(&noisy), y);
        }
    }

    #[test]
    fn l2_stays_in_the_ball_when_clipping_bites() {
        // Values at the bounds: clipping cuts most of δ; the result must stay in the ball.
        let data: Vec<f32> = (0..DIM)
            .map(|k| {
                if k % 3 == 0 {
                    0.0
                } else if k % 3 == 1 {
                    1.0
                } else {
                    0.5
                }
            })
            .collect();
        let image = ModelImage { width: SIDE, height: SIDE, data };
        let mut oracle = Linear::new(1);
        let y = oracle.predict(&image.data);
        let config = SquareConfig::new(Norm::L2, 2.0, 300, 9);
        let outcome = run(&mut oracle, &image, &Goal::Untargeted { true_class: y }, &config);
        assert_in_box(&outcome.adversarial);
        assert!(outcome.l2 <= 2.0 + 1e-4 && outcome.l2 > 0.0);
        assert_eq!(outcome.queries, oracle.seen);
    }

    #[test]
    fn same_seed_same_outcome_different_seed_differs() {
        let (image, y) = input(3);
        let goal = Goal::Untargeted { true_class: y };
        for norm in [Norm::Linf, Norm::L2] {
            let eps = 2.0 * Linear::new(1).min_epsilon(&image.data, y, norm);
            let attack = |seed| run(&mut Linear::new(1), &image, &goal, &SquareConfig::new(norm, eps, 3000, seed));
            let (a, b, c) = (attack(1), attack(1), attack(2));
            assert_eq!(a, b);
            assert!(a.queries != c.queries || a.adversarial != c.adversarial);
        }
    }

    #[test]
    fn success_rate_rises_with_epsilon_and_queries() {
        // Distinct problems: for a linear model without clipping, rescaling ε with ε* makes
        // inputs of one model nearly equivalent, so vary the model (and the true class).
        let problems: Vec<(u64, ModelImage, usize)> = (20..26)
            .map(|model_seed| {
                let (image, y) = input_for(&Linear::new(model_seed), model_seed);
                (model_seed, image, y)
            })
            .collect();
        let successes = |factor: f32, max_queries: usize| {
            let mut count = 0;
            for (model_seed, image, y) in &problems {
                for seed in 0..2 {
                    let mut oracle = Linear::new(*model_seed);
                    let eps = factor * oracle.min_epsilon(&image.data, *y, Norm::Linf);
                    let config = SquareConfig::new(Norm::Linf, eps, max_queries, seed);
                    count +=
                        usize::from(run(&mut oracle, image, &Goal::Untargeted { true_class: *y }, &config).success);
                }
            }
            count
        };
        // The attack is strong on these problems: success goes from none to all over a
        // narrow range, with partial success in between.
        let by_epsilon: Vec<usize> = [0.9, 1.3, 1.5, 1.6, 1.8].iter().map(|&f| successes(f, 700)).collect();
        assert!(by_epsilon.windows(2).all(|w| w[0] <= w[1]), "{by_epsilon:?}");
        // Below ε* success is impossible; well above it every run succeeds.
        assert_eq!((by_epsilon[0], by_epsilon[4]), (0, 12), "{by_epsilon:?}");
        assert!(by_epsilon.iter().any(|&n| 0 < n && n < 12), "{by_epsilon:?}");
        let by_queries: Vec<usize> = [300, 700, 1000, 2000].iter().map(|&q| successes(1.5, q)).collect();
        assert!(by_queries.windows(2).all(|w| w[0] <= w[1]), "{by_queries:?}");
        assert_eq!((by_queries[0], by_queries[3]), (0, 12), "{by_queries:?}");
        assert!(by_queries.iter().any(|&n| 0 < n && n < 12), "{by_queries:?}");
    }

    #[test]
    fn oracle_errors_and_bad_arguments_are_reported() {
        struct Failing;
        impl Oracle for Failing {
            fn scores(&mut self, _: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
                Err(OracleError::Failed("model offline".to_string()))
            }
        }
        let (image, y) = input(3);
        let goal = Goal::Untargeted { true_class: y };
        let config = SquareConfig::new(Norm::Linf, 0.05, 100, 0);
        let err = square_attack(&mut Failing, &image, &goal, &config, &mut |_, _| {}).unwrap_err();
        assert_eq!(err, AttackError::Oracle(OracleError::Failed("model offline".into())));

        let mut oracle = Linear::new(1);
        let bad = |config: SquareConfig| square_attack(&mut Linear::new(1), &image, &goal, &config, &mut |_, _| {});
        assert!(bad(SquareConfig { epsilon: 0.0, ..config.clone() }).is_err());
        assert!(bad(SquareConfig { max_queries: 0, ..config.clone() }).is_err());
        assert!(bad(SquareConfig { p_init: 0.0, ..config.clone() }).is_err());
        let short = ModelImage { width: SIDE, height: SIDE, data: vec![0.5; 10] };
        assert!(square_attack(&mut oracle, &short, &goal, &config, &mut |_, _| {}).is_err());
        let target = Goal::Targeted { target: CLASSES };
        assert!(square_attack(&mut oracle, &image, &target, &config, &mut |_, _| {}).is_err());
    }
}

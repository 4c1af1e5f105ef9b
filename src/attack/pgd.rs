//! Gradient attacks: PGD (Madry et al. 2018) with a random start, and APGD (Croce &
//! Hein 2020, the step-size schedule of AutoAttack), in L∞ or L2, on any
//! [`Differentiable`] loss — in practice the [`Surrogate`](super::surrogate::Surrogate)
//! of a preset, whose noise is drawn afresh at every step (EOT).
//!
//! Both maximize the loss inside the ε-ball around the image and [0, 1]. After every
//! step whose iterate the loss's own verdict calls fooled, `judge` is asked (the red
//! team classifies the 8-bit image with the real pipeline); the attack stops when it
//! says yes. Otherwise the iterate with the highest loss is returned.

use rand::rngs::Xoshiro256PlusPlus as StdRng;
use rand::{RngExt, SeedableRng};

use super::surrogate::Step;
use super::{AttackError, Norm, distances};
use crate::imaging::ModelImage;

/// Something to attack with gradients: loss and gradient at a point (maybe random).
pub trait Differentiable {
    fn step(&mut self, x: &[f32]) -> Result<Step, AttackError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Pgd,
    Apgd,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradientConfig {
    pub method: Method,
    pub norm: Norm,
    pub epsilon: f32,
    /// Gradient steps (each one loss-and-gradient evaluation).
    pub steps: usize,
    /// PGD's step size; `None` = 2.5 ε / steps (Madry et al.), at least ε / 10.
    pub step_size: Option<f32>,
    /// Start at a uniform random point of the ball (PGD; APGD starts at the image as AutoAttack).
    pub random_start: bool,
    pub seed: u64,
}

/// What a gradient attack found.
#[derive(Debug, Clone)]
pub struct GradientOutcome {
    pub adversarial: ModelImage,
    /// The judge said the goal is reached on `adversarial`.
    pub success: bool,
    /// Steps taken (loss-and-gradient evaluations).
    pub steps: usize,
    pub loss: f32,
    pub linf: f32,
    pub l2: f32,
    /// The loss at every step.
    pub losses: Vec<f32>,
    /// Judge calls.
    pub judged: usize,
}

/// The judge: is the goal reached on this image (as the service would see it)?
pub type Judge<'a> = dyn FnMut(&ModelImage) -> Result<bool, AttackError> + 'a;

/// Runs the configured attack from `image`.
pub fn gradient_attack(
    model: &mut dyn Differentiable,
    image: &ModelImage,
    config: &GradientConfig,
    judge: &mut Judge<'_>,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<GradientOutcome, AttackError> {
    super::validate(image, config.epsilon)?;
    if config.steps == 0 {
        return Err(AttackError::Invalid("a gradient attack needs at least one step".into()));
    }
    let mut state = State {
        image,
        config,
        best: image.data.clone(),
        best_loss: f32::NEG_INFINITY,
        losses: Vec::new(),
        judged: 0,
        success: None,
    };
    let mut rng = StdRng::seed_from_u64(config.seed);
    match config.method {
        Method::Pgd => pgd(model, &mut state, &mut rng, judge, progress)?,
        Method::Apgd => apgd(model, &mut state, judge, progress)?,
    }
    let adversarial = ModelImage {
        width: image.width,
        height: image.height,
        data: state.success.clone().unwrap_or_else(|| state.best.clone()),
    };
    let (linf, l2) = distances(&adversarial.data, &image.data);
    Ok(GradientOutcome {
        success: state.success.is_some(),
        steps: state.losses.len(),
        loss: state.best_loss,
        linf,
        l2,
        losses: state.losses,
        judged: state.judged,
        adversarial,
    })
}

struct State<'a> {
    image: &'a ModelImage,
    config: &'a GradientConfig,
    best: Vec<f32>,
    best_loss: f32,
    losses: Vec<f32>,
    judged: usize,
    /// The first iterate the judge called a success.
    success: Option<Vec<f32>>,
}

impl State<'_> {
    /// Evaluates `x`: records its loss, keeps it if best, asks the judge when the loss
    /// says fooled. Returns the step, or `None` when the judge confirmed success.
    fn evaluate(
        &mut self,
        model: &mut dyn Differentiable,
        x: &[f32],
        judge: &mut Judge<'_>,
        progress: &mut dyn FnMut(usize, f32),
    ) -> Result<Option<Step>, AttackError> {
        let step = model.step(x)?;
        self.losses.push(step.loss);
        if step.loss > self.best_loss || self.losses.len() == 1 {
            self.best_loss = step.loss;
            self.best = x.to_vec();
        }
        progress(self.losses.len(), self.best_loss);
        if step.fooled {
            self.judged += 1;
            let candidate = ModelImage { width: self.image.width, height: self.image.height, data: x.to_vec() };
            if judge(&candidate)? {
                self.success = Some(x.to_vec());
                return Ok(None);
            }
        }
        Ok(Some(step))
    }

    /// Projection onto the ε-ball around the image and [0, 1].
    fn project(&self, x: &mut [f32]) {
        let epsilon = self.config.epsilon;
        let original = &self.image.data;
        match self.config.norm {
            Norm::Linf => {
                for (v, o) in x.iter_mut().zip(original) {
                    *v = v.clamp(o - epsilon, o + epsilon).clamp(0.0, 1.0);
                }
            }
            Norm::L2 => {
                // Clip to the box, then scale δ into the ball (the box stays satisfied:
                // shrinking δ moves every value towards the original, inside [0, 1]).
                x.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
                let norm = x.iter().zip(original).map(|(v, o)| (v - o) * (v - o)).sum::<f32>().sqrt();
                if norm > epsilon {
                    let scale = epsilon / norm;
                    x.iter_mut().zip(original).for_each(|(v, o)| *v = o + (*v - o) * scale);
                }
            }
        }
    }

    /// x + size · (the steepest ascent direction of the norm for `gradient`).
    fn ascend(&self, x: &[f32], gradient: &[f32], size: f32) -> Vec<f32> {
        match self.config.norm {
            Norm::Linf => x.iter().zip(gradient).map(|(v, g)| v + size * sign(*g)).collect(),
            Norm::L2 => {
                let norm = gradient.iter().map(|g| g * g).sum::<f32>().sqrt().max(1e-12);
                x.iter().zip(gradient).map(|(v, g)| v + size * g / norm).collect()
            }
        }
    }
}

/// −1, 0 or 1 (`f32::signum` gives 1 for 0, which would move pixels with no gradient).
pub(crate) fn sign(g: f32) -> f32 {
    if g > 0.0 {
        1.0
    } else if g < 0.0 {
        -1.0
    } else {
        0.0
    }
}

fn pgd(
    model: &mut dyn Differentiable,
    state: &mut State<'_>,
    rng: &mut StdRng,
    judge: &mut Judge<'_>,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<(), AttackError> {
    let config = state.config;
    let epsilon = config.epsilon;
    let size = config.step_size.unwrap_or((2.5 * epsilon / config.steps as f32).max(epsilon / 10.0));
    let mut x = state.image.data.clone();
    if config.random_start {
        match config.norm {
            Norm::Linf => x.iter_mut().for_each(|v| *v += rng.random_range(-epsilon..=epsilon)),
            Norm::L2 => {
                // A uniform direction at a uniform radius fraction.
                let direction: Vec<f32> = (0..x.len()).map(|_| rng.random_range(-1.0f32..=1.0)).collect();
                let norm = direction.iter().map(|d| d * d).sum::<f32>().sqrt().max(1e-12);
                let radius = epsilon * rng.random_range(0.0f32..=1.0);
                x.iter_mut().zip(&direction).for_each(|(v, d)| *v += radius * d / norm);
            }
        }
        state.project(&mut x);
    }
    for _ in 0..config.steps {
        let Some(step) = state.evaluate(model, &x, judge, progress)? else { return Ok(()) };
        x = state.ascend(&x, &step.gradient, size);
        state.project(&mut x);
    }
    // The last iterate was never evaluated: one more look (it may be the best).
    if state.success.is_none() {
        let _ = state.evaluate(model, &x, judge, progress)?;
    }
    Ok(())
}

/// APGD's checkpoints as fractions of the budget: p₀ = 0, p₁ = 0.22,
/// p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06).
fn checkpoints(steps: usize) -> Vec<usize> {
    let mut p = vec![0.0f64, 0.22];
    while p[p.len() - 1] < 1.0 {
        let (a, b) = (p[p.len() - 2], p[p.len() - 1]);
        p.push(b + (b - a - 0.03).max(0.06));
    }
    let mut points: Vec<usize> =
        p.iter().map(|f| (f * steps as f64 - 1e-9).ceil() as usize).filter(|&w| w < steps).collect();
    points.dedup();
    points
}

fn apgd(
    model: &mut dyn Differentiable,
    state: &mut State<'_>,
    judge: &mut Judge<'_>,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<(), AttackError> {
    const MOMENTUM: f32 = 0.75;
    const RHO: f64 = 0.75;
    let config = state.config;
    let checkpoints = checkpoints(config.steps);
    let mut eta = 2.0 * config.epsilon;
    let mut x = state.image.data.clone();
    let Some(mut step) = state.evaluate(model, &x, judge, progress)? else { return Ok(()) };
    let mut previous = x.clone();
    let mut previous_loss = step.loss;
    // State at the last checkpoint, and successful increases since then.
    let (mut eta_at_checkpoint, mut best_at_checkpoint, mut last_checkpoint) = (eta, state.best_loss, 0usize);
    let mut increases = 0usize;
    for k in 0..config.steps.saturating_sub(1) {
        let mut z = state.ascend(&x, &step.gradient, eta);
        state.project(&mut z);
        let next: Vec<f32> = if k == 0 {
            z
        } else {
            let mut next: Vec<f32> = x
                .iter()
                .zip(&z)
                .zip(&previous)
                .map(|((xk, zk), pk)| xk + MOMENTUM * (zk - xk) + (1.0 - MOMENTUM) * (xk - pk))
                .collect();
            state.project(&mut next);
            next
        };
        previous = std::mem::replace(&mut x, next);
        let Some(next_step) = state.evaluate(model, &x, judge, progress)? else { return Ok(()) };
        step = next_step;
        increases += usize::from(step.loss > previous_loss);
        previous_loss = step.loss;
        if checkpoints.contains(&(k + 1)) {
            let span = (k + 1 - last_checkpoint) as f64;
            let too_few_increases = (increases as f64) < RHO * span;
            let stalled = eta_at_checkpoint == eta && best_at_checkpoint == state.best_loss;
            eta_at_checkpoint = eta;
            best_at_checkpoint = state.best_loss;
            if too_few_increases || stalled {
                eta /= 2.0;
                // Restart from the best point (its gradient is re-evaluated with fresh noise).
                x = state.best.clone();
                previous = x.clone();
                let Some(restart) = state.evaluate(model, &x, judge, progress)? else { return Ok(()) };
                step = restart;
                previous_loss = step.loss;
            }
            increases = 0;
            last_checkpoint = k + 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Goal;
    use super::super::surrogate::{Loss, loss_and_gradient};
    use super::*;

    /// A linear softmax classifier on 3×4×4 images: logits = W x + b.
    struct Linear {
        weights: Vec<Vec<f32>>,
        goal: Goal,
        loss: Loss,
        calls: usize,
    }

    impl Linear {
        fn new(goal: Goal, loss: Loss) -> Self {
            let weights =
                (0..5).map(|k| (0..48).map(|i| (((i * 7 + k * 13) % 11) as f32 - 5.0) * 0.8).collect()).collect();
            Self { weights, goal, loss, calls: 0 }
        }

        fn probabilities(&self, x: &[f32]) -> Vec<f32> {
            let logits: Vec<f32> = self.weights.iter().map(|w| w.iter().zip(x).map(|(a, b)| a * b).sum()).collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = logits.iter().map(|z| (z - max).exp()).collect();
            let total: f32 = e.iter().sum();
            e.iter().map(|v| v / total).collect()
        }
    }

    impl Differentiable for Linear {
        fn step(&mut self, x: &[f32]) -> Result<Step, AttackError> {
            self.calls += 1;
            let p = self.probabilities(x);
            let (loss, dp) = loss_and_gradient(&p, self.goal, self.loss)?;
            let dot: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            let dz: Vec<f32> = p.iter().zip(&dp).map(|(pk, gk)| pk * (gk - dot)).collect();
            let gradient = (0..x.len()).map(|i| self.weights.iter().zip(&dz).map(|(w, d)| w[i] * d).sum()).collect();
            let top = crate::prediction::argmax(&p);
            let fooled = match self.goal {
                Goal::Untargeted { true_class } => top != true_class,
                Goal::Targeted { target } => top == target,
            };
            Ok(Step { loss, gradient, probabilities: p, fooled })
        }
    }

    fn image() -> ModelImage {
        ModelImage { width: 4, height: 4, data: (0..48).map(|i| 0.3 + 0.4 * ((i % 5) as f32 / 4.0)).collect() }
    }

    fn config(method: Method, norm: Norm, epsilon: f32, steps: usize) -> GradientConfig {
        GradientConfig { method, norm, epsilon, steps, step_size: None, random_start: true, seed: 7 }
    }

    fn run(model: &mut Linear, config: &GradientConfig) -> GradientOutcome {
        let probe = Linear::new(model.goal, model.loss);
        let goal = model.goal;
        let mut judge = |image: &ModelImage| {
            let top = crate::prediction::argmax(&probe.probabilities(&image.data));
            Ok(match goal {
                Goal::Untargeted { true_class } => top != true_class,
                Goal::Targeted { target } => top == target,
            })
        };
        gradient_attack(model, &image(), config, &mut judge, &mut |_, _| {}).unwrap()
    }

    #[test]
    fn both_methods_reach_the_goal_inside_the_ball_in_both_norms() {
        let clean = crate::prediction::argmax(
            &Linear::new(Goal::Untargeted { true_class: 0 }, Loss::CrossEntropy).probabilities(&image().data),
        );
        for method in [Method::Pgd, Method::Apgd] {
            for (norm, epsilon) in [(Norm::Linf, 0.1), (Norm::L2, 0.8)] {
                for loss in [Loss::CrossEntropy, Loss::Dlr, Loss::Margin] {
                    let mut model = Linear::new(Goal::Untargeted { true_class: clean }, loss);
                    let outcome = run(&mut model, &config(method, norm, epsilon, 30));
                    assert!(outcome.success, "{method:?} {norm:?} {loss:?}: {:?}", outcome.losses);
                    let bound = if norm == Norm::Linf { outcome.linf } else { outcome.l2 };
                    assert!(bound <= epsilon * 1.0001, "{method:?} {norm:?}: {bound} > {epsilon}");
                    assert!(outcome.adversarial.data.iter().all(|v| (0.0..=1.0).contains(v)));
                }
            }
        }
    }

    #[test]
    fn a_targeted_attack_reaches_its_target() {
        let clean = crate::prediction::argmax(
            &Linear::new(Goal::Targeted { target: 0 }, Loss::CrossEntropy).probabilities(&image().data),
        );
        let target = (clean + 2) % 5;
        let mut model = Linear::new(Goal::Targeted { target }, Loss::CrossEntropy);
        let outcome = run(&mut model, &config(Method::Apgd, Norm::Linf, 0.3, 40));
        assert!(outcome.success);
        let top = crate::prediction::argmax(&model.probabilities(&outcome.adversarial.data));
        assert_eq!(top, target);
    }

    #[test]
    fn a_ball_too_small_to_cross_is_reported_as_failure_with_the_best_loss() {
        let clean = crate::prediction::argmax(
            &Linear::new(Goal::Untargeted { true_class: 0 }, Loss::CrossEntropy).probabilities(&image().data),
        );
        let mut model = Linear::new(Goal::Untargeted { true_class: clean }, Loss::CrossEntropy);
        let outcome = run(&mut model, &config(Method::Apgd, Norm::Linf, 1e-4, 20));
        assert!(!outcome.success);
        assert_eq!(outcome.loss, outcome.losses.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        assert!(outcome.steps >= 20 && outcome.steps <= 20 + checkpoints(20).len());
    }

    #[test]
    fn apgd_checkpoints_follow_the_papers_schedule() {
        // p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (then ≥ 1) for 100 steps.
        assert_eq!(checkpoints(100), vec![0, 22, 41, 57, 70, 80, 87, 93, 99]);
    }
}

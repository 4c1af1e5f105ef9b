//! White-box attacks on the served pipeline: the attacker has the weights (they are
//! public) and the code. The gradients come from the same ONNX files
//! ([`GradientServer`]); the defended pipeline is copied differentiably per preset
//! ([`Surrogate`]); every verdict comes from the real pipeline on the 8-bit PNG, with
//! fresh noise, `judge_draws` times: the attack succeeds if any draw is wrong (an
//! abstention is wrong).

use std::path::Path;
use std::sync::Arc;

use super::RedTeamError;
use super::oracle::{DefendedPipeline, Seeds};
use crate::attack::gradient::{GradientServer, GradientServerOptions, Gradients};
use crate::attack::pgd::{Differentiable, GradientConfig, GradientOutcome, Judge, Method, gradient_attack};
use crate::attack::surrogate::{Fit, Loss, Step, Surrogate, SurrogateModel, Term};
use crate::attack::{AttackError, Goal};
use crate::defense::DefenseSettings;
use crate::imaging::ModelImage;
use crate::model::LoadedModel;
use crate::pipeline::Pipeline;

/// The judge's seeds, apart from any the attack's own noise could use.
const JUDGE_SEEDS: u64 = 0x6a75_6467_6500_0000;

/// One white-box attack of `--attacks` / `--method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhiteBoxAttack {
    /// PGD with a random start on the cross-entropy, then (same budget) on the margin loss.
    Pgd,
    ApgdCe,
    ApgdDlr,
}

impl WhiteBoxAttack {
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "pgd" => Some(Self::Pgd),
            "apgd-ce" | "apgd" => Some(Self::ApgdCe),
            "apgd-dlr" => Some(Self::ApgdDlr),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Pgd => "pgd",
            Self::ApgdCe => "apgd-ce",
            Self::ApgdDlr => "apgd-dlr",
        }
    }

    /// (method, loss) runs of this attack, in order.
    fn runs(self) -> &'static [(Method, Loss)] {
        match self {
            Self::Pgd => &[(Method::Pgd, Loss::CrossEntropy), (Method::Pgd, Loss::Margin)],
            Self::ApgdCe => &[(Method::Apgd, Loss::CrossEntropy)],
            Self::ApgdDlr => &[(Method::Apgd, Loss::Dlr)],
        }
    }
}

/// Budget and threat model of a white-box attack.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WhiteBoxBudget {
    pub norm: crate::attack::Norm,
    pub epsilon: f32,
    /// Gradient steps per run.
    pub steps: usize,
    /// Noisy views per noisy term and step (EOT draws).
    pub eot: usize,
    /// Fresh-noise verdicts of the real pipeline; right on all of them = robust.
    pub judge_draws: usize,
    pub seed: u64,
}

/// The result of attacking one photo with a list of attacks (stops at the first success).
#[derive(Debug, Clone)]
pub struct WhiteBoxResult {
    pub outcome: GradientOutcome,
    /// The attack that succeeded, or the last one tried.
    pub attack: WhiteBoxAttack,
    /// Gradient steps over every attack tried.
    pub steps: usize,
    /// Rows through the gradient server.
    pub rows: usize,
}

/// The gradient server of every loaded model, started once.
pub struct WhiteBox {
    server: GradientServer,
    pipeline: Arc<Pipeline>,
    runtime: tokio::runtime::Handle,
}

impl WhiteBox {
    /// Starts the gradient server (`.venv`, `models/gradients/server.py` under `root`)
    /// for every model the pipeline has loaded.
    pub fn start(pipeline: Arc<Pipeline>, runtime: tokio::runtime::Handle, root: &Path) -> Result<Self, RedTeamError> {
        let dir = pipeline.config().models.dir.clone();
        let models = pipeline
            .registry()
            .names()
            .filter_map(|name| pipeline.registry().get(name))
            .map(|m| (m.card.name.clone(), dir.join(&m.card.file)))
            .collect();
        let server = GradientServer::start(&GradientServerOptions::in_project(root, models))?;
        Ok(Self { server, pipeline, runtime })
    }

    /// The differentiable copy of `preset` (API parameters) for images of the raw model's size.
    fn surrogate(
        &mut self,
        params: &[(&str, &str)],
        budget: &WhiteBoxBudget,
    ) -> Result<Surrogate<&mut GradientServer>, RedTeamError> {
        let parsed = self.pipeline.params(params.iter().copied())?;
        let registry = Arc::clone(self.pipeline.registry());
        let raw_name = parsed.model.clone().unwrap_or_else(|| registry.default_name().to_string());
        let raw =
            registry.get(&raw_name).ok_or_else(|| RedTeamError::Invalid(format!("model {raw_name} is not loaded")))?;
        let members: Vec<Arc<LoadedModel>> = ensemble_members(&parsed.defense, raw, &registry)?;
        let (models, terms) = copy_of(&parsed.defense, raw, &members)?;
        Ok(Surrogate::new(&mut self.server, models, terms, parsed.defense.sigma, budget.eot, budget.seed)?)
    }

    /// One step of `params`' differentiable copy at `image`: the loss, its gradient and
    /// the copy's mean probabilities, nothing judged. For checking that gradients flow
    /// through a preset (finite, not masked to zero) before trusting an attack on it.
    pub fn probe(
        &mut self,
        image: &ModelImage,
        goal: Goal,
        loss: Loss,
        params: &[(&str, &str)],
        budget: &WhiteBoxBudget,
    ) -> Result<Step, RedTeamError> {
        Ok(self.surrogate(params, budget)?.step(&image.data, goal, loss)?)
    }

    /// Attacks `image` (raw model size, [0, 1]) of class `truth` against `params`, with
    /// each of `attacks` in turn until one succeeds on the real pipeline.
    pub fn attack(
        &mut self,
        image: &ModelImage,
        goal: Goal,
        params: &[(&str, &str)],
        attacks: &[WhiteBoxAttack],
        budget: &WhiteBoxBudget,
        progress: &mut dyn FnMut(usize, f32),
    ) -> Result<WhiteBoxResult, RedTeamError> {
        let mut judge_oracle =
            DefendedPipeline::new(Arc::clone(&self.pipeline), self.runtime.clone(), params, budget.seed ^ JUDGE_SEEDS)?
                .with_seeds(Seeds::Fresh(budget.seed ^ JUDGE_SEEDS));
        let draws = budget.judge_draws.max(1);
        let mut judge = move |candidate: &ModelImage| -> Result<bool, AttackError> {
            for _ in 0..draws {
                let outcome = judge_oracle.classify(candidate)?;
                let reached = match goal {
                    Goal::Untargeted { true_class } => outcome.defended.class_id != Some(true_class),
                    Goal::Targeted { target } => outcome.defended.class_id == Some(target),
                };
                if reached {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        let mut surrogate = self.surrogate(params, budget)?;
        let (mut steps, mut last) = (0, None);
        for (index, attack) in attacks.iter().enumerate() {
            for (run, &(method, loss)) in attack.runs().iter().enumerate() {
                let config = GradientConfig {
                    method,
                    norm: budget.norm,
                    epsilon: budget.epsilon,
                    steps: budget.steps,
                    step_size: None,
                    random_start: true,
                    seed: budget.seed.wrapping_add((index * 8 + run) as u64),
                };
                let mut objective = Objective { surrogate: &mut surrogate, goal, loss };
                let outcome = gradient_attack(&mut objective, image, &config, &mut judge as &mut Judge<'_>, progress)?;
                steps += outcome.steps;
                let success = outcome.success;
                last = Some((outcome, *attack));
                if success {
                    break;
                }
            }
            if last.as_ref().is_some_and(|(o, _)| o.success) {
                break;
            }
        }
        let rows = surrogate.rows;
        let (outcome, attack) = last.ok_or_else(|| RedTeamError::Invalid("no white-box attack given".into()))?;
        Ok(WhiteBoxResult { outcome, attack, steps, rows })
    }
}

/// The surrogate's loss for one goal, as something PGD/APGD can climb.
struct Objective<'a, 'g> {
    surrogate: &'a mut Surrogate<&'g mut GradientServer>,
    goal: Goal,
    loss: Loss,
}

impl Differentiable for Objective<'_, '_> {
    fn step(&mut self, x: &[f32]) -> Result<Step, AttackError> {
        self.surrogate.step(x, self.goal, self.loss)
    }
}

impl<G: Gradients + ?Sized> Gradients for &mut G {
    fn forward(&mut self, model: &str, input: &[f32], rows: usize) -> Result<(u64, Vec<f32>), AttackError> {
        (**self).forward(model, input, rows)
    }

    fn backward(&mut self, handle: u64, cotangent: &[f32]) -> Result<Vec<f32>, AttackError> {
        (**self).backward(handle, cotangent)
    }
}

/// The models an `ensemble` in `settings` combines (the raw model first, as the defense does).
fn ensemble_members(
    settings: &DefenseSettings,
    raw: &Arc<LoadedModel>,
    registry: &crate::model::ModelRegistry,
) -> Result<Vec<Arc<LoadedModel>>, RedTeamError> {
    let names = settings.ensemble_members(registry.names());
    if names.is_empty() {
        return Err(RedTeamError::Invalid(format!(
            "the ensemble combines the loaded {} models and none is loaded",
            settings.precision
        )));
    }
    let mut members = Vec::new();
    if names.contains(&raw.card.name) {
        members.push(Arc::clone(raw));
    }
    for name in names.iter().filter(|n| **n != raw.card.name) {
        let model = registry.get(name).ok_or_else(|| RedTeamError::Invalid(format!("model {name} is not loaded")))?;
        members.push(Arc::clone(model));
    }
    Ok(members)
}

/// The terms of the defended mean for `settings`: the defended answer is the mean of
/// the defenses' probabilities (`defense::combine`), an ensemble the mean of its
/// members', a member the mean of its plain and noisy views.
fn copy_of(
    settings: &DefenseSettings,
    raw: &Arc<LoadedModel>,
    members: &[Arc<LoadedModel>],
) -> Result<(Vec<SurrogateModel>, Vec<Term>), RedTeamError> {
    let spec = &raw.card.input;
    let (width, height) = (spec.width as usize, spec.height as usize);
    let mut models: Vec<SurrogateModel> = Vec::new();
    let mut index_of = |model: &Arc<LoadedModel>| -> usize {
        if let Some(i) = models.iter().position(|m| m.name == model.card.name) {
            return i;
        }
        let input = &model.card.input;
        models.push(SurrogateModel {
            name: model.card.name.clone(),
            fit: Fit::new(width, height, input),
            mean: input.mean,
            std: input.std,
        });
        models.len() - 1
    };
    let mut terms = Vec::new();
    let defenses = &settings.defenses;
    if defenses.is_empty() {
        terms.push(Term { model: index_of(raw), noisy: false, weight: 1.0 });
    }
    let share = 1.0 / defenses.len().max(1) as f32;
    for defense in defenses {
        match defense.as_str() {
            "smooth" if settings.denoise_sigma == 0.0 => {
                terms.push(Term { model: index_of(raw), noisy: true, weight: share });
            }
            "ensemble" => {
                let samples = settings.ensemble_samples as f32;
                let member_share = share / members.len().max(1) as f32;
                for member in members {
                    let model = index_of(member);
                    terms.push(Term { model, noisy: false, weight: member_share / (1.0 + samples) });
                    if samples > 0.0 {
                        terms.push(Term { model, noisy: true, weight: member_share * samples / (1.0 + samples) });
                    }
                }
            }
            other => {
                return Err(RedTeamError::Invalid(format!(
                    "no differentiable copy of `{other}`{}: white-box attacks cover smooth (without denoise_sigma) \
                     and ensemble; use square-eot / nes-eot for it",
                    if other == "smooth" { " with denoise_sigma" } else { "" }
                )));
            }
        }
    }
    Ok((models, terms))
}

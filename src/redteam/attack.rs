//! `pandaguard attack IMAGE --out ADV.png`: one attack on one photo, against the raw
//! model or a defended pipeline, in-process or against a running server (`--url`).
//!
//! The attack works at the raw model's input size (a lossless PNG of that size is what
//! it writes, so a server uses it without resampling). Success is judged at the end on
//! the PNG as written (8-bit), with a fresh seed: what a client would get back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::RedTeamError;
use super::oracle::{Answer, DefendedPipeline, HttpService, RawModel, Seeds, Verdict, as_png};
use super::whitebox::{WhiteBox, WhiteBoxAttack, WhiteBoxBudget};
use crate::attack::eot::Eot;
use crate::attack::nes::{NesConfig, nes_attack};
use crate::attack::square::{SquareConfig, square_attack};
use crate::attack::{Goal, Norm, Oracle, OracleError};
use crate::config::Config;
use crate::imaging::{DecodeLimits, ModelImage, decode, fit_to_input};
use crate::model::{Labels, ModelRegistry};
use crate::pipeline::Pipeline;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Square,
    Nes,
    /// White-box: gradients through a differentiable copy of the pipeline (in-process only).
    Pgd,
    ApgdCe,
    ApgdDlr,
}

impl Method {
    fn white_box(self) -> Option<WhiteBoxAttack> {
        match self {
            Method::Square | Method::Nes => None,
            Method::Pgd => Some(WhiteBoxAttack::Pgd),
            Method::ApgdCe => Some(WhiteBoxAttack::ApgdCe),
            Method::ApgdDlr => Some(WhiteBoxAttack::ApgdDlr),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AttackOptions {
    pub image: PathBuf,
    pub out: PathBuf,
    /// Class name or id; `None` = untargeted (any answer but the current one).
    pub target: Option<String>,
    pub epsilon: f32,
    pub norm: Norm,
    pub method: Method,
    pub queries: usize,
    /// `raw`, `defended` (the `default` preset) or a preset name / comma list of defenses.
    pub against: String,
    /// Draws of the defense's randomness averaged per query (1 = none).
    pub eot: usize,
    /// Attack a running server through `POST /classify` instead of in-process.
    pub url: Option<String>,
    pub seed: u64,
    /// Square Attack's initial fraction of changed pixels (`None`: the paper's).
    pub p_init: Option<f32>,
    /// Score every candidate under the same `eot` seeds ([`Seeds::Fixed`]).
    pub fixed_noise: bool,
    /// Raw model (default: the configured default, or the server's first model).
    pub model: Option<String>,
}

/// One label as reported.
#[derive(Debug, Clone, Serialize)]
pub struct Label {
    pub class_id: Option<usize>,
    pub label: Option<String>,
}

/// The JSON line `pandaguard attack` prints.
#[derive(Debug, Clone, Serialize)]
pub struct AttackReport {
    pub image: String,
    pub out: String,
    pub method: Method,
    pub norm: Norm,
    pub epsilon: f32,
    pub against: String,
    pub eot: usize,
    /// The same `eot` seeds scored every candidate (fixed noise) instead of fresh draws.
    pub fixed_noise: bool,
    pub mode: &'static str,
    pub target: Option<Label>,
    /// The attacked system's answer on the clean image.
    pub original: Label,
    /// Attack iterations (EOT-averaged evaluations).
    pub queries: usize,
    /// Answers of the attacked system: the clean look and every attack query (× EOT
    /// draws), plus the final check.
    pub oracle_queries: usize,
    pub seconds: f64,
    /// The goal is reached on the written PNG, judged with a fresh seed (an
    /// abstention of the defended answer counts as success for an untargeted attack).
    pub success: bool,
    /// The search's own verdict (margin < 0 on its EOT-averaged scores).
    pub search_success: bool,
    pub margin: f32,
    pub linf: f32,
    pub l2: f32,
    /// The preset of the final check (the attacked one, or `default` after an attack on raw).
    pub check_defense: String,
    pub raw: Label,
    pub defended: Label,
    pub suspicious: bool,
}

/// Who the attack talks to.
enum Target {
    Local { pipeline: Arc<Pipeline>, runtime: tokio::runtime::Handle },
    Remote { url: String },
}

/// Runs the attack, writes the PNG and returns the report.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    config: Config,
    options: &AttackOptions,
) -> Result<AttackReport, RedTeamError> {
    if options.eot == 0 {
        return Err(RedTeamError::Invalid("--eot must be at least 1".into()));
    }
    if options.method.white_box().is_some() && options.url.is_some() {
        return Err(RedTeamError::Invalid(
            "white-box attacks run in-process (they need the weights); judge the written PNG with curl".into(),
        ));
    }
    let started = Instant::now();
    let against_raw = options.against == "raw";
    let defense = match options.against.as_str() {
        "raw" => "none".to_string(),
        "defended" => "default".to_string(),
        preset => preset.to_string(),
    };
    let limits = DecodeLimits::from(&config.image);
    let bytes = std::fs::read(&options.image).map_err(RedTeamError::io(&options.image))?;
    let photo =
        decode(&bytes, &limits).map_err(|source| RedTeamError::Decode { path: options.image.clone(), source })?;

    // The raw model's input spec and labels, and who answers.
    let (target, spec, labels, model_name) = match &options.url {
        None => {
            let config = Arc::new(config);
            let raw_name = options.model.clone().unwrap_or_else(|| config.models.default.clone());
            let mut names = vec![raw_name.clone()];
            if !against_raw {
                names.extend(config.models.load.iter().filter(|m| **m != raw_name).cloned());
            }
            let registry = Arc::new(ModelRegistry::load_only(&config, &names)?);
            let model = registry
                .get(&raw_name)
                .ok_or_else(|| RedTeamError::Invalid(format!("model {raw_name} did not load")))?;
            let (spec, labels) = (model.card.input.clone(), model.labels.clone());
            let pipeline = Arc::new(Pipeline::new(Arc::clone(&config), registry));
            (Target::Local { pipeline, runtime: runtime.handle().clone() }, spec, labels, raw_name)
        }
        Some(url) => {
            let models = HttpService::models(url)?;
            let info = match &options.model {
                Some(name) => models.models.iter().find(|m| m.card.name == *name),
                None => models.models.iter().find(|m| m.name == models.default).or(models.models.first()),
            }
            .ok_or_else(|| RedTeamError::Invalid("the server lists no such model".into()))?;
            // The server does not send its label list; the bundled one is the same file.
            let labels = Labels::load(&config.models.dir.join(&info.card.labels), info.card.num_classes)?;
            (Target::Remote { url: url.clone() }, info.card.input.clone(), labels, info.card.name.clone())
        }
    };
    let clean = ModelImage::from_rgb(&fit_to_input(&photo, &spec)?);
    let goal_target = options.target.as_deref().map(|t| resolve_label(t, &labels)).transpose()?;

    // The final check asks the attacked preset, or the default preset when the attack
    // is on the raw model (so the answer shows what the defenses make of it).
    let check_defense = if against_raw { "default".to_string() } else { defense.clone() };
    let check_seed = u64::MAX / 2 + options.seed;
    let fixed = Seeds::Fixed { base: options.seed << 20, period: options.eot as u64 };
    let (mut oracle, mut checker) = match &target {
        Target::Local { pipeline, runtime } => {
            let check = [("defense", check_defense.as_str()), ("model", model_name.as_str())];
            let checker = DefendedPipeline::new(Arc::clone(pipeline), runtime.clone(), &check, check_seed)?;
            let oracle = if against_raw {
                let model = pipeline
                    .registry()
                    .get(&model_name)
                    .ok_or_else(|| RedTeamError::Invalid(format!("model {model_name} is not loaded")))?;
                Attacked::Raw(RawModel::new(Arc::clone(model)))
            } else {
                let params = [("defense", defense.as_str()), ("model", model_name.as_str())];
                let oracle = DefendedPipeline::new(Arc::clone(pipeline), runtime.clone(), &params, options.seed << 20)?;
                Attacked::Pipeline(if options.fixed_noise { oracle.with_seeds(fixed) } else { oracle })
            };
            (oracle, Checker::Pipeline(checker))
        }
        Target::Remote { url } => {
            let answer = if against_raw { Answer::Raw } else { Answer::Defended };
            let params = vec![("defense".to_string(), defense.clone()), ("model".to_string(), model_name.clone())];
            let check = vec![("defense".to_string(), check_defense.clone()), ("model".to_string(), model_name.clone())];
            let checker = HttpService::new(url, check, Answer::Defended, labels.len());
            let oracle = HttpService::new(url, params, answer, labels.len());
            let oracle = if options.fixed_noise { oracle.with_seeds(fixed) } else { oracle };
            (Attacked::Http(oracle), Checker::Http(checker))
        }
    };
    // The attacked system's answer on the clean image (EOT-averaged like every
    // query) decides the untargeted goal.
    let bar = progress_bar(options.queries);
    let outcome = {
        let mut eot = Eot::new(oracle.oracle(), options.eot);
        let original_scores = eot.scores(std::slice::from_ref(&clean))?;
        let original_class = argmax(&original_scores[0]);
        let goal = match goal_target {
            Some(target) => Goal::Targeted { target },
            None => Goal::Untargeted { true_class: original_class },
        };
        let mut progress = |queries: usize, margin: f32| {
            bar.set_position(queries as u64);
            bar.set_message(format!("margin {margin:.3}"));
        };
        let outcome = match options.method {
            Method::Square => {
                let mut config = SquareConfig::new(options.norm, options.epsilon, options.queries, options.seed);
                config.p_init = options.p_init.unwrap_or(config.p_init);
                square_attack(&mut eot, &clean, &goal, &config, &mut progress)?
            }
            Method::Nes => {
                let config = NesConfig::new(options.norm, options.epsilon, options.queries, options.seed);
                nes_attack(&mut eot, &clean, &goal, &config, &mut progress)?
            }
            Method::Pgd | Method::ApgdCe | Method::ApgdDlr => {
                let Target::Local { pipeline, runtime } = &target else {
                    return Err(RedTeamError::Invalid("white-box attacks run in-process".into()));
                };
                let root = std::env::current_dir().map_err(RedTeamError::io("."))?;
                let mut white_box = WhiteBox::start(Arc::clone(pipeline), runtime.clone(), &root)?;
                let budget = WhiteBoxBudget {
                    norm: options.norm,
                    epsilon: options.epsilon,
                    steps: options.queries,
                    eot: options.eot,
                    judge_draws: 1,
                    seed: options.seed,
                };
                let params = [("defense", defense.as_str()), ("model", model_name.as_str())];
                let attacks: Vec<WhiteBoxAttack> = options.method.white_box().into_iter().collect();
                let found = white_box.attack(&clean, goal, &params, &attacks, &budget, &mut progress)?;
                let outcome = found.outcome;
                crate::attack::AttackOutcome {
                    success: outcome.success,
                    queries: found.steps,
                    margin: -outcome.loss,
                    linf: outcome.linf,
                    l2: outcome.l2,
                    margin_history: Vec::new(),
                    adversarial: outcome.adversarial,
                }
            }
        };
        (outcome, original_class, goal)
    };
    let (outcome, original_class, goal) = outcome;
    bar.finish_and_clear();

    let png = as_png(&outcome.adversarial)?;
    std::fs::write(&options.out, &png).map_err(RedTeamError::io(&options.out))?;
    // The final check: the PNG as written, through the full pipeline with a fresh seed.
    let written = image::load_from_memory(&png)
        .map_err(|e| RedTeamError::Invalid(format!("{}: cannot read back: {e}", options.out.display())))?;
    let written = ModelImage::from_rgb(&written.to_rgb8());
    let check = checker.verdict(&written)?;
    let attacked_answer = if against_raw { Some(check.raw) } else { check.defended };
    let success = match goal {
        Goal::Targeted { target } => attacked_answer == Some(target),
        Goal::Untargeted { true_class } => attacked_answer != Some(true_class),
    };
    let (linf, l2) = crate::attack::distances(&clean.data, &written.data);
    Ok(AttackReport {
        image: options.image.display().to_string(),
        out: options.out.display().to_string(),
        method: options.method,
        norm: options.norm,
        epsilon: options.epsilon,
        against: options.against.clone(),
        eot: options.eot,
        fixed_noise: options.fixed_noise,
        mode: if options.url.is_some() { "http" } else { "in-process" },
        target: goal_target.map(|t| label(Some(t), &labels)),
        original: label(Some(original_class), &labels),
        queries: outcome.queries,
        oracle_queries: oracle.queries() + 1,
        check_defense,
        seconds: started.elapsed().as_secs_f64(),
        success,
        search_success: outcome.success,
        margin: outcome.margin,
        linf,
        l2,
        raw: label(Some(check.raw), &labels),
        defended: label(check.defended, &labels),
        suspicious: check.suspicious,
    })
}

/// The answers the attack sees: the raw model in-process, the defended pipeline
/// in-process, or a server.
enum Attacked {
    Raw(RawModel),
    Pipeline(DefendedPipeline),
    Http(HttpService),
}

impl Attacked {
    fn oracle(&mut self) -> &mut dyn Oracle {
        match self {
            Attacked::Raw(oracle) => oracle,
            Attacked::Pipeline(oracle) => oracle,
            Attacked::Http(oracle) => oracle,
        }
    }

    fn queries(&self) -> usize {
        match self {
            Attacked::Raw(oracle) => oracle.queries,
            Attacked::Pipeline(oracle) => oracle.queries,
            Attacked::Http(oracle) => oracle.queries,
        }
    }
}

/// Who gives the full answer (raw and defended) for the final check.
enum Checker {
    Pipeline(DefendedPipeline),
    Http(HttpService),
}

impl Checker {
    fn verdict(&mut self, image: &ModelImage) -> Result<Verdict, OracleError> {
        Ok(match self {
            Checker::Pipeline(checker) => Verdict::from(&checker.classify(image)?),
            Checker::Http(checker) => Verdict::from(&checker.classify(image)?),
        })
    }
}

fn label(class_id: Option<usize>, labels: &Labels) -> Label {
    Label { class_id, label: class_id.map(|c| labels.name(c).to_string()) }
}

/// A class id, an exact class name, or the one class whose name contains the text
/// (case-insensitive): `--target vulture` finds "vulture"; an ambiguous text is refused.
pub fn resolve_label(text: &str, labels: &Labels) -> Result<usize, RedTeamError> {
    if let Ok(id) = text.trim().parse::<usize>() {
        return if id < labels.len() {
            Ok(id)
        } else {
            Err(RedTeamError::Invalid(format!("class {id} is out of range")))
        };
    }
    let wanted = text.trim().to_lowercase();
    let names: Vec<String> = (0..labels.len()).map(|c| labels.name(c).to_lowercase()).collect();
    if let Some(exact) = names.iter().position(|n| *n == wanted || n.split(", ").any(|part| part == wanted)) {
        return Ok(exact);
    }
    let matches: Vec<usize> = (0..names.len()).filter(|&c| names[c].contains(&wanted)).collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => Err(RedTeamError::Invalid(format!("no class is called {text:?}"))),
        many => Err(RedTeamError::Invalid(format!(
            "{text:?} matches {} classes: {}",
            many.len(),
            many.iter().take(5).map(|&c| labels.name(c)).collect::<Vec<_>>().join("; ")
        ))),
    }
}

fn argmax(scores: &[f32]) -> usize {
    scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

/// A query counter on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(queries: usize) -> ProgressBar {
    let bar = ProgressBar::new(queries as u64);
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} queries {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

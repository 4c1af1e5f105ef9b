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
use crate::attack::hsja::{HsjaConfig, hsja_attack};
use crate::attack::nes::{NesConfig, nes_attack};
use crate::attack::oars::{EvasionConfig, EvasionStats, Evasive, Identities};
use crate::attack::square::{SquareConfig, square_attack};
use crate::attack::{AttackError, AttackOutcome, Goal, Norm, Oracle, OracleError};
use crate::config::Config;
use crate::imaging::{DecodeLimits, ModelImage, decode, fit_to_input};
use crate::model::{Labels, ModelRegistry};
use crate::pipeline::Pipeline;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Square,
    Nes,
    /// HopSkipJump: decision-based, untargeted (top-1 answers only).
    Hsja,
    /// White-box: gradients through a differentiable copy of the pipeline (in-process only).
    Pgd,
    ApgdCe,
    ApgdDlr,
}

impl Method {
    fn white_box(self) -> Option<WhiteBoxAttack> {
        match self {
            Method::Square | Method::Nes | Method::Hsja => None,
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
    /// API keys for `--url` (`Authorization: Bearer`); several are identities for
    /// `adaptive`.
    pub api_keys: Vec<String>,
    /// OARS-style evasion of a stateful detector ([`Evasive`]; `--url` only).
    pub adaptive: bool,
    /// With `adaptive`: switch identity every this many accepted queries too (0: only
    /// when refused).
    pub rotate_every: usize,
    /// With `adaptive`: the longest wait for a cooling identity before giving up.
    pub max_wait: Duration,
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
    /// ‖written PNG − clean‖ in `norm` (the `linf` or `l2` above).
    pub distance: f32,
    /// HTTP requests the attack sent (the clean look, the attack, the final check;
    /// refused ones included); `None` in-process.
    pub queries_sent: Option<usize>,
    /// Requests refused with 429 `query_attack_detected`.
    pub refusals: usize,
    /// The 1-based number of the first refused request (`None`: never refused).
    pub queries_until_first_refusal: Option<usize>,
    /// Why the attack ended before its search did: `query_attack_detected` (refused;
    /// no PNG is written then), `budget` (the adaptive attacker spent its requests).
    pub stopped: Option<String>,
    /// The OARS-style evasive attacker ran (`--adaptive`).
    pub adaptive: bool,
    /// Identities (API keys) the attack could switch between, and how often it did.
    pub identities: usize,
    pub identity_switches: usize,
    /// Seconds the adaptive attacker waited for cooldowns to end.
    pub waited_seconds: f64,
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
    if options.adaptive && options.url.is_none() {
        return Err(RedTeamError::Invalid("--adaptive evades a server's detector: it needs --url".into()));
    }
    if options.method == Method::Hsja && options.target.is_some() {
        return Err(RedTeamError::Invalid("--method hsja is untargeted: drop --target".into()));
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
            let models = HttpService::models(url, options.api_keys.first().map(String::as_str))?;
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
            // With several keys the last one judges and never attacks: the judge is a
            // client the detector has not seen sending near-duplicates (the attack's
            // keys may all be refused by the end, which says nothing about the image).
            let mut keys = options.api_keys.clone();
            let judge = if keys.len() >= 2 { keys.split_off(keys.len() - 1) } else { keys.clone() };
            let checker = HttpService::new(url, check, Answer::Defended, labels.len()).with_keys(judge);
            let oracle = HttpService::new(url, params, answer, labels.len()).with_keys(keys);
            let oracle = if options.fixed_noise { oracle.with_seeds(fixed) } else { oracle };
            (Attacked::Http(oracle), Checker::Http(checker))
        }
    };
    // The attacked system's answer on the clean image (EOT-averaged like every
    // query) decides the untargeted goal.
    let bar = progress_bar(options.queries);
    let mut original_class = None;
    let mut evasive = None;
    let searched = {
        let attacked: &mut dyn Oracle = match (&mut oracle, options.adaptive) {
            (Attacked::Http(http), true) => {
                let config = EvasionConfig {
                    rotate_every: options.rotate_every,
                    max_wait: options.max_wait,
                    // The clean look and the search share the budget.
                    ..EvasionConfig::new(options.queries + 1, options.seed)
                };
                evasive.insert(Evasive::new(http, config))
            }
            (attacked, _) => attacked.oracle(),
        };
        // A decision-based attack ends right at the boundary, where rounding the PNG
        // to 8 bits alone could cross back: it is asked about 8-bit images only, so the
        // PNG written is exactly a point it was answered about.
        let mut quantized;
        let attacked: &mut dyn Oracle = if options.method == Method::Hsja {
            quantized = Quantized(attacked);
            &mut quantized
        } else {
            attacked
        };
        let mut eot = Eot::new(attacked, options.eot);
        let mut search = || -> Result<(AttackOutcome, Goal), RedTeamError> {
            let original_scores = eot.scores(std::slice::from_ref(&clean))?;
            let class = argmax(&original_scores[0]);
            original_class = Some(class);
            let goal = match goal_target {
                Some(target) => Goal::Targeted { target },
                None => Goal::Untargeted { true_class: class },
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
                Method::Hsja => {
                    let config = HsjaConfig::new(options.norm, options.epsilon, options.queries, options.seed);
                    hsja_attack(&mut eot, &clean, &goal, &config, &mut progress)?
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
                    AttackOutcome {
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
            Ok((outcome, goal))
        };
        search()
    };
    let evasion = evasive.map(|e| e.stats);
    bar.finish_and_clear();
    let stopped = |reason: &str, oracle: &Attacked| Stopped {
        reason: reason.to_string(),
        original: original_class,
        queries: oracle.queries(),
        evasion: evasion.clone(),
    };
    let (outcome, goal) = match searched {
        Ok(found) => found,
        // Refused by the detector (or out of requests): what matters is how far it got.
        Err(error) => match stop_reason(&error) {
            Some(reason) => {
                let stop = stopped(reason, &oracle);
                return Ok(stopped_report(
                    options,
                    stop,
                    &oracle,
                    &checker,
                    check_defense,
                    &labels,
                    goal_target,
                    started,
                ));
            }
            None => return Err(error),
        },
    };
    let Some(original_class) = original_class else {
        return Err(RedTeamError::Invalid("the clean image was never answered".into()));
    };

    let png = as_png(&outcome.adversarial)?;
    std::fs::write(&options.out, &png).map_err(RedTeamError::io(&options.out))?;
    // The final check: the PNG as written, through the full pipeline with a fresh seed.
    let written = image::load_from_memory(&png)
        .map_err(|e| RedTeamError::Invalid(format!("{}: cannot read back: {e}", options.out.display())))?;
    let written = ModelImage::from_rgb(&written.to_rgb8());
    let check = match checker.verdict(&written) {
        Ok(check) => check,
        Err(OracleError::Detected(_)) => {
            let stop = stopped("query_attack_detected", &oracle);
            return Ok(stopped_report(options, stop, &oracle, &checker, check_defense, &labels, goal_target, started));
        }
        Err(e) => return Err(e.into()),
    };
    let attacked_answer = if against_raw { Some(check.raw) } else { check.defended };
    let fooled = match goal {
        Goal::Targeted { target } => attacked_answer == Some(target),
        Goal::Untargeted { true_class } => attacked_answer != Some(true_class),
    };
    // Square and NES never leave the ε-ball; HopSkipJump returns its closest
    // misclassified point wherever that is, so success also needs it within ε.
    let success = fooled && (options.method != Method::Hsja || outcome.success);
    let (linf, l2) = crate::attack::distances(&clean.data, &written.data);
    let counts = Counts::of(&oracle, &checker, evasion.as_ref());
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
        distance: match options.norm {
            Norm::Linf => linf,
            Norm::L2 => l2,
        },
        queries_sent: counts.sent,
        refusals: counts.refusals,
        queries_until_first_refusal: counts.first_refusal,
        stopped: None,
        adaptive: options.adaptive,
        identities: counts.identities,
        identity_switches: counts.switches,
        waited_seconds: evasion.as_ref().map_or(0.0, |e| e.waited.as_secs_f64()),
    })
}

/// An attack the detector (or its own request budget) ended before its search did.
struct Stopped {
    reason: String,
    original: Option<usize>,
    queries: usize,
    evasion: Option<EvasionStats>,
}

/// `Some(reason)` when `error` is a refusal by the detector or a spent request budget.
fn stop_reason(error: &RedTeamError) -> Option<&'static str> {
    match error {
        RedTeamError::Attack(AttackError::Oracle(e)) | RedTeamError::Oracle(e) => match e {
            OracleError::Detected(_) => Some("query_attack_detected"),
            OracleError::Exhausted(_) => Some("budget"),
            _ => None,
        },
        _ => None,
    }
}

/// The report of a stopped attack: no PNG, no verdict, the counts.
#[allow(clippy::too_many_arguments)]
fn stopped_report(
    options: &AttackOptions,
    stop: Stopped,
    oracle: &Attacked,
    checker: &Checker,
    check_defense: String,
    labels: &Labels,
    goal_target: Option<usize>,
    started: Instant,
) -> AttackReport {
    let counts = Counts::of(oracle, checker, stop.evasion.as_ref());
    let none = Label { class_id: None, label: None };
    AttackReport {
        image: options.image.display().to_string(),
        out: options.out.display().to_string(),
        method: options.method,
        norm: options.norm,
        epsilon: options.epsilon,
        against: options.against.clone(),
        eot: options.eot,
        fixed_noise: options.fixed_noise,
        mode: if options.url.is_some() { "http" } else { "in-process" },
        target: goal_target.map(|t| label(Some(t), labels)),
        original: label(stop.original, labels),
        queries: stop.queries,
        oracle_queries: stop.queries,
        check_defense,
        seconds: started.elapsed().as_secs_f64(),
        success: false,
        search_success: false,
        margin: f32::NAN,
        linf: f32::NAN,
        l2: f32::NAN,
        raw: none.clone(),
        defended: none,
        suspicious: false,
        distance: f32::NAN,
        queries_sent: counts.sent,
        refusals: counts.refusals,
        queries_until_first_refusal: counts.first_refusal,
        stopped: Some(stop.reason),
        adaptive: options.adaptive,
        identities: counts.identities,
        identity_switches: counts.switches,
        waited_seconds: stop.evasion.as_ref().map_or(0.0, |e| e.waited.as_secs_f64()),
    }
}

/// Requests and refusals over HTTP, the attack's and the final check's together.
struct Counts {
    sent: Option<usize>,
    refusals: usize,
    first_refusal: Option<usize>,
    identities: usize,
    switches: usize,
}

impl Counts {
    fn of(oracle: &Attacked, checker: &Checker, evasion: Option<&EvasionStats>) -> Counts {
        let switches = evasion.map_or(0, |e| e.switches);
        match (oracle, checker) {
            (Attacked::Http(http), Checker::Http(check)) => Counts {
                sent: Some(http.queries + check.queries),
                refusals: http.refusals + check.refusals,
                // The check comes after every attack request.
                first_refusal: http.first_refusal.or(check.first_refusal.map(|n| http.queries + n)),
                identities: http.identities(),
                switches,
            },
            _ => Counts { sent: None, refusals: 0, first_refusal: None, identities: 1, switches },
        }
    }
}

/// Rounds every image to 8 bits (as the PNG written at the end) before the inner
/// oracle sees it.
struct Quantized<'a>(&'a mut dyn Oracle);

impl Oracle for Quantized<'_> {
    fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
        let rounded: Vec<ModelImage> = images.iter().map(|image| ModelImage::from_rgb(&image.to_rgb())).collect();
        self.0.scores(&rounded)
    }

    fn pressure(&self) -> f32 {
        self.0.pressure()
    }
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
    /// The verdict on `image`. Over HTTP a refused check is asked again under each
    /// other identity (the attacker holds the keys; one refused key is cooling down).
    fn verdict(&mut self, image: &ModelImage) -> Result<Verdict, OracleError> {
        Ok(match self {
            Checker::Pipeline(checker) => Verdict::from(&checker.classify(image)?),
            Checker::Http(checker) => {
                let mut tries = checker.identities();
                loop {
                    match checker.classify(image) {
                        Ok(answer) => break Verdict::from(&answer),
                        Err(OracleError::Detected(_)) if tries > 1 => {
                            tries -= 1;
                            checker.switch_identity();
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
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

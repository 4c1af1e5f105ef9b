//! `pandaguard evaluate`: clean and adversarial accuracy of the raw model and of
//! defense presets on labelled photos, measured in-process.
//!
//! Threat model of the transfer evaluation: an L∞-bounded perturbation (ε per pixel
//! in [0,1] units) of the model-input image, crafted by score-based black-box attacks
//! (Square, NES) against the *raw* model with at most `queries` queries, then sent to
//! the defended pipeline. The adaptive phase attacks each preset's pipeline itself.
//! Abstentions count as errors everywhere.
//!
//! One [`Evaluator`] holds what every phase needs (the pipeline, the photos, the
//! options); the phases are one file each, in the order they run: `clean`,
//! `transfer`, `adaptive`, `certify`, then `markdown` writes the report.

mod adaptive;
mod certify;
mod clean;
mod markdown;
mod report;
mod samples;
mod transfer;
mod whitebox;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use markdown::whitebox_chart;
pub use report::{
    AdaptiveResult, AttackSummary, Calibration, CertifiedResult, CleanResult, EvaluationReport, Example,
    TransferResult, WhiteBoxRow,
};
pub use samples::{Sample, clean_variants, load_samples, png_bytes};

use super::RedTeamError;
use super::oracle::oracle_error;
use super::whitebox::WhiteBoxAttack;
use crate::config::Config;
use crate::imaging::DecodeLimits;
use crate::model::{LoadedModel, ModelRegistry};
use crate::pipeline::{Outcome, Pipeline};

#[derive(Debug, Clone)]
pub struct EvaluateOptions {
    pub images: PathBuf,
    /// CSV `file,class_id`; default `<images>/labels.csv`.
    pub labels: Option<PathBuf>,
    pub presets: Vec<String>,
    pub epsilons: Vec<f32>,
    pub queries: usize,
    pub max_images: usize,
    pub out: PathBuf,
    pub seed: u64,
    /// Also set the squeeze threshold for a 5% false-positive rate on clean variants.
    pub calibrate: bool,
    /// `square` / `nes` attack the raw model (transfer); `square-eot` / `nes-eot`
    /// attack each preset's defended pipeline itself (adaptive).
    pub attacks: Vec<AttackKind>,
    /// Query budget of the adaptive attacks (each query costs `eot` defended answers).
    pub adaptive_queries: usize,
    /// Photos (of those the raw model gets right) attacked adaptively.
    pub adaptive_images: usize,
    /// Draws of the defense's randomness averaged per adaptive query.
    pub eot: usize,
    /// Noise levels for the certified-accuracy curves (empty = skip).
    pub certify_sigmas: Vec<f32>,
    /// CERTIFY's estimation samples n (its alpha is the configured default).
    pub certify_samples: u32,
    /// Square Attack's initial fraction of changed pixels (default: the paper's).
    pub p_init: Option<f32>,
    /// Presets attacked adaptively (empty: every preset but `none`).
    pub adaptive_presets: Vec<String>,
    /// The adaptive attacker fixes the defense's noise (the API's `seed`): every
    /// candidate is scored under the same `eot` draws (`Seeds::Fixed`).
    pub fixed_noise: bool,
    /// White-box attacks (empty: no white-box phase), tried in order per photo.
    pub whitebox: Vec<WhiteBoxAttack>,
    pub whitebox_steps: usize,
    pub whitebox_eot: usize,
    /// Presets attacked white-box (empty: every preset but `none`).
    pub whitebox_presets: Vec<String>,
    /// L2 radii of an extra white-box row (empty: L∞ only).
    pub whitebox_l2: Vec<f32>,
}

/// One attack of `--attacks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttackKind {
    /// Square Attack on the raw model, its result sent to the defenses.
    Square,
    /// NES on the raw model, its result sent to the defenses.
    Nes,
    /// Square Attack on the defended pipeline, EOT-averaged, warm-started from the transfer example.
    SquareEot,
    /// NES on the defended pipeline, EOT-averaged.
    NesEot,
    /// HopSkipJump (decision-based, L∞) on the raw model, its result sent to the defenses.
    Hsja,
}

impl AttackKind {
    pub fn parse(text: &str) -> Result<Self, RedTeamError> {
        match text.trim() {
            "square" => Ok(Self::Square),
            "nes" => Ok(Self::Nes),
            "square-eot" => Ok(Self::SquareEot),
            "nes-eot" => Ok(Self::NesEot),
            "hsja" => Ok(Self::Hsja),
            other => {
                Err(RedTeamError::Invalid(format!("unknown attack {other:?} (square, nes, hsja, square-eot, nes-eot)")))
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Square => "square",
            Self::Nes => "nes",
            Self::SquareEot => "square-eot",
            Self::NesEot => "nes-eot",
            Self::Hsja => "hsja",
        }
    }

    fn adaptive(self) -> bool {
        matches!(self, Self::SquareEot | Self::NesEot)
    }
}

/// What every phase of an evaluation works with.
pub struct Evaluator<'a> {
    runtime: &'a tokio::runtime::Runtime,
    pipeline: Arc<Pipeline>,
    /// The raw model (the configured default), whose input size the photos have.
    raw: Arc<LoadedModel>,
    samples: Vec<Sample>,
    /// Each sample's clean image as the PNG the service is sent.
    clean_png: Vec<Vec<u8>>,
    /// Whether the raw model classifies each sample correctly (the attacked photos).
    raw_correct: Vec<bool>,
    options: &'a EvaluateOptions,
}

impl<'a> Evaluator<'a> {
    /// Loads every configured model and the photos, and creates the output folders.
    pub fn new(
        runtime: &'a tokio::runtime::Runtime,
        config: Config,
        options: &'a EvaluateOptions,
    ) -> Result<Self, RedTeamError> {
        let config = Arc::new(config);
        let registry = Arc::new(ModelRegistry::load(&config)?);
        let raw = Arc::clone(
            registry.get(registry.default_name()).ok_or_else(|| RedTeamError::Invalid("no default model".into()))?,
        );
        let limits = DecodeLimits::from(&config.image);
        let labels = options.labels.clone().unwrap_or_else(|| options.images.join("labels.csv"));
        let samples = load_samples(&options.images, &labels, options.max_images, &raw, &limits)?;
        for folder in ["adversarial", "clean", "charts"] {
            let path = options.out.join(folder);
            std::fs::create_dir_all(&path).map_err(RedTeamError::io(path))?;
        }
        let clean_png = samples.iter().map(|s| png_bytes(&s.clean)).collect::<Result<Vec<_>, _>>()?;
        let pipeline = Arc::new(Pipeline::new(config, registry));
        let mut evaluator = Evaluator { runtime, pipeline, raw, samples, clean_png, raw_correct: Vec::new(), options };
        evaluator.raw_correct = (0..evaluator.samples.len())
            .map(|i| {
                Ok(evaluator.preset(evaluator.clean_png[i].clone(), "none", 0)?.raw_class()
                    == evaluator.samples[i].class_id)
            })
            .collect::<Result<_, RedTeamError>>()?;
        Ok(evaluator)
    }

    /// Classifies PNG bytes with API parameters.
    fn classify(&self, png: Vec<u8>, pairs: &[(&str, &str)]) -> Result<Outcome, RedTeamError> {
        let params = self.pipeline.params(pairs.iter().copied())?;
        let outcome = self.runtime.block_on(self.pipeline.classify(png.into(), &params, Instant::now()));
        Ok(outcome.map_err(oracle_error)?)
    }

    /// Classifies PNG bytes with a preset and a seed.
    fn preset(&self, png: Vec<u8>, preset: &str, seed: u64) -> Result<Outcome, RedTeamError> {
        let seed = seed.to_string();
        self.classify(png, &[("defense", preset), ("seed", seed.as_str())])
    }

    /// Writes `bytes` to `relative` inside the output folder.
    fn write(&self, relative: &str, bytes: &[u8]) -> Result<(), RedTeamError> {
        let path = self.options.out.join(relative);
        std::fs::write(&path, bytes).map_err(RedTeamError::io(path))
    }

    /// The indices of the photos the raw model gets right.
    fn attacked(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.samples.len()).filter(|&i| self.raw_correct[i])
    }
}

/// Runs the evaluation and writes `report.json`, `report.md` and the charts into `options.out`.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    config: Config,
    options: &EvaluateOptions,
) -> Result<EvaluationReport, RedTeamError> {
    let evaluator = Evaluator::new(runtime, config, options)?;
    let mut report = EvaluationReport {
        model: evaluator.raw.card.name.clone(),
        images: evaluator.samples.len(),
        queries: options.queries,
        seed: options.seed,
        clean: Vec::new(),
        attacks: Vec::new(),
        transfer: Vec::new(),
        calibration: Vec::new(),
        examples: Vec::new(),
        adaptive: Vec::new(),
        certified: Vec::new(),
        whitebox: Vec::new(),
        charts: Vec::new(),
    };
    report.clean = clean::measure(&evaluator)?;
    let transfer_images = transfer::run(&evaluator, &mut report)?;
    report.adaptive = adaptive::run(&evaluator, &transfer_images)?;
    report.whitebox = whitebox::run(&evaluator)?;
    report.certified = certify::run(&evaluator)?;
    if options.calibrate {
        report.calibration = clean::calibrate(&evaluator)?;
    }
    report.charts.extend(report.examples.iter().filter_map(|e| e.strip.clone()));
    report.charts.extend(report.whitebox.iter().filter_map(|r| r.strip.clone()));
    report.charts.extend(markdown::summary_charts(&report, &options.out));
    markdown::write(&report, &options.out)?;
    evaluator.pipeline.registry().close();
    Ok(report)
}

/// Correct answers among (true class, outcome) pairs.
struct Tally {
    raw_correct: usize,
    defended_correct: usize,
    abstained: usize,
    suspicious: usize,
    per_defense: Vec<(String, usize)>,
}

impl Tally {
    fn of(answers: &[(usize, Outcome)]) -> Self {
        let mut tally =
            Tally { raw_correct: 0, defended_correct: 0, abstained: 0, suspicious: 0, per_defense: Vec::new() };
        for (truth, outcome) in answers {
            tally.raw_correct += usize::from(outcome.raw_class() == *truth);
            tally.defended_correct += usize::from(outcome.defended.class_id == Some(*truth));
            tally.abstained += usize::from(outcome.defended.abstained());
            tally.suspicious += usize::from(outcome.suspicious);
            for defense in &outcome.defenses {
                let correct = usize::from(defense.class_id == Some(*truth));
                match tally.per_defense.iter_mut().find(|(name, _)| name == defense.name) {
                    Some((_, count)) => *count += correct,
                    None => tally.per_defense.push((defense.name.to_string(), correct)),
                }
            }
        }
        tally
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 0 { (values[mid - 1] + values[mid]) / 2.0 } else { values[mid] }
}

/// ε as the n/255 the reports and file names use.
fn eps_255(epsilon: f32) -> f32 {
    (epsilon * 255.0).round()
}

/// One attack of `kind` on `oracle`, from `start` when given (Square's warm start).
#[allow(clippy::too_many_arguments)]
fn run_attack(
    kind: AttackKind,
    oracle: &mut dyn crate::attack::Oracle,
    image: &crate::imaging::ModelImage,
    goal: &crate::attack::Goal,
    epsilon: f32,
    queries: usize,
    seed: u64,
    start: Option<&crate::imaging::ModelImage>,
    p_init: Option<f32>,
) -> Result<crate::attack::AttackOutcome, RedTeamError> {
    use crate::attack::Norm;
    use crate::attack::nes::{NesConfig, nes_attack};
    use crate::attack::square::{SquareConfig, square_attack};
    Ok(match kind {
        AttackKind::Square | AttackKind::SquareEot => {
            let mut config = SquareConfig::new(Norm::Linf, epsilon, queries, seed);
            config.start = start.map(|s| s.data.clone());
            if let Some(p_init) = p_init {
                config.p_init = p_init;
            }
            square_attack(oracle, image, goal, &config, &mut |_, _| {})?
        }
        AttackKind::Nes | AttackKind::NesEot => {
            let config = NesConfig::new(Norm::Linf, epsilon, queries, seed);
            nes_attack(oracle, image, goal, &config, &mut |_, _| {})?
        }
        AttackKind::Hsja => {
            let config = crate::attack::hsja::HsjaConfig::new(Norm::Linf, epsilon, queries, seed);
            crate::attack::hsja::hsja_attack(oracle, image, goal, &config, &mut |_, _| {})?
        }
    })
}

//! `pandaguard evaluate`: clean and adversarial accuracy of the raw model and of
//! defense presets on labelled photos, measured in-process.
//!
//! Threat model of the transfer evaluation: an L∞-bounded perturbation (ε per pixel
//! in [0,1] units) of the model-input image, crafted by the score-based black-box
//! Square Attack against the *raw* model with at most `queries` queries, then sent to
//! the defended pipeline. Abstentions count as errors everywhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::charts;
use super::oracle::{DefendedPipeline, RawModel, Seeds};
use crate::api::ClassifyResponse;
use crate::attack::Goal;
use crate::attack::eot::Eot;
use crate::attack::nes::{NesConfig, nes_attack};
use crate::attack::square::{AttackOutcome, Norm, SquareConfig, square_attack};
use crate::config::Config;
use crate::defense::report::DefenseDetails;
use crate::imaging::{DecodeLimits, ModelImage, Region, decode, fit_to_input, resize_region};
use crate::model::{LoadedModel, ModelRegistry};
use crate::params::ClassifyParams;
use crate::pipeline::Pipeline;

/// Classifies PNG bytes with a preset and a seed.
type Classify<'a> = dyn Fn(Vec<u8>, &str, u64) -> Result<ClassifyResponse, String> + 'a;
/// Classifies PNG bytes with API parameters.
type ClassifyWith<'a> = dyn Fn(Vec<u8>, &[(&str, &str)]) -> Result<ClassifyResponse, String> + 'a;

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
    /// candidate is scored under the same `eot` draws ([`Seeds::Fixed`]).
    pub fixed_noise: bool,
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
}

impl AttackKind {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "square" => Ok(Self::Square),
            "nes" => Ok(Self::Nes),
            "square-eot" => Ok(Self::SquareEot),
            "nes-eot" => Ok(Self::NesEot),
            other => Err(format!("unknown attack {other:?} (square, nes, square-eot, nes-eot)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Square => "square",
            Self::Nes => "nes",
            Self::SquareEot => "square-eot",
            Self::NesEot => "nes-eot",
        }
    }

    fn adaptive(self) -> bool {
        matches!(self, Self::SquareEot | Self::NesEot)
    }
}

/// A labelled photo at the raw model's input size.
pub struct Sample {
    pub file: String,
    pub class_id: usize,
    /// The decoded photo (for calibration variants).
    pub photo: RgbImage,
    /// The model-input image the attacks perturb.
    pub clean: ModelImage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvaluationReport {
    pub model: String,
    pub images: usize,
    pub queries: usize,
    pub seed: u64,
    pub clean: Vec<CleanResult>,
    pub attacks: Vec<AttackSummary>,
    pub transfer: Vec<TransferResult>,
    pub calibration: Vec<Calibration>,
    pub examples: Vec<Example>,
    pub adaptive: Vec<AdaptiveResult>,
    pub certified: Vec<CertifiedResult>,
    /// Chart files written beside the report, relative to it.
    pub charts: Vec<String>,
}

/// Transfer and adaptive attacks on one preset, on the same photos.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdaptiveResult {
    pub preset: String,
    pub attack: String,
    pub epsilon: f32,
    /// Attack iterations allowed; each is `eot` defended answers.
    pub queries: usize,
    pub eot: usize,
    /// The attacker fixed the defense's noise (same `eot` seeds for every candidate)
    /// instead of drawing fresh noise per query; judged with unused seeds either way.
    #[serde(default)]
    pub fixed_noise: bool,
    /// Photos attacked (the first ones the raw model classifies correctly).
    pub images: usize,
    /// Defended answer right on the clean photo.
    pub clean_correct: usize,
    /// Defended answer right on the transfer example (Square on the raw model).
    pub transfer_correct: usize,
    /// Defended answer right on both the transfer and the adaptive example, judged with
    /// fresh seeds: accuracy under the stronger of the two attacks.
    pub adaptive_correct: usize,
    pub abstained: usize,
    /// Final adversarial answers flagged suspicious.
    pub suspicious: usize,
    /// Median attack iterations of the adaptive searches that reached their goal.
    pub median_queries: f64,
    pub seconds: f64,
}

/// Certified accuracy of randomized smoothing on the raw model (CERTIFY).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertifiedResult {
    pub sigma: f32,
    pub selection_samples: u64,
    pub samples: u64,
    pub alpha: f64,
    /// The largest radius these n and alpha can certify (all samples agree).
    pub max_radius: f64,
    pub images: usize,
    /// Certified with the true class at radius 0 (the smoothed classifier's accuracy).
    pub certified_correct: usize,
    pub abstained: usize,
    /// Per photo: certified radius when CERTIFY returned the true class, else null.
    pub radii: Vec<Option<f64>>,
    /// (L2 radius, fraction of photos certified correct at that radius or more).
    pub curve: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CleanResult {
    pub preset: String,
    pub raw_correct: usize,
    pub defended_correct: usize,
    pub abstained: usize,
    pub suspicious: usize,
    pub total: usize,
    /// Per defense: photos it classified correctly.
    pub per_defense: Vec<(String, usize)>,
    pub median_latency_ms: f64,
    /// Median ORT time of the same batches run alone.
    pub median_inference_ms: f64,
    pub median_rows: f64,
    /// median latency / median ORT time alone.
    pub latency_ratio: f64,
    /// Median time building the defenses' views (noise, blur, crops) as a share of the
    /// request's own inference time.
    pub views_share: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttackSummary {
    pub attack: String,
    pub epsilon: f32,
    /// Photos the raw model got right (the ones attacked).
    pub attacked: usize,
    /// Of those, the attack fooled the raw model on:
    pub fooled: usize,
    pub median_queries: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferResult {
    pub preset: String,
    pub attack: String,
    pub epsilon: f32,
    /// Adversarial photos (those that fool the raw model).
    pub adversarial: usize,
    /// The defended answer is the true label again.
    pub recovered: usize,
    pub abstained: usize,
    pub suspicious: usize,
    pub per_defense: Vec<(String, usize)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    pub preset: String,
    pub images: usize,
    /// Clean variants where raw and defended disagree (flagged whatever the threshold).
    pub disagreements: usize,
    /// 95th percentile of the squeeze score on the clean variants.
    pub threshold: f32,
    /// Share of clean variants flagged suspicious (disagreement or score above the threshold).
    pub false_positive_rate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Example {
    pub file: String,
    pub class_id: usize,
    pub epsilon: f32,
    pub queries: usize,
    pub fooled: bool,
    pub raw_label: String,
    /// (preset, defended label or "abstain", suspicious)
    pub defended: Vec<(String, String, bool)>,
    pub png: String,
    /// Strip chart (original, adversarial, amplified perturbation), when drawn.
    pub strip: Option<String>,
}

pub fn load_samples(
    options: &EvaluateOptions,
    raw: &LoadedModel,
    limits: &DecodeLimits,
) -> Result<Vec<Sample>, String> {
    let labels = options.labels.clone().unwrap_or_else(|| options.images.join("labels.csv"));
    let text = std::fs::read_to_string(&labels).map_err(|e| format!("{}: {e}", labels.display()))?;
    let mut samples = Vec::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()).take(options.max_images) {
        let (file, class) = line.split_once(',').ok_or_else(|| format!("{}: bad line {line:?}", labels.display()))?;
        let class_id: usize =
            class.trim().parse().map_err(|_| format!("{}: bad class in {line:?}", labels.display()))?;
        let path = options.images.join(file.trim());
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let photo = decode(&bytes, limits).map_err(|e| format!("{}: {e}", path.display()))?;
        let clean = ModelImage::from_rgb(&fit_to_input(&photo, &raw.card.input)?);
        samples.push(Sample { file: file.trim().to_string(), class_id, photo, clean });
    }
    if samples.is_empty() {
        return Err(format!("no labelled images in {}", labels.display()));
    }
    Ok(samples)
}

pub fn png_bytes(image: &ModelImage) -> Result<Vec<u8>, String> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.to_rgb().write_to(&mut out, image::ImageFormat::Png).map_err(|e| e.to_string())?;
    Ok(out.into_inner())
}

/// Runs the evaluation and writes `report.json` and `report.md` into `options.out`.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    config: Config,
    options: &EvaluateOptions,
) -> Result<EvaluationReport, String> {
    let config = Arc::new(config);
    let registry = Arc::new(ModelRegistry::load(&config)?);
    let pipeline = Arc::new(Pipeline::new(Arc::clone(&config), Arc::clone(&registry)));
    let raw = Arc::clone(registry.get(registry.default_name()).ok_or("no default model")?);
    let limits = DecodeLimits::from(&config.image);
    let samples = load_samples(options, &raw, &limits)?;
    for folder in ["adversarial", "clean", "charts"] {
        std::fs::create_dir_all(options.out.join(folder)).map_err(|e| format!("{}: {e}", options.out.display()))?;
    }
    let classify_with = |bytes: Vec<u8>, pairs: &[(&str, &str)]| -> Result<ClassifyResponse, String> {
        let params = ClassifyParams::from_pairs(pairs.iter().copied(), &config).map_err(|e| e.to_string())?;
        runtime
            .block_on(pipeline.classify(bytes.into(), &params, "evaluate".into(), Instant::now()))
            .map_err(|e| e.to_string())
    };
    let classify = |bytes: Vec<u8>, preset: &str, seed: u64| -> Result<ClassifyResponse, String> {
        let seed_text = seed.to_string();
        classify_with(bytes, &[("defense", preset), ("seed", seed_text.as_str())])
    };

    let mut report = EvaluationReport {
        model: raw.card.name.clone(),
        images: samples.len(),
        queries: options.queries,
        seed: options.seed,
        clean: Vec::new(),
        attacks: Vec::new(),
        transfer: Vec::new(),
        calibration: Vec::new(),
        examples: Vec::new(),
        adaptive: Vec::new(),
        certified: Vec::new(),
        charts: Vec::new(),
    };

    // Clean photos.
    let clean_png: Vec<Vec<u8>> = samples.iter().map(|s| png_bytes(&s.clean)).collect::<Result<_, _>>()?;
    for (sample, png) in samples.iter().zip(&clean_png) {
        let stem = sample.file.trim_end_matches(".jpg");
        std::fs::write(options.out.join("clean").join(format!("{stem}.png")), png).map_err(|e| e.to_string())?;
        for (v, variant) in clean_variants(sample, &raw)?.iter().enumerate() {
            let path = options.out.join("clean").join(format!("{stem}_v{v}.png"));
            std::fs::write(path, png_bytes(variant)?).map_err(|e| e.to_string())?;
        }
    }
    for preset in &options.presets {
        let mut answers = Vec::new();
        for (index, (sample, png)) in samples.iter().zip(&clean_png).enumerate() {
            answers.push((sample.class_id, classify(png.clone(), preset, options.seed + index as u64)?));
        }
        let (latency, inference, rows) = cost(runtime, &registry, &answers.iter().map(|(_, a)| a).collect::<Vec<_>>())?;
        let views_share =
            median(answers.iter().map(|(_, a)| a.timing_ms.views / a.timing_ms.inference.max(1e-9)).collect());
        let tally = Tally::of(&answers);
        report.clean.push(CleanResult {
            preset: preset.clone(),
            raw_correct: tally.raw_correct,
            defended_correct: tally.defended_correct,
            abstained: tally.abstained,
            suspicious: tally.suspicious,
            total: answers.len(),
            per_defense: tally.per_defense,
            median_latency_ms: latency,
            median_inference_ms: inference,
            median_rows: rows,
            latency_ratio: latency / inference.max(f64::EPSILON),
            views_share,
        });
        eprintln!(
            "clean {preset}: raw {}/{n}, defended {}/{n}",
            tally.raw_correct,
            tally.defended_correct,
            n = answers.len()
        );
    }

    // Transfer: each attack on the raw model, then every preset on its result.
    let transfer_kinds: Vec<AttackKind> =
        match options.attacks.iter().filter(|a| !a.adaptive()).copied().collect::<Vec<_>>() {
            kinds if kinds.is_empty() => vec![AttackKind::Square],
            kinds => kinds,
        };
    let raw_correct: Vec<bool> = samples
        .iter()
        .zip(&clean_png)
        .map(|(sample, png)| Ok(classify(png.clone(), "none", 0)?.raw.class_id == sample.class_id))
        .collect::<Result<_, String>>()?;
    // The first transfer attack's output per (ε, photo), attacked photos only: the
    // adaptive attacks start from it.
    let mut transfer_images: Vec<Vec<Option<ModelImage>>> = vec![vec![None; samples.len()]; options.epsilons.len()];
    let mut strips = 0;
    for (e, &epsilon) in options.epsilons.iter().enumerate() {
        for (k, &kind) in transfer_kinds.iter().enumerate() {
            let mut adversarial = Vec::new();
            let mut queries = Vec::new();
            let mut attacked = 0;
            let bar = super::attack::progress_bar(samples.len());
            bar.set_message(format!("{} on raw, ε {:.0}/255", kind.name(), epsilon * 255.0));
            for (index, sample) in samples.iter().enumerate() {
                bar.set_position(index as u64);
                if !raw_correct[index] {
                    continue;
                }
                attacked += 1;
                let mut oracle = RawModel::new(Arc::clone(&raw));
                let goal = Goal::Untargeted { true_class: sample.class_id };
                let seed = options.seed + index as u64;
                let outcome = run_attack(
                    kind,
                    &mut oracle,
                    &sample.clean,
                    &goal,
                    epsilon,
                    options.queries,
                    seed,
                    None,
                    options.p_init,
                )?;
                if k == 0 {
                    transfer_images[e][index] = Some(outcome.adversarial.clone());
                }
                if outcome.success {
                    queries.push(outcome.queries as f64);
                    adversarial.push((index, outcome));
                }
            }
            bar.finish_and_clear();
            report.attacks.push(AttackSummary {
                attack: kind.name().into(),
                epsilon,
                attacked,
                fooled: adversarial.len(),
                median_queries: median(queries),
            });
            eprintln!("{} eps {:.0}/255: fooled raw on {}/{attacked}", kind.name(), epsilon * 255.0, adversarial.len());

            let mut per_preset: Vec<Vec<(usize, ClassifyResponse)>> = vec![Vec::new(); options.presets.len()];
            for (index, outcome) in &adversarial {
                let sample = &samples[*index];
                let png = png_bytes(&outcome.adversarial)?;
                let stem = sample.file.trim_end_matches(".jpg");
                let name = format!("{stem}_{}_eps{}.png", kind.name(), (epsilon * 255.0).round());
                std::fs::write(options.out.join("adversarial").join(&name), &png).map_err(|e| e.to_string())?;
                let mut defended = Vec::new();
                let mut raw_label = String::new();
                for (p, preset) in options.presets.iter().enumerate() {
                    let answer = classify(png.clone(), preset, options.seed + *index as u64)?;
                    raw_label = answer.raw.label.clone();
                    let label = answer.defended.label.clone().unwrap_or_else(|| "abstain".into());
                    defended.push((preset.clone(), label, answer.suspicious));
                    per_preset[p].push((sample.class_id, answer));
                }
                let strip = if strips < MAX_STRIPS {
                    strips += 1;
                    let path = format!("charts/strip_{stem}_{}_eps{}.png", kind.name(), (epsilon * 255.0).round());
                    let truth = raw.labels.name(sample.class_id);
                    let (preset, label, _) = defended.first().cloned().unwrap_or_default();
                    let captions = [
                        format!("original: {truth}"),
                        format!("adversarial: raw {raw_label} / {preset} {label}"),
                        format!("perturbation x20 ({} {:.0}/255)", kind.name(), epsilon * 255.0),
                    ];
                    let captions = [captions[0].as_str(), captions[1].as_str(), captions[2].as_str()];
                    match charts::example_strip(
                        &options.out.join(&path),
                        &sample.clean,
                        &outcome.adversarial,
                        20.0,
                        captions,
                    ) {
                        Ok(()) => Some(path),
                        Err(e) => {
                            eprintln!("no strip chart: {e}");
                            None
                        }
                    }
                } else {
                    None
                };
                report.examples.push(Example {
                    file: sample.file.clone(),
                    class_id: sample.class_id,
                    epsilon,
                    queries: outcome.queries,
                    fooled: true,
                    raw_label,
                    defended,
                    png: format!("adversarial/{name}"),
                    strip,
                });
            }
            for (preset, answers) in options.presets.iter().zip(per_preset) {
                let tally = Tally::of(&answers);
                report.transfer.push(TransferResult {
                    preset: preset.clone(),
                    attack: kind.name().into(),
                    epsilon,
                    adversarial: answers.len(),
                    recovered: tally.defended_correct,
                    abstained: tally.abstained,
                    suspicious: tally.suspicious,
                    per_defense: tally.per_defense,
                });
            }
        }
    }

    // Adaptive: each EOT attack on each preset's own pipeline, beside the transfer
    // example on the same photos.
    let adaptive_photos: Vec<usize> =
        (0..samples.len()).filter(|&i| raw_correct[i]).take(options.adaptive_images).collect();
    for kind in options.attacks.iter().copied().filter(|a| a.adaptive()) {
        let targets = if options.adaptive_presets.is_empty() { &options.presets } else { &options.adaptive_presets };
        for preset in targets.iter().filter(|p| p.as_str() != "none") {
            for (e, &epsilon) in options.epsilons.iter().enumerate() {
                let result = adaptive(
                    &pipeline,
                    runtime,
                    &samples,
                    &adaptive_photos,
                    &transfer_images[e],
                    preset,
                    kind,
                    epsilon,
                    options,
                    &classify,
                )?;
                eprintln!(
                    "{} on {preset} eps {:.0}/255: transfer {}/{n}, adaptive {}/{n} correct",
                    kind.name(),
                    epsilon * 255.0,
                    result.transfer_correct,
                    result.adaptive_correct,
                    n = result.images
                );
                report.adaptive.push(result);
            }
        }
    }

    // Certified accuracy of randomized smoothing on the raw model.
    for &sigma in &options.certify_sigmas {
        let result = certified(&samples, &clean_png, sigma, options, &classify_with)?;
        eprintln!(
            "certify sigma {sigma}: {}/{} certified correct at radius 0, max radius {:.3}",
            result.certified_correct, result.images, result.max_radius
        );
        report.certified.push(result);
    }

    if options.calibrate {
        for preset in &options.presets {
            report.calibration.push(calibrate(&samples, &raw, preset, options.seed, &classify)?);
        }
    }
    report.charts.extend(report.examples.iter().filter_map(|e| e.strip.clone()));
    report.charts.extend(summary_charts(&report, &options.out));
    write_report(&report, &options.out)?;
    registry.close();
    Ok(report)
}

/// Example strips drawn (the first adversarial examples).
const MAX_STRIPS: usize = 6;

/// One attack on `oracle` by kind.
#[allow(clippy::too_many_arguments)]
fn run_attack(
    kind: AttackKind,
    oracle: &mut dyn crate::attack::Oracle,
    image: &ModelImage,
    goal: &Goal,
    epsilon: f32,
    queries: usize,
    seed: u64,
    start: Option<&ModelImage>,
    p_init: Option<f32>,
) -> Result<AttackOutcome, String> {
    match kind {
        AttackKind::Square | AttackKind::SquareEot => {
            let mut config = SquareConfig::new(Norm::Linf, epsilon, queries, seed);
            config.start = start.map(|s| s.data.clone());
            if let Some(p_init) = p_init {
                config.p_init = p_init;
            }
            square_attack(oracle, image, goal, &config, &mut |_, _| {})
        }
        AttackKind::Nes | AttackKind::NesEot => {
            let config = NesConfig::new(Norm::Linf, epsilon, queries, seed);
            nes_attack(oracle, image, goal, &config, &mut |_, _| {})
        }
    }
}

/// The adaptive attack of one kind on one preset at one ε.
#[allow(clippy::too_many_arguments)]
fn adaptive(
    pipeline: &Arc<Pipeline>,
    runtime: &tokio::runtime::Runtime,
    samples: &[Sample],
    photos: &[usize],
    transfer_images: &[Option<ModelImage>],
    preset: &str,
    kind: AttackKind,
    epsilon: f32,
    options: &EvaluateOptions,
    classify: &Classify<'_>,
) -> Result<AdaptiveResult, String> {
    let started = Instant::now();
    let mut result = AdaptiveResult {
        preset: preset.to_string(),
        attack: kind.name().into(),
        epsilon,
        queries: options.adaptive_queries,
        eot: options.eot,
        fixed_noise: options.fixed_noise,
        images: photos.len(),
        clean_correct: 0,
        transfer_correct: 0,
        adaptive_correct: 0,
        abstained: 0,
        suspicious: 0,
        median_queries: f64::NAN,
        seconds: 0.0,
    };
    let mut queries = Vec::new();
    let bar = super::attack::progress_bar(photos.len());
    bar.set_message(format!("{} on {preset}, ε {:.0}/255", kind.name(), epsilon * 255.0));
    for (n, &index) in photos.iter().enumerate() {
        bar.set_position(n as u64);
        let sample = &samples[index];
        // Judged seeds differ from every seed the attack's oracle used.
        let judge_seed = u64::MAX / 2 + options.seed * 1000 + index as u64;
        let clean = classify(png_bytes(&sample.clean)?, preset, judge_seed)?;
        result.clean_correct += usize::from(clean.defended.class_id == Some(sample.class_id));
        let transfer = transfer_images[index].as_ref();
        let transfer_ok = match transfer {
            Some(image) => classify(png_bytes(image)?, preset, judge_seed)?.defended.class_id == Some(sample.class_id),
            None => clean.defended.class_id == Some(sample.class_id),
        };
        result.transfer_correct += usize::from(transfer_ok);

        let attack_seed = (options.seed + index as u64) << 24;
        let mut oracle =
            DefendedPipeline::new(Arc::clone(pipeline), runtime.handle().clone(), &[("defense", preset)], attack_seed)?;
        if options.fixed_noise {
            oracle = oracle.with_seeds(Seeds::Fixed { base: attack_seed, period: options.eot as u64 });
        }
        let mut eot = Eot::new(&mut oracle, options.eot);
        let goal = Goal::Untargeted { true_class: sample.class_id };
        let seed = options.seed + index as u64;
        let start = if kind == AttackKind::SquareEot { transfer } else { None };
        let outcome = run_attack(
            kind,
            &mut eot,
            &sample.clean,
            &goal,
            epsilon,
            options.adaptive_queries,
            seed,
            start,
            options.p_init,
        )?;
        if outcome.success {
            queries.push(outcome.queries as f64);
        }
        let answer = classify(png_bytes(&outcome.adversarial)?, preset, judge_seed + 1)?;
        let adaptive_ok = answer.defended.class_id == Some(sample.class_id);
        result.adaptive_correct += usize::from(adaptive_ok && transfer_ok);
        result.abstained += usize::from(answer.defended.abstained);
        result.suspicious += usize::from(answer.suspicious);
    }
    bar.finish_and_clear();
    result.median_queries = median(queries);
    result.seconds = started.elapsed().as_secs_f64();
    Ok(result)
}

/// CERTIFY on every photo at one σ; the curve of certified accuracy against radius.
fn certified(
    samples: &[Sample],
    clean_png: &[Vec<u8>],
    sigma: f32,
    options: &EvaluateOptions,
    classify_with: &ClassifyWith<'_>,
) -> Result<CertifiedResult, String> {
    let sigma_text = sigma.to_string();
    let samples_text = options.certify_samples.to_string();
    let mut radii = Vec::new();
    let (mut abstained, mut correct) = (0, 0);
    let mut meta = None;
    for (index, (sample, png)) in samples.iter().zip(clean_png).enumerate() {
        let seed = (options.seed + index as u64).to_string();
        let pairs = [
            ("defense", "smooth"),
            ("sigma", sigma_text.as_str()),
            ("samples", samples_text.as_str()),
            ("certify", "true"),
            ("seed", seed.as_str()),
        ];
        let answer = classify_with(png.clone(), &pairs)?;
        let certificate = answer
            .defenses
            .iter()
            .find_map(|d| match &d.details {
                DefenseDetails::Smooth(details) => details.certificate.clone().map(|c| (c, details.alpha)),
                _ => None,
            })
            .ok_or("the smoothing answer carries no certificate")?;
        let (certificate, alpha) = certificate;
        abstained += usize::from(certificate.abstained);
        let radius = match (certificate.class_id, certificate.radius) {
            (Some(class), Some(radius)) if class == sample.class_id => Some(radius),
            _ => None,
        };
        correct += usize::from(radius.is_some());
        radii.push(radius);
        meta = Some((certificate.selection_samples, certificate.max_radius, alpha));
    }
    let (selection_samples, max_radius, alpha) = meta.ok_or("no photos to certify")?;
    let steps = 40;
    let curve = (0..=steps)
        .map(|i| {
            let r = max_radius * 1.05 * i as f64 / steps as f64;
            let certified = radii.iter().filter(|radius| radius.is_some_and(|x| x >= r)).count();
            (r, certified as f64 / samples.len() as f64)
        })
        .collect();
    Ok(CertifiedResult {
        sigma,
        selection_samples,
        samples: u64::from(options.certify_samples),
        alpha,
        max_radius,
        images: samples.len(),
        certified_correct: correct,
        abstained,
        radii,
        curve,
    })
}

/// The certified-accuracy and accuracy-per-preset charts; returns the files written.
fn summary_charts(report: &EvaluationReport, out: &Path) -> Vec<String> {
    let mut written = Vec::new();
    if !report.certified.is_empty() {
        let curves: Vec<charts::Curve> = report
            .certified
            .iter()
            .map(|c| charts::Curve {
                label: format!("σ = {} (n = {}, α = {})", c.sigma, c.samples, c.alpha),
                points: c.curve.clone(),
            })
            .collect();
        let path = "charts/certified_accuracy.png";
        match charts::certified_accuracy_chart(
            &out.join(path),
            "Certified accuracy against L2 radius (CERTIFY, raw model)",
            &curves,
        ) {
            Ok(()) => written.push(path.to_string()),
            Err(e) => eprintln!("no certified-accuracy chart: {e}"),
        }
    }
    let mut groups = Vec::new();
    for clean in &report.clean {
        let mut bars = vec![("clean".to_string(), clean.defended_correct as f64 / clean.total.max(1) as f64)];
        for a in report.adaptive.iter().filter(|a| a.preset == clean.preset) {
            let eps = format!("{:.0}/255", a.epsilon * 255.0);
            bars.push((format!("transfer {eps}"), a.transfer_correct as f64 / a.images.max(1) as f64));
            bars.push((format!("{} {eps}", a.attack), a.adaptive_correct as f64 / a.images.max(1) as f64));
        }
        groups.push(charts::AccuracyBars { group: clean.preset.clone(), bars });
    }
    if !groups.is_empty() {
        let path = "charts/accuracy.png";
        match charts::accuracy_bars_chart(
            &out.join(path),
            "Defended top-1 accuracy: clean, transfer and adaptive attacks",
            &groups,
        ) {
            Ok(()) => written.push(path.to_string()),
            Err(e) => eprintln!("no accuracy chart: {e}"),
        }
    }
    written
}

/// Correct answers among (true class, answer) pairs.
struct Tally {
    raw_correct: usize,
    defended_correct: usize,
    abstained: usize,
    suspicious: usize,
    per_defense: Vec<(String, usize)>,
}

impl Tally {
    fn of(answers: &[(usize, ClassifyResponse)]) -> Self {
        let mut per_defense: Vec<(String, usize)> = Vec::new();
        let mut tally =
            Tally { raw_correct: 0, defended_correct: 0, abstained: 0, suspicious: 0, per_defense: Vec::new() };
        for (truth, answer) in answers {
            tally.raw_correct += usize::from(answer.raw.class_id == *truth);
            tally.defended_correct += usize::from(answer.defended.class_id == Some(*truth));
            tally.abstained += usize::from(answer.defended.abstained);
            tally.suspicious += usize::from(answer.suspicious);
            for defense in &answer.defenses {
                let correct = usize::from(defense.class_id == Some(*truth));
                match per_defense.iter_mut().find(|(name, _)| *name == defense.name) {
                    Some((_, count)) => *count += correct,
                    None => per_defense.push((defense.name.clone(), correct)),
                }
            }
        }
        tally.per_defense = per_defense;
        tally
    }
}

/// Median total latency, median ORT time of the same batches run alone, median rows.
fn cost(
    runtime: &tokio::runtime::Runtime,
    registry: &ModelRegistry,
    answers: &[&ClassifyResponse],
) -> Result<(f64, f64, f64), String> {
    let mut latencies = Vec::new();
    let mut inference = Vec::new();
    let mut rows = Vec::new();
    for answer in answers {
        latencies.push(answer.timing_ms.total);
        rows.push(answer.rows as f64);
        let mut alone = Duration::ZERO;
        for (model, count) in &answer.batches {
            let model = registry.get(model).ok_or("unknown model in a batch")?;
            let input = vec![0.0f32; count * model.card.row_len()];
            let deadline = Instant::now() + Duration::from_secs(60);
            let output = runtime.block_on(model.engine.infer(input, *count, deadline)).map_err(|e| e.to_string())?;
            alone += output.inference_time;
        }
        inference.push(alone.as_secs_f64() * 1e3);
    }
    Ok((median(latencies), median(inference), median(rows)))
}

/// Clean variants of a photo that are not the evaluation image itself: the whole
/// photo and a tighter centre crop, each also mirrored, at the model's input size.
pub fn clean_variants(sample: &Sample, raw: &LoadedModel) -> Result<Vec<ModelImage>, String> {
    let spec = &raw.card.input;
    let (w, h) = (sample.photo.width() as f64, sample.photo.height() as f64);
    let mut variants = Vec::new();
    for fraction in [1.0, 0.75] {
        let side = w.min(h) * fraction;
        let region = Region { left: (w - side) / 2.0, top: (h - side) / 2.0, width: side, height: side };
        let crop = resize_region(&sample.photo, Some(region), spec.width, spec.height, spec.interpolation)?;
        variants.push(ModelImage::from_rgb(&image::imageops::flip_horizontal(&crop)));
        variants.push(ModelImage::from_rgb(&crop));
    }
    Ok(variants)
}

/// The squeeze threshold at which the score test alone flags 5% of clean images:
/// the 95th percentile of the score over the clean variants. (Raw/defended
/// disagreements are flagged whatever the threshold; the combined rate is reported.)
fn calibrate(
    samples: &[Sample],
    raw: &LoadedModel,
    preset: &str,
    seed: u64,
    classify: &Classify<'_>,
) -> Result<Calibration, String> {
    let mut scores = Vec::new();
    let mut disagreements = 0;
    for (index, sample) in samples.iter().enumerate() {
        for variant in clean_variants(sample, raw)? {
            let answer = classify(png_bytes(&variant)?, preset, seed + index as u64)?;
            let disagree = answer.defended.class_id != Some(answer.raw.class_id);
            disagreements += usize::from(disagree);
            scores.push((disagree, answer.squeeze_score));
        }
    }
    let total = scores.len();
    let mut sorted: Vec<f32> = scores.iter().map(|(_, s)| *s).collect();
    sorted.sort_by(f32::total_cmp);
    let threshold = sorted.get(((total as f64 * 0.95).ceil() as usize).saturating_sub(1)).copied().unwrap_or(2.0);
    let flagged = scores.iter().filter(|(d, s)| *d || *s > threshold).count();
    Ok(Calibration {
        preset: preset.to_string(),
        images: total,
        disagreements,
        threshold,
        false_positive_rate: flagged as f64 / total as f64,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 0 { (values[mid - 1] + values[mid]) / 2.0 } else { values[mid] }
}

fn percent(part: usize, whole: usize) -> String {
    if whole == 0 { "–".into() } else { format!("{part}/{whole} ({:.0}%)", 100.0 * part as f64 / whole as f64) }
}

fn write_report(report: &EvaluationReport, out: &Path) -> Result<(), String> {
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(out.join("report.json"), json).map_err(|e| e.to_string())?;
    let mut md = String::new();
    md.push_str(&format!(
        "# Robustness report\n\nModel `{}`, {} labelled photos, seed {}. Threat model: L∞ perturbations of the model-input image (ε per value in [0,1] units), score-based black-box attacks (untargeted) with at most {} queries against the raw model (transfer) and the budgets below against the defended pipeline (adaptive). Abstentions count as errors.\n\n",
        report.model, report.images, report.seed, report.queries
    ));
    md.push_str("## Clean photos\n\n| preset | raw top-1 | defended top-1 | abstained | suspicious | p50 latency ms | p50 ORT alone ms | ratio | views/inference | rows |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for c in &report.clean {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.3} | {:.1}% | {:.0} |\n",
            c.preset,
            percent(c.raw_correct, c.total),
            percent(c.defended_correct, c.total),
            c.abstained,
            percent(c.suspicious, c.total),
            c.median_latency_ms,
            c.median_inference_ms,
            c.latency_ratio,
            100.0 * c.views_share,
            c.median_rows
        ));
    }
    md.push_str("\n## Attacks on the raw model\n\n| attack | ε | fooled raw | median queries |\n|---|---|---|---|\n");
    for a in &report.attacks {
        md.push_str(&format!(
            "| {} | {:.0}/255 | {} | {:.0} |\n",
            a.attack,
            a.epsilon * 255.0,
            percent(a.fooled, a.attacked),
            a.median_queries
        ));
    }
    md.push_str("\n## Transfer: adversarial photos (that fool raw) sent to the defended pipeline\n\n| preset | attack | ε | recovered true label | abstained | suspicious | per defense (correct) |\n|---|---|---|---|---|---|---|\n");
    for t in &report.transfer {
        let per: Vec<String> = t.per_defense.iter().map(|(n, c)| format!("{n} {c}/{}", t.adversarial)).collect();
        md.push_str(&format!(
            "| {} | {} | {:.0}/255 | {} | {} | {} | {} |\n",
            t.preset,
            t.attack,
            t.epsilon * 255.0,
            percent(t.recovered, t.adversarial),
            t.abstained,
            percent(t.suspicious, t.adversarial),
            per.join(", ")
        ));
    }
    if !report.adaptive.is_empty() {
        md.push_str("\n## Adaptive attacks beside transfer, on the same photos\n\nThe adaptive attacker queries the defended pipeline itself, averages each query over `eot` draws of the defense's randomness (EOT) — fresh draws on every answer, or the same `eot` seeds for every candidate when the noise column says fixed (the API lets a client choose `seed`) — and Square starts from the transfer example; a photo counts as robust only when the defended answer is right on both the transfer and the adaptive example (judged with fresh seeds). Abstentions count as errors.\n\n| preset | attack | ε | photos | clean defended | transfer robust | adaptive robust | queries × EOT | noise | median queries to success | abstained | suspicious | minutes |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for a in &report.adaptive {
            md.push_str(&format!(
                "| {} | {} | {:.0}/255 | {} | {} | {} | {} | {} × {} | {} | {} | {} | {} | {:.1} |\n",
                a.preset,
                a.attack,
                a.epsilon * 255.0,
                a.images,
                percent(a.clean_correct, a.images),
                percent(a.transfer_correct, a.images),
                percent(a.adaptive_correct, a.images),
                a.queries,
                a.eot,
                if a.fixed_noise { "fixed" } else { "fresh" },
                if a.median_queries.is_nan() { "–".to_string() } else { format!("{:.0}", a.median_queries) },
                a.abstained,
                a.suspicious,
                a.seconds / 60.0
            ));
        }
    }
    if !report.certified.is_empty() {
        md.push_str("\n## Certified accuracy (randomized smoothing on the raw model, CERTIFY)\n\nCertified = CERTIFY returned the true class with a radius at least r (L2, in [0,1] model-input pixel units, 3×H×W values). The largest certifiable radius is σ·Φ⁻¹(α^(1/n)) for these n and α.\n\n| σ | n0 | n | α | max radius | certified at r=0 | r ≥ 0.25·max | r ≥ 0.5·max | abstained |\n|---|---|---|---|---|---|---|---|---|\n");
        for c in &report.certified {
            let at = |fraction: f64| c.radii.iter().filter(|r| r.is_some_and(|r| r >= fraction * c.max_radius)).count();
            md.push_str(&format!(
                "| {} | {} | {} | {} | {:.3} | {} | {} | {} | {} |\n",
                c.sigma,
                c.selection_samples,
                c.samples,
                c.alpha,
                c.max_radius,
                percent(c.certified_correct, c.images),
                percent(at(0.25), c.images),
                percent(at(0.5), c.images),
                c.abstained
            ));
        }
    }
    if !report.charts.is_empty() {
        md.push_str("\n## Charts\n\n");
        for chart in &report.charts {
            md.push_str(&format!("![{chart}]({chart})\n\n"));
        }
    }
    if !report.calibration.is_empty() {
        md.push_str("\n## Squeeze-score calibration on clean variants\n\n| preset | variants | raw≠defended | threshold (score's 95th percentile) | flagged at threshold |\n|---|---|---|---|---|\n");
        for c in &report.calibration {
            md.push_str(&format!(
                "| {} | {} | {} | {:.3} | {:.1}% |\n",
                c.preset,
                c.images,
                c.disagreements,
                c.threshold,
                100.0 * c.false_positive_rate
            ));
        }
    }
    std::fs::write(out.join("report.md"), md).map_err(|e| e.to_string())
}

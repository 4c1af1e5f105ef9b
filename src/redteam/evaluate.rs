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

use super::oracle::RawModel;
use crate::api::ClassifyResponse;
use crate::attack::Goal;
use crate::attack::square::{Norm, SquareConfig, square_attack};
use crate::config::Config;
use crate::imaging::{DecodeLimits, ModelImage, Region, decode, fit_to_input, resize_region};
use crate::model::{LoadedModel, ModelRegistry};
use crate::params::ClassifyParams;
use crate::pipeline::Pipeline;

/// Classifies PNG bytes with a preset and a seed.
type Classify<'a> = dyn Fn(Vec<u8>, &str, u64) -> Result<ClassifyResponse, String> + 'a;

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
    let pipeline = Pipeline::new(Arc::clone(&config), Arc::clone(&registry));
    let raw = Arc::clone(registry.get(registry.default_name()).ok_or("no default model")?);
    let limits = DecodeLimits::from(&config.image);
    let samples = load_samples(options, &raw, &limits)?;
    for folder in ["adversarial", "clean"] {
        std::fs::create_dir_all(options.out.join(folder)).map_err(|e| format!("{}: {e}", options.out.display()))?;
    }
    let classify = |bytes: Vec<u8>, preset: &str, seed: u64| -> Result<ClassifyResponse, String> {
        let seed_text = seed.to_string();
        let params = ClassifyParams::from_pairs([("defense", preset), ("seed", seed_text.as_str())], &config)
            .map_err(|e| e.to_string())?;
        runtime
            .block_on(pipeline.classify(bytes.into(), &params, "evaluate".into(), Instant::now()))
            .map_err(|e| e.to_string())
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

    // Transfer: Square Attack on the raw model, then every preset on the result.
    for &epsilon in &options.epsilons {
        let mut adversarial = Vec::new();
        let mut queries = Vec::new();
        let mut attacked = 0;
        for (index, sample) in samples.iter().enumerate() {
            let raw_answer = classify(clean_png[index].clone(), "none", 0)?;
            if raw_answer.raw.class_id != sample.class_id {
                continue;
            }
            attacked += 1;
            let mut oracle = RawModel::new(Arc::clone(&raw));
            let attack = SquareConfig::new(Norm::Linf, epsilon, options.queries, options.seed + index as u64);
            let goal = Goal::Untargeted { true_class: sample.class_id };
            let outcome = square_attack(&mut oracle, &sample.clean, &goal, &attack, &mut |_, _| {})?;
            if outcome.success {
                queries.push(outcome.queries as f64);
                adversarial.push((index, outcome));
            }
        }
        report.attacks.push(AttackSummary {
            attack: "square".into(),
            epsilon,
            attacked,
            fooled: adversarial.len(),
            median_queries: median(queries),
        });
        eprintln!("square eps {epsilon:.4}: fooled {}/{attacked}", adversarial.len());

        let mut per_preset: Vec<Vec<(usize, ClassifyResponse)>> = vec![Vec::new(); options.presets.len()];
        for (index, outcome) in &adversarial {
            let sample = &samples[*index];
            let png = png_bytes(&outcome.adversarial)?;
            let name = format!("{}_eps{}.png", sample.file.trim_end_matches(".jpg"), (epsilon * 255.0).round());
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
            report.examples.push(Example {
                file: sample.file.clone(),
                class_id: sample.class_id,
                epsilon,
                queries: outcome.queries,
                fooled: true,
                raw_label,
                defended,
                png: format!("adversarial/{name}"),
            });
        }
        for (preset, answers) in options.presets.iter().zip(per_preset) {
            let tally = Tally::of(&answers);
            report.transfer.push(TransferResult {
                preset: preset.clone(),
                attack: "square".into(),
                epsilon,
                adversarial: answers.len(),
                recovered: tally.defended_correct,
                abstained: tally.abstained,
                suspicious: tally.suspicious,
                per_defense: tally.per_defense,
            });
        }
    }

    if options.calibrate {
        for preset in &options.presets {
            report.calibration.push(calibrate(&samples, &raw, preset, options.seed, &classify)?);
        }
    }
    write_report(&report, &options.out)?;
    registry.close();
    Ok(report)
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
        "# Robustness report\n\nModel `{}`, {} labelled photos, Square Attack (L∞, untargeted, ≤ {} queries) against the raw model, seed {}.\nAbstentions count as errors.\n\n",
        report.model, report.images, report.queries, report.seed
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

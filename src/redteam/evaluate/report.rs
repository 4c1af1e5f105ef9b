//! The report `pandaguard evaluate` writes (report.json), one struct per table.

use serde::{Deserialize, Serialize};

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
    /// White-box attacks (gradients through a copy of each preset) beside transfer.
    #[serde(default)]
    pub whitebox: Vec<WhiteBoxRow>,
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

/// White-box robustness of one preset at one radius, on the photos the raw model gets right.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhiteBoxRow {
    pub preset: String,
    /// "linf" or "l2".
    pub norm: String,
    /// The radius in [0, 1] pixel units (L∞: per value; L2: over 3×H×W values).
    pub epsilon: f32,
    /// The attacks tried per photo, in order, until one succeeded.
    pub attacks: Vec<String>,
    pub steps: usize,
    pub eot: usize,
    /// Fresh-noise verdicts per adversarial image; robust = right on every one.
    pub judge_draws: usize,
    pub photos: usize,
    /// Right on every draw after the white-box attacks (worst case over them).
    pub whitebox_robust: usize,
    /// Right on every draw after PGD on the raw model alone (transfer from white-box Lite0).
    pub transfer_robust: usize,
    /// Robust against both (what the preset holds against this project's attacks).
    pub robust: usize,
    /// Median gradient steps to a confirmed success (NaN, written as null, when no
    /// photo was broken).
    #[serde(deserialize_with = "nan_when_null")]
    pub median_steps: f64,
    pub seconds_per_photo: f64,
    /// Rows through the gradient server per step, on average.
    pub rows_per_step: f64,
    /// original | adversarial | perturbation for the first photo broken (charts/…).
    #[serde(default)]
    pub strip: Option<String>,
}

/// serde_json writes a NaN as null; read it back as NaN.
fn nan_when_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

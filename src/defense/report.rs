//! What the defenses report, and how their answers are combined into the defended
//! prediction and the suspicion score.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::smooth::CertifyReport;
use crate::api::ClassScore;
use crate::model::Labels;
use crate::prediction::{argmax, ranked};

/// The combined answer of the defenses.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DefendedPrediction {
    /// `null` when the defended classifier abstains.
    pub class_id: Option<usize>,
    pub label: Option<String>,
    /// Combined probability of `class_id` (0 when abstaining).
    pub confidence: f32,
    pub top_k: Vec<ClassScore>,
    pub abstained: bool,
    /// How the answer was formed, e.g. "mean of smooth, blur, saccade, ensemble".
    pub method: String,
}

/// One defense's own answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DefenseReport {
    /// `smooth`, `blur`, `saccade` or `ensemble`.
    pub name: String,
    pub class_id: Option<usize>,
    pub label: Option<String>,
    pub confidence: f32,
    pub abstained: bool,
    /// Model inputs this defense added to the request.
    pub views: usize,
    pub details: DefenseDetails,
    /// The probability vector this defense contributes to the combination.
    #[serde(skip)]
    pub probabilities: Vec<f32>,
}

/// A single view's top class.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ViewPrediction {
    pub class_id: usize,
    pub label: String,
    pub confidence: f32,
}

impl ViewPrediction {
    pub fn from_probabilities(probabilities: &[f32], labels: &Labels) -> Self {
        let class_id = argmax(probabilities);
        ViewPrediction {
            class_id,
            label: labels.name(class_id).to_string(),
            confidence: probabilities.get(class_id).copied().unwrap_or(0.0),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DefenseDetails {
    Smooth(SmoothDetails),
    Blur(BlurDetails),
    Saccade(SaccadeDetails),
    Ensemble(EnsembleDetails),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SmoothDetails {
    pub sigma: f32,
    pub alpha: f64,
    pub denoise_sigma: f32,
    /// Noisy samples PREDICT drew (it stops as soon as its test settles).
    pub samples_used: u64,
    pub max_samples: u64,
    /// Looks taken at the data; each tested at alpha / planned looks (Bonferroni).
    pub looks: usize,
    pub planned_looks: Vec<u64>,
    /// Two-sided binomial test p-value of the top two counts at the last look.
    pub p_value: f64,
    /// Vote counts of the most voted classes.
    pub votes: Vec<VoteCount>,
    /// CERTIFY's result when `certify=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertifyReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VoteCount {
    pub class_id: usize,
    pub label: String,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BlurDetails {
    pub blur_sigma: f32,
    pub median_radius: u32,
    pub gaussian: ViewPrediction,
    pub median: ViewPrediction,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SaccadeDetails {
    /// Where the model looked, most informative first, in original-image pixels.
    pub fixations: Vec<FixationReport>,
    /// The whole image (the raw view).
    pub full_view: ViewPrediction,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FixationReport {
    /// Centre of the crop, original-image pixels.
    pub x: f64,
    pub y: f64,
    /// Side of the square crop, original-image pixels.
    pub size: f64,
    /// Local grey-level entropy (bits) that ranked this place.
    pub entropy: f32,
    pub class_id: usize,
    pub label: String,
    pub confidence: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnsembleDetails {
    pub members: Vec<MemberPrediction>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberPrediction {
    pub model: String,
    pub class_id: usize,
    pub label: String,
    pub confidence: f32,
}

/// Mean of probability vectors (all of the same length).
pub fn mean_probabilities<'a>(vectors: impl IntoIterator<Item = &'a [f32]>) -> Vec<f32> {
    let mut sum: Vec<f32> = Vec::new();
    let mut count = 0usize;
    for vector in vectors {
        if sum.is_empty() {
            sum = vec![0.0; vector.len()];
        }
        for (s, v) in sum.iter_mut().zip(vector) {
            *s += v;
        }
        count += 1;
    }
    let scale = 1.0 / count.max(1) as f32;
    sum.iter_mut().for_each(|s| *s *= scale);
    sum
}

/// The defended prediction: the mean of the defenses' probability vectors. Averaging
/// (rather than a vote among four or fewer defenses) keeps each defense's confidence,
/// cannot tie, and yields a probability vector for the suspicion score. Smoothing
/// contributes its vote frequencies even when PREDICT abstains: they are still the
/// best estimate of the smoothed classifier's class probabilities, and its abstention
/// is reported in its own entry. Abstains only when no defense has an answer.
pub fn combine(reports: &[DefenseReport], labels: &Labels, top_k: usize) -> (DefendedPrediction, Vec<f32>) {
    let voting: Vec<&DefenseReport> = reports.iter().filter(|r| !r.probabilities.is_empty()).collect();
    let names: Vec<&str> = reports.iter().map(|r| r.name.as_str()).collect();
    let method = if names.is_empty() { "none (raw)".to_string() } else { format!("mean of {}", names.join(", ")) };
    if voting.is_empty() {
        let prediction = DefendedPrediction {
            class_id: None,
            label: None,
            confidence: 0.0,
            top_k: Vec::new(),
            abstained: true,
            method,
        };
        return (prediction, Vec::new());
    }
    let probabilities = mean_probabilities(voting.iter().map(|r| r.probabilities.as_slice()));
    let class_id = argmax(&probabilities);
    let prediction = DefendedPrediction {
        class_id: Some(class_id),
        label: Some(labels.name(class_id).to_string()),
        confidence: probabilities[class_id],
        top_k: ranked(&probabilities, labels, top_k),
        abstained: false,
        method,
    };
    (prediction, probabilities)
}

/// L1 distance between the raw and defended probability vectors, in [0, 2] (the
/// feature-squeezing score of Xu et al. 2018). An abstaining defense counts as the
/// largest distance.
pub fn squeeze_score(raw: &[f32], defended: &[f32]) -> f32 {
    if defended.is_empty() {
        return 2.0;
    }
    raw.iter().zip(defended).map(|(a, b)| (a - b).abs()).sum::<f32>().min(2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Labels {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/imagenet_labels.txt");
        Labels::load(&dir, 1000).unwrap()
    }

    fn report(name: &str, probabilities: Vec<f32>, abstained: bool) -> DefenseReport {
        DefenseReport {
            name: name.into(),
            class_id: None,
            label: None,
            confidence: 0.0,
            abstained,
            views: 1,
            details: DefenseDetails::Ensemble(EnsembleDetails { members: vec![] }),
            probabilities,
        }
    }

    fn one_hot(class: usize, p: f32) -> Vec<f32> {
        let mut v = vec![(1.0 - p) / 999.0; 1000];
        v[class] = p;
        v
    }

    #[test]
    fn combination_averages_every_defense_with_an_answer() {
        let labels = labels();
        let reports = [
            report("a", one_hot(388, 0.9), false),
            report("b", one_hot(23, 0.6), false),
            report("c", one_hot(388, 0.5), true), // abstained, but its frequencies still count
            report("d", Vec::new(), true),        // nothing to contribute
        ];
        let (defended, probabilities) = combine(&reports, &labels, 3);
        assert_eq!(defended.class_id, Some(388));
        assert_eq!(defended.label.as_deref(), Some("giant panda"));
        assert!((defended.confidence - (0.9 + 0.4 / 999.0 + 0.5) / 3.0).abs() < 1e-4);
        assert_eq!(defended.top_k.len(), 3);
        assert!((probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-3);
        assert_eq!(defended.method, "mean of a, b, c, d");
    }

    #[test]
    fn without_any_answer_the_defended_answer_abstains() {
        let (defended, probabilities) = combine(&[report("smooth", Vec::new(), true)], &labels(), 5);
        assert!(defended.abstained && defended.class_id.is_none() && probabilities.is_empty());
        assert_eq!(squeeze_score(&one_hot(1, 0.5), &probabilities), 2.0);
    }

    #[test]
    fn squeeze_score_is_the_l1_distance() {
        assert_eq!(squeeze_score(&[0.5, 0.5, 0.0], &[0.5, 0.5, 0.0]), 0.0);
        assert!((squeeze_score(&[1.0, 0.0], &[0.0, 1.0]) - 2.0).abs() < 1e-6);
        assert!((squeeze_score(&[0.7, 0.3], &[0.6, 0.4]) - 0.2).abs() < 1e-6);
    }
}

//! How the defenses' answers become the defended answer, and how far it is from the
//! raw one (the suspicion score).

use super::DefenseOutcome;
use crate::prediction::argmax;

/// The defended answer: the defenses' combined probabilities and class.
#[derive(Debug, Clone, PartialEq)]
pub struct Defended {
    /// `None` when every defense abstained without anything to contribute.
    pub class_id: Option<usize>,
    /// The combined probability vector (empty when abstaining).
    pub probabilities: Vec<f32>,
    /// How it was formed, e.g. "mean of smooth, ensemble", or "none (raw)".
    pub method: String,
}

impl Defended {
    /// No defenses: the defended answer is the raw one.
    pub fn raw(raw: &[f32]) -> Self {
        Defended { class_id: Some(argmax(raw)), probabilities: raw.to_vec(), method: "none (raw)".into() }
    }

    pub fn abstained(&self) -> bool {
        self.class_id.is_none()
    }

    /// Probability of the answer (0 when abstaining).
    pub fn confidence(&self) -> f32 {
        self.class_id.and_then(|c| self.probabilities.get(c)).copied().unwrap_or(0.0)
    }
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
pub fn combine(outcomes: &[DefenseOutcome], raw: &[f32]) -> Defended {
    if outcomes.is_empty() {
        return Defended::raw(raw);
    }
    let names: Vec<&str> = outcomes.iter().map(|o| o.name).collect();
    let method = format!("mean of {}", names.join(", "));
    let voting: Vec<&[f32]> =
        outcomes.iter().filter(|o| !o.probabilities.is_empty()).map(|o| o.probabilities.as_slice()).collect();
    if voting.is_empty() {
        return Defended { class_id: None, probabilities: Vec::new(), method };
    }
    let probabilities = mean_probabilities(voting);
    Defended { class_id: Some(argmax(&probabilities)), probabilities, method }
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

    fn outcome(name: &'static str, probabilities: Vec<f32>, abstained: bool) -> DefenseOutcome {
        DefenseOutcome {
            name,
            class_id: None,
            confidence: 0.0,
            abstained,
            probabilities,
            views: 1,
            details: crate::defense::null(),
        }
    }

    fn one_hot(class: usize, p: f32) -> Vec<f32> {
        let mut v = vec![(1.0 - p) / 999.0; 1000];
        v[class] = p;
        v
    }

    #[test]
    fn combination_averages_every_defense_with_an_answer() {
        let outcomes = [
            outcome("a", one_hot(388, 0.9), false),
            outcome("b", one_hot(23, 0.6), false),
            outcome("c", one_hot(388, 0.5), true), // abstained, but its frequencies still count
            outcome("d", Vec::new(), true),        // nothing to contribute
        ];
        let defended = combine(&outcomes, &one_hot(1, 1.0));
        assert_eq!(defended.class_id, Some(388));
        assert!((defended.confidence() - (0.9 + 0.4 / 999.0 + 0.5) / 3.0).abs() < 1e-4);
        assert!((defended.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-3);
        assert_eq!(defended.method, "mean of a, b, c, d");
    }

    #[test]
    fn without_any_answer_the_defended_answer_abstains() {
        let defended = combine(&[outcome("smooth", Vec::new(), true)], &one_hot(1, 0.5));
        assert!(defended.abstained() && defended.class_id.is_none() && defended.probabilities.is_empty());
        assert_eq!(defended.confidence(), 0.0);
        assert_eq!(squeeze_score(&one_hot(1, 0.5), &defended.probabilities), 2.0);
    }

    #[test]
    fn without_defenses_the_defended_answer_is_the_raw_one() {
        let raw = one_hot(7, 0.8);
        let defended = combine(&[], &raw);
        assert_eq!((defended.class_id, defended.method.as_str()), (Some(7), "none (raw)"));
        assert_eq!(squeeze_score(&raw, &defended.probabilities), 0.0);
    }

    #[test]
    fn squeeze_score_is_the_l1_distance() {
        assert_eq!(squeeze_score(&[0.5, 0.5, 0.0], &[0.5, 0.5, 0.0]), 0.0);
        assert!((squeeze_score(&[1.0, 0.0], &[0.0, 1.0]) - 2.0).abs() < 1e-6);
        assert!((squeeze_score(&[0.7, 0.3], &[0.6, 0.4]) - 0.2).abs() < 1e-6);
    }
}

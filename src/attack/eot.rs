//! Expectation over Transformation (Athalye, Carlini, Wagner 2018, "Obfuscated Gradients
//! Give a False Sense of Security"; Athalye, Engstrom, Ilyas, Kwok 2018, "Synthesizing
//! Robust Adversarial Examples"): against a randomized defense, whose answer depends
//! on random noise or views, an adaptive attacker optimises the EXPECTED answer.
//!
//! [`Eot`] is an [`Oracle`] adapter that any attack (Square, NES) can query instead of
//! the randomized oracle: each image is scored `draws` times and the answers averaged.
//!
//! Cost: every query of the attack costs `draws` queries to the defended system. The
//! attack's own `queries` (e.g. [`super::AttackOutcome::queries`]) then counts
//! EOT-averaged evaluations; [`Eot::queries`] counts the images the inner oracle scored.

use super::{Oracle, OracleError, log_softmax};
use crate::imaging::ModelImage;

/// Wraps a randomized oracle: each image's score vector is the mean, over `draws`
/// fresh draws of the defense's randomness, of the inner oracle's scores. The inner
/// oracle must draw fresh randomness on every call (e.g. a new seed per query) and for
/// every image of a batch, including repeats of one image.
///
/// The mean is taken over PROBABILITIES and returned as log-probabilities:
/// ln((1/K) Σ_j softmax(s_j)). The expected decision of a randomized classifier is
/// about its expected output, E[p]: its argmax is the class the defense answers on
/// average (a smooth surrogate of the majority vote of randomized smoothing), and the
/// margin on ln E[p] is negative exactly when the target class has the largest expected
/// probability. Averaging logits is not that: logits have no common scale across draws
/// (a shift per draw leaves the draw's answer unchanged), so one draw with large logits
/// outweighs many that disagree with it, and argmax of the mean logit can differ from
/// the answer the defense gives most of the time (see the tests). log_softmax and then
/// exp gives probabilities whether the inner oracle returns logits or log-probabilities.
pub struct Eot<'a> {
    inner: &'a mut dyn Oracle,
    draws: usize,
    /// Images the inner oracle has scored (`draws` per image scored through the adapter).
    pub queries: usize,
}

impl<'a> Eot<'a> {
    /// `draws` = 1 is a pass-through (the scores come back as log-probabilities); 0 makes
    /// every call fail.
    pub fn new(inner: &'a mut dyn Oracle, draws: usize) -> Self {
        Self { inner, draws, queries: 0 }
    }

    pub fn draws(&self) -> usize {
        self.draws
    }
}

impl Oracle for Eot<'_> {
    fn pressure(&self) -> f32 {
        self.inner.pressure()
    }

    /// One inner batch per call: the images in order, each repeated `draws` times in a row.
    fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
        let draws = self.draws;
        if draws == 0 {
            return Err(OracleError::Failed("EOT needs at least one draw per image".to_string()));
        }
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let repeated: Vec<ModelImage>;
        let batch = if draws == 1 {
            images
        } else {
            repeated = images.iter().flat_map(|image| std::iter::repeat_n(image, draws)).cloned().collect();
            &repeated
        };
        let scores = self.inner.scores(batch)?;
        self.queries += batch.len();
        if scores.len() != batch.len() {
            let message = format!("the oracle returned {} score vectors for {} images", scores.len(), batch.len());
            return Err(OracleError::Failed(message));
        }
        scores.chunks(draws).map(mean_log_probability).collect()
    }
}

/// ln of the mean probability per class over the draws' score vectors, computed as a
/// log-sum-exp of the log-probabilities (no underflow for improbable classes).
fn mean_log_probability(draws: &[Vec<f32>]) -> Result<Vec<f32>, OracleError> {
    let classes = draws.first().map_or(0, Vec::len);
    if draws.iter().any(|s| s.len() != classes) {
        return Err(OracleError::Failed("the oracle returned score vectors of different lengths for one image".into()));
    }
    let log_probs: Vec<Vec<f32>> = draws.iter().map(|s| log_softmax(s)).collect();
    let log_count = (draws.len() as f64).ln();
    Ok((0..classes)
        .map(|c| {
            let max = log_probs.iter().map(|lp| f64::from(lp[c])).fold(f64::NEG_INFINITY, f64::max);
            if max.is_infinite() {
                // All −∞ (probability 0) or a +∞ score: nothing to average.
                return max as f32;
            }
            let sum: f64 = log_probs.iter().map(|lp| (f64::from(lp[c]) - max).exp()).sum();
            (max + sum.ln() - log_count) as f32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::Norm;
    use crate::attack::testing::{CLASSES, Linear, NoisyLinear, input_for};
    use crate::attack::{Goal, margin};

    fn std_dev(values: &[f32]) -> f32 {
        let n = values.len() as f32;
        let mean = values.iter().sum::<f32>() / n;
        (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / (n - 1.0)).sqrt()
    }

    #[test]
    fn one_draw_is_a_pass_through() {
        let mut model = Linear::new(1);
        let images: Vec<ModelImage> = (0..4).map(|seed| input_for(&model, seed).0).collect();
        let direct = model.scores(&images).unwrap();
        let mut eot = Eot::new(&mut model, 1);
        let averaged = eot.scores(&images).unwrap();
        assert_eq!((eot.queries, eot.draws()), (4, 1));
        assert_eq!(model.batches, vec![4, 4]);
        for (logits, log_probs) in direct.iter().zip(&averaged) {
            for (want, got) in log_softmax(logits).iter().zip(log_probs) {
                assert!((want - got).abs() < 1e-5, "{logits:?} → {log_probs:?}");
            }
            // The margin is shift-invariant: the same as on the logits.
            for y in 0..CLASSES {
                let goal = Goal::Untargeted { true_class: y };
                assert!((margin(&goal, logits) - margin(&goal, log_probs)).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn k_draws_cost_k_inner_images_in_one_batch() {
        let mut model = Linear::new(1);
        let images: Vec<ModelImage> = (0..3).map(|seed| input_for(&model, seed).0).collect();
        let direct = model.scores(&images).unwrap();
        let mut eot = Eot::new(&mut model, 5);
        let averaged = eot.scores(&images).unwrap();
        assert_eq!(eot.queries, 15);
        assert!(eot.scores(&[]).unwrap().is_empty());
        assert_eq!(eot.queries, 15);
        assert_eq!(model.batches, vec![3, 15]);
        assert_eq!(model.seen, 18);
        // A deterministic oracle: the mean of identical probabilities is that probability.
        for (logits, log_probs) in direct.iter().zip(&averaged) {
            for (want, got) in log_softmax(logits).iter().zip(log_probs) {
                assert!((want - got).abs() < 1e-5, "{logits:?} → {log_probs:?}");
            }
        }
    }

    /// Cycles through fixed two-class logits, one per image scored: with 4 draws of one
    /// image every variant is seen once.
    struct Cycling {
        variants: Vec<[f32; 2]>,
        next: usize,
    }

    impl Oracle for Cycling {
        fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
            Ok(images
                .iter()
                .map(|_| {
                    self.next += 1;
                    self.variants[(self.next - 1) % self.variants.len()].to_vec()
                })
                .collect())
        }
    }

    #[test]
    fn averages_probabilities_not_logits() {
        // One draw is confidently class 0 (logit 30), three lean to class 1: the mean
        // logit says class 0, the defense answers class 1 three times in four.
        let mut oracle = Cycling { variants: vec![[30.0, 0.0], [-2.0, 0.0], [-2.0, 0.0], [-2.0, 0.0]], next: 0 };
        let image = input_for(&Linear::new(1), 0).0;
        let mut eot = Eot::new(&mut oracle, 4);
        let scores = eot.scores(&[image.clone(), image]).unwrap();
        let p0 = (1.0 + 3.0 / (1.0 + 2.0f32.exp())) / 4.0;
        for s in &scores {
            assert!((s[0] - p0.ln()).abs() < 1e-5 && (s[1] - (1.0 - p0).ln()).abs() < 1e-5, "{s:?}");
            assert!(margin(&Goal::Targeted { target: 1 }, s) < 0.0);
        }
        // A log-probability so small that exp underflows in f32 still averages correctly.
        let mut oracle = Cycling { variants: vec![[0.0, -200.0], [0.0, -100.0]], next: 0 };
        let image = input_for(&Linear::new(1), 0).0;
        let scores = Eot::new(&mut oracle, 2).scores(&[image]).unwrap();
        assert!((scores[0][1] - (-100.0 - 2.0f32.ln())).abs() < 1e-3, "{scores:?}");
    }

    #[test]
    fn averaging_shrinks_the_spread_of_a_randomized_margin() {
        let model = Linear::new(1);
        let (clean, y) = input_for(&model, 3);
        // A point just on y's side of the boundary, where single draws often flip.
        let eps_star = model.min_epsilon(&clean.data, y, Norm::Linf);
        let logits = model.logits(&clean.data);
        let k = (0..CLASSES).filter(|&k| k != y).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
        let data: Vec<f32> = clean
            .data
            .iter()
            .zip(model.weights[y].iter().zip(&model.weights[k]))
            .map(|(x, (a, b))| x - 0.8 * eps_star * (a - b).signum())
            .collect();
        let image = ModelImage { data, ..clean };
        let goal = Goal::Untargeted { true_class: y };
        // Noise sized so that the margin to k is 0.67 noise standard deviations: a
        // single draw flips about a quarter of the time (Φ(-0.67) ≈ 0.25).
        let point_logits = model.logits(&image.data);
        let gap = point_logits[y] - point_logits[k];
        let direction_norm =
            model.weights[y].iter().zip(&model.weights[k]).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
        let noise = gap / (0.67 * direction_norm);
        let mut noisy = NoisyLinear::new(model, noise, 17);
        let single: Vec<f32> =
            (0..200).map(|_| margin(&goal, &noisy.scores(std::slice::from_ref(&image)).unwrap()[0])).collect();
        let flips = single.iter().filter(|&&m| m < 0.0).count();
        assert!((20..=100).contains(&flips), "{flips} of 200 single draws flip");
        let mut eot = Eot::new(&mut noisy, 32);
        let averaged: Vec<f32> =
            (0..200).map(|_| margin(&goal, &eot.scores(std::slice::from_ref(&image)).unwrap()[0])).collect();
        assert_eq!(eot.queries, 200 * 32);
        assert_eq!(noisy.seen, 200 + 200 * 32);
        let (single_std, eot_std) = (std_dev(&single), std_dev(&averaged));
        assert!(eot_std < single_std / 3.0, "std {eot_std} with EOT(32), {single_std} single");
        assert!(averaged.iter().all(|&m| m > 0.0), "the expected answer is y");
    }

    #[test]
    fn errors_are_reported() {
        let mut model = Linear::new(1);
        let image = input_for(&model, 0).0;
        assert!(Eot::new(&mut model, 0).scores(std::slice::from_ref(&image)).is_err());
        struct Short;
        impl Oracle for Short {
            fn scores(&mut self, _: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
                Ok(vec![vec![0.0, 1.0]])
            }
        }
        let err = Eot::new(&mut Short, 3).scores(std::slice::from_ref(&image)).unwrap_err();
        assert!(err.to_string().contains("1 score vectors for 3 images"), "{err}");
        struct Ragged(usize);
        impl Oracle for Ragged {
            fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
                self.0 += 1;
                Ok(images.iter().enumerate().map(|(i, _)| vec![0.0; 2 + i % 2]).collect())
            }
        }
        assert!(Eot::new(&mut Ragged(0), 2).scores(std::slice::from_ref(&image)).is_err());
    }
}

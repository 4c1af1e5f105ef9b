//! Test oracles shared by the attack tests: a seeded linear 3-class model on 3×16×16
//! images and a randomized version of it (fresh Gaussian input noise on every image).

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::attack::{Norm, Oracle, OracleError};
use crate::imaging::ModelImage;

pub(crate) const SIDE: usize = 16;
pub(crate) const CLASSES: usize = 3;
pub(crate) const DIM: usize = 3 * SIDE * SIDE;

/// Logits W·x + b with W, b uniform in [−1, 1]; counts images and records batch sizes.
pub(crate) struct Linear {
    pub(crate) weights: Vec<Vec<f32>>,
    pub(crate) bias: Vec<f32>,
    pub(crate) seen: usize,
    pub(crate) batches: Vec<usize>,
}

impl Linear {
    pub(crate) fn new(seed: u64) -> Self {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let weights = (0..CLASSES).map(|_| (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect()).collect();
        let bias = (0..CLASSES).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Linear { weights, bias, seen: 0, batches: Vec::new() }
    }

    pub(crate) fn logits(&self, data: &[f32]) -> Vec<f32> {
        self.weights
            .iter()
            .zip(&self.bias)
            .map(|(w, b)| w.iter().zip(data).map(|(a, x)| a * x).sum::<f32>() + b)
            .collect()
    }

    pub(crate) fn predict(&self, data: &[f32]) -> usize {
        let logits = self.logits(data);
        (0..CLASSES).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap()
    }

    /// The smallest ε (ignoring clipping) that can change the prediction away from
    /// `y`: min_k margin_k / ‖w_y − w_k‖ in the dual norm (L1 for L∞, L2 for L2).
    pub(crate) fn min_epsilon(&self, data: &[f32], y: usize, norm: Norm) -> f32 {
        let logits = self.logits(data);
        (0..CLASSES)
            .filter(|&k| k != y)
            .map(|k| {
                let diff = self.weights[y].iter().zip(&self.weights[k]).map(|(a, b)| a - b);
                let dual = match norm {
                    Norm::Linf => diff.map(f32::abs).sum::<f32>(),
                    Norm::L2 => diff.map(|d| d * d).sum::<f32>().sqrt(),
                };
                (logits[y] - logits[k]) / dual
            })
            .fold(f32::INFINITY, f32::min)
    }

    /// For moving `data` (class `y`) to class `target` under L∞: twice the ε that the
    /// best direction for y vs target needs, checked to reach the target (so a solution
    /// exists inside the ball). Necessary: ε ≥ (s_y − s_t)/‖w_y − w_t‖₁.
    pub(crate) fn targeted_linf_epsilon(&self, data: &[f32], y: usize, target: usize) -> f32 {
        let logits = self.logits(data);
        let direction: Vec<f32> =
            self.weights[target].iter().zip(&self.weights[y]).map(|(t, o)| (t - o).signum()).collect();
        let l1: f32 =
            direction.iter().zip(&self.weights[target]).zip(&self.weights[y]).map(|((d, t), o)| d * (t - o)).sum();
        let eps = 2.0 * (logits[y] - logits[target]) / l1;
        let witness: Vec<f32> = data.iter().zip(&direction).map(|(x, d)| x + eps * d).collect();
        assert_eq!(self.predict(&witness), target, "no witness at 2x the needed epsilon");
        eps
    }
}

impl Oracle for Linear {
    fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
        self.seen += images.len();
        self.batches.push(images.len());
        Ok(images.iter().map(|image| self.logits(&image.data)).collect())
    }
}

/// An input with values in [0.3, 0.7] (away from the clipping bounds) and its class
/// under `model`.
pub(crate) fn input_for(model: &Linear, seed: u64) -> (ModelImage, usize) {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x5eed);
    let data: Vec<f32> = (0..DIM).map(|_| rng.random_range(0.3f32..0.7)).collect();
    let image = ModelImage { width: SIDE, height: SIDE, data };
    let class = model.predict(&image.data);
    (image, class)
}

/// A randomized defense in miniature: the linear model on x + N(0, noise²) (not
/// clipped), with fresh noise for every image of every call.
pub(crate) struct NoisyLinear {
    pub(crate) model: Linear,
    pub(crate) noise: f32,
    rng: Xoshiro256PlusPlus,
    pub(crate) seen: usize,
}

impl NoisyLinear {
    pub(crate) fn new(model: Linear, noise: f32, seed: u64) -> Self {
        NoisyLinear { model, noise, rng: Xoshiro256PlusPlus::seed_from_u64(seed), seen: 0 }
    }
}

impl Oracle for NoisyLinear {
    fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
        self.seen += images.len();
        Ok(images
            .iter()
            .map(|image| {
                let noisy: Vec<f32> = image
                    .data
                    .iter()
                    .map(|&x| {
                        let z: f32 = StandardNormal.sample(&mut self.rng);
                        x + self.noise * z
                    })
                    .collect();
                self.model.logits(&noisy)
            })
            .collect())
    }
}

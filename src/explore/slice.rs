//! The 2-D slice of input space a decision map shows: the image at the origin, an
//! x direction toward an adversarial example (or random when there is none) and a y
//! direction drawn at random and made orthogonal to x. Both are unit vectors in L2, so
//! the map's coordinates are L2 distances; an axis's L∞ size per unit is the largest
//! coordinate of its direction.

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ExploreError;
use crate::imaging::ModelImage;

/// What an axis of the map points along.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    TowardAdversarial,
    Random,
    RandomOrthogonal,
}

pub struct Slice {
    origin: ModelImage,
    x: Vec<f32>,
    y: Vec<f32>,
    pub x_direction: Direction,
    /// Where the adversarial example sits on the x axis (its L2 distance), when there is one.
    pub adversarial: Option<f32>,
}

impl Slice {
    /// The slice through `origin` toward `toward` (same size, values in [0, 1]); a
    /// random x direction when `toward` is `None` or equal to the origin. `seed` draws
    /// the random directions.
    pub fn new(origin: ModelImage, toward: Option<&ModelImage>, seed: u64) -> Result<Slice, ExploreError> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut random = || -> Vec<f32> { (0..origin.data.len()).map(|_| StandardNormal.sample(&mut rng)).collect() };
        let mut toward_direction = None;
        if let Some(toward) = toward {
            if (toward.width, toward.height) != (origin.width, origin.height) {
                return Err(ExploreError::Invalid(format!(
                    "the adversarial example is {}x{}, the image at the model's input is {}x{}",
                    toward.width, toward.height, origin.width, origin.height
                )));
            }
            let delta: Vec<f32> = toward.data.iter().zip(&origin.data).map(|(t, o)| t - o).collect();
            let distance = l2(&delta);
            if distance > 0.0 {
                toward_direction = Some((delta, distance));
            }
        }
        let (x, x_direction, adversarial) = match toward_direction {
            Some((delta, distance)) => (scaled(&delta, 1.0 / distance), Direction::TowardAdversarial, Some(distance)),
            None => (unit(random()), Direction::Random, None),
        };
        // Gram-Schmidt: remove x's share from a random vector.
        let mut y = random();
        let along = dot(&y, &x);
        for (v, d) in y.iter_mut().zip(&x) {
            *v -= along * d;
        }
        let y = unit(y);
        Ok(Slice { origin, x, y, x_direction, adversarial })
    }

    pub fn origin(&self) -> &ModelImage {
        &self.origin
    }

    /// ‖x‖∞ and ‖y‖∞: how far one L2 unit along each axis moves the largest pixel.
    pub fn linf_per_unit(&self) -> (f32, f32) {
        (linf(&self.x), linf(&self.y))
    }

    /// origin + a·x + b·y, clipped to valid pixel values.
    pub fn point(&self, a: f32, b: f32) -> ModelImage {
        let data = self
            .origin
            .data
            .iter()
            .zip(self.x.iter().zip(&self.y))
            .map(|(o, (dx, dy))| (o + a * dx + b * dy).clamp(0.0, 1.0))
            .collect();
        ModelImage { width: self.origin.width, height: self.origin.height, data }
    }
}

/// The coordinates of `grid` points spread evenly over [-radius, radius].
pub fn coordinates(grid: usize, radius: f32) -> Vec<f32> {
    if grid <= 1 {
        return vec![0.0; grid];
    }
    let step = 2.0 * radius / (grid - 1) as f32;
    (0..grid).map(|k| -radius + step * k as f32).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn l2(v: &[f32]) -> f32 {
    dot(v, v).sqrt()
}

fn linf(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn scaled(v: &[f32], k: f32) -> Vec<f32> {
    v.iter().map(|x| x * k).collect()
}

fn unit(v: Vec<f32>) -> Vec<f32> {
    let norm = l2(&v);
    if norm > 0.0 { scaled(&v, 1.0 / norm) } else { v }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(value: f32) -> ModelImage {
        ModelImage { width: 4, height: 4, data: vec![value; 48] }
    }

    #[test]
    fn axes_are_orthonormal_and_x_points_at_the_adversarial_example() {
        let origin = grey(0.5);
        let mut toward = grey(0.5);
        toward.data[3] = 0.8;
        toward.data[20] = 0.1;
        let slice = Slice::new(origin, Some(&toward), 7).unwrap();
        assert!((l2(&slice.x) - 1.0).abs() < 1e-5 && (l2(&slice.y) - 1.0).abs() < 1e-5);
        assert!(dot(&slice.x, &slice.y).abs() < 1e-5);
        let distance = (0.3f32.powi(2) + 0.4f32.powi(2)).sqrt();
        assert!((slice.adversarial.unwrap() - distance).abs() < 1e-5);
        assert_eq!(slice.x_direction, Direction::TowardAdversarial);
        // The point at the adversarial coordinate is the adversarial example.
        let there = slice.point(distance, 0.0);
        for (a, b) in there.data.iter().zip(&toward.data) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn without_an_adversarial_example_both_axes_are_random_and_seeded() {
        let a = Slice::new(grey(0.3), None, 1).unwrap();
        let b = Slice::new(grey(0.3), None, 1).unwrap();
        let c = Slice::new(grey(0.3), None, 2).unwrap();
        assert_eq!(a.x, b.x);
        assert_ne!(a.x, c.x);
        assert_eq!(a.x_direction, Direction::Random);
        assert!(a.adversarial.is_none());
        assert!(dot(&a.x, &a.y).abs() < 1e-5);
    }

    #[test]
    fn a_wrong_sized_adversarial_example_is_refused() {
        let toward = ModelImage { width: 2, height: 2, data: vec![0.0; 12] };
        assert!(matches!(Slice::new(grey(0.3), Some(&toward), 1), Err(ExploreError::Invalid(_))));
    }

    #[test]
    fn coordinates_span_the_radius_evenly() {
        assert_eq!(coordinates(5, 2.0), vec![-2.0, -1.0, 0.0, 1.0, 2.0]);
        assert_eq!(coordinates(1, 2.0), vec![0.0]);
    }
}

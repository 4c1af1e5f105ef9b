//! An adaptive attacker against stateful query-attack detection, after OARS (Feng et
//! al. 2023, "Stateful Defenses for Machine Learning Models Are Not Yet Secure Against
//! Black-box Attacks"): a detector that remembers a client's recent queries refuses the
//! near-duplicates every query attack sends; the attacker adapts to the refusals.
//!
//! [`Evasive`] is an [`Oracle`] adapter in front of an oracle that can be refused
//! ([`OracleError::Detected`]) and that holds several client identities ([`Identities`],
//! e.g. API keys):
//! - **Random transforms of growing magnitude, found by rejection sampling guided by the
//!   refusals.** Every query is sent as a random transform of the image the attack asked
//!   about: a global brightness shift and per-value uniform noise, both of magnitude σ.
//!   σ starts at 0 (or `initial_noise`); every refusal multiplies it by `noise_growth`
//!   (up to `max_noise`) and the same query is tried again with a fresh draw: the
//!   oracle's refusals tell the attacker which magnitudes the detector still matches.
//!   The answer to the transformed image stands in for the image itself.
//! - **Larger steps.** [`Oracle::pressure`] grows with the refusals; attacks that read it
//!   (HopSkipJump) scale their probe radius and step size by it.
//! - **Queries spread across identities**: a refused identity is in its cooldown, so the
//!   next query goes out under the next one that is not ([`Identities::cooldown_left`]);
//!   when all are, the attacker waits for the first to be free (up to `max_wait`).
//!   Optionally it also switches every `rotate_every` accepted queries.
//!
//! Every request counts, refused ones too: the adapter stops with
//! [`OracleError::Exhausted`] when `max_requests` are spent, and with the refusal itself
//! after `max_consecutive_refusals` refusals in a row (every identity cooling down).

use std::time::Duration;

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::{Oracle, OracleError};
use crate::imaging::ModelImage;

/// An oracle that can ask under several client identities.
pub trait Identities {
    /// How many identities there are (at least 1).
    fn identities(&self) -> usize;
    /// Sends the next requests under the next identity (round robin).
    fn switch_identity(&mut self);
    /// How long the current identity is still refused (the cooldown the server
    /// announced with its refusal); zero when it is not.
    fn cooldown_left(&self) -> Duration {
        Duration::ZERO
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EvasionConfig {
    /// Requests the adapter may send in all, refused ones included.
    pub max_requests: usize,
    /// σ before any refusal (0: send the attack's images unchanged until refused).
    pub initial_noise: f32,
    /// σ after the first refusal when `initial_noise` is 0 ([0, 1] units).
    pub first_noise: f32,
    /// σ ← σ · growth on every refusal.
    pub noise_growth: f32,
    /// The largest σ.
    pub max_noise: f32,
    /// The largest [`Oracle::pressure`] handed to the attack.
    pub max_pressure: f32,
    /// Switch identity after this many accepted queries too (0: only when refused).
    pub rotate_every: usize,
    /// Give up after this many refusals in a row.
    pub max_consecutive_refusals: usize,
    /// When every identity is cooling down: wait for the first one to be free if that
    /// takes at most this long (a patient attacker), else give up.
    pub max_wait: Duration,
    pub seed: u64,
}

impl EvasionConfig {
    pub fn new(max_requests: usize, seed: u64) -> Self {
        Self {
            max_requests,
            initial_noise: 0.0,
            first_noise: 4.0 / 255.0,
            noise_growth: 2.0,
            max_noise: 32.0 / 255.0,
            max_pressure: 8.0,
            rotate_every: 0,
            max_consecutive_refusals: 12,
            max_wait: Duration::from_secs(60),
            seed,
        }
    }
}

/// What the adapter did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvasionStats {
    /// Requests sent (refused ones included).
    pub requests: usize,
    pub refusals: usize,
    /// The 1-based number of the first refused request.
    pub first_refusal: Option<usize>,
    /// Identity switches.
    pub switches: usize,
    /// σ at the end.
    pub noise: f32,
    /// Time spent waiting for an identity's cooldown to end.
    pub waited: Duration,
}

pub struct Evasive<'a, O: Oracle + Identities> {
    inner: &'a mut O,
    config: EvasionConfig,
    rng: Xoshiro256PlusPlus,
    noise: f32,
    pressure: f32,
    accepted_since_switch: usize,
    pub stats: EvasionStats,
}

impl<'a, O: Oracle + Identities> Evasive<'a, O> {
    pub fn new(inner: &'a mut O, config: EvasionConfig) -> Self {
        let rng = Xoshiro256PlusPlus::seed_from_u64(config.seed ^ 0x0a25);
        let noise = config.initial_noise;
        Self { inner, config, rng, noise, pressure: 1.0, accepted_since_switch: 0, stats: EvasionStats::default() }
    }

    fn switch(&mut self) {
        self.inner.switch_identity();
        self.stats.switches += 1;
        self.accepted_since_switch = 0;
    }

    /// Moves to the next identity that is not cooling down; when all are, to the one
    /// free soonest, after waiting for it (up to `max_wait`, else the refusal stands).
    fn next_free_identity(&mut self, refusal: String) -> Result<(), OracleError> {
        let count = self.inner.identities().max(1);
        let (mut soonest, mut soonest_at) = (Duration::MAX, 0);
        for step in 1..=count {
            self.switch();
            let left = self.inner.cooldown_left();
            if left.is_zero() {
                return Ok(());
            }
            if left < soonest {
                (soonest, soonest_at) = (left, step % count);
            }
        }
        // Back where the loop started (count switches); on to the soonest free one.
        if soonest > self.config.max_wait {
            return Err(OracleError::Detected(refusal));
        }
        for _ in 0..soonest_at {
            self.switch();
        }
        std::thread::sleep(soonest);
        self.stats.waited += soonest;
        Ok(())
    }

    /// `image` under a fresh random transform of magnitude σ (unchanged at σ = 0).
    fn transform(&mut self, image: &ModelImage) -> ModelImage {
        let sigma = self.noise;
        if sigma <= 0.0 {
            return image.clone();
        }
        let shift = self.rng.random_range(-sigma..=sigma);
        let data =
            image.data.iter().map(|&v| (v + shift + self.rng.random_range(-sigma..=sigma)).clamp(0.0, 1.0)).collect();
        ModelImage { width: image.width, height: image.height, data }
    }

    /// One image, asked until an answer comes back (or the budget or patience ends).
    fn ask(&mut self, image: &ModelImage) -> Result<Vec<f32>, OracleError> {
        let mut refused_in_a_row = 0;
        loop {
            if self.stats.requests >= self.config.max_requests {
                return Err(OracleError::Exhausted(format!("{} requests sent", self.stats.requests)));
            }
            let sent = self.transform(image);
            self.stats.requests += 1;
            match self.inner.scores(std::slice::from_ref(&sent)) {
                Ok(mut scores) => {
                    self.accepted_since_switch += 1;
                    if self.config.rotate_every > 0 && self.accepted_since_switch >= self.config.rotate_every {
                        self.switch();
                    }
                    return scores.pop().ok_or_else(|| OracleError::Failed("no scores for an image".into()));
                }
                Err(OracleError::Detected(message)) => {
                    self.stats.refusals += 1;
                    self.stats.first_refusal.get_or_insert(self.stats.requests);
                    refused_in_a_row += 1;
                    // More randomness and larger steps, and a fresh identity: the
                    // refused one is in its cooldown.
                    self.noise =
                        if self.noise <= 0.0 { self.config.first_noise } else { self.noise * self.config.noise_growth }
                            .min(self.config.max_noise);
                    self.stats.noise = self.noise;
                    self.pressure = (self.pressure * self.config.noise_growth).min(self.config.max_pressure);
                    if refused_in_a_row >= self.config.max_consecutive_refusals {
                        return Err(OracleError::Detected(message));
                    }
                    self.next_free_identity(message)?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl<O: Oracle + Identities> Oracle for Evasive<'_, O> {
    fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
        images.iter().map(|image| self.ask(image)).collect()
    }

    fn pressure(&self) -> f32 {
        self.pressure
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::attack::hsja::{HsjaConfig, hsja_attack};
    use crate::attack::square::{SquareConfig, square_attack};
    use crate::attack::testing::{DIM, Linear, input_for};
    use crate::attack::{AttackError, Goal, Norm};

    /// A stand-in for the server's stateful detector in front of the linear model:
    /// values quantized to 1/16; a query whose quantized values equal those of one of
    /// the identity's last 50 answered queries in ≥ 60% of places is a near-duplicate,
    /// is refused, and the identity is refused from then on (the cooldown, which
    /// outlasts these tests). Refused requests are counted like answered ones.
    struct Stateful {
        model: Linear,
        identities: usize,
        current: usize,
        seen: Vec<VecDeque<Vec<u8>>>,
        cooling: Vec<bool>,
        requests: usize,
        refusals: usize,
    }

    impl Stateful {
        fn new(identities: usize) -> Self {
            Stateful {
                model: Linear::new(1),
                identities,
                current: 0,
                seen: vec![VecDeque::new(); identities],
                cooling: vec![false; identities],
                requests: 0,
                refusals: 0,
            }
        }
    }

    impl Oracle for Stateful {
        fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
            let mut out = Vec::new();
            for image in images {
                self.requests += 1;
                let quantized: Vec<u8> = image.data.iter().map(|v| (v * 16.0).floor() as u8).collect();
                let window = &mut self.seen[self.current];
                let duplicate = window
                    .iter()
                    .any(|old| old.iter().zip(&quantized).filter(|(a, b)| a == b).count() * 10 >= 6 * quantized.len());
                if self.cooling[self.current] || duplicate {
                    self.cooling[self.current] = true;
                    self.refusals += 1;
                    return Err(OracleError::Detected(format!("identity {}", self.current)));
                }
                window.push_back(quantized);
                if window.len() > 50 {
                    window.pop_front();
                }
                out.push(self.model.logits(&image.data));
            }
            Ok(out)
        }
    }

    impl Identities for Stateful {
        fn identities(&self) -> usize {
            self.identities
        }
        fn switch_identity(&mut self) {
            self.current = (self.current + 1) % self.identities;
        }
        fn cooldown_left(&self) -> Duration {
            if self.cooling[self.current] { Duration::from_secs(3600) } else { Duration::ZERO }
        }
    }

    #[test]
    fn a_plain_attack_is_stopped_at_the_first_refusal() {
        let (image, y) = input_for(&Linear::new(1), 3);
        let goal = Goal::Untargeted { true_class: y };
        let mut oracle = Stateful::new(1);
        let config = HsjaConfig::new(Norm::L2, 0.5, 2000, 1);
        let err = hsja_attack(&mut oracle, &image, &goal, &config, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, AttackError::Oracle(OracleError::Detected(_))), "{err:?}");
        assert_eq!(oracle.refusals, 1);
        assert!(oracle.requests < 100, "refused after {} requests", oracle.requests);

        let mut oracle = Stateful::new(1);
        let config = SquareConfig::new(Norm::Linf, 0.05, 2000, 1);
        let err = square_attack(&mut oracle, &image, &goal, &config, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, AttackError::Oracle(OracleError::Detected(_))), "{err:?}");
        assert!(oracle.requests < 10, "square refused after {} requests", oracle.requests);
    }

    #[test]
    fn the_adaptive_attacker_keeps_going_within_its_budget() {
        // An input whose class is not mid-grey's, so that HopSkipJump's noise start works.
        let grey = Linear::new(1).predict(&[0.5; DIM]);
        let (image, y) = (3..).map(|s| input_for(&Linear::new(1), s)).find(|(_, y)| *y != grey).unwrap();
        let goal = Goal::Untargeted { true_class: y };
        let eps_star = Linear::new(1).min_epsilon(&image.data, y, Norm::L2);
        let budget = 3000;
        let mut oracle = Stateful::new(16);
        let mut evasive = Evasive::new(&mut oracle, EvasionConfig::new(budget, 5));
        let mut config = HsjaConfig::new(Norm::L2, 1.5 * eps_star, budget, 1);
        config.stop_at_epsilon = false;
        let outcome = hsja_attack(&mut evasive, &image, &goal, &config, &mut |_, _| {}).unwrap();
        let stats = evasive.stats.clone();
        // Refused, adapted (more noise, other identities), and went on to spend the budget.
        assert!(stats.refusals >= 1 && stats.first_refusal.is_some(), "{stats:?}");
        assert!(stats.switches >= stats.refusals && stats.noise > 0.0, "{stats:?}");
        assert!(stats.requests <= budget && stats.requests > stats.first_refusal.unwrap_or(0) + 500, "{stats:?}");
        assert_eq!((stats.requests, stats.refusals), (oracle.requests, oracle.refusals));
        // Every answer the attack counted is one accepted request; a probe batch cut
        // short by the budget was sent in part but never answered to the attack.
        let accepted = stats.requests - stats.refusals;
        assert!(outcome.queries <= accepted && accepted - outcome.queries < 100, "{} {stats:?}", outcome.queries);
        // It made progress after the first refusal: the noise image is far away.
        let history = &outcome.margin_history;
        let first_refused = stats.first_refusal.unwrap_or(0);
        assert!(history.iter().any(|&(q, _)| q > first_refused), "{history:?} {stats:?}");
        println!("{stats:?}, distance {} (ε* {eps_star}), success {}", outcome.l2, outcome.success);
    }
}

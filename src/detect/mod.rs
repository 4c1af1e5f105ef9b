//! Stateful detection of black-box query attacks (Blacklight, Li et al. 2022): every
//! score- or decision-based attack (Square, NES, HopSkipJump, Boundary) sends many
//! images that are nearly identical to each other; a stateless defense cannot see
//! that, the server can. Each decoded query gets a content fingerprint
//! (`fingerprint.rs`), the client's recent fingerprints are kept in a store
//! (`store.rs` in process, `redis.rs` shared by replicas) and the query is compared with
//! each of them. It is an attack when it is nearly identical (`close_match_threshold`
//! hashes shared) to `close_queries` earlier queries, what the small steps and probes of
//! Square, NES or HopSkipJump look like, or alike (`match_threshold`) to `alike_queries`
//! of them, which a noisier attacker reaches and a client sending a few edited copies of
//! one photo does not; `policy.rs` says what then happens.
//!
//! Owns: fingerprints, client windows, the decision. Must not import: `http`/axum, the
//! pipeline or the engines (the handler hands in the model-input pixels and a client
//! identity, and turns the verdict into an answer).

pub mod fingerprint;
pub mod policy;
pub mod redis;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

pub use fingerprint::{Fingerprint, FingerprintParams, Fingerprinter};
pub use policy::{Action, Decision, Policy};
pub use store::{ClientId, FingerprintStore, MemoryStore, Observation, StoreLimits, Thresholds};

use crate::config::AttackDetectionConfig;

/// The detector of one replica: fingerprinter, store, threshold and policy.
pub struct Detector {
    fingerprinter: Fingerprinter,
    store: Box<dyn FingerprintStore>,
    thresholds: Thresholds,
    /// Nearly identical, or alike, earlier queries that make an attack.
    close_queries: usize,
    alike_queries: usize,
    policy: Policy,
    /// Key of the client digests (the same on every replica sharing the secret).
    identity_key: [u8; 32],
}

/// The verdict on one query.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub detected: bool,
    pub observation: Observation,
    pub fingerprint_time: Duration,
    pub store_time: Duration,
}

impl Detector {
    /// The detector `config` asks for, or `None` when `action = "off"`.
    pub fn from_config(config: &AttackDetectionConfig) -> Option<Arc<Detector>> {
        if config.action == Action::Off {
            return None;
        }
        let secret = config.secret.as_ref().map(|s| s.expose().as_bytes());
        if secret.is_none() {
            let scope =
                if config.store == "memory" { "" } else { " replicas will not recognise each other's clients;" };
            tracing::warn!(
                "attack_detection.secret is not set: fingerprints use a random key for this process;{scope} \
                 set PANDAGUARD_ATTACK_DETECTION__SECRET to the same value on every replica"
            );
        }
        let fingerprinter = Fingerprinter::new(config.fingerprint_params(), secret);
        let identity_key: [u8; 32] = match secret {
            Some(secret) => {
                let mut hasher = Sha256::new();
                hasher.update(b"pandaguard attack_detection client v1\0");
                hasher.update(secret);
                hasher.finalize().into()
            }
            None => rand::random(),
        };
        let limits = config.store_limits();
        let store: Box<dyn FingerprintStore> = if config.store == "memory" {
            Box::new(MemoryStore::new(limits))
        } else {
            let timeout = Duration::from_millis(config.redis_timeout_ms);
            match redis::RedisStore::new(&config.store, limits, timeout) {
                Ok(store) => Box::new(store),
                // `Config::validate` parses the URL first; should it still be refused,
                // this replica detects alone rather than not at all.
                Err(problem) => {
                    tracing::error!(%problem, "attack detection uses this replica's memory only");
                    Box::new(MemoryStore::new(limits))
                }
            }
        };
        tracing::info!(action = ?config.action, store = store.name(), "query-attack detection is on");
        let policy = Policy { action: config.action, cooldown: Duration::from_secs(config.cooldown_seconds) };
        let thresholds = Thresholds { alike: config.match_threshold, close: config.close_match_threshold };
        Some(Arc::new(Detector {
            fingerprinter,
            store,
            thresholds,
            close_queries: config.close_queries,
            alike_queries: config.alike_queries,
            policy,
            identity_key,
        }))
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn store_name(&self) -> &'static str {
        self.store.name()
    }

    /// The client's id: a keyed digest of `kind` ("key", "addr") and the identity.
    /// The identity (an API key, an address) never leaves this function.
    pub fn client_id(&self, kind: &str, identity: &[u8]) -> ClientId {
        let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.identity_key) else {
            // Unreachable (HMAC takes any key length); one shared id is the safe side:
            // everything is compared with everything.
            return ClientId::from_hashed("unknown".into());
        };
        mac.update(kind.as_bytes());
        mac.update(b"\0");
        mac.update(identity);
        let tag = mac.finalize().into_bytes();
        ClientId::from_hashed(tag[..12].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Fingerprints the model-input pixels, compares them with the client's window and
    /// remembers them. Blocks (CPU, and a round trip for Redis): call it on the
    /// blocking pool.
    pub fn inspect(&self, client: &ClientId, pixels: &[u8]) -> Verdict {
        let started = Instant::now();
        let fingerprint = self.fingerprinter.fingerprint(pixels);
        let fingerprint_time = started.elapsed();
        let stored = Instant::now();
        // An image without a single textured window (a flat colour) has nothing to be
        // compared by, and is neither counted nor stored.
        let observation = if fingerprint.hashes.is_empty() {
            Observation::default()
        } else {
            self.store.record(client, &fingerprint, self.thresholds)
        };
        let store_time = stored.elapsed();
        let detected =
            !observation.repeat && (observation.close >= self.close_queries || observation.alike >= self.alike_queries);
        metrics::histogram!("pandaguard_fingerprint_seconds").record(fingerprint_time.as_secs_f64());
        metrics::histogram!("pandaguard_detection_store_seconds", "store" => self.store.name())
            .record(store_time.as_secs_f64());
        if !observation.repeat {
            metrics::histogram!("pandaguard_query_attack_matches").record(observation.matches as f64);
        }
        if detected {
            let action = match self.policy.action {
                Action::Off => "off",
                Action::Flag => "flag",
                Action::Refuse => "refuse",
                Action::Degrade => "degrade",
            };
            metrics::counter!("pandaguard_query_attacks_detected_total", "action" => action).increment(1);
        }
        if detected && self.policy.refuses() {
            self.store.start_cooldown(client, self.policy.cooldown);
        }
        Verdict { detected, observation, fingerprint_time, store_time }
    }

    /// The rest of the client's cooldown under `refuse` (a round trip for Redis).
    pub fn cooldown(&self, client: &ClientId) -> Option<Duration> {
        if self.policy.refuses() { self.store.cooldown(client) } else { None }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::Xoshiro256PlusPlus;

    use image::RgbImage;

    use super::fingerprint::tests::{nudged, photo, probe};
    use super::*;

    fn detector(action: Action) -> Arc<Detector> {
        let mut config = AttackDetectionConfig { action, ..AttackDetectionConfig::default() };
        config.secret = Some(crate::config::DetectionSecret::new("a deployment secret"));
        Detector::from_config(&config).unwrap()
    }

    /// The first query of `queries` the detector flags (1-based).
    fn first_detection(
        detector: &Detector,
        client: &ClientId,
        queries: impl IntoIterator<Item = RgbImage>,
    ) -> Option<usize> {
        queries.into_iter().position(|image| detector.inspect(client, image.as_raw()).detected).map(|i| i + 1)
    }

    #[test]
    fn probe_series_are_detected_within_a_few_queries_and_distinct_photos_never() {
        let detector = detector(Action::Flag);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        let image = photo(4);
        // NES-like probes are nearly identical to each other: caught by `close_queries` (3).
        let attacker = detector.client_id("addr", b"10.0.0.1");
        let probes: Vec<RgbImage> = (0..10).map(|_| probe(&image, &mut rng)).collect();
        let first = first_detection(&detector, &attacker, probes).expect("probes detected within 10 queries");
        println!("NES-like probes of one photo were detected at query {first}");
        assert_eq!(first, 4, "three nearly identical earlier queries make an attack");
        // ±2/255 noise per probe is only alike (about half the hashes): `alike_queries` (8).
        let noisier = detector.client_id("addr", b"10.0.0.4");
        let nudges: Vec<RgbImage> = (0..20).map(|_| nudged(&image, &mut rng)).collect();
        let first = first_detection(&detector, &noisier, nudges).expect("±2/255 probes detected within 20 queries");
        println!("±2/255 probes of one photo were detected at query {first}");
        assert!((9..=16).contains(&first), "detected at query {first}");

        let benign = detector.client_id("addr", b"10.0.0.2");
        let mut most = 0;
        for index in 0..20 {
            let verdict = detector.inspect(&benign, photo(index).as_raw());
            assert!(!verdict.detected, "photo {index}: {verdict:?}");
            most = most.max(verdict.observation.matches);
        }
        println!("one client's 20 distinct photos: at most {most} hashes shared with one earlier photo");
    }

    /// `image` re-encoded as JPEG at `quality`, then brought back to the model input
    /// size the way the server does (here a plain resize: the photos are 224×224).
    fn reencoded(image: &RgbImage, quality: u8, scale: f32) -> RgbImage {
        let (width, height) = ((224.0 * scale) as u32, (224.0 * scale) as u32);
        let resized = image::imageops::resize(image, width, height, image::imageops::FilterType::Triangle);
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality)
            .encode_image(&resized)
            .expect("JPEG encoding in memory");
        let decoded = image::load_from_memory(&bytes).expect("our own JPEG").to_rgb8();
        image::imageops::resize(&decoded, 224, 224, image::imageops::FilterType::Triangle)
    }

    #[test]
    fn a_client_sending_a_few_edited_copies_of_its_photo_is_not_an_attacker() {
        let detector = detector(Action::Flag);
        for index in [1, 6, 12] {
            let image = photo(index);
            let client = detector.client_id("addr", format!("10.0.1.{index}").as_bytes());
            // The photo, then re-encodes at quality 70–95 and resizes by 0.8–1.2: the
            // edits that stay alike to each other (crops, flips and brightness changes do
            // not). Seven edits pass; a client that keeps sending them is refused soon
            // after, the case README "Stopping query attacks" measures as (d).
            let copies = [(95, 1.0), (70, 1.0), (85, 0.8), (90, 1.2), (75, 1.1), (80, 0.9), (92, 1.0), (88, 0.85)];
            let edits = std::iter::once(image.clone()).chain(copies.iter().map(|&(q, s)| reencoded(&image, q, s)));
            let mut most_close = 0;
            for (query, edit) in edits.enumerate() {
                let verdict = detector.inspect(&client, edit.as_raw());
                assert!(!verdict.detected, "photo {index}, query {}: {verdict:?}", query + 1);
                most_close = most_close.max(verdict.observation.close);
            }
            assert!(most_close < 3, "photo {index}: edits nearly identical to {most_close} earlier ones");
            let more = [(72, 1.05), (94, 0.95), (78, 1.15), (83, 1.0), (71, 0.82), (89, 1.18)];
            let later = first_detection(&detector, &client, more.iter().map(|&(q, s)| reencoded(&image, q, s)));
            println!("photo {index}: 8 edits passed; refused at edit {:?} after them", later);
        }
    }

    #[test]
    fn client_ids_are_keyed_digests() {
        let detector = detector(Action::Refuse);
        let id = detector.client_id("key", b"secret-api-key");
        assert_eq!(id, detector.client_id("key", b"secret-api-key"));
        assert_ne!(id, detector.client_id("addr", b"secret-api-key"));
        assert!(!id.as_str().contains("secret") && id.as_str().len() == 24);
    }

    #[test]
    fn refuse_starts_a_cooldown() {
        let detector = detector(Action::Refuse);
        let client = detector.client_id("addr", b"10.0.0.3");
        let image = photo(2);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
        assert!(detector.cooldown(&client).is_none());
        assert!((0..10).any(|_| detector.inspect(&client, probe(&image, &mut rng).as_raw()).detected));
        let left = detector.cooldown(&client).expect("in cooldown");
        assert!(left > Duration::from_secs(50), "{left:?}");
    }
}

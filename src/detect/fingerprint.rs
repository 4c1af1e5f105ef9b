//! Blacklight-style content fingerprints (Li et al., USENIX Security 2022) of the
//! model-input image: what stays the same when a query attacker nudges pixels by a
//! few levels, and differs between unrelated photos.
//!
//! 1. Quantise every 8-bit value (R, G, B interleaved, row after row) into buckets of
//!    `quantization` levels: a ±2/255 nudge leaves most values in their bucket.
//! 2. Slide a window of `window` quantised values over the flattened array with step
//!    `stride`, and hash each window: a polynomial rolling hash (O(1) per step, which
//!    is what keeps a 224×224 image well under the 2 ms budget), then a keyed mixer.
//! 3. Keep the `hashes` largest distinct mixed values: the fingerprint.
//!
//! One departure from Blacklight, measured on the 20 sample photos: windows of a
//! uniformly coloured region (sky, a white background: the same R, G, B buckets
//! repeated) are skipped unless at least `min_changes` of their values differ from the
//! same channel one pixel earlier. Such windows are common to many unrelated photos;
//! with them, one client's 20 distinct photos reached 28 of 50 hashes in common with
//! its earlier photos (a false positive at any useful threshold); without them, 5.
//!
//! Two near-identical images keep most windows unchanged, hence most of the top
//! values; two unrelated photos share almost none. The rolling hash's base and the
//! mixer's keys come from the deployment's secret (random per process when unset), so
//! an attacker cannot compute offline which windows are selected and steer their
//! perturbation into the others. The mixer is not a cryptographic PRF: it hides the
//! selection from an attacker who sees only accept/refuse answers, nothing more.
//!
//! Exact re-sends are recognised by a keyed digest of all the pixels, not of the
//! fingerprint: a Square-attack step that changes one small square often leaves every
//! selected window as it was, and would pass for a retry if the fingerprint decided.

use sha2::{Digest, Sha256};

/// How fingerprints are made (from `[attack_detection]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FingerprintParams {
    /// Width of a quantisation bucket in 8-bit levels.
    pub quantization: u8,
    /// Quantised values per hashed window.
    pub window: usize,
    /// Step between windows.
    pub stride: usize,
    /// Hashes kept (the top N).
    pub hashes: usize,
    /// A window is hashed only when at least this many of its values differ from the
    /// same channel of the pixel before (see below).
    pub min_changes: usize,
}

/// The top-N window hashes of one image (distinct, in increasing order) and the keyed
/// digest of its exact pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub hashes: Vec<u64>,
    pub digest: u64,
}

impl Fingerprint {
    /// How many of `self`'s hashes `other` has too.
    pub fn shared_with(&self, other: &Fingerprint) -> usize {
        self.hashes.iter().filter(|h| other.hashes.binary_search(h).is_ok()).count()
    }
}

/// The deployment's keys: the rolling hash's base and the mixer's two keys.
#[derive(Clone)]
struct Keys {
    base: u64,
    mix_in: u64,
    mix_out: u64,
    digest: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct Fingerprinter {
    params: FingerprintParams,
    keys: Keys,
    /// Quantised value of each 8-bit level, plus one (so a window of zeros still
    /// contributes to the hash).
    buckets: [u64; 256],
    /// base^(window-1): what the value leaving the window contributed.
    leaving: u64,
}

impl Fingerprinter {
    /// Keys derived from `secret` (every replica with the same secret fingerprints
    /// alike), or random ones for this process when there is none.
    pub fn new(params: FingerprintParams, secret: Option<&[u8]>) -> Self {
        let seed: [u8; 32] = match secret {
            Some(secret) => {
                let mut hasher = Sha256::new();
                hasher.update(b"pandaguard attack_detection fingerprint v1\0");
                hasher.update(secret);
                hasher.finalize().into()
            }
            None => rand::random(),
        };
        let word = |i: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&seed[i * 8..i * 8 + 8]);
            u64::from_le_bytes(bytes)
        };
        // An odd base is invertible modulo 2^64, so no window's leading value is
        // multiplied away; forcing a high bit keeps it away from tiny bases.
        let keys = Keys { base: word(0) | 1 | (1 << 62), mix_in: word(1), mix_out: word(2), digest: word(3) };
        let step = u64::from(params.quantization.max(1));
        let mut buckets = [0u64; 256];
        for (level, bucket) in buckets.iter_mut().enumerate() {
            *bucket = level as u64 / step + 1;
        }
        let leaving = (1..params.window.max(1)).fold(1u64, |acc, _| acc.wrapping_mul(keys.base));
        Self { params, keys, buckets, leaving }
    }

    pub fn params(&self) -> FingerprintParams {
        self.params
    }

    /// The fingerprint of an image given as its 8-bit pixel values (HWC order, as
    /// `RgbImage::as_raw`). An image without a window of enough texture (flat, or
    /// smaller than a window) has no hashes: there is nothing to compare it by.
    pub fn fingerprint(&self, pixels: &[u8]) -> Fingerprint {
        let FingerprintParams { window, stride, hashes: wanted, .. } = self.params;
        // `changes`: values in the window that differ from the same channel one pixel
        // earlier (a rolling count, like the hash).
        let window = window.clamp(1, pixels.len().max(1));
        let stride = stride.max(1);
        let base = self.keys.base;
        let mut top = TopDistinct::new(wanted);
        let mut hash = 0u64;
        let mut changes = 0usize;
        let b = &self.buckets;
        for (i, &level) in pixels.iter().enumerate() {
            if i >= window {
                let out = b[usize::from(pixels[i - window])];
                hash = hash.wrapping_sub(out.wrapping_mul(self.leaving));
                // The pair (i-window, i-window+3) leaves the window.
                changes -= usize::from(b[usize::from(pixels[i - window + 3])] != out);
            }
            let value = b[usize::from(level)];
            if i >= 3 {
                changes += usize::from(b[usize::from(pixels[i - 3])] != value);
            }
            hash = hash.wrapping_mul(base).wrapping_add(value);
            // Window [start, i] is complete; emit every `stride`-th one.
            if i + 1 >= window && (i + 1 - window) % stride == 0 && changes >= self.params.min_changes {
                top.offer(self.mix(hash));
            }
        }
        Fingerprint { hashes: top.into_sorted(), digest: self.digest(pixels) }
    }

    /// A keyed 64-bit finaliser (murmur3's fmix64 between two key words).
    fn mix(&self, value: u64) -> u64 {
        fmix(value ^ self.keys.mix_in) ^ self.keys.mix_out
    }

    /// Keyed digest of the exact bytes, eight at a time.
    fn digest(&self, pixels: &[u8]) -> u64 {
        let mut state = self.keys.digest ^ (pixels.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut chunks = pixels.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            state = fmix(state ^ u64::from_le_bytes(word)).wrapping_add(self.keys.mix_in);
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        fmix(state ^ u64::from_le_bytes(tail) ^ self.keys.mix_out)
    }
}

fn fmix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The `n` largest distinct values offered, kept sorted. Most offers lose against the
/// current minimum in one comparison, so the whole scan stays linear.
struct TopDistinct {
    n: usize,
    values: Vec<u64>,
}

impl TopDistinct {
    fn new(n: usize) -> Self {
        Self { n, values: Vec::with_capacity(n + 1) }
    }

    fn offer(&mut self, value: u64) {
        if self.n == 0 {
            return;
        }
        if self.values.len() == self.n && value <= self.values[0] {
            return;
        }
        if let Err(position) = self.values.binary_search(&value) {
            self.values.insert(position, value);
            if self.values.len() > self.n {
                self.values.remove(0);
            }
        }
    }

    fn into_sorted(self) -> Vec<u64> {
        self.values
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use image::RgbImage;
    use rand::rngs::Xoshiro256PlusPlus;
    use rand::{Rng, RngExt, SeedableRng};

    use super::*;

    /// The shipped defaults (config/default.toml).
    pub(crate) fn params() -> FingerprintParams {
        let config = crate::config::AttackDetectionConfig::default();
        config.fingerprint_params()
    }

    /// A sample photo at the default model's input size, as the pipeline gives it.
    pub(crate) fn photo(index: usize) -> RgbImage {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/imagenet");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("testdata/imagenet is missing: run `make setup`")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        files.sort();
        let image = image::open(&files[index]).expect("a sample photo").to_rgb8();
        image::imageops::resize(&image, 224, 224, image::imageops::FilterType::Triangle)
    }

    /// `image` with every value moved by a uniform random amount in [-2, 2] (clamped): a
    /// noisier probe than the project's attacks send (see `probe`).
    pub(crate) fn nudged(image: &RgbImage, rng: &mut impl Rng) -> RgbImage {
        let mut out = image.clone();
        for value in out.iter_mut() {
            *value = (i16::from(*value) + rng.random_range(-2i16..=2)).clamp(0, 255) as u8;
        }
        out
    }

    /// What NES sends: `image` plus Gaussian noise of σ = 0.001 (its default, in [0, 1]
    /// units), rounded to 8 bits; Square's steps change one small square and are as close.
    pub(crate) fn probe(image: &RgbImage, rng: &mut impl Rng) -> RgbImage {
        let mut out = image.clone();
        for value in out.iter_mut() {
            let noise: f32 = rand_distr::Distribution::sample(&rand_distr::StandardNormal, rng);
            *value = (f32::from(*value) + noise * 0.255).round().clamp(0.0, 255.0) as u8;
        }
        out
    }

    #[test]
    fn identical_images_have_identical_fingerprints_and_the_key_decides() {
        let image = photo(0);
        let a = Fingerprinter::new(params(), Some(b"a deployment secret"));
        let b = Fingerprinter::new(params(), Some(b"a deployment secret"));
        let fingerprint = a.fingerprint(image.as_raw());
        assert_eq!(fingerprint.hashes.len(), params().hashes);
        assert_eq!(fingerprint, b.fingerprint(image.as_raw()));
        let other = Fingerprinter::new(params(), Some(b"another secret!!"));
        assert_eq!(fingerprint.shared_with(&other.fingerprint(image.as_raw())), 0, "another key, other hashes");
        assert_ne!(fingerprint.digest, other.fingerprint(image.as_raw()).digest);
    }

    #[test]
    fn a_small_random_nudge_keeps_most_hashes_but_changes_the_digest() {
        let fingerprinter = Fingerprinter::new(params(), Some(b"a deployment secret"));
        let threshold = crate::config::AttackDetectionConfig::default().match_threshold;
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        let mut shared = Vec::new();
        for index in [0, 5, 11] {
            let image = photo(index);
            let original = fingerprinter.fingerprint(image.as_raw());
            for _ in 0..3 {
                let probe = fingerprinter.fingerprint(nudged(&image, &mut rng).as_raw());
                assert_ne!(probe.digest, original.digest);
                shared.push(probe.shared_with(&original));
            }
        }
        println!("hashes shared with the original after a ±2/255 nudge: {shared:?} (threshold {threshold})");
        // One nudged probe against one original; an attack's later probes are compared
        // with the union of all its earlier ones and match more (detect/mod.rs tests).
        shared.sort_unstable();
        assert!(shared[shared.len() / 2] >= threshold, "median of {shared:?} below {threshold}");
        assert!(shared[0] + 5 >= threshold, "{shared:?}: one probe far below {threshold}");
    }

    #[test]
    fn different_photos_share_almost_nothing() {
        let fingerprinter = Fingerprinter::new(params(), Some(b"a deployment secret"));
        let prints: Vec<Fingerprint> = (0..20).map(|i| fingerprinter.fingerprint(photo(i).as_raw())).collect();
        let mut worst = 0;
        for (i, a) in prints.iter().enumerate() {
            for b in &prints[i + 1..] {
                worst = worst.max(a.shared_with(b));
            }
        }
        println!("most hashes shared by two different sample photos: {worst} of {}", params().hashes);
        assert!(worst <= params().hashes / 10, "{worst}");
    }

    #[test]
    fn flat_and_tiny_images_have_no_hashes() {
        let fingerprinter = Fingerprinter::new(params(), None);
        assert!(fingerprinter.fingerprint(&[]).hashes.is_empty());
        assert!(fingerprinter.fingerprint(&[1, 2, 3]).hashes.is_empty());
        assert!(fingerprinter.fingerprint(&vec![128u8; 3 * 224 * 224]).hashes.is_empty());
        // Without the texture rule every window counts; a flat image has one distinct
        // window: one hash, not N copies of it.
        let every_window = Fingerprinter::new(FingerprintParams { min_changes: 0, ..params() }, None);
        assert_eq!(every_window.fingerprint(&vec![128u8; 3 * 224 * 224]).hashes.len(), 1);
    }
}

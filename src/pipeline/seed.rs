//! Content-derived seeds: without a client seed, the defenses' noise for a request is
//! seeded by HMAC-SHA256(key, the raw model's input pixels). The same image then gets
//! the same answer on every retry, cache and replica sharing the key, while a client
//! can neither choose the seed nor predict it (the key is the deployment's secret).
//! The trade-off: re-sending the same image gives the same draw, so an attacker who
//! wants fresh noise (EOT) must vary the image (docs/defenses.md).

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::defense::settings::SeedSecret;

pub struct SeedKey {
    key: [u8; 32],
}

impl SeedKey {
    /// The configured secret's key, or a random one for this process (then only this
    /// replica repeats its answers; said once in the log).
    pub fn new(secret: Option<&SeedSecret>) -> Self {
        match secret {
            Some(secret) => SeedKey { key: Sha256::digest(secret.expose().as_bytes()).into() },
            None => {
                tracing::info!(
                    "defense.seed_secret is not set: content-derived seeds use a random key; \
                     replicas will not repeat each other's answers"
                );
                SeedKey { key: rand::random() }
            }
        }
    }

    /// The seed of an image given as its model-input pixels.
    pub fn seed_for(&self, pixels: &[u8]) -> u64 {
        // HMAC accepts keys of any length; a 32-byte key never fails.
        let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => return 0,
        };
        mac.update(pixels);
        let tag = mac.finalize().into_bytes();
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag[..8]);
        u64::from_le_bytes(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_pixels_and_key_give_the_same_seed_and_nothing_else_does() {
        let key = SeedKey::new(Some(&SeedSecret::new("a deployment secret")));
        let same = SeedKey::new(Some(&SeedSecret::new("a deployment secret")));
        let other = SeedKey::new(Some(&SeedSecret::new("another secret here")));
        let pixels = vec![7u8; 3 * 224 * 224];
        let mut changed = pixels.clone();
        changed[1234] ^= 1;
        assert_eq!(key.seed_for(&pixels), same.seed_for(&pixels));
        assert_ne!(key.seed_for(&pixels), key.seed_for(&changed), "one bit of one pixel changes the seed");
        assert_ne!(key.seed_for(&pixels), other.seed_for(&pixels), "the key decides");
        assert_ne!(SeedKey::new(None).seed_for(&pixels), SeedKey::new(None).seed_for(&pixels));
    }
}

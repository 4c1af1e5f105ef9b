//! Which defenses run and with what parameters: presets from the config, overridden
//! per request within the config's limits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Defenses;
use crate::model::Precision;

/// The key of content-derived seeds. Its `Debug` form is redacted, so printing the
/// configuration never writes it to a log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SeedSecret(String);

impl SeedSecret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SeedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeedSecret(<redacted>)")
    }
}

/// A setting outside its limits; the message names the parameter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{parameter} must be in {range}")]
pub struct SettingsError {
    pub parameter: &'static str,
    pub range: String,
}

/// `Ok` when `ok`, else the error naming `parameter` and its allowed `range`.
pub fn within(ok: bool, parameter: &'static str, range: impl FnOnce() -> String) -> Result<(), SettingsError> {
    if ok { Ok(()) } else { Err(SettingsError { parameter, range: range() }) }
}

/// Everything a defended request needs to know. Presets in the config are complete
/// `DefenseSettings`; a request starts from one and overrides single fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DefenseSettings {
    /// Defenses to run (names from the registry), in the order they are reported.
    pub defenses: Vec<String>,
    /// smooth: noise standard deviation in [0,1] pixel units.
    pub sigma: f32,
    /// smooth: most noisy samples for PREDICT, and CERTIFY's estimation samples n.
    pub samples: u32,
    /// smooth: error level of PREDICT's test and CERTIFY's bound.
    pub alpha: f64,
    /// smooth: also run CERTIFY.
    pub certify: bool,
    /// smooth: CERTIFY's selection samples n0.
    pub selection_samples: u32,
    /// smooth: Gaussian blur (pixels) after the noise ("denoised smoothing"); 0 = off.
    pub denoise_sigma: f32,
    /// saccade: number of fixations.
    pub fixations: u32,
    /// saccade: crop side as fractions of the image's shorter side.
    pub scales: Vec<f64>,
    /// blur: Gaussian blur sigma in pixels (also the saccade periphery's blur).
    pub blur_sigma: f32,
    /// blur: median filter radius (1 = 3×3).
    pub median_radius: u32,
    /// ensemble: models to combine (empty = every loaded model of `precision`).
    pub models: Vec<String>,
    /// ensemble with `models` empty: combine every loaded fp32 model (`fp32`) or every
    /// loaded int8 variant (`int8`, the models named `<model>-int8`).
    pub precision: Precision,
    /// ensemble: noisy views (the smoothing noise, `sigma`) each member classifies
    /// besides its plain view: sampling the image space and the classifier space.
    pub ensemble_samples: u32,
}

impl DefenseSettings {
    /// The models an ensemble combines: `models` when it names any, else every loaded
    /// model of `precision`, in the order given.
    pub fn ensemble_members<'a>(&self, loaded: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        if !self.models.is_empty() {
            return self.models.clone();
        }
        loaded.into_iter().filter(|name| Precision::of_model(name) == self.precision).map(str::to_string).collect()
    }
}

impl Default for DefenseSettings {
    fn default() -> Self {
        Self {
            defenses: Vec::new(),
            sigma: 0.05,
            samples: 32,
            alpha: 0.001,
            certify: false,
            selection_samples: 16,
            denoise_sigma: 0.0,
            fixations: 3,
            scales: vec![0.6],
            blur_sigma: 1.0,
            median_radius: 1,
            models: Vec::new(),
            precision: Precision::Fp32,
            ensemble_samples: 8,
        }
    }
}

/// Bounds on what a request may ask for; out-of-range values get 422.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefenseLimits {
    pub max_sigma: f32,
    pub max_samples: u32,
    pub min_alpha: f64,
    pub max_alpha: f64,
    pub max_fixations: u32,
    pub max_blur_sigma: f32,
}

impl Default for DefenseLimits {
    fn default() -> Self {
        Self {
            max_sigma: 1.0,
            max_samples: 256,
            min_alpha: 1e-6,
            max_alpha: 0.5,
            max_fixations: 8,
            max_blur_sigma: 8.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefenseConfig {
    /// Preset applied when a request names none.
    pub default_preset: String,
    /// `suspicious` when the L1 distance between the raw and defended probability
    /// vectors exceeds this (set on clean images for a 5% false-positive rate).
    pub squeeze_threshold: f32,
    /// Whether an HTTP request may choose the defenses' `seed`. Reproducible answers
    /// help debugging, but a client that fixes the seed fixes the noise a randomized
    /// defense relies on: an attacker then optimises against known draws (README "Red
    /// team", fixed noise). With `false` a request naming a seed gets 422 and every
    /// answer draws its own noise; the offline tools (`classify`, `evaluate`, `attack`
    /// in-process) are the operator's and still seed as they are told.
    pub allow_client_seed: bool,
    /// Key of the content-derived seed: without a client seed, a request's noise is
    /// seeded by a keyed hash of its image (the raw model's input pixels), so the same
    /// image gets the same answer on every retry and every replica that shares the key,
    /// while no client can choose or predict the noise. Unset: a random key per process
    /// (answers then repeat on one replica only). Set it through
    /// `PANDAGUARD_DEFENSE__SEED_SECRET` from a secret store, not in a file in git.
    pub seed_secret: Option<SeedSecret>,
    pub limits: DefenseLimits,
    pub presets: BTreeMap<String, DefenseSettings>,
}

impl Default for DefenseConfig {
    /// The shipped presets (also written out in config/default.toml, with the
    /// measurements that chose them).
    fn default() -> Self {
        let base = DefenseSettings::default();
        let list = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let presets = BTreeMap::from([
            ("none".to_string(), DefenseSettings { defenses: vec![], ..base.clone() }),
            (
                "fast".to_string(),
                DefenseSettings { defenses: list(&["ensemble"]), ensemble_samples: 0, ..base.clone() },
            ),
            (
                "default".to_string(),
                DefenseSettings { defenses: list(&["ensemble"]), ensemble_samples: 16, ..base.clone() },
            ),
            (
                "fast-int8".to_string(),
                DefenseSettings {
                    defenses: list(&["ensemble"]),
                    ensemble_samples: 0,
                    precision: Precision::Int8,
                    ..base.clone()
                },
            ),
            (
                "default-int8".to_string(),
                DefenseSettings {
                    defenses: list(&["ensemble"]),
                    ensemble_samples: 16,
                    precision: Precision::Int8,
                    ..base.clone()
                },
            ),
            (
                "strong".to_string(),
                DefenseSettings { defenses: list(&["smooth", "ensemble"]), samples: 128, ensemble_samples: 32, ..base },
            ),
        ]);
        Self {
            default_preset: "default".into(),
            squeeze_threshold: 0.97,
            allow_client_seed: true,
            seed_secret: None,
            limits: DefenseLimits::default(),
            presets,
        }
    }
}

impl DefenseConfig {
    /// Problems with the presets and limits, for start-up validation.
    pub fn problems(&self, loaded_models: &[String], defenses: &Defenses) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.presets.contains_key(&self.default_preset) {
            problems.push(format!("defense.default_preset {:?} is not a preset", self.default_preset));
        }
        if !(0.0..=2.0).contains(&self.squeeze_threshold) {
            problems.push("defense.squeeze_threshold must be in [0, 2]".into());
        }
        if self.seed_secret.as_ref().is_some_and(|s| s.expose().len() < 16) {
            problems.push("defense.seed_secret must be at least 16 characters (or unset)".into());
        }
        for (name, preset) in &self.presets {
            if let Err(message) = self.check(preset, defenses) {
                problems.push(format!("defense.presets.{name}: {message}"));
            }
            for model in &preset.models {
                if !loaded_models.contains(model) {
                    problems.push(format!("defense.presets.{name}: model {model:?} is not in models.load"));
                }
            }
        }
        problems
    }

    /// Checks settings against the limits: the parameters every request has, then each
    /// listed defense its own. A defense name that is not registered is reported too.
    pub fn check(&self, settings: &DefenseSettings, defenses: &Defenses) -> Result<(), String> {
        for name in &settings.defenses {
            let defense = defenses
                .get(name)
                .ok_or_else(|| format!("{name:?} is not a defense (defenses: {})", defenses.names().join(", ")))?;
            defense.check(settings, &self.limits).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_presets_are_valid() {
        let config = DefenseConfig::default();
        let problems = config.problems(&[], &Defenses::standard());
        assert!(problems.is_empty(), "{problems:?}");
        assert!(config.presets["none"].defenses.is_empty());
    }

    #[test]
    fn out_of_range_settings_name_the_parameter() {
        let config = DefenseConfig::default();
        let all = ["smooth", "blur", "saccade", "ensemble"].map(String::from).to_vec();
        for (change, name) in [
            (DefenseSettings { sigma: 0.0, ..Default::default() }, "sigma"),
            (DefenseSettings { samples: 100_000, ..Default::default() }, "samples"),
            (DefenseSettings { alpha: 0.9, ..Default::default() }, "alpha"),
            (DefenseSettings { fixations: 99, ..Default::default() }, "fixations"),
            (DefenseSettings { blur_sigma: 50.0, ..Default::default() }, "blur_sigma"),
        ] {
            let settings = DefenseSettings { defenses: all.clone(), ..change };
            let message = config.check(&settings, &Defenses::standard()).unwrap_err();
            assert!(message.starts_with(name), "{message}");
        }
        let unknown = DefenseSettings { defenses: vec!["magic".into()], ..Default::default() };
        assert!(config.check(&unknown, &Defenses::standard()).unwrap_err().contains("magic"));
    }
}

//! Request parameters of `/classify`.
//!
//! Owns: [`ClassifyQuery`], the one list of query parameters (the parser accepts
//! exactly its fields, the OpenAPI document is generated from it, the CLI's `--param`
//! goes through it), and their resolution against the config's presets and limits into
//! [`ClassifyParams`]. Must not import: `http`/axum, the pipeline, the engine.
//!
//! Unknown, repeated, malformed or out-of-range parameters are refused (422) rather
//! than silently ignored: a typo like `top-k=3` should not quietly give the default,
//! and neither should a parameter that no defense of the request reads
//! (`certify=true` with a preset that has no smoothing).

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::IntoParams;

use crate::config::Config;
use crate::defense::{DefenseSettings, Defenses, SettingsError};

/// The query parameters of `POST /classify`. Every field is optional: a request
/// starts from a preset and overrides single parameters within `defense.limits`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ClassifyQuery {
    /// Model for the raw prediction (default from config; see /models).
    pub model: Option<String>,
    /// Classes to list, 1 to classify.max_top_k (default 5, at most 20).
    pub top_k: Option<usize>,
    /// A preset (default, fast, strong, none) or a comma list of defenses (smooth, blur, saccade, ensemble).
    pub defense: Option<String>,
    /// smooth, ensemble: noise standard deviation in [0,1] pixel units.
    pub sigma: Option<f32>,
    /// smooth: most noisy samples (PREDICT stops earlier once its test settles); CERTIFY's n.
    pub samples: Option<u32>,
    /// smooth: error level of PREDICT's test and CERTIFY's bound.
    pub alpha: Option<f64>,
    /// smooth: also run CERTIFY and report a certified L2 radius (true/false, 1/0, yes/no).
    #[serde(default, deserialize_with = "flexible_bool")]
    #[param(value_type = Option<bool>)]
    pub certify: Option<bool>,
    /// saccade: number of fixations.
    pub fixations: Option<u32>,
    /// blur: Gaussian sigma in pixels (also the saccade periphery).
    pub blur_sigma: Option<f32>,
    /// ensemble: comma list of models (default: all loaded).
    pub models: Option<String>,
    /// ensemble: noisy views per member besides its plain view (0 to defense.limits.max_samples).
    pub ensemble_samples: Option<u32>,
    /// Seed of the random views; the same seed and image give the same answer (refused when the server has defense.allow_client_seed = false).
    pub seed: Option<u64>,
}

/// Parameters every request may set, whatever its defenses.
const GENERAL: &[&str] = &["model", "top_k", "defense", "seed"];

/// A request as the pipeline runs it: the model, the defenses and their settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifyParams {
    /// Model for the raw prediction; `None` = the configured default.
    pub model: Option<String>,
    pub top_k: usize,
    /// The preset the defenses started from, or "custom" for a list of defenses.
    pub preset: String,
    /// The defenses to run and their parameters, within the config's limits.
    pub defense: DefenseSettings,
    /// Seed of every random choice; `None` = derived by the pipeline (reported in the answer).
    pub seed: Option<u64>,
}

/// A parameter the request got wrong; `name` is the parameter as sent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid parameter `{name}`: {problem}")]
pub struct ParamError {
    pub name: String,
    pub problem: ParamProblem,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamProblem {
    #[error("unknown parameter; known parameters are {}", known.join(", "))]
    Unknown { known: Vec<String> },
    #[error("given more than once")]
    Repeated,
    #[error("{value:?} is not a valid value ({reason})")]
    Malformed { value: String, reason: String },
    #[error("{value} is outside {range}")]
    OutOfRange { value: String, range: String },
    #[error("{value:?} is not a model name")]
    NotAName { value: String },
    #[error("unknown model {value:?}; loaded models: {}", known.join(", "))]
    UnknownModel { value: String, known: Vec<String> },
    #[error("{value} has other classes than {raw}")]
    IncompatibleModel { value: String, raw: String },
    #[error(
        "the ensemble combines the loaded {precision} models and none is loaded (loaded: {}); add them to \
         models.load (int8 variants are named <model>-int8) or name members with `models`",
        loaded.join(", ")
    )]
    NoModelsOfPrecision { precision: String, loaded: Vec<String> },
    #[error("{value:?} is neither a preset ({}) nor a defense ({})", presets.join(", "), defenses.join(", "))]
    UnknownDefense { value: String, presets: Vec<String>, defenses: Vec<String> },
    #[error("no defense of this request reads it (defenses: {})", if defenses.is_empty() { "none".to_string() } else { defenses.join(", ") })]
    NoEffect { defenses: Vec<String> },
    #[error("this server draws the defenses' noise itself (defense.allow_client_seed = false)")]
    SeedRefused,
    #[error(
        "the request needs {rows} model inputs for {model}, more than engine.max_rows_per_request = {max}; \
         lower it"
    )]
    TooManyRows { model: String, rows: usize, max: usize },
}

impl ParamError {
    pub fn new(name: impl Into<String>, problem: ParamProblem) -> Self {
        ParamError { name: printable(&name.into()), problem }
    }

    fn out_of_range(error: SettingsError, settings: &DefenseSettings) -> Self {
        let value = match error.parameter {
            "sigma" => settings.sigma.to_string(),
            "samples" => settings.samples.to_string(),
            "alpha" => settings.alpha.to_string(),
            "fixations" => settings.fixations.to_string(),
            "blur_sigma" => settings.blur_sigma.to_string(),
            "ensemble_samples" => settings.ensemble_samples.to_string(),
            "selection_samples" => settings.selection_samples.to_string(),
            "denoise_sigma" => settings.denoise_sigma.to_string(),
            "median_radius" => settings.median_radius.to_string(),
            _ => "the value".to_string(),
        };
        ParamError::new(error.parameter, ParamProblem::OutOfRange { value, range: error.range })
    }
}

impl ClassifyQuery {
    /// Every parameter name, from the same derive the OpenAPI document uses.
    pub fn names() -> Vec<String> {
        Self::into_params(|| None).into_iter().map(|p| p.name).collect()
    }

    /// Parses a raw query string (`a=1&b=2`, percent-encoded; invalid UTF-8 arrives as U+FFFD).
    pub fn parse(query: Option<&str>) -> Result<Self, ParamError> {
        let query = query.unwrap_or("");
        let known = Self::names();
        let mut seen: Vec<String> = Vec::new();
        for (key, _) in form_urlencoded::parse(query.as_bytes()) {
            if !known.iter().any(|k| *k == key) {
                return Err(ParamError::new(key, ParamProblem::Unknown { known }));
            }
            if seen.iter().any(|s| *s == key) {
                return Err(ParamError::new(key, ParamProblem::Repeated));
            }
            seen.push(key.into_owned());
        }
        serde_urlencoded::from_str(query).map_err(|whole| {
            // serde's message does not say which parameter failed: parse them one by one.
            for (key, value) in form_urlencoded::parse(query.as_bytes()) {
                let single = form_urlencoded::Serializer::new(String::new()).append_pair(&key, &value).finish();
                if let Err(error) = serde_urlencoded::from_str::<ClassifyQuery>(&single) {
                    let problem = ParamProblem::Malformed { value: printable(&value), reason: error.to_string() };
                    return ParamError::new(key, problem);
                }
            }
            ParamError::new("query", ParamProblem::Malformed { value: printable(query), reason: whole.to_string() })
        })
    }

    /// Parses `key=value` pairs (the CLI's `--param`s, the red team's requests).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, ParamError> {
        let query = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
        Self::parse(Some(&query))
    }

    /// The defense parameters this query sets (every field that is set, but the
    /// general ones), read off the struct itself so no second list of names exists.
    fn defense_parameters(&self) -> Vec<String> {
        let serde_json::Value::Object(fields) = serde_json::to_value(self).unwrap_or_default() else {
            return Vec::new();
        };
        fields
            .into_iter()
            .filter(|(name, value)| !value.is_null() && !GENERAL.contains(&name.as_str()))
            .map(|(name, _)| name)
            .collect()
    }
}

impl ClassifyParams {
    pub fn defaults(config: &Config) -> Self {
        let preset = config.defense.default_preset.clone();
        let defense = config.defense.presets.get(&preset).cloned().unwrap_or_default();
        Self { model: None, top_k: config.classify.default_top_k, preset, defense, seed: None }
    }

    /// The request's model, defenses and settings: the preset (or list) first, then
    /// single parameters over it, every value checked against the limits, and every
    /// defense parameter read by at least one of the request's defenses.
    pub fn resolve(query: &ClassifyQuery, config: &Config, defenses: &Defenses) -> Result<Self, ParamError> {
        let mut params = Self::defaults(config);
        if let Some(value) = &query.defense {
            let (preset, settings) = parse_defense(value, config, defenses)?;
            params.preset = preset;
            params.defense = settings;
        }
        if let Some(model) = &query.model {
            params.model = Some(parse_name("model", model)?);
        }
        if let Some(top_k) = query.top_k {
            let max = config.classify.max_top_k;
            if !(1..=max).contains(&top_k) {
                let range = format!("[1, {max}]");
                return Err(ParamError::new("top_k", ParamProblem::OutOfRange { value: top_k.to_string(), range }));
            }
            params.top_k = top_k;
        }
        params.seed = query.seed;
        let settings = &mut params.defense;
        set(&mut settings.sigma, query.sigma);
        set(&mut settings.samples, query.samples);
        set(&mut settings.alpha, query.alpha);
        set(&mut settings.certify, query.certify);
        set(&mut settings.fixations, query.fixations);
        set(&mut settings.blur_sigma, query.blur_sigma);
        set(&mut settings.ensemble_samples, query.ensemble_samples);
        if let Some(models) = &query.models {
            settings.models = models.split(',').map(|m| parse_name("models", m.trim())).collect::<Result<_, _>>()?;
        }

        for name in &settings.defenses {
            if let Some(defense) = defenses.get(name) {
                defense.check(settings, &config.defense.limits).map_err(|e| ParamError::out_of_range(e, settings))?;
            }
        }
        let read: Vec<&str> = settings
            .defenses
            .iter()
            .filter_map(|name| defenses.get(name))
            .flat_map(|defense| defense.parameters().iter().copied())
            .collect();
        if let Some(unread) = query.defense_parameters().into_iter().find(|p| !read.contains(&p.as_str())) {
            return Err(ParamError::new(unread, ParamProblem::NoEffect { defenses: settings.defenses.clone() }));
        }
        Ok(params)
    }

    /// Parses and resolves a raw query string.
    pub fn from_query(query: Option<&str>, config: &Config, defenses: &Defenses) -> Result<Self, ParamError> {
        Self::resolve(&ClassifyQuery::parse(query)?, config, defenses)
    }

    /// Parses and resolves `key=value` pairs.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
        config: &Config,
        defenses: &Defenses,
    ) -> Result<Self, ParamError> {
        Self::resolve(&ClassifyQuery::from_pairs(pairs)?, config, defenses)
    }
}

/// Overrides `target` when the request gives a value.
fn set<T>(target: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *target = value;
    }
}

/// `defense=default` (a preset) or `defense=smooth,blur` (defenses with the default
/// preset's parameters) or `defense=none`.
fn parse_defense(value: &str, config: &Config, defenses: &Defenses) -> Result<(String, DefenseSettings), ParamError> {
    if let Some(preset) = config.defense.presets.get(value) {
        return Ok((value.to_string(), preset.clone()));
    }
    let base = config.defense.presets.get(&config.defense.default_preset).cloned().unwrap_or_default();
    let mut list: Vec<String> = Vec::new();
    for name in value.split(',').map(str::trim) {
        if defenses.get(name).is_none() {
            let problem = ParamProblem::UnknownDefense {
                value: printable(name),
                presets: config.defense.presets.keys().cloned().collect(),
                defenses: defenses.names().into_iter().map(String::from).collect(),
            };
            return Err(ParamError::new("defense", problem));
        }
        if !list.iter().any(|n| n == name) {
            list.push(name.to_string());
        }
    }
    Ok(("custom".to_string(), DefenseSettings { defenses: list, ..base }))
}

/// `true`/`false`, `1`/`0`, `yes`/`no`.
fn flexible_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    let text = String::deserialize(deserializer)?;
    match text.trim() {
        "true" | "1" | "yes" => Ok(Some(true)),
        "false" | "0" | "no" => Ok(Some(false)),
        _ => Err(serde::de::Error::custom("expected true or false")),
    }
}

/// Keeps error messages readable and log-safe when a key is binary junk.
fn printable(text: &str) -> String {
    text.chars().take(64).map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn parse_name(key: &str, value: &str) -> Result<String, ParamError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(value.to_string())
    } else {
        Err(ParamError::new(key, ParamProblem::NotAName { value: printable(value) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &str) -> Result<ClassifyParams, ParamError> {
        ClassifyParams::from_query(Some(query), &Config::default(), &Defenses::standard())
    }

    #[test]
    fn defaults_apply_without_parameters() {
        let params = parse("").unwrap();
        assert_eq!((params.model, params.top_k, params.seed), (None, 5, None));
        assert_eq!(params.preset, "default");
        assert_eq!(params.defense, Config::default().defense.presets["default"]);
    }

    #[test]
    fn a_preset_or_a_list_then_single_overrides() {
        let p = parse("sigma=0.25&defense=strong").unwrap();
        assert_eq!(p.preset, "strong");
        assert_eq!(p.defense.sigma, 0.25);
        assert_eq!(p.defense.samples, Config::default().defense.presets["strong"].samples);
        let p = parse("defense=blur,smooth,blur,ensemble&certify=true&samples=64&seed=9&models=efficientnet-lite0")
            .unwrap();
        assert_eq!(p.preset, "custom");
        assert_eq!(p.defense.defenses, ["blur", "smooth", "ensemble"]);
        assert!(p.defense.certify);
        assert_eq!((p.defense.samples, p.seed), (64, Some(9)));
        assert_eq!(p.defense.models, vec!["efficientnet-lite0".to_string()]);
        assert!(parse("defense=none").unwrap().defense.defenses.is_empty());
        assert!(parse("defense=smooth&certify=1").unwrap().defense.certify);
    }

    #[test]
    fn valid_parameters_parse() {
        let p = parse("model=efficientnet-lite1&top_k=20").unwrap();
        assert_eq!(p.model.as_deref(), Some("efficientnet-lite1"));
        assert_eq!(p.top_k, 20);
    }

    #[test]
    fn bad_parameters_are_invalid_with_the_name() {
        for (query, name) in [
            ("top_k=0", "top_k"),
            ("top_k=21", "top_k"),
            ("top_k=three", "top_k"),
            ("top_k=1&top_k=2", "top_k"),
            ("model=", "model"),
            ("model=../../etc/passwd", "model"),
            ("model=%FF%FE", "model"),
            ("top-k=3", "top-k"),
            ("defense=magic", "defense"),
            ("sigma=0", "sigma"),
            ("sigma=2", "sigma"),
            ("sigma=nan", "sigma"),
            ("defense=smooth&samples=0", "samples"),
            ("defense=smooth&samples=100000", "samples"),
            ("defense=smooth&alpha=0.7", "alpha"),
            ("certify=maybe", "certify"),
            ("defense=saccade&fixations=99", "fixations"),
            ("defense=blur&blur_sigma=-1", "blur_sigma"),
            ("models=a,,b", "models"),
            ("seed=-4", "seed"),
        ] {
            match parse(query) {
                Err(ParamError { name: got, .. }) => assert_eq!(got, name, "{query}"),
                other => panic!("{query}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_parameter_no_defense_reads_is_refused() {
        for (query, name) in [
            ("certify=true", "certify"),
            ("defense=fast&samples=64", "samples"),
            ("defense=none&sigma=0.1", "sigma"),
            ("defense=smooth&fixations=2", "fixations"),
            ("defense=ensemble&blur_sigma=2", "blur_sigma"),
        ] {
            let error = parse(query).unwrap_err();
            assert_eq!(error.name, name, "{query}");
            assert!(matches!(error.problem, ParamProblem::NoEffect { .. }), "{query}: {error}");
        }
        // Read by one of the request's defenses: accepted.
        assert!(parse("defense=smooth,ensemble&certify=true&ensemble_samples=2").is_ok());
        assert!(parse("defense=saccade&blur_sigma=2").is_ok());
    }

    #[test]
    fn every_field_is_a_known_parameter_and_no_other() {
        let names = ClassifyQuery::names();
        assert_eq!(
            names,
            [
                "model",
                "top_k",
                "defense",
                "sigma",
                "samples",
                "alpha",
                "certify",
                "fixations",
                "blur_sigma",
                "models",
                "ensemble_samples",
                "seed"
            ]
        );
        // Each defense's parameters are query parameters.
        for defense in Defenses::standard().iter() {
            for parameter in defense.parameters() {
                assert!(names.iter().any(|n| n == parameter), "{} reads unknown {parameter}", defense.name());
            }
        }
        for general in GENERAL {
            assert!(names.iter().any(|n| n == general));
        }
    }
}

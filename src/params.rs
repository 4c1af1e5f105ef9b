//! Request parameters of `/classify`, parsed from query pairs (the CLI builds the
//! same pairs from its flags) and checked against the limits in the config.
//! Unknown, repeated or out-of-range parameters are refused with 422 rather than
//! silently ignored: a typo like `top-k=3` should not quietly give the default.

use crate::config::Config;
use crate::defense::{DefenseKind, DefenseSettings};
use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq)]
pub struct ClassifyParams {
    /// Model for the raw prediction; `None` = the configured default.
    pub model: Option<String>,
    pub top_k: usize,
    /// The preset the defenses started from, or "custom" for a list of defenses.
    pub preset: String,
    /// The defenses to run and their parameters, within the config's limits.
    pub defense: DefenseSettings,
    /// Seed of every random choice; `None` = a fresh one (reported in the answer).
    pub seed: Option<u64>,
}

const KNOWN: &[&str] = &[
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
    "seed",
];

impl ClassifyParams {
    pub fn defaults(config: &Config) -> Self {
        let preset = config.defense.default_preset.clone();
        let defense = config.defense.presets.get(&preset).cloned().unwrap_or_default();
        Self { model: None, top_k: config.classify.default_top_k, preset, defense, seed: None }
    }

    /// Parses `key=value` pairs (already percent-decoded; invalid UTF-8 arrives as U+FFFD).
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
        config: &Config,
    ) -> Result<Self, ApiError> {
        let mut params = Self::defaults(config);
        let mut seen: Vec<&str> = Vec::new();
        let pairs: Vec<(&str, &str)> = pairs.into_iter().collect();
        // The preset or defense list comes first, whatever the order in the query,
        // so that single parameters override it.
        if let Some((_, value)) = pairs.iter().find(|(k, _)| *k == "defense") {
            let (preset, settings) = parse_defense(value, config)?;
            params.preset = preset;
            params.defense = settings;
        }
        let limits = &config.defense.limits;
        for (key, value) in pairs {
            if !KNOWN.contains(&key) {
                return Err(ApiError::invalid_parameter(
                    &printable(key),
                    format!("unknown parameter; known parameters are {}", KNOWN.join(", ")),
                ));
            }
            if seen.contains(&key) {
                return Err(ApiError::invalid_parameter(key, "given more than once"));
            }
            seen.push(key);
            match key {
                "model" => params.model = Some(parse_name(key, value)?),
                "top_k" => params.top_k = parse_in_range(key, value, 1, config.classify.max_top_k)?,
                "defense" => {}
                "sigma" => params.defense.sigma = parse_in_range(key, value, f32::MIN_POSITIVE, limits.max_sigma)?,
                "samples" => params.defense.samples = parse_in_range(key, value, 1, limits.max_samples)?,
                "alpha" => params.defense.alpha = parse_in_range(key, value, limits.min_alpha, limits.max_alpha)?,
                "certify" => params.defense.certify = parse_bool(key, value)?,
                "fixations" => params.defense.fixations = parse_in_range(key, value, 0, limits.max_fixations)?,
                "blur_sigma" => {
                    params.defense.blur_sigma = parse_in_range(key, value, f32::MIN_POSITIVE, limits.max_blur_sigma)?
                }
                "models" => {
                    params.defense.models =
                        value.split(',').map(|m| parse_name(key, m.trim())).collect::<Result<_, _>>()?
                }
                "ensemble_samples" => {
                    params.defense.ensemble_samples = parse_in_range(key, value, 0, limits.max_samples)?
                }
                "seed" => params.seed = Some(parse_in_range(key, value, 0, u64::MAX)?),
                _ => {}
            }
        }
        config.defense.check(&params.defense).map_err(|message| {
            let name = message.split_whitespace().next().unwrap_or("defense").to_string();
            ApiError::invalid_parameter(&name, message)
        })?;
        Ok(params)
    }

    /// Parses a raw query string (`a=1&b=2`).
    pub fn from_query(query: Option<&str>, config: &Config) -> Result<Self, ApiError> {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        Self::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())), config)
    }
}

/// `defense=default` (a preset) or `defense=smooth,blur` (defenses with the default
/// preset's parameters) or `defense=none`.
fn parse_defense(value: &str, config: &Config) -> Result<(String, DefenseSettings), ApiError> {
    if let Some(preset) = config.defense.presets.get(value) {
        return Ok((value.to_string(), preset.clone()));
    }
    let base = config.defense.presets.get(&config.defense.default_preset).cloned().unwrap_or_default();
    let mut defenses = Vec::new();
    for name in value.split(',').map(str::trim) {
        let kind = DefenseKind::parse(name).ok_or_else(|| {
            let presets: Vec<&str> = config.defense.presets.keys().map(String::as_str).collect();
            ApiError::invalid_parameter(
                "defense",
                format!(
                    "{:?} is neither a preset ({}) nor a defense (smooth, blur, saccade, ensemble)",
                    printable(name),
                    presets.join(", ")
                ),
            )
        })?;
        if !defenses.contains(&kind) {
            defenses.push(kind);
        }
    }
    Ok(("custom".to_string(), DefenseSettings { defenses, ..base }))
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ApiError> {
    match value.trim() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(ApiError::invalid_parameter(key, format!("{:?} is not true or false", printable(other)))),
    }
}

/// Keeps error messages readable and log-safe when a key is binary junk.
fn printable(text: &str) -> String {
    text.chars().take(64).map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn parse_name(key: &str, value: &str) -> Result<String, ApiError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(value.to_string())
    } else {
        Err(ApiError::invalid_parameter(key, format!("{:?} is not a model name", printable(value))))
    }
}

pub fn parse_in_range<T>(key: &str, value: &str, min: T, max: T) -> Result<T, ApiError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let parsed: T = value
        .trim()
        .parse()
        .map_err(|_| ApiError::invalid_parameter(key, format!("{:?} is not a number", printable(value))))?;
    // Written so that NaN is out of range too.
    let in_range = parsed >= min && parsed <= max;
    if !in_range {
        return Err(ApiError::invalid_parameter(key, format!("{parsed} is outside [{min}, {max}]")));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &str) -> Result<ClassifyParams, ApiError> {
        ClassifyParams::from_query(Some(query), &Config::default())
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
        let p = parse("defense=blur,smooth,blur&certify=true&samples=64&seed=9&models=efficientnet-lite0").unwrap();
        assert_eq!(p.preset, "custom");
        assert_eq!(p.defense.defenses, vec![DefenseKind::Blur, DefenseKind::Smooth]);
        assert!(p.defense.certify);
        assert_eq!((p.defense.samples, p.seed), (64, Some(9)));
        assert_eq!(p.defense.models, vec!["efficientnet-lite0".to_string()]);
        assert!(parse("defense=none").unwrap().defense.defenses.is_empty());
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
            ("samples=0", "samples"),
            ("samples=100000", "samples"),
            ("alpha=0.7", "alpha"),
            ("certify=maybe", "certify"),
            ("fixations=99", "fixations"),
            ("blur_sigma=-1", "blur_sigma"),
            ("models=a,,b", "models"),
            ("seed=-4", "seed"),
        ] {
            match parse(query) {
                Err(ApiError::InvalidParameter { name: got, .. }) => assert_eq!(got, name, "{query}"),
                other => panic!("{query}: {other:?}"),
            }
        }
    }
}

//! Request parameters of `/classify`, parsed from query pairs (the CLI builds the
//! same pairs from its flags) and checked against the limits in the config.
//! Unknown, repeated or out-of-range parameters are refused with 422 rather than
//! silently ignored: a typo like `top-k=3` should not quietly give the default.

use crate::config::Config;
use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq)]
pub struct ClassifyParams {
    /// Model for the raw prediction; `None` = the configured default.
    pub model: Option<String>,
    pub top_k: usize,
}

const KNOWN: &[&str] = &["model", "top_k"];

impl ClassifyParams {
    pub fn defaults(config: &Config) -> Self {
        Self { model: None, top_k: config.classify.default_top_k }
    }

    /// Parses `key=value` pairs (already percent-decoded; invalid UTF-8 arrives as U+FFFD).
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
        config: &Config,
    ) -> Result<Self, ApiError> {
        let mut params = Self::defaults(config);
        let mut seen: Vec<&str> = Vec::new();
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
                _ => {}
            }
        }
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
    if parsed < min || parsed > max {
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
        assert_eq!(parse("").unwrap(), ClassifyParams { model: None, top_k: 5 });
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
        ] {
            match parse(query) {
                Err(ApiError::InvalidParameter { name: got, .. }) => assert_eq!(got, name, "{query}"),
                other => panic!("{query}: {other:?}"),
            }
        }
    }
}

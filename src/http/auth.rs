//! Optional API keys: `Authorization: Bearer <key>` on every route except the probes,
//! `/metrics` and the API documentation. Keys are kept only as SHA-256 digests and a
//! presented key is compared with every one of them in constant time, so neither the
//! timing nor an early exit tells how much of a guess was right. The header itself is
//! never logged (the access log records method, route, status and the summary only).

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::AppState;
use crate::config::ApiKey;
use crate::error::ApiError;

/// Paths served without a key: load balancers, scrapers and people reading the docs.
fn is_open(path: &str) -> bool {
    matches!(path, "/metrics" | "/openapi.json" | "/docs")
        || path.starts_with("/health/")
        || path.starts_with("/v2/health/")
        || path.starts_with("/docs/")
}

/// The accepted keys as digests.
#[derive(Clone)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
    /// Keys are required; with no digests (keys failed to load) nothing is accepted.
    required: bool,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys").field("keys", &self.digests.len()).field("required", &self.required).finish()
    }
}

impl ApiKeys {
    pub fn new(keys: &[ApiKey]) -> Self {
        Self { digests: keys.iter().map(|k| digest(k.expose().as_bytes())).collect(), required: !keys.is_empty() }
    }

    /// Fail closed: keys were configured but could not be loaded.
    pub fn refuse_all() -> Self {
        Self { digests: Vec::new(), required: true }
    }

    pub fn required(&self) -> bool {
        self.required
    }

    /// Whether an `Authorization` header value carries an accepted key.
    pub fn accepts(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(token) = authorization.and_then(|v| v.to_str().ok()).and_then(bearer_token) else { return false };
        let presented = digest(token.as_bytes());
        // Look at every key, whichever matches: no early exit.
        let mut matched = 0u8;
        for stored in &self.digests {
            matched |= u8::from(constant_time_eq(stored, &presented));
        }
        matched == 1
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Equal-length digests compared by folding their XOR: the time does not depend on
/// where they differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// `Bearer <token>` (scheme case-insensitive, RFC 7235).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Refuses requests without an accepted key with 401, the service's JSON error and
/// `WWW-Authenticate: Bearer`. Runs inside `observe`, so a refusal still gets a
/// request id, a metric and an access-log line.
pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let keys = state.api_keys();
    if !keys.required() || is_open(request.uri().path()) || keys.accepts(request.headers().get(header::AUTHORIZATION)) {
        return next.run(request).await;
    }
    let mut response = ApiError::Unauthorized.into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"pandaguard\""));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).unwrap()
    }

    #[test]
    fn only_a_configured_bearer_key_is_accepted() {
        let keys = ApiKeys::new(&[ApiKey::new("alpha-key"), ApiKey::new("beta-key")]);
        assert!(keys.required());
        for accepted in ["Bearer alpha-key", "Bearer beta-key", "bearer beta-key", "BEARER  alpha-key "] {
            assert!(keys.accepts(Some(&header(accepted))), "{accepted}");
        }
        for refused in ["Bearer alpha-ke", "Bearer alpha-key2", "Basic alpha-key", "alpha-key", "Bearer ", "Bearer"] {
            assert!(!keys.accepts(Some(&header(refused))), "{refused}");
        }
        assert!(!keys.accepts(None));
    }

    #[test]
    fn no_keys_means_no_authentication_and_refuse_all_accepts_nothing() {
        assert!(!ApiKeys::new(&[]).required());
        let closed = ApiKeys::refuse_all();
        assert!(closed.required() && !closed.accepts(Some(&header("Bearer anything"))));
    }

    #[test]
    fn probes_metrics_and_docs_are_open() {
        for open in
            ["/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json"]
        {
            assert!(is_open(open), "{open}");
        }
        assert!(is_open("/docs/index.html"));
        for closed in ["/classify", "/models", "/nowhere", "/healthz", "/metrics/x", "/v2/models"] {
            assert!(!is_open(closed), "{closed}");
        }
    }
}

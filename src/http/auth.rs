//! Optional API keys: `Authorization: Bearer <key>` on the protected routes (the
//! router in `http/mod.rs` says which: everything but the probes, `/metrics` and the
//! API documentation). Keys are kept only as SHA-256 digests and a
//! presented key is compared with every one of them in constant time, so neither the
//! timing nor an early exit tells how much of a guess was right. The header itself is
//! never logged (the access log records method, route, status and the summary only).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};
use crate::config::ApiKey;

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
pub(super) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Refuses requests without an accepted key with 401, the service's JSON error and
/// `WWW-Authenticate: Bearer`. A route layer of the protected router, inside
/// `observe`, so a refusal still gets a request id, a metric and an access-log line.
pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match refusal(&state, request.headers()) {
        Some(refused) => refused,
        None => next.run(request).await,
    }
}

/// The 401 answer when keys are required and `headers` carry no accepted one.
pub fn refusal(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let keys = state.api_keys();
    if !keys.required() || keys.accepts(headers.get(header::AUTHORIZATION)) {
        return None;
    }
    let mut response = ApiError::Unauthorized.into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"pandaguard\""));
    Some(response)
}

/// Unknown routes: 404, but only to a client with a key when keys are required, so a
/// caller without one cannot probe which routes exist.
pub async fn not_found(State(state): State<AppState>, headers: HeaderMap) -> Response {
    refusal(&state, &headers)
        .unwrap_or_else(|| ApiError::NotFound("no such route; see /openapi.json".into()).into_response())
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
}

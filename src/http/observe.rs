//! Per-request bookkeeping in one middleware: the request id (accepted from
//! `x-request-id` or generated, echoed back), the arrival time the deadline runs
//! from, Prometheus counters and latency, `Retry-After` on 503s, and one structured
//! access-log line per request.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppState, RouteLabel};
use crate::detect::{ClientId, Verdict};

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Inserted into every request's extensions by `observe`.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub id: String,
    pub arrived: Instant,
}

/// What a handler wants in the access log; put into the response's extensions.
#[derive(Debug, Clone, Default)]
pub struct RequestSummary {
    pub model: String,
    pub rows: usize,
    pub suspicious: Option<bool>,
    /// With query-attack detection on: the client's keyed digest (never its key or
    /// address), whether the query was detected (or refused in a cooldown), and its
    /// matching hashes.
    pub client: Option<String>,
    pub query_attack: Option<bool>,
    pub matches: Option<usize>,
}

impl RequestSummary {
    pub fn detection(&mut self, client: &ClientId, verdict: &Verdict) {
        self.client = Some(client.to_string());
        self.query_attack = Some(verdict.detected);
        self.matches = Some(verdict.observation.matches);
    }

    /// Refused without a look at the image: the client is in its cooldown.
    pub fn cooling_down(&mut self, client: &ClientId) {
        self.client = Some(client.to_string());
        self.query_attack = Some(true);
    }
}

/// Marks a response the access log leaves out (probes and scrapes).
#[derive(Debug, Clone, Copy)]
pub struct Quiet;

/// Response mapper for routes whose requests are not logged.
pub async fn quiet(mut response: Response) -> Response {
    response.extensions_mut().insert(Quiet);
    response
}

pub async fn observe(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let arrived = Instant::now();
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_acceptable_id(v))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let method = request.method().clone();
    request.extensions_mut().insert(RequestContext { id: id.clone(), arrived });

    let mut response = next.run(request).await;
    // Label by matched route, never by raw path: arbitrary paths would explode the label set.
    let route = response.extensions().get::<RouteLabel>().map_or_else(|| "other".to_string(), |r| r.0.clone());

    let status = response.status();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID.clone(), value);
    }
    if status == StatusCode::SERVICE_UNAVAILABLE && !headers.contains_key(header::RETRY_AFTER) {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(state.config().server.retry_after_seconds));
    }
    let latency = arrived.elapsed();
    metrics::counter!("pandaguard_http_requests_total", "route" => route.clone(), "status" => status.as_str().to_string())
        .increment(1);
    metrics::histogram!("pandaguard_http_request_seconds", "route" => route.clone()).record(latency.as_secs_f64());

    let summary = response.extensions().get::<RequestSummary>().cloned().unwrap_or_default();
    // Only these fields are logged: never a header (so never `Authorization`), a query
    // string or a body.
    if response.extensions().get::<Quiet>().is_none() {
        tracing::info!(
            target: "access",
            request_id = %id,
            method = %method,
            path = %route,
            status = status.as_u16(),
            latency_ms = (latency.as_secs_f64() * 1e3 * 1e3).round() / 1e3,
            model = %summary.model,
            rows = summary.rows,
            suspicious = summary.suspicious,
            client = summary.client.as_deref(),
            query_attack = summary.query_attack,
            matches = summary.matches,
            "request"
        );
    }
    response
}

/// Printable ASCII, bounded: anything else is replaced by a fresh id rather than
/// echoed into headers and logs.
fn is_acceptable_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus metrics", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics().render()).into_response()
}

//! Per-request bookkeeping in one middleware: the request id (accepted from
//! `x-request-id` or generated, echoed back), the arrival time the deadline runs
//! from (and the time a load balancer already spent on it), Prometheus counters and
//! latency, `Retry-After` on 503s, and one structured access-log line per request.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    /// Time spent on the request before it arrived here, by the load balancer's
    /// account (`server.request_start_header`): earlier tries on other replicas. It
    /// counts against the request's deadline.
    pub spent_upstream: Duration,
}

impl RequestContext {
    /// The request's deadline: `timeout` from when the load balancer first passed it
    /// on, or from its arrival here without that header.
    pub fn deadline(&self, timeout: Duration) -> Instant {
        self.arrived + timeout.saturating_sub(self.spent_upstream)
    }
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
    let start_header = &state.config().server.request_start_header;
    let spent_upstream = if start_header.is_empty() {
        Duration::ZERO
    } else {
        request
            .headers()
            .get(start_header.as_str())
            .and_then(|v| v.to_str().ok())
            .and_then(|v| spent_since(v, SystemTime::now()))
            .unwrap_or(Duration::ZERO)
    };
    request.extensions_mut().insert(RequestContext { id: id.clone(), arrived, spent_upstream });

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
            // Time the load balancer had already spent (earlier tries elsewhere), when
            // it said so: a retry shows up here with the deadline it had left.
            upstream_ms = (!spent_upstream.is_zero()).then_some(spent_upstream.as_millis() as u64),
            "request"
        );
    }
    response
}

/// How long ago a load balancer's request-start stamp was: `t=1733600000.123` (nginx's
/// `$msec`, seconds) or the same without `t=`; whole numbers this large in
/// milliseconds or microseconds (Heroku, New Relic) are read as such. A stamp in the
/// future (clock skew) counts as now; one that is unreadable is ignored (`None`).
fn spent_since(stamp: &str, now: SystemTime) -> Option<Duration> {
    let number: f64 = stamp.trim().trim_start_matches("t=").parse().ok()?;
    if !number.is_finite() || number <= 0.0 {
        return None;
    }
    // Seconds since 1970 are about 1.7e9 now; in ms 1.7e12, in µs 1.7e15.
    let seconds = if number > 1e14 {
        number / 1e6
    } else if number > 1e11 {
        number / 1e3
    } else {
        number
    };
    let stamp = UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(seconds).ok()?)?;
    Some(now.duration_since(stamp).unwrap_or(Duration::ZERO))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_start_stamps_in_seconds_milliseconds_and_microseconds() {
        let now = UNIX_EPOCH + Duration::from_millis(1_765_000_000_500);
        let ago = |stamp: &str| spent_since(stamp, now);
        assert_eq!(ago("t=1765000000.250"), Some(Duration::from_millis(250)));
        assert_eq!(ago("1765000000.250"), Some(Duration::from_millis(250)));
        assert_eq!(ago("t=1764999997500"), Some(Duration::from_secs(3)));
        assert_eq!(ago("t=1765000000000000"), Some(Duration::from_millis(500)));
        // In the future (the balancer's clock is ahead): nothing spent.
        assert_eq!(ago("t=1765000060"), Some(Duration::ZERO));
        for junk in ["", "t=", "soon", "t=-5", "t=NaN", "t=inf", "t=1e400"] {
            assert_eq!(ago(junk), None, "{junk:?}");
        }
    }
}

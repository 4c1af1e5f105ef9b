//! Logs (tracing) and metrics (Prometheus text via the `metrics` facade).
//!
//! Owns: the log subscriber, the metrics recorder and the metric descriptions. Must not
//! import: anything of the request path (the layers record their own metrics).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Log filter from `PANDAGUARD_LOG` (e.g. `info`, `pandaguard=debug`), default `info`.
/// `json` gives one JSON object per line, for log shippers; otherwise human text.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_env("PANDAGUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info,ort=warn"));
    init_logging_to(json, filter, std::io::stderr);
}

/// The same log format as `init_logging`, written to `writer` (tests capture the
/// access log this way). A second call finds a subscriber already set; that is fine.
pub fn init_logging_to<W>(json: bool, filter: EnvFilter, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    METRICS.get_or_init(install_recorder).clone()
}

fn install_recorder() -> PrometheusHandle {
    const SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
    const ROWS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
    // Attack detection's steps take microseconds (memory) to a Redis round trip.
    const DETECTION_SECONDS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1];
    const MATCHES: &[f64] = &[0.0, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0];
    let builder = PrometheusBuilder::new();
    // Full-name matchers win over the suffix ones.
    let builder = builder
        .set_buckets_for_metric(Matcher::Full("pandaguard_fingerprint_seconds".into()), DETECTION_SECONDS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full("pandaguard_detection_store_seconds".into()), DETECTION_SECONDS)
        })
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("pandaguard_query_attack_matches".into()), MATCHES))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_rows".into()), ROWS))
        .unwrap_or_else(|_| PrometheusBuilder::new());
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
    }
    describe();
    // Histograms are kept as rolling windows that need periodic upkeep.
    let upkeep = handle.clone();
    let _ = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        }
    });
    handle
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("pandaguard_http_requests_total", "HTTP requests by route and status");
    describe_histogram!("pandaguard_http_request_seconds", Unit::Seconds, "HTTP request latency by route");
    describe_histogram!("pandaguard_stage_seconds", Unit::Seconds, "Time per /classify stage");
    describe_histogram!("pandaguard_batch_rows", "Rows per Session::run, by model");
    describe_counter!(
        "pandaguard_query_attacks_detected_total",
        "Queries detected as part of a black-box query attack, by action"
    );
    describe_histogram!(
        "pandaguard_query_attack_matches",
        "Fingerprint hashes of a query already in its client's window"
    );
    describe_histogram!("pandaguard_fingerprint_seconds", Unit::Seconds, "Time to fingerprint one model input");
    describe_histogram!(
        "pandaguard_detection_store_seconds",
        Unit::Seconds,
        "Time of one fingerprint store lookup-and-record, by store"
    );
    describe_counter!(
        "pandaguard_detection_store_fallback_total",
        "Store operations answered by the replica's memory because Redis was down or slow"
    );
    describe_histogram!("pandaguard_inference_seconds", Unit::Seconds, "Session::run time, by model");
    describe_gauge!("pandaguard_queue_rows", "Rows admitted and not yet run, by model");
    describe_counter!("pandaguard_rejected_total", "Requests refused at admission, by model and reason");
    describe_counter!("pandaguard_rows_dropped_total", "Queued rows dropped before inference, by model and reason");
    describe_gauge!("pandaguard_row_cost_seconds", "Measured Session::run time per row (moving average), by model");
    describe_gauge!(
        "pandaguard_admission_drain_seconds",
        "At the last admission: time for every queue to drain at the measured row costs"
    );
    describe_counter!(
        "pandaguard_admission_refused_total",
        "Requests refused at arrival, by reason (deadline: the queues cannot drain in time; queue_full)"
    );
    describe_gauge!("pandaguard_open_connections", "Open client connections");
    describe_counter!("pandaguard_connections_refused_total", "Connections refused over server.max_connections");
    describe_counter!(
        "pandaguard_lingering_bodies_total",
        "Unread request bodies after an early answer, by outcome (drained, cut_off)"
    );
}

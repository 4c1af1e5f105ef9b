//! Optional API keys over real TCP with the real model: 401 with the JSON error and
//! `WWW-Authenticate` without a valid key, 200 with a real classification with one,
//! probes/metrics/docs open; keys from the config, a key file, and (as a real
//! process) the `PANDAGUARD_API_KEYS_FILE` environment variable. Also checks that the
//! access log (captured in the production JSON format) records each request and
//! never a key.

mod common;

use std::io::Write;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use common::{TestServer, client, photo, root, test_config};
use pandaguard::api::{ClassifyResponse, ErrorResponse};
use pandaguard::config::ApiKey;
use reqwest::StatusCode;
use serde_json::Value;

const CONFIG_KEY: &str = "cfg-key-6f1d9a0c2b";
const FILE_KEY: &str = "file-key-93ab77e410";
const RETIRED_KEY: &str = "retired-key-0000";

/// Everything the server logs, in the production JSON format.
static LOG: LazyLock<Arc<Mutex<Vec<u8>>>> = LazyLock::new(|| Arc::new(Mutex::new(Vec::new())));

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Lite0 with one key in the config and one in a key file (whose commented-out
/// key must not work).
static SERVER: LazyLock<TestServer> = LazyLock::new(|| {
    let capture = Capture(Arc::clone(&LOG));
    // Everything the service itself logs, at every level.
    let filter = tracing_subscriber::EnvFilter::new("info,pandaguard=trace,access=trace,axum=trace,tower_http=trace");
    pandaguard::telemetry::init_logging_to(true, filter, move || capture.clone());
    let dir = std::env::temp_dir().join(format!("pandaguard-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.txt");
    std::fs::write(&file, format!("# keys for the auth test\n\n{FILE_KEY}\n# {RETIRED_KEY}\n")).unwrap();
    let mut config = test_config(&["efficientnet-lite0"]);
    config.server.api_keys = vec![ApiKey::new(CONFIG_KEY)];
    config.server.api_keys_file = Some(file);
    config.validate().unwrap();
    TestServer::start(config)
});

/// The thatch photo (512 × 512 JPEG) and its class.
fn thatch() -> (Vec<u8>, usize) {
    photo("imagenet_05_853.jpg")
}

async fn classify(key: Option<&str>, request_id: &str) -> reqwest::Response {
    let mut request = client()
        .post(SERVER.url("/classify?defense=none"))
        .header("content-type", "image/jpeg")
        .header("x-request-id", request_id)
        .body(thatch().0);
    if let Some(key) = key {
        request = request.header("authorization", key);
    }
    request.send().await.unwrap()
}

async fn expect_unauthorized(response: reqwest::Response) {
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let challenge = response.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    assert_eq!(response.headers()["content-type"], "application/json");
    assert!(response.headers().contains_key("x-request-id"));
    let body: ErrorResponse = response.json().await.unwrap();
    assert_eq!(body.error.code, "unauthorized");
    assert!(!body.error.message.is_empty());
}

#[tokio::test]
async fn without_a_valid_key_classify_and_models_get_401() {
    expect_unauthorized(classify(None, "no-key").await).await;
    for wrong in [
        "Bearer wrong-key".to_string(),
        format!("Bearer {}", &CONFIG_KEY[..CONFIG_KEY.len() - 1]),
        format!("Bearer {CONFIG_KEY}x"),
        format!("Bearer {RETIRED_KEY}"),
        format!("Basic {CONFIG_KEY}"),
        CONFIG_KEY.to_string(),
        "Bearer".to_string(),
    ] {
        expect_unauthorized(classify(Some(&wrong), "wrong-key").await).await;
    }
    expect_unauthorized(client().get(SERVER.url("/models")).send().await.unwrap()).await;
    // Unknown routes do not reveal whether they exist.
    expect_unauthorized(client().get(SERVER.url("/v2/models")).send().await.unwrap()).await;
}

#[tokio::test]
async fn a_key_from_the_config_or_the_key_file_gets_a_real_classification() {
    let (_, class) = thatch();
    for key in [CONFIG_KEY, FILE_KEY] {
        let response = classify(Some(&format!("Bearer {key}")), "with-key").await;
        assert_eq!(response.status(), StatusCode::OK);
        let answer: ClassifyResponse = response.json().await.unwrap();
        assert_eq!(answer.raw.class_id, class);
        assert_eq!(answer.raw.label, "thatch");
    }
    let models = client().get(SERVER.url("/models")).bearer_auth(FILE_KEY).send().await.unwrap();
    assert_eq!(models.status(), StatusCode::OK);
}

#[tokio::test]
async fn probes_metrics_and_docs_need_no_key() {
    for path in ["/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json"] {
        let response = client().get(SERVER.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let docs = client().get(SERVER.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    let spec: Value = client().get(SERVER.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(spec["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert!(spec["paths"]["/classify"]["post"]["responses"].get("401").is_some());
}

/// One JSON line per request with the documented fields, and no key anywhere in the
/// log although every request here carried one.
#[tokio::test]
async fn the_access_log_has_one_json_line_per_request_and_never_a_key() {
    let id = "auth-log-check-1";
    let response = classify(Some(&format!("Bearer {CONFIG_KEY}")), id).await;
    assert_eq!(response.status(), StatusCode::OK);
    let refused = classify(Some(&format!("Bearer {FILE_KEY}-typo")), "auth-log-check-2").await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    // The line is written after the response is built; give it a moment.
    let started = Instant::now();
    let (line, text) = loop {
        let text = String::from_utf8_lossy(&LOG.lock().unwrap()).to_string();
        if let Some(line) = text.lines().find(|l| l.contains(id)) {
            break (line.to_string(), text);
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no access-log line for {id}:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let entry: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["target"], "access");
    assert_eq!(entry["request_id"], id);
    assert_eq!(entry["method"], "POST");
    assert_eq!(entry["path"], "/classify");
    assert_eq!(entry["status"], 200);
    assert!(entry["latency_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(entry["model"], "efficientnet-lite0");
    assert_eq!(entry["rows"], 1);
    assert!(entry["suspicious"].is_boolean());
    assert!(entry.get("upstream_ms").is_none(), "no load balancer said it spent time: {line}");
    assert_eq!(text.lines().filter(|l| l.contains(id)).count(), 1, "one line per request");
    for key in [CONFIG_KEY, FILE_KEY, "Bearer", "authorization"] {
        assert!(!text.contains(key), "the log contains {key:?}:\n{text}");
    }
}

/// A request a load balancer stamped (`X-Request-Start`, 1.5 s before) is logged with
/// the time it had already spent, so retries stand out in the access log.
#[tokio::test]
async fn the_access_log_shows_the_time_a_load_balancer_spent() {
    let id = "auth-log-upstream";
    // Whole milliseconds, 1501 back: the stamp is then over 1.5 s old whatever the
    // float rounding of the seconds (1.5 s to the nearest ms could be logged as 1499).
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let stamp = (now_ms - 1501) as f64 / 1000.0;
    let response = client()
        .post(SERVER.url("/classify?defense=none"))
        .header("authorization", format!("Bearer {CONFIG_KEY}"))
        .header("x-request-id", id)
        .header("x-request-start", format!("t={stamp:.3}"))
        .body(thatch().0)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let started = Instant::now();
    let line = loop {
        let text = String::from_utf8_lossy(&LOG.lock().unwrap()).to_string();
        if let Some(line) = text.lines().find(|l| l.contains(id)) {
            break line.to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no access-log line for {id}:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let entry: Value = serde_json::from_str(&line).unwrap();
    let upstream = entry["upstream_ms"].as_u64().unwrap_or_else(|| panic!("no upstream_ms: {line}"));
    assert!((1500..2500).contains(&upstream), "{line}");
}

/// `PANDAGUARD_API_KEYS_FILE` with the real binary: an unreadable file stops start-up
/// with a message naming it; a good file protects the server it starts.
#[tokio::test]
async fn the_environment_variable_names_a_key_file_for_the_real_process() {
    use std::process::{Command, Stdio};
    let binary = env!("CARGO_BIN_EXE_pandaguard");
    let dir = std::env::temp_dir().join(format!("pandaguard-auth-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let command = |keys: &std::path::Path, bind: &str| {
        let mut command = Command::new(binary);
        command
            .current_dir(root())
            .env_remove("ORT_DYLIB_PATH")
            .env("PANDAGUARD_LOG", "warn")
            .env("PANDAGUARD_API_KEYS_FILE", keys)
            .env("PANDAGUARD_MODELS__LOAD", "[\"efficientnet-lite0\"]")
            .env("PANDAGUARD_SERVER__DRAIN_DELAY_MS", "0")
            .args(["serve", "--bind", bind]);
        command
    };

    let missing = dir.join("no-such-keys.txt");
    let output = command(&missing, "127.0.0.1:0").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-such-keys.txt"), "{stderr}");

    let empty = dir.join("empty-keys.txt");
    std::fs::write(&empty, "# no keys yet\n\n").unwrap();
    let output = command(&empty, "127.0.0.1:0").output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("holds no keys"));

    let keys = dir.join("keys.txt");
    std::fs::write(&keys, "env-key-5d2c\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let guard = Kill(command(&keys, &format!("127.0.0.1:{port}")).stdout(Stdio::null()).spawn().unwrap());
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        if let Ok(r) = client().get(format!("{base}/v2/health/ready")).send().await {
            if r.status() == StatusCode::OK {
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(180), "the server did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let post = |key: Option<&'static str>| {
        let mut request = client().post(format!("{base}/classify?defense=none")).body(thatch().0);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    expect_unauthorized(post(None).await.unwrap()).await;
    let answer: ClassifyResponse = post(Some("env-key-5d2c")).await.unwrap().json().await.unwrap();
    assert_eq!(answer.raw.class_id, thatch().1);
    drop(guard);
}

//! The HTTP API over real TCP, against the real ONNX Runtime and the converted models:
//! every endpoint and every documented error status.

mod common;

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use common::{TestServer, client, photo, read, read_json_answer, samples, test_config};
use pandaguard::api::{ClassifyResponse, ErrorResponse, ModelsResponse};
use pandaguard::config::Config;
use reqwest::StatusCode;
use serde_json::Value;

const MAX_BODY: usize = 1024 * 1024;

/// Lite0 (default) and Lite1, 1 MiB body limit.
static SERVER: LazyLock<TestServer> = LazyLock::new(|| {
    let mut config = test_config(&["efficientnet-lite0", "efficientnet-lite1"]);
    config.server.max_body_bytes = MAX_BODY;
    TestServer::start(config)
});

/// The thatch photo (512 × 512 JPEG) and its class.
fn thatch() -> (Vec<u8>, usize) {
    photo("imagenet_05_853.jpg")
}

async fn post(url: &str, content_type: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let mut request = client().post(url).body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request.send().await.unwrap()
}

async fn expect_error(response: reqwest::Response, status: StatusCode, code: &str) -> ErrorResponse {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: ErrorResponse = response.json().await.unwrap();
    assert_eq!(body.error.code, code, "{}", body.error.message);
    assert!(!body.error.message.is_empty());
    body
}

#[tokio::test]
async fn raw_body_is_classified_with_ranked_probabilities_and_timings() {
    let (image, class) = thatch();
    let response = client()
        .post(SERVER.url("/classify"))
        .header("content-type", "image/jpeg")
        .header("x-request-id", "test-request-42")
        .body(image)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-request-id"], "test-request-42");
    assert!(response.headers()["server-timing"].to_str().unwrap().contains("inference;dur="));
    let answer: ClassifyResponse = response.json().await.unwrap();
    assert_eq!(answer.request_id, "test-request-42");
    assert_eq!(answer.model, "efficientnet-lite0");
    assert_eq!(answer.raw.class_id, class);
    assert_eq!(answer.raw.label, "thatch");
    assert_eq!(answer.raw.top_k.len(), 5);
    assert_eq!(answer.raw.top_k[0].class_id, class);
    assert_eq!(answer.raw.confidence, answer.raw.top_k[0].probability);
    assert!(answer.raw.top_k.windows(2).all(|w| w[0].probability >= w[1].probability));
    let listed: f32 = answer.raw.top_k.iter().map(|c| c.probability).sum();
    assert!(listed > 0.0 && listed <= 1.0 + 1e-5);
    let t = &answer.timing_ms;
    assert!(t.decode > 0.0 && t.preprocess > 0.0 && t.inference > 0.0);
    assert!(t.total >= t.decode + t.preprocess + t.inference);
}

#[tokio::test]
async fn multipart_curl_default_and_missing_content_types_give_the_same_answer() {
    let (image, class) = thatch();
    let form = reqwest::multipart::Form::new()
        .text("note", "ignored")
        .part("image", reqwest::multipart::Part::bytes(image.clone()).file_name("thatch.jpg"));
    let multipart = client().post(SERVER.url("/classify")).multipart(form).send().await.unwrap();
    assert_eq!(multipart.status(), StatusCode::OK);
    let multipart: ClassifyResponse = multipart.json().await.unwrap();
    // `curl --data-binary @file` sends application/x-www-form-urlencoded.
    for content_type in [Some("application/x-www-form-urlencoded"), Some("application/octet-stream"), None] {
        let response = post(&SERVER.url("/classify"), content_type, image.clone()).await;
        assert_eq!(response.status(), StatusCode::OK, "{content_type:?}");
        let answer: ClassifyResponse = response.json().await.unwrap();
        assert_eq!(answer.raw.class_id, class);
        assert!((answer.raw.confidence - multipart.raw.confidence).abs() < 1e-6);
    }
}

#[tokio::test]
async fn model_and_top_k_parameters_are_honoured() {
    let (image, class) = thatch();
    let url = SERVER.url("/classify?model=efficientnet-lite1&top_k=3");
    let answer: ClassifyResponse = post(&url, Some("image/jpeg"), image).await.json().await.unwrap();
    assert_eq!(answer.model, "efficientnet-lite1");
    assert_eq!(answer.raw.top_k.len(), 3);
    assert_eq!(answer.raw.class_id, class);
}

#[tokio::test]
async fn bad_requests_get_json_errors_with_the_documented_status() {
    let (image, _) = thatch();
    let url = SERVER.url("/classify");
    expect_error(
        post(&url, Some("image/png"), b"not an image at all".to_vec()).await,
        StatusCode::BAD_REQUEST,
        "invalid_image",
    )
    .await;
    expect_error(post(&url, Some("image/jpeg"), Vec::new()).await, StatusCode::BAD_REQUEST, "invalid_image").await;
    expect_error(
        post(&url, Some("image/jpeg"), image[..image.len() / 3].to_vec()).await,
        StatusCode::BAD_REQUEST,
        "invalid_image",
    )
    .await;
    let form = reqwest::multipart::Form::new().text("picture", "no image field here");
    let response = client().post(&url).multipart(form).send().await.unwrap();
    expect_error(response, StatusCode::BAD_REQUEST, "bad_request").await;

    expect_error(
        post(&url, Some("text/plain"), image.clone()).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    expect_error(
        post(&url, Some("application/json"), b"{}".to_vec()).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;

    for query in ["top_k=0", "top_k=21", "top_k=many", "model=resnet50", "colour=blue", "top_k=2&top_k=3"] {
        let response = post(&SERVER.url(&format!("/classify?{query}")), Some("image/jpeg"), image.clone()).await;
        expect_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    }

    let response = client().get(SERVER.url("/classify")).send().await.unwrap();
    expect_error(response, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    let response = client().get(SERVER.url("/nowhere")).send().await.unwrap();
    expect_error(response, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn oversized_bodies_and_images_are_refused_with_413() {
    // A declared oversize body is refused before a byte of it is read.
    let head = format!(
        "POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
        MAX_BODY + 1
    );
    let (status, body) = raw_exchange(&head, b"");
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("body_too_large"), "{body}");
    // So is a multipart one.
    let head = format!(
        "POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: {}\r\n\r\n",
        2 * MAX_BODY
    );
    assert_eq!(raw_exchange(&head, b"").0, 413);
    // A chunked body is cut off as soon as it passes the limit.
    let head = "POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n";
    let size = MAX_BODY + 100;
    let mut chunk = format!("{size:x}\r\n").into_bytes();
    chunk.extend(vec![0u8; size]);
    chunk.extend(b"\r\n");
    let (status, body) = raw_exchange(head, &chunk);
    assert_eq!(status, 413, "{body}");

    // 57 bytes of PNG claiming 60000×60000 pixels: refused from the header, at once.
    let started = Instant::now();
    let response = post(&SERVER.url("/classify"), Some("image/png"), png_header_only(60_000, 60_000)).await;
    expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "image_too_large").await;
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Sends `head` and `body` on a fresh connection and reads the answer: (status, body).
fn raw_exchange(head: &str, body: &[u8]) -> (u16, String) {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(SERVER.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let _ = stream.write_all(body);
    read_json_answer(&mut stream)
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_answer() {
    let photos = samples();
    let client = client();
    let mut alone = Vec::new();
    for (path, _) in &photos {
        let answer: ClassifyResponse = client
            .post(SERVER.url("/classify?defense=none"))
            .body(read(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        alone.push(answer.raw.class_id);
    }
    let mut tasks = Vec::new();
    for round in 0..3 {
        for (index, (path, _)) in photos.iter().enumerate() {
            let client = client.clone();
            let url = SERVER.url("/classify?defense=none");
            let body = read(path);
            tasks.push(tokio::spawn(async move {
                let id = format!("r{round}-{index}");
                let response = client.post(url).header("x-request-id", &id).body(body).send().await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                let answer: ClassifyResponse = response.json().await.unwrap();
                assert_eq!(answer.request_id, id);
                (index, answer.raw.class_id)
            }));
        }
    }
    for task in tasks {
        let (index, class_id) = task.await.unwrap();
        assert_eq!(class_id, alone[index], "photo {index} answered differently under concurrency");
    }
}

#[tokio::test]
async fn models_health_metrics_and_openapi_endpoints() {
    let client = client();
    let models: ModelsResponse = client.get(SERVER.url("/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models.default, "efficientnet-lite0");
    let names: Vec<&str> = models.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["efficientnet-lite0", "efficientnet-lite1"]);
    assert_eq!(models.models[1].card.input.width, 240);
    assert_eq!(models.models[0].card.license, "Apache-2.0");

    let live = client.get(SERVER.url("/health/live")).send().await.unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    let ready = client.get(SERVER.url("/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    // Make sure at least one classification has been recorded.
    let (image, _) = thatch();
    assert_eq!(post(&SERVER.url("/classify"), None, image).await.status(), StatusCode::OK);
    let metrics = client.get(SERVER.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "pandaguard_http_requests_total{route=\"/classify\",status=\"200\"}",
        "pandaguard_http_request_seconds_bucket",
        "pandaguard_stage_seconds_bucket{stage=\"decode\"",
        "pandaguard_stage_seconds_bucket{stage=\"queue\"",
        "pandaguard_batch_rows_bucket{model=\"efficientnet-lite0\"",
        "pandaguard_inference_seconds_bucket{model=\"efficientnet-lite0\"",
        "pandaguard_queue_rows{model=\"efficientnet-lite0\"}",
    ] {
        assert!(metrics.contains(name), "missing {name} in /metrics");
    }

    let spec: Value = client.get(SERVER.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    let responses = &spec["paths"]["/classify"]["post"]["responses"];
    for status in ["200", "400", "413", "415", "422", "503", "504"] {
        assert!(responses.get(status).is_some(), "/openapi.json lacks {status} for /classify");
    }
    assert!(spec["paths"]["/health/ready"]["get"]["responses"].get("503").is_some());
    let schemas = &spec["components"]["schemas"];
    for schema in
        ["ClassifyResponse", "SmoothDetails", "CertifyReport", "EnsembleDetails", "SaccadeDetails", "BlurDetails"]
    {
        assert!(schemas.get(schema).is_some(), "/openapi.json lacks the {schema} schema");
    }
}

/// `/info` tells the page which presets run here: a preset whose models are not loaded
/// (the int8 ones, with the shipped `[models] load`) says why instead of counting rows,
/// and a request naming it is refused with that reason.
#[tokio::test]
async fn info_marks_presets_whose_models_are_not_loaded() {
    let info: Value = client().get(SERVER.url("/info")).send().await.unwrap().json().await.unwrap();
    let presets = info["presets"].as_array().expect("presets");
    let preset = |name: &str| presets.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no preset {name}"));
    assert_eq!(preset("none")["rows"], 1);
    assert!(preset("none")["unavailable"].is_null());
    let int8 = preset("fast-int8");
    assert!(int8["rows"].is_null());
    let reason = int8["unavailable"].as_str().expect("a reason");
    assert!(reason.contains("int8"), "reason {reason:?} does not name the missing model");
    for p in presets {
        assert_ne!(p["rows"].is_null(), p["unavailable"].is_null(), "preset {p}: exactly one of rows/unavailable");
    }
    let (image, _) = thatch();
    let refused = post(&SERVER.url("/classify?defense=fast-int8"), None, image).await;
    let error = expect_error(refused, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert!(error.error.message.contains("int8"), "{}", error.error.message);
}

/// The OpenAPI document lists exactly the query parameters the parser accepts: every
/// documented one is known to the server (a value for it is never refused as an
/// unknown parameter) and nothing else is.
#[tokio::test]
async fn the_documented_query_parameters_are_the_accepted_ones() {
    let spec: Value = client().get(SERVER.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    let documented: Vec<String> = spec["paths"]["/classify"]["post"]["parameters"]
        .as_array()
        .expect("/classify lists parameters")
        .iter()
        .filter(|p| p["in"] == "query")
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(documented, pandaguard::params::ClassifyQuery::names());
    assert!(documented.iter().any(|p| p == "ensemble_samples"));
    let (image, _) = thatch();
    for name in documented.iter().map(String::as_str).chain(["top-k", "temperature"]) {
        let response = post(&SERVER.url(&format!("/classify?{name}=x")), None, image.clone()).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{name}=x");
        let error: ErrorResponse = response.json().await.unwrap();
        let unknown = error.error.message.contains("unknown parameter");
        let known = documented.iter().any(|d| d == name);
        assert_eq!(unknown, !known, "{name}: {}", error.error.message);
        assert!(error.error.message.contains(&format!("`{name}`")), "{name}: {}", error.error.message);
    }
}

/// A replica whose batcher holds rows for 3 s with room for 2 rows, sent three
/// one-row requests: one is refused at once with 503 + Retry-After, the two admitted
/// ones hit their 500 ms deadline with 504. Which one is refused depends on arrival
/// order (a loaded CI machine can decode the first request late), so the test counts
/// outcomes instead of assuming an order.
#[tokio::test]
async fn a_full_queue_answers_503_at_once_and_a_late_request_504() {
    let mut config = test_config(&["efficientnet-lite0"]);
    config.engine.max_wait_ms = 3000;
    config.engine.queue_capacity_rows = 2;
    config.engine.max_rows_per_request = 1;
    config.server.request_timeout_ms = 500;
    let server = TestServer::start(config);
    let (image, _) = thatch();
    let url = server.url("/classify?defense=none");
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(tokio::spawn(timed_post(url.clone(), image.clone())));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (mut refused, mut late) = (0, 0);
    for task in tasks {
        let (response, took) = task.await.unwrap();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            refused += 1;
            assert!(took < Duration::from_millis(400), "503 took {took:?}");
            assert_eq!(response.headers()["retry-after"], "1");
            expect_error(response, StatusCode::SERVICE_UNAVAILABLE, "overloaded").await;
        } else {
            late += 1;
            expect_error(response, StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded").await;
        }
    }
    assert_eq!((refused, late), (1, 2));
}

/// Behind a load balancer that stamps when it first passed a request on
/// (`X-Request-Start`, nginx's `t=${msec}`), the time since counts against the
/// deadline: a retry whose earlier tries used the whole 10 s is answered 504 at once,
/// a request with time left is served, and a stamp from the future or one that cannot
/// be read does not shorten anything.
#[tokio::test]
async fn a_load_balancers_request_start_counts_against_the_deadline() {
    let (image, label) = thatch();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let timeout = Config::default().server.request_timeout_ms as f64 / 1e3;
    let send = |stamp: String| {
        let (url, image) = (SERVER.url("/classify?defense=none"), image.clone());
        async move {
            let started = Instant::now();
            let response = client().post(url).header("x-request-start", stamp).body(image).send().await.unwrap();
            (response, started.elapsed())
        }
    };
    let (response, took) = send(format!("t={:.3}", now - timeout - 0.5)).await;
    assert!(took < Duration::from_secs(1), "an exhausted deadline took {took:?} to report");
    expect_error(response, StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded").await;
    for stamp in [format!("t={:.3}", now - 1.0), format!("t={:.3}", now + 3600.0), "soon".to_string()] {
        let (response, _) = send(stamp.clone()).await;
        assert_eq!(response.status(), StatusCode::OK, "stamp {stamp}");
        let answer: ClassifyResponse = response.json().await.unwrap();
        assert_eq!(answer.raw.class_id, label, "stamp {stamp}");
    }
}

async fn timed_post(url: String, body: Vec<u8>) -> (reqwest::Response, Duration) {
    let started = Instant::now();
    let response = post(&url, Some("image/jpeg"), body).await;
    (response, started.elapsed())
}

/// Before the models are loaded the replica is alive, not ready, and refuses work with 503.
#[tokio::test]
async fn before_models_load_the_replica_is_live_but_not_ready() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    let state = pandaguard::http::AppState::new(
        std::sync::Arc::new(test_config(&["efficientnet-lite0"])),
        pandaguard::telemetry::metrics_handle(),
    );
    let app = pandaguard::http::router(state);
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    assert_eq!(app.clone().oneshot(get("/health/live")).await.unwrap().status(), StatusCode::OK);
    let ready = app.clone().oneshot(get("/health/ready")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let classify = app.clone().oneshot(Request::post("/classify").body(Body::from("x")).unwrap()).await.unwrap();
    assert_eq!(classify.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(classify.headers().contains_key("retry-after"));
    assert_eq!(app.oneshot(get("/models")).await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// PNG signature + IHDR chunk only.
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

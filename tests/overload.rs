//! A burst of ten times what the replica can hold at once: the excess is refused at
//! once with 503 + Retry-After, the admitted requests finish in time with the right
//! answer, memory stays bounded, and the replica serves normally afterwards.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, read, samples, test_config};
use pandaguard::api::{ClassifyResponse, ErrorResponse, ModelsResponse};
use reqwest::StatusCode;

const BURST: usize = 60;
const QUEUE_ROWS: usize = 6;
const TIMEOUT_MS: u64 = 10_000;

fn rss_mib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

#[tokio::test]
async fn a_burst_beyond_the_queue_gets_fast_503s_and_the_rest_is_served_in_time() {
    let mut config = test_config(&["efficientnet-lite0"]);
    config.engine.queue_capacity_rows = QUEUE_ROWS;
    config.engine.max_rows_per_request = 1;
    config.engine.max_batch_rows = QUEUE_ROWS;
    config.server.request_timeout_ms = TIMEOUT_MS;
    config.server.retry_after_seconds = 2;
    let server = TestServer::start(config);
    let (path, class) = samples().into_iter().find(|(p, _)| p.ends_with("imagenet_05_853.jpg")).unwrap();
    let photo = read(&path);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).pool_max_idle_per_host(0).build().unwrap();
    let url = server.url("/classify?defense=none");

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(BURST));
    let mut tasks = Vec::new();
    for _ in 0..BURST {
        let (client, url, body, barrier) = (client.clone(), url.clone(), photo.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let started = Instant::now();
            let response = client.post(url).header("content-type", "image/jpeg").body(body).send().await.unwrap();
            let status = response.status();
            let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            let text = response.text().await.unwrap();
            (status, retry_after, text, started.elapsed())
        }));
    }
    let (mut served, mut refused) = (Vec::new(), Vec::new());
    for task in tasks {
        let (status, retry_after, text, took) = task.await.unwrap();
        match status {
            StatusCode::OK => {
                let answer: ClassifyResponse = serde_json::from_str(&text).unwrap();
                assert_eq!(answer.raw.class_id, class);
                assert!(took < Duration::from_millis(TIMEOUT_MS), "served after {took:?}");
                served.push(took);
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(retry_after.as_deref(), Some("2"));
                let error: ErrorResponse = serde_json::from_str(&text).unwrap();
                assert_eq!(error.error.code, "overloaded");
                refused.push(took);
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    refused.sort();
    served.sort();
    eprintln!(
        "burst of {BURST}: {} served (median {:?}), {} refused (median {:?}); peak RSS {} MiB",
        served.len(),
        served.get(served.len() / 2),
        refused.len(),
        refused.get(refused.len() / 2),
        rss_mib("VmHWM:")
    );
    assert!(served.len() >= QUEUE_ROWS, "only {} served", served.len());
    assert!(!refused.is_empty(), "a burst of {BURST} into {QUEUE_ROWS} rows refused nothing");
    // "Fast": generous for a loaded 2-core machine, and far below the 10 s deadline
    // an unbounded queue would let requests wait out.
    let median = refused[refused.len() / 2];
    assert!(median < Duration::from_secs(3), "median 503 took {median:?}");
    assert!(rss_mib("VmHWM:") < 1536);

    // Afterwards: nothing left queued, ready, and serving normally.
    let models: ModelsResponse = client.get(server.url("/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models.models[0].queued_rows, 0);
    assert_eq!(client.get(server.url("/health/ready")).send().await.unwrap().status(), StatusCode::OK);
    for _ in 0..3 {
        let response = client.post(&url).body(photo.clone()).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let answer: ClassifyResponse = response.json().await.unwrap();
        assert_eq!(answer.raw.class_id, class);
    }
}

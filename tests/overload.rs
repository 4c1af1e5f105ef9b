//! The shipped configuration (`config/default.toml`, unchanged) under a burst of 300
//! concurrent `default` requests at one replica: admission refuses what cannot finish
//! before the deadline at once (503 `overloaded` with a `Retry-After` from the queues'
//! drain time), every admitted request is answered correctly within its deadline, no
//! request waits out the deadline (no 504), memory stays bounded, and the replica
//! serves normally right after.

mod common;

use std::time::{Duration, Instant};

use common::{Replica, Scratch, free_port, photo};
use pandaguard::api::{ClassifyResponse, ErrorResponse, ModelsResponse};
use reqwest::StatusCode;

const BURST: usize = 300;
/// `server.request_timeout_ms` of the shipped config.
const DEADLINE: Duration = Duration::from_secs(10);

#[test]
fn a_burst_of_default_requests_gets_503_at_once_and_no_504() {
    let scratch = Scratch::new("overload");
    let mut replica = Replica::spawn("overload", free_port(), &[], &scratch.join("replica.log"));
    replica.wait_ready(Duration::from_secs(180));
    let base = format!("http://{}", replica.addr());
    let (image, class) = photo("imagenet_05_853.jpg");

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let outcomes = runtime.block_on(async {
        // A connection per request, as 300 separate users would send them.
        let client =
            reqwest::Client::builder().timeout(Duration::from_secs(60)).pool_max_idle_per_host(0).build().unwrap();
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(BURST));
        let mut tasks = Vec::new();
        for _ in 0..BURST {
            let (client, url, body, barrier) =
                (client.clone(), format!("{base}/classify"), image.clone(), barrier.clone());
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
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        outcomes
    });

    // What the replica measured, printed before any assertion so a failure explains itself.
    let metrics = runtime.block_on(async {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap()
    });
    for line in metrics.lines().filter(|l| {
        ["pandaguard_row_cost_seconds", "pandaguard_rows_dropped_total", "pandaguard_admission_refused_total"]
            .iter()
            .any(|name| l.starts_with(name))
    }) {
        eprintln!("{line}");
    }
    let mut by_status = std::collections::BTreeMap::<u16, (usize, Duration)>::new();
    for (status, _, _, took) in &outcomes {
        let entry = by_status.entry(status.as_u16()).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(*took);
    }
    eprintln!("status -> (count, slowest): {by_status:?}");

    let (mut served, mut refused) = (Vec::new(), Vec::new());
    for (status, retry_after, text, took) in outcomes {
        match status {
            StatusCode::OK => {
                let answer: ClassifyResponse = serde_json::from_str(&text).unwrap();
                assert_eq!(answer.raw.class_id, class);
                assert_eq!(answer.defended.class_id, Some(class));
                assert!(took < DEADLINE, "served after {took:?}, past the deadline");
                served.push(took);
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                let error: ErrorResponse = serde_json::from_str(&text).unwrap();
                assert_eq!(error.error.code, "overloaded", "{}", error.error.message);
                let seconds: u64 = retry_after.expect("a 503 carries Retry-After").parse().unwrap();
                assert!((1..=DEADLINE.as_secs() + 1).contains(&seconds), "Retry-After {seconds}");
                refused.push(took);
            }
            other => panic!("a burst may only get 200 or 503, got {other}: {text:.300}"),
        }
    }
    served.sort();
    refused.sort();
    let median = |v: &[Duration]| v.get(v.len() / 2).copied().unwrap_or_default();
    let peak = replica.memory_mib("VmHWM:");
    eprintln!(
        "burst of {BURST} default requests, shipped config: {} served (median {:?}, max {:?}), {} refused \
         (median {:?}, max {:?}); peak RSS {peak} MiB",
        served.len(),
        median(&served),
        served.last(),
        refused.len(),
        median(&refused),
        refused.last()
    );
    assert!(!served.is_empty(), "nothing was admitted");
    assert!(!refused.is_empty(), "a burst of {BURST} was admitted whole");
    // "At once": the refusal comes from the request's head, before its body is read;
    // far below the 10 s a queued request would wait (bound generous for a loaded CI box).
    assert!(median(&refused) < Duration::from_secs(1), "median 503 took {:?}", median(&refused));
    assert!(peak < 2048, "peak RSS {peak} MiB");

    // Afterwards: nothing left queued, ready, and serving normally.
    runtime.block_on(async {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let models: ModelsResponse = client.get(format!("{base}/models")).send().await.unwrap().json().await.unwrap();
        assert!(models.models.iter().all(|m| m.queued_rows == 0), "rows left queued after the burst");
        assert_eq!(client.get(format!("{base}/health/ready")).send().await.unwrap().status(), StatusCode::OK);
        for _ in 0..3 {
            let response = client.post(format!("{base}/classify")).body(image.clone()).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let answer: ClassifyResponse = response.json().await.unwrap();
            assert_eq!(answer.defended.class_id, Some(class));
        }
    });
}

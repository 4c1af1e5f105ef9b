//! Slow and impatient clients against a replica with the shipped configuration: a
//! flood of connections that trickle their headers is cut off by the header-read
//! timeout while normal requests are served; and early refusals (413 from the declared
//! length, 401, 415, 422, 503) reach clients that send their whole body before reading
//! (Python's http.client and urllib), and curl.

mod common;

use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Replica, Scratch, free_port, photo, root, venv_python};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The tests here start replicas and load the machine: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `server.header_timeout_ms` of the shipped config.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const SLOW_CONNECTIONS: usize = 1000;

#[test]
fn a_slow_header_flood_is_cut_off_while_normal_requests_are_served() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // This process holds SLOW_CONNECTIONS sockets plus its own files.
    rlimit::increase_nofile_limit(4 * SLOW_CONNECTIONS as u64).unwrap();
    let scratch = Scratch::new("slow-headers");
    let mut replica = Replica::spawn("slow", free_port(), &[], &scratch.join("replica.log"));
    replica.wait_ready(Duration::from_secs(180));
    let files_before = replica.open_files();
    let addr = replica.addr();
    let (image, _) = photo("imagenet_05_853.jpg");

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (mut cut_off_after, normal, files_during) = runtime.block_on(async {
        let opened = std::sync::Arc::new(AtomicUsize::new(0));
        let mut slow = Vec::new();
        for _ in 0..SLOW_CONNECTIONS {
            let opened = opened.clone();
            slow.push(tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let started = Instant::now();
                stream.write_all(b"GET /health/live HTTP/1.1\r\nHost: slow\r\n").await.expect("request line");
                opened.fetch_add(1, Ordering::SeqCst);
                // One more header line a second, until the server closes the connection.
                let mut buffer = [0u8; 256];
                loop {
                    tokio::select! {
                        read = stream.read(&mut buffer) => if !matches!(read, Ok(n) if n > 0) { break },
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            if stream.write_all(b"X-Slow: still-here\r\n").await.is_err() {
                                break;
                            }
                        }
                    }
                    if started.elapsed() > 3 * HEADER_TIMEOUT {
                        break;
                    }
                }
                started.elapsed()
            }));
        }
        while opened.load(Ordering::SeqCst) < SLOW_CONNECTIONS {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The client's connect returns once the kernel completed the handshake; the
        // replica accepts from its backlog a little later (CI once counted 964 of 1000
        // right here). Watch its descriptors for up to 3 s and keep the highest count.
        let mut files_during = replica.open_files();
        let watching = Instant::now();
        while files_during < SLOW_CONNECTIONS && watching.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            files_during = files_during.max(replica.open_files());
        }
        // Normal requests meanwhile, each on a fresh connection.
        let client =
            reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(0).build().unwrap();
        let mut normal = Vec::new();
        for _ in 0..8 {
            let live = client.get(format!("http://{addr}/health/live")).send().await.map(|r| r.status().as_u16());
            let classify = client
                .post(format!("http://{addr}/classify?defense=none"))
                .body(image.clone())
                .send()
                .await
                .map(|r| r.status().as_u16());
            normal.push((live.ok(), classify.ok()));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut cut_off_after = Vec::new();
        for task in slow {
            cut_off_after.push(task.await.unwrap());
        }
        (cut_off_after, normal, files_during)
    });
    cut_off_after.sort();
    // Give the replica a moment to release the sockets it closed.
    std::thread::sleep(Duration::from_millis(500));
    let files_after = replica.open_files();
    eprintln!(
        "{SLOW_CONNECTIONS} slow-header connections: closed after {:?} .. {:?}; replica open files {files_before} \
         before, {files_during} during, {files_after} after; normal requests {normal:?}",
        cut_off_after.first(),
        cut_off_after.last()
    );
    let latest = *cut_off_after.last().unwrap();
    // Closing 1000 sockets on 2 busy cores takes a moment: seen 10.2-10.4 s, once past 11.
    assert!(latest <= HEADER_TIMEOUT + Duration::from_secs(2), "a slow connection lasted {latest:?}");
    assert!(cut_off_after.first().unwrap() >= &(HEADER_TIMEOUT - Duration::from_secs(1)));
    for (live, classify) in &normal {
        assert_eq!((*live, *classify), (Some(200), Some(200)), "normal requests during the flood: {normal:?}");
    }
    assert!(files_during >= SLOW_CONNECTIONS, "the flood was not open at once ({files_during} files)");
    assert!(files_after <= files_before + 16, "{files_after} files left open (was {files_before})");
}

/// Runs the Python client against `url`: `tries` posts of `bytes`, with headers.
fn python_client(url: &str, tries: usize, bytes: usize, headers: &[&str]) -> Value {
    let output = Command::new(venv_python())
        .arg(root().join("tests/fixtures/early_refusal_client.py"))
        .args([url, &tries.to_string(), &bytes.to_string()])
        .args(headers)
        .output()
        .expect("run .venv/bin/python (make setup)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn early_refusals_reach_clients_that_send_the_whole_body_first() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let scratch = Scratch::new("early-refusals");
    let env = [("PANDAGUARD_SERVER__API_KEYS", "[\"early-refusal-test-key\"]")];
    let mut replica = Replica::spawn("early", free_port(), &env, &scratch.join("replica.log"));
    let base = format!("http://{}", replica.addr());

    // While the models load: 503 not_ready, before the body is read.
    replica.wait_live(Duration::from_secs(60));
    let loading =
        python_client(&format!("{base}/classify"), 2, 5 << 20, &["Authorization: Bearer early-refusal-test-key"]);
    replica.wait_ready(Duration::from_secs(180));
    let key = "Authorization: Bearer early-refusal-test-key";
    let cases = [
        // 25 MiB against the 20 MiB limit, refused from Content-Length: 100 tries.
        ("413", python_client(&format!("{base}/classify"), 100, 25 << 20, &[key]), "body_too_large"),
        ("401", python_client(&format!("{base}/classify"), 10, 5 << 20, &[]), "unauthorized"),
        (
            "415",
            python_client(&format!("{base}/classify"), 10, 5 << 20, &[key, "Content-Type: text/plain"]),
            "unsupported_media_type",
        ),
        ("422", python_client(&format!("{base}/classify?top-k=3"), 10, 5 << 20, &[key]), "invalid_parameter"),
    ];
    eprintln!("early refusals, Python clients: while loading {loading}");
    let loading_codes = loading["codes"].as_object().unwrap();
    assert_eq!(loading["read"], loading["tries"], "{loading}");
    assert_eq!(loading_codes.keys().collect::<Vec<_>>(), ["not_ready"], "{loading}");
    for (status, report, code) in &cases {
        eprintln!("  {status}: {report}");
        assert_eq!(report["read"], report["tries"], "every try reads the answer: {report}");
        assert_eq!(report["statuses"][*status], report["tries"], "{report}");
        assert_eq!(report["codes"][*code], report["tries"], "{report}");
    }

    // curl, which reads an early answer while uploading, gets it too (25 MiB).
    let big = scratch.join("big.bin");
    std::fs::write(&big, vec![0u8; 25 << 20]).unwrap();
    let output = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-H", key, "-H", "Content-Type: image/jpeg", "--data-binary"])
        .arg(format!("@{}", big.display()))
        .arg(format!("{base}/classify"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(text.ends_with("\n413") && text.contains("body_too_large"), "curl: {text}");

    // The replica is fine afterwards.
    let (_, class) = photo("imagenet_05_853.jpg");
    let answer = Command::new("curl")
        .args(["-s", "-H", key, "--data-binary"])
        .arg(format!("@{}", root().join("testdata/imagenet/imagenet_05_853.jpg").display()))
        .arg(format!("{base}/classify?defense=none"))
        .output()
        .expect("curl");
    let answer: Value = serde_json::from_slice(&answer.stdout).unwrap();
    assert_eq!(answer["raw"]["class_id"], class);
}

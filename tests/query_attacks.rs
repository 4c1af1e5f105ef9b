//! Query-attack detection end to end: the release binary as replicas, the real
//! EfficientNet-Lite0 model, and a real `redis-server` started here on a free port in a
//! scratch folder (killed when the test ends, even when it fails).
//!
//! The attacker sends what a score-based query attack (Square, NES) sends: the same
//! photo at the model's input size with fresh small random perturbations (±2/255 per
//! value) in every query, as PNG so the perturbation reaches the server intact.
//! Benign traffic: exact re-sends (retries) and distinct photos.
//!
//! Clients are told apart by `X-Forwarded-For` (the replicas trust 127.0.0.1 as a
//! proxy), so one replica serves several clients at once.
//!
//! `redis-server` must be installed (`make test` installs it from Debian's packages);
//! without it these tests fail, they never skip.

mod common;

use std::io::{Cursor, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Replica, Scratch, free_port, samples};
use image::RgbImage;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const SECRET: &str = "query-attack-test-secret";
const START_BOUND: Duration = Duration::from_secs(180);
/// The brief's bound: a query attack is refused within this many queries.
const DETECTION_BOUND: usize = 10;

/// A `redis-server` of this test's own: free port, scratch folder, no persistence.
struct RedisServer {
    port: u16,
    child: Option<Child>,
    _scratch: Scratch,
}

impl RedisServer {
    fn start() -> RedisServer {
        let binary = find_redis().unwrap_or_else(|| {
            panic!(
                "redis-server is not installed: `make test` installs it (apt-get install redis-server); the \
                 query-attack tests need a real Redis and do not skip"
            )
        });
        let scratch = Scratch::new("redis");
        let port = free_port();
        let log = std::fs::File::create(scratch.join("redis.log")).unwrap();
        let child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&scratch.path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let server = RedisServer { port, child: Some(child), _scratch: scratch };
        let started = Instant::now();
        while !server.answers_ping() {
            assert!(started.elapsed() < Duration::from_secs(10), "redis-server did not answer PING on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut answer = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
    }

    /// Sends `signal` (STOP: a Redis that no longer answers; CONT: back).
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().map(Child::id).expect("redis-server running");
        let status = Command::new("kill").args(["-s", signal, &pid.to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -s {signal} {pid}");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn find_redis() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
}

/// A replica with detection configured by `env` (on top of: Lite0 only, the test
/// secret, 127.0.0.1 trusted as a proxy, access log on).
fn replica(name: &str, scratch: &Scratch, env: &[(&str, &str)]) -> Replica {
    let mut all = vec![
        ("PANDAGUARD_MODELS__LOAD", "[\"efficientnet-lite0\"]"),
        ("PANDAGUARD_ATTACK_DETECTION__SECRET", SECRET),
        ("PANDAGUARD_ATTACK_DETECTION__TRUSTED_PROXIES", "[\"127.0.0.1\"]"),
        ("PANDAGUARD_LOG", "info,ort=warn"),
    ];
    all.extend_from_slice(env);
    let mut replica = Replica::spawn(name, free_port(), &all, &scratch.join(&format!("{name}.log")));
    replica.wait_ready(START_BOUND);
    replica
}

/// One answer: status, head (lower-case) and JSON body.
struct Answer {
    status: u16,
    head: String,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<&str> {
        let prefix = format!("{name}:");
        self.head.lines().find_map(|l| l.strip_prefix(&prefix)).map(str::trim)
    }
}

/// `POST /classify?defense=none` as client `client` (its X-Forwarded-For address).
fn classify(addr: SocketAddr, client: &str, png: &[u8]) -> Answer {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "POST /classify?defense=none HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: image/png\r\n\
         X-Forwarded-For: {client}\r\nContent-Length: {}\r\n\r\n",
        png.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(png).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not HTTP: {text:?}"));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status");
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    Answer { status, head: head.to_ascii_lowercase(), body }
}

/// The sum of a metric's samples in the replica's `/metrics` (0 when absent).
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, text) = common::get(addr, "/metrics").expect("metrics");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sample photo `index` at the model's input size (224×224), as an attacker that
/// works at the model's resolution starts from.
fn photo(index: usize) -> RgbImage {
    let (path, _) = &samples()[index];
    let image = image::open(path).expect("a sample photo").to_rgb8();
    image::imageops::resize(&image, 224, 224, image::imageops::FilterType::Triangle)
}

/// A probe as NES sends it: `image` plus fresh Gaussian noise of σ = 0.001 (its
/// default, in [0, 1] units), rounded to 8 bits.
fn probe(image: &RgbImage, rng: &mut impl Rng) -> RgbImage {
    let mut out = image.clone();
    for value in out.iter_mut() {
        let noise: f32 = rand_distr::Distribution::sample(&rand_distr::StandardNormal, rng);
        *value = (f32::from(*value) + noise * 0.255).round().clamp(0.0, 255.0) as u8;
    }
    out
}

fn png(image: &RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).expect("encode PNG");
    out.into_inner()
}

#[test]
fn refuse_stops_a_query_attack_and_never_retries_or_distinct_photos() {
    let scratch = Scratch::new("qa-refuse");
    let server = replica("refuse", &scratch, &[("PANDAGUARD_ATTACK_DETECTION__ACTION", "refuse")]);
    let addr = server.addr();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(13);

    // (a) The attacker: the same photo, freshly perturbed each time.
    let attacker = "203.0.113.10";
    let target = photo(3);
    let mut refused_at = None;
    for query in 1..=DETECTION_BOUND {
        let answer = classify(addr, attacker, &png(&probe(&target, &mut rng)));
        match answer.status {
            200 => {}
            429 => {
                assert_eq!(answer.code(), "query_attack_detected", "{}", answer.body);
                let retry_after: u64 = answer.header("retry-after").and_then(|v| v.parse().ok()).expect("Retry-After");
                assert!((59..=60).contains(&retry_after), "Retry-After {retry_after}");
                refused_at = Some(query);
                break;
            }
            other => panic!("query {query}: {other} {}", answer.body),
        }
    }
    let refused_at = refused_at.unwrap_or_else(|| panic!("not refused within {DETECTION_BOUND} queries"));
    println!("query attack refused at query {refused_at}");
    // In its cooldown the attacker is refused whatever it sends, a new photo included.
    let cooling = classify(addr, attacker, &png(&photo(7)));
    assert_eq!((cooling.status, cooling.code()), (429, "query_attack_detected"), "{}", cooling.body);

    // (b) A client retrying exactly the same bytes is never refused.
    let retried = png(&probe(&photo(5), &mut rng));
    for attempt in 1..=30 {
        let answer = classify(addr, "203.0.113.20", &retried);
        assert_eq!(answer.status, 200, "retry {attempt}: {}", answer.body);
    }

    // (c) One client sending the 20 distinct sample photos is never refused.
    for index in 0..samples().len() {
        let answer = classify(addr, "203.0.113.30", &png(&photo(index)));
        assert_eq!(answer.status, 200, "photo {index}: {}", answer.body);
    }

    assert!(metric(addr, "pandaguard_query_attacks_detected_total") >= 1.0);
    assert!(metric(addr, "pandaguard_query_attack_matches_count") >= 1.0 + 20.0);
    // The access log records the detection under the client's digest, never its address.
    let log = server.stderr();
    assert!(log.contains("\"query_attack\":true"), "no detection in the access log:\n{log}");
    assert!(!log.contains(attacker), "the client's address reached the log");
}

#[test]
fn replicas_sharing_redis_see_one_client_and_survive_its_loss() {
    let scratch = Scratch::new("qa-redis");
    let mut redis = RedisServer::start();
    let url = redis.url();
    let env = [("PANDAGUARD_ATTACK_DETECTION__ACTION", "flag"), ("PANDAGUARD_ATTACK_DETECTION__STORE", url.as_str())];
    let replicas = [replica("a", &scratch, &env), replica("b", &scratch, &env)];
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(29);

    // (d) Queries alternate between the replicas; each sees the other's through Redis.
    let target = photo(11);
    let mut detected_at = None;
    for query in 1..=DETECTION_BOUND {
        let replica = &replicas[(query - 1) % 2];
        let answer = classify(replica.addr(), "198.51.100.7", &png(&probe(&target, &mut rng)));
        assert_eq!(answer.status, 200, "{}", answer.body);
        // (f) flag: every answer carries the report, with the shared window.
        let report = &answer.body["query_attack"];
        assert_eq!(report["window"].as_u64(), Some(query as u64 - 1), "query {query} on {}: {report}", replica.name);
        // Every earlier probe is alike to this one (most nearly identical), whichever
        // replica saw it.
        assert_eq!(report["alike"].as_u64(), Some(query as u64 - 1), "query {query} on {}: {report}", replica.name);
        assert!(answer.body["raw"]["confidence"].is_number(), "flag keeps the scores");
        if report["detected"] == Value::Bool(true) && detected_at.is_none() {
            detected_at = Some(query);
        }
    }
    let detected_at = detected_at.unwrap_or_else(|| panic!("not detected within {DETECTION_BOUND} queries"));
    println!("query attack over two replicas detected at query {detected_at}");
    assert_eq!(metric(replicas[0].addr(), "pandaguard_detection_store_fallback_total"), 0.0);

    // (e) Redis stops answering (SIGSTOP): each request waits at most redis_timeout_ms
    // for it, then this replica's memory answers.
    redis.signal("STOP");
    for (query, replica) in replicas.iter().enumerate() {
        let started = Instant::now();
        let answer = classify(replica.addr(), "198.51.100.8", &png(&photo(query)));
        assert_eq!(answer.status, 200, "with Redis stopped: {}", answer.body);
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let fallbacks = metric(replica.addr(), "pandaguard_detection_store_fallback_total");
        assert!(fallbacks >= 1.0, "{}: fallback counter {fallbacks}", replica.name);
        assert!(replica.stderr().contains("Redis is unavailable"), "{}: no warning logged", replica.name);
    }
    // Redis answers again: a second later the replicas share windows again.
    redis.signal("CONT");
    std::thread::sleep(Duration::from_millis(1500));
    let target = photo(12);
    for query in 1..=4 {
        let replica = &replicas[(query - 1) % 2];
        let answer = classify(replica.addr(), "198.51.100.9", &png(&probe(&target, &mut rng)));
        assert_eq!(answer.status, 200, "{}", answer.body);
        let window = answer.body["query_attack"]["window"].as_u64();
        assert_eq!(window, Some(query as u64 - 1), "after Redis came back, query {query} on {}", replica.name);
    }

    // Redis dies: every request is still answered, from each replica's memory.
    let before: Vec<f64> =
        replicas.iter().map(|r| metric(r.addr(), "pandaguard_detection_store_fallback_total")).collect();
    redis.kill();
    for query in 0..4 {
        let replica = &replicas[query % 2];
        let answer = classify(replica.addr(), "198.51.100.10", &png(&photo(query + 2)));
        assert_eq!(answer.status, 200, "without Redis: {}", answer.body);
    }
    for (replica, before) in replicas.iter().zip(before) {
        let fallbacks = metric(replica.addr(), "pandaguard_detection_store_fallback_total");
        assert!(fallbacks > before, "{}: fallback counter {before} -> {fallbacks}", replica.name);
    }
}

#[test]
fn degrade_answers_labels_without_scores() {
    let scratch = Scratch::new("qa-degrade");
    let server = replica("degrade", &scratch, &[("PANDAGUARD_ATTACK_DETECTION__ACTION", "degrade")]);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(41);
    let target = photo(8);
    let first = classify(server.addr(), "192.0.2.5", &png(&probe(&target, &mut rng)));
    assert_eq!(first.status, 200);
    assert!(first.body["raw"]["top_k"][0]["probability"].is_number(), "a first query has its scores");
    assert!(first.body.get("query_attack").is_none(), "only flag reports");
    let mut degraded = None;
    for _ in 1..DETECTION_BOUND {
        let answer = classify(server.addr(), "192.0.2.5", &png(&probe(&target, &mut rng)));
        assert_eq!(answer.status, 200, "{}", answer.body);
        if answer.body["raw"].get("confidence").is_none() {
            degraded = Some(answer.body);
            break;
        }
    }
    let body = degraded.unwrap_or_else(|| panic!("never degraded within {DETECTION_BOUND} queries"));
    assert_eq!(body["raw"]["class_id"], first.body["raw"]["class_id"], "labels stay: {body}");
    assert!(body["raw"]["label"].is_string() && body["defended"]["label"].is_string(), "{body}");
    for prediction in [&body["raw"], &body["defended"]] {
        assert!(prediction.get("confidence").is_none(), "{body}");
        for entry in prediction["top_k"].as_array().expect("top_k") {
            assert!(entry.get("probability").is_none() && entry["label"].is_string(), "{body}");
        }
    }
    assert!(body.get("squeeze_score").is_none(), "{body}");

    // The OpenAPI document lists the refusal and the report.
    let (_, text) = common::get(server.addr(), "/openapi.json").expect("openapi.json");
    let spec: Value = serde_json::from_str(&text).expect("OpenAPI JSON");
    assert!(spec["paths"]["/classify"]["post"]["responses"].get("429").is_some(), "no 429 for /classify");
    assert!(spec["components"]["schemas"].get("QueryAttackReport").is_some(), "no QueryAttackReport schema");
}

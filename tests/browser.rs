//! The web page in a real browser: Debian's Chromium, headless, driven by
//! chromedriver over the W3C WebDriver protocol (plain HTTP + JSON, spoken here with
//! reqwest: nothing is downloaded). `make test` installs both when missing.
//! The page is loaded from a real server with the real models; a sample photo is
//! picked as a person would, and the labels the page shows must equal the JSON API's
//! for the same image and seed. With an API key required, a wrong key shows the 401.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestServer, root, test_config};
use pandaguard::api::ClassifyResponse;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const SAMPLE: &str = "imagenet_05_853.jpg";
const SEED: u64 = 7;

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    base: String,
    session: String,
    http: Http,
}

/// Blocking JSON over HTTP (ureq, already a dependency), statuses passed through.
struct Http(ureq::Agent);

impl Http {
    fn new() -> Http {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build();
        Http(config.into())
    }

    /// (status, body) of a request with an optional JSON body and headers.
    fn call(
        &self,
        method: &str,
        url: &str,
        body: Option<(&str, Vec<u8>)>,
        key: Option<&str>,
    ) -> Result<(u16, Vec<u8>), String> {
        let response = match method {
            "GET" => {
                let mut request = self.0.get(url);
                if let Some(key) = key {
                    request = request.header("authorization", format!("Bearer {key}"));
                }
                request.call()
            }
            "DELETE" => self.0.delete(url).call(),
            _ => {
                let (content_type, bytes) = body.unwrap_or(("application/json", b"{}".to_vec()));
                let mut request = self.0.post(url).header("content-type", content_type);
                if let Some(key) = key {
                    request = request.header("authorization", format!("Bearer {key}"));
                }
                request.send(&bytes[..])
            }
        };
        let mut response = response.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let bytes = response.body_mut().with_config().limit(64 << 20).read_to_vec().map_err(|e| e.to_string())?;
        Ok((status, bytes))
    }

    fn json(&self, method: &str, url: &str, body: Value) -> Value {
        let (_, bytes) =
            self.call(method, url, Some(("application/json", body.to_string().into_bytes())), None).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }
}

impl Driver {
    fn start() -> Driver {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(path).exists(),
                "{path} is missing: `make test` installs Debian's chromium and chromium-driver (make browser)"
            );
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = Http::new();
        let started = Instant::now();
        while http.call("GET", &format!("{base}/status"), None, None).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1100", "--no-first-run"]
            }
        }}});
        let answer = http.json("POST", &format!("{base}/session"), capabilities);
        let session =
            answer["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {answer}")).to_string();
        Driver { child, base, session, http }
    }

    fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let answer = match method {
            "GET" => {
                let (_, bytes) = self.http.call("GET", &url, None, None).unwrap();
                serde_json::from_slice(&bytes).unwrap()
            }
            _ => self.http.json("POST", &url, body),
        };
        if answer["value"].get("error").is_some() {
            panic!("WebDriver {path}: {}", answer["value"]);
        }
        answer["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.command("POST", "/url", json!({ "url": url }));
    }

    /// Runs `script` (a function body; `arguments` available) in the page.
    fn run(&self, script: &str, args: Value) -> Value {
        self.command("POST", "/execute/sync", json!({ "script": script, "args": args }))
    }

    /// Polls `script` until it returns a truthy value, and returns it.
    fn wait_for(&self, what: &str, script: &str, timeout: Duration) -> Value {
        let started = Instant::now();
        loop {
            let value = self.run(script, json!([]));
            if !(value.is_null() || value == json!(false) || value == json!("")) {
                return value;
            }
            assert!(started.elapsed() < timeout, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self) -> Vec<u8> {
        base64_decode(self.command("GET", "/screenshot", Value::Null).as_str().unwrap())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.http.call("DELETE", &format!("{}/session/{}", self.base, self.session), None, None);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (the screenshot's encoding), decoded without another crate.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &c)| acc | (u32::from(value(c)) << (18 - 6 * i)));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}

fn server(keys: &[&str]) -> TestServer {
    let mut config = test_config(&["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]);
    config.page.samples_dir = Some(root().join("testdata/imagenet"));
    config.server.api_keys = keys.iter().map(|k| pandaguard::config::ApiKey::new(*k)).collect();
    TestServer::start(config)
}

/// Picks the sample in the page (which classifies it at once) and waits for the answer.
fn classify_sample_in_page(driver: &Driver) -> (u64, Option<u64>, String) {
    driver.wait_for(
        "the sample list",
        &format!("const s = document.getElementById('samples'); return !s.disabled && [...s.options].some(o => o.value === '{SAMPLE}');"),
        Duration::from_secs(60),
    );
    driver.run(
        "const seed = document.getElementById('seed'); seed.value = arguments[0]; seed.dispatchEvent(new Event('input'));
         const s = document.getElementById('samples'); s.value = arguments[1]; s.dispatchEvent(new Event('change'));",
        json!([SEED.to_string(), SAMPLE]),
    );
    let state = driver.wait_for(
        "the answer",
        "const st = document.getElementById('status').dataset.state; return (st === 'done' || st === 'error') ? st : null;",
        Duration::from_secs(60),
    );
    assert_eq!(
        state,
        json!("done"),
        "page error: {}",
        driver.run("return document.getElementById('error').textContent;", json!([]))
    );
    let read = driver.run(
        "const r = document.getElementById('raw-label'), d = document.getElementById('defended-label');
         return [r.dataset.classId, d.dataset.classId, d.textContent];",
        json!([]),
    );
    let raw = read[0].as_str().unwrap().parse().unwrap();
    let defended = read[1].as_str().and_then(|s| s.parse().ok());
    (raw, defended, read[2].as_str().unwrap_or_default().to_string())
}

fn api_answer(server: &TestServer, key: Option<&str>) -> (ClassifyResponse, Duration) {
    let bytes = std::fs::read(root().join("testdata/imagenet").join(SAMPLE)).unwrap();
    let started = Instant::now();
    let url = server.url(&format!("/classify?seed={SEED}"));
    let (status, body) = Http::new().call("POST", &url, Some(("image/jpeg", bytes)), key).unwrap();
    let elapsed = started.elapsed();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    (serde_json::from_slice(&body).unwrap(), elapsed)
}

#[test]
fn the_page_shows_the_apis_answer_and_a_wrong_key_shows_the_401() {
    let shots = std::env::temp_dir().join(format!("pandaguard-browser-{}", std::process::id()));
    std::fs::create_dir_all(&shots).unwrap();
    let driver = Driver::start();

    // Open: pick a sample, compare with the JSON API for the same bytes and seed.
    let open = server(&[]);
    driver.goto(&open.url("/"));
    let clicked = Instant::now();
    let (raw, defended, shown) = classify_sample_in_page(&driver);
    let page_time = clicked.elapsed();
    // The page's own round trip of its /classify (shown to the user), beside the same
    // request from a plain HTTP client, one after the other on the same server.
    let shown_trip = driver.run("return document.getElementById('status-detail').textContent;", json!([]));
    let (answer, curl_time) = api_answer(&open, None);
    // Presets whose models are not loaded (the int8 ones here) are listed but cannot be picked.
    let presets = driver.run(
        "const p = document.getElementById('preset');
         return [p.value, [...p.options].filter(o => o.disabled).map(o => o.value)];",
        json!([]),
    );
    assert_eq!(presets[0], json!("default"), "the default preset is selected");
    assert_eq!(presets[1], json!(["default-int8", "fast-int8"]), "greyed-out presets");
    assert_eq!(raw, answer.raw.class_id as u64, "raw label shown");
    assert_eq!(defended, answer.defended.class_id.map(|c| c as u64), "defended label shown ({shown})");
    eprintln!(
        "page: sample picked to answer shown in {page_time:?} (incl. the sample's download); the page's /classify: \
         {shown_trip}; the same request by a plain HTTP client: {curl_time:?}"
    );
    let png = driver.screenshot();
    let path: PathBuf = shots.join("page.png");
    std::fs::write(&path, &png).unwrap();
    let image = image::load_from_memory(&png).unwrap();
    assert!(image.width() >= 1000 && image.height() >= 800, "{}x{}", image.width(), image.height());
    assert!(png.len() > 30_000, "a screenshot of a drawn page, not a blank one ({} bytes)", png.len());
    eprintln!("screenshot: {}", path.display());
    drop(open);

    // Keys required: a wrong key shows the server's 401 message; the right one works.
    let keyed = server(&["right-key-123"]);
    driver.goto(&keyed.url("/"));
    driver.wait_for(
        "the key prompt",
        "return document.getElementById('error').textContent.includes('401');",
        Duration::from_secs(30),
    );
    driver.run(
        "const k = document.getElementById('key'); k.value = 'wrong-key'; k.dispatchEvent(new Event('change'));",
        json!([]),
    );
    // With a key typed, the hint says that this key was refused (not merely missing).
    driver.wait_for(
        "the wrong key's 401",
        "return document.getElementById('error').textContent.includes('401')
            && document.getElementById('error-hint').textContent.includes('refused');",
        Duration::from_secs(30),
    );
    driver.run(
        "const k = document.getElementById('key'); k.value = 'right-key-123'; k.dispatchEvent(new Event('change'));",
        json!([]),
    );
    let (raw, defended, _) = classify_sample_in_page(&driver);
    let (answer, _) = api_answer(&keyed, Some("right-key-123"));
    assert_eq!((raw, defended), (answer.raw.class_id as u64, answer.defended.class_id.map(|c| c as u64)));
}

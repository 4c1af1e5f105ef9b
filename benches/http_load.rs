//! `make bench` (second part): what a user of the HTTP API feels, pandaguard beside a
//! Python FastAPI + onnxruntime service doing the same work (`benches/python_peer/`),
//! in one run on one machine.
//!
//! The harness starts both servers (`target/release/pandaguard serve --config
//! config/default.toml` and the peer under uvicorn, one process each), then drives each
//! with closed-loop load: C clients, each sending its next request when the previous
//! answer has arrived, a fixed number of requests per row after a short warm-up. Rows:
//! presets `none`, `fast`, `default` on a 512×512 JPEG and `none` on a 2000×1500 JPEG,
//! each at C = 1, 4 and 16. The two servers run the same row back to back (the order
//! alternates from row to row) so drift on a shared machine hits both.
//!
//! Per row and server: req/s, p50/p99 latency, errors, server CPU ms per request
//! (utime + stime of the server process from /proc/PID/stat over the row, divided by
//! the requests), peak RSS (VmHWM) after the row's warm-up and at its end, and the CPU
//! that everything else on the machine used meanwhile (cores; the load generator
//! included), to tell a noisy row. Output: a markdown table on stdout and
//! `target/bench/http_load-<mode>.{md,json}`.
//!
//! Environment:
//!   BENCH_QUICK=1             a few requests per row (smoke test, about two minutes)
//!   BENCH_CONTENTION=1        contention mode only: another process keeps one core busy
//!                             for the whole run; `both` = idle, then contention
//!   BENCH_PRESETS=none,fast   only these presets' rows; `default-int8` (not run unless named)
//!                             is pandaguard's `default` with the int8 models as ensemble
//!                             members against the peer's fp32 `default`: pandaguard then
//!                             also loads the three int8 models, for every row of the run
//!   PANDAGUARD_*, PEER_*      passed on to the servers (pandaguard's config overrides, the
//!                             peer's PEER_RUN_LOCK); the report lists them
//!   PANDAGUARD_BIN            server binary (default <target dir>/release/pandaguard)
//!   BENCH_PEER_PYTHON         the peer's interpreter (default benches/python_peer/.venv/bin/python)
//!
//! Run through `make bench` (builds the binary and the peer's venv first) or
//! `cargo bench --locked --bench http_load` once both exist.

use std::fmt::Write as _;
use std::io::Cursor;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::{RgbImage, imageops};
use serde_json::{Value, json};

/// The photo both bodies are made from (README's `thatch.jpg`).
const PHOTO: &str = "testdata/imagenet/imagenet_05_853.jpg";
const CONCURRENCY: [usize; 3] = [1, 4, 16];
/// Set in the contention process, which only spins.
const SPIN_ENV: &str = "PANDAGUARD_BENCH_SPIN";
/// Rows whose "other" load differs by this many cores between the servers are marked.
const NOISY_CORES: f64 = 0.25;
const READY_TIMEOUT: Duration = Duration::from_secs(300);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// `[models] load` of a run with int8 rows: the shipped fp32 models and their int8 variants.
const INT8_RUN_MODELS: &str = "[\"efficientnet-lite0\", \"efficientnet-lite1\", \"efficientnet-lite2\", \
    \"efficientnet-lite0-int8\", \"efficientnet-lite1-int8\", \"efficientnet-lite2-int8\"]";

fn main() {
    if std::env::var_os(SPIN_ENV).is_some() {
        spin();
    }
    // `cargo test --all-targets` runs bench targets without `--bench`: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("http_load: run with `cargo bench --bench http_load` (or `make bench`)");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(d));
    let quick = flag("BENCH_QUICK");
    let modes: &[bool] = match std::env::var("BENCH_CONTENTION").unwrap_or_default().as_str() {
        "" | "0" => &[false],
        "both" => &[false, true],
        _ => &[true],
    };
    let pandaguard =
        std::env::var_os("PANDAGUARD_BIN").map_or_else(|| target.join("release/pandaguard"), PathBuf::from);
    let python = std::env::var_os("BENCH_PEER_PYTHON")
        .map_or_else(|| root.join("benches/python_peer/.venv/bin/python"), PathBuf::from);
    for (path, how) in [(&pandaguard, "cargo build --release --locked"), (&python, "make bench")] {
        assert!(path.exists(), "{} is missing: run `{how}` first", path.display());
    }
    let out_dir = target.join("bench");
    std::fs::create_dir_all(out_dir.join("logs")).expect("create target/bench");

    let bodies = make_bodies(&root);
    let rows = plan(quick, &bodies);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let client = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().expect("HTTP client");
    let machine = Machine::describe(&root);
    for &contention in modes {
        let mode = if contention { "contention" } else { "idle" };
        let started = Instant::now();
        println!(
            "\n== http_load, {mode} mode{}: {} rows x 2 servers ==",
            if quick { " (quick)" } else { "" },
            rows.len()
        );
        // The busy process first, so it is there for the servers' start-up too.
        let spinner = contention.then(Spinner::start);
        let servers = [
            Server::pandaguard(&root, &pandaguard, &out_dir, mode, rows.iter().any(|r| r.preset.ends_with("-int8"))),
            Server::peer(&root, &python, &out_dir, mode, machine.cores),
        ];
        for server in &servers {
            runtime.block_on(server.wait_ready(&client));
        }
        let start_hwm: Vec<u64> = servers.iter().map(|s| s.status_kib("VmHWM")).collect();
        let sanity: Vec<Value> =
            servers.iter().map(|s| runtime.block_on(s.sanity(&client, &bodies[0].bytes))).collect();
        for (server, answer) in servers.iter().zip(&sanity) {
            println!(
                "{:<10} ready, peak RSS {} MiB; `none` on the 512 JPEG: raw {} ({})",
                server.name,
                mib(server.status_kib("VmHWM")),
                answer["raw"]["label"],
                answer["raw"]["confidence"]
            );
        }

        let mut results = Vec::new();
        for (index, row) in rows.iter().enumerate() {
            // Alternate which server goes first, so neither always follows the other,
            // and split the requests into rounds (pg, peer, peer, pg, ...) so that load
            // from elsewhere on the machine falls on both.
            let order: [usize; 2] = if index % 2 == 0 { [0, 1] } else { [1, 0] };
            let mut tallies = [Tally::default(), Tally::default()];
            for i in order {
                runtime.block_on(tallies[i].warm_up(&client, &servers[i], row));
            }
            for (round, requests) in row.round_sizes().into_iter().enumerate() {
                let turn = if round % 2 == 0 { order } else { [order[1], order[0]] };
                for i in turn {
                    runtime.block_on(tallies[i].round(&client, &servers[i], row, requests));
                }
            }
            let [pg, peer] = [0, 1].map(|i| std::mem::take(&mut tallies[i]).finish(&servers[i], row));
            println!("{}", row_line(row, &pg, &peer));
            results.push((row.clone(), pg, peer));
        }
        let end_hwm: Vec<u64> = servers.iter().map(|s| s.status_kib("VmHWM")).collect();
        let spin = spinner.map(|s| s.finish());
        let elapsed = started.elapsed();
        drop(servers);

        let report = Report { mode, quick, machine: &machine, results: &results, start_hwm, end_hwm, spin, elapsed };
        let markdown = report.markdown();
        println!("\n{markdown}");
        let base = out_dir.join(format!("http_load-{mode}"));
        std::fs::write(base.with_extension("md"), &markdown).expect("write markdown");
        let json = serde_json::to_string_pretty(&report.json()).expect("json");
        std::fs::write(base.with_extension("json"), json + "\n").expect("write json");
        println!("wrote {0}.md and {0}.json", base.display());
    }
}

fn flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

// ---------------------------------------------------------------- bodies and rows

struct Body {
    name: &'static str,
    bytes: Bytes,
}

/// A 512×512 and a 2000×1500 JPEG (quality 90) made from one sample photo.
fn make_bodies(root: &Path) -> Vec<Body> {
    let photo = image::open(root.join(PHOTO)).unwrap_or_else(|e| panic!("{PHOTO}: {e} (run `make setup`)")).to_rgb8();
    let square = if photo.dimensions() == (512, 512) {
        photo.clone()
    } else {
        imageops::resize(&photo, 512, 512, imageops::FilterType::Lanczos3)
    };
    // The centre 4:3 of the photo, enlarged.
    let (w, h) = photo.dimensions();
    let crop_h = (w * 3 / 4).min(h);
    let crop_w = crop_h * 4 / 3;
    let crop = imageops::crop_imm(&photo, (w - crop_w) / 2, (h - crop_h) / 2, crop_w, crop_h).to_image();
    let large = imageops::resize(&crop, 2000, 1500, imageops::FilterType::Lanczos3);
    vec![Body { name: "512x512", bytes: jpeg(&square) }, Body { name: "2000x1500", bytes: jpeg(&large) }]
}

fn jpeg(image: &RgbImage) -> Bytes {
    let mut out = Cursor::new(Vec::new());
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
    image.write_with_encoder(encoder).expect("encode JPEG");
    Bytes::from(out.into_inner())
}

#[derive(Clone)]
struct Row {
    preset: &'static str,
    /// What the peer runs for this row (its fp32 `default` beside `default-int8`).
    peer_preset: &'static str,
    body_name: &'static str,
    body: Bytes,
    concurrency: usize,
    warmup: usize,
    requests: usize,
    rounds: usize,
}

impl Row {
    /// The preset column: pandaguard's preset, and the peer's when it differs.
    fn label(&self) -> String {
        if self.preset == self.peer_preset {
            self.preset.to_string()
        } else {
            format!("{} (peer: {})", self.preset, self.peer_preset)
        }
    }

    /// The row's requests split into `rounds` nearly equal parts.
    fn round_sizes(&self) -> Vec<usize> {
        (0..self.rounds).map(|r| self.requests / self.rounds + usize::from(r < self.requests % self.rounds)).collect()
    }
}

/// Requests per row: chosen so a full run of both modes stays near 20 minutes on
/// 2 cores (`default` costs 51 model rows a request, `none` one).
fn plan(quick: bool, bodies: &[Body]) -> Vec<Row> {
    // (preset, the peer's preset, body, requests, warm-up per client)
    let table: [(&str, &str, usize, usize, usize); 5] = [
        ("none", "none", 0, 400, 3),
        ("none", "none", 1, 150, 2),
        ("fast", "fast", 0, 150, 2),
        ("default", "default", 0, 32, 1),
        ("default-int8", "default", 0, 64, 1),
    ];
    let only = std::env::var("BENCH_PRESETS").unwrap_or_default();
    let only: Vec<&str> = only.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
    // int8 rows only when named: they make pandaguard load three more models.
    let selected = |preset: &str| if only.is_empty() { !preset.ends_with("-int8") } else { only.contains(&preset) };
    let mut rows = Vec::new();
    for (preset, peer_preset, body, requests, warmup) in table.into_iter().filter(|(p, ..)| selected(p)) {
        for concurrency in CONCURRENCY {
            let (requests, warmup) = if quick {
                ((requests / 20).max(concurrency), concurrency)
            } else {
                (requests.max(2 * concurrency), (warmup * concurrency).max(4))
            };
            // Rounds of at least 2C requests (C clients stay busy most of a round), at most 4.
            let rounds = if quick { 1 } else { (requests / (2 * concurrency)).clamp(1, 4) };
            rows.push(Row {
                preset,
                peer_preset,
                body_name: bodies[body].name,
                body: bodies[body].bytes.clone(),
                concurrency,
                warmup,
                requests,
                rounds,
            });
        }
    }
    assert!(!rows.is_empty(), "BENCH_PRESETS={only:?} selects no row (presets: none, fast, default, default-int8)");
    rows
}

// ---------------------------------------------------------------- servers

struct Server {
    name: &'static str,
    child: Child,
    url: String,
    health: String,
}

impl Server {
    fn pandaguard(root: &Path, binary: &Path, out_dir: &Path, mode: &str, with_int8: bool) -> Self {
        let port = free_port();
        let mut command = Command::new(binary);
        command.args(["serve", "--config", "config/default.toml", "--bind", &format!("127.0.0.1:{port}")]);
        // The bench's own setting, not a configuration key (the server refuses unknown keys).
        command.env_remove("PANDAGUARD_BIN");
        if with_int8 {
            // The shipped config loads the fp32 models only; `default-int8` needs their
            // int8 variants too.
            command.env("PANDAGUARD_MODELS__LOAD", INT8_RUN_MODELS);
        }
        Self::spawn("pandaguard", command, root, out_dir, mode, port, "/health/ready")
    }

    /// uvicorn, one process (no --workers: the server runs in the process started
    /// here), uvloop and httptools, access log on like pandaguard's.
    fn peer(root: &Path, python: &Path, out_dir: &Path, mode: &str, cores: usize) -> Self {
        let port = free_port();
        let mut command = Command::new(python);
        command
            .args(["-m", "uvicorn", "app:app", "--app-dir", "benches/python_peer", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--loop", "uvloop", "--http", "httptools"])
            .env("PEER_THREADS", cores.to_string())
            .env("PEER_PROJECT_ROOT", root);
        Self::spawn("peer", command, root, out_dir, mode, port, "/health")
    }

    fn spawn(
        name: &'static str,
        mut command: Command,
        root: &Path,
        out_dir: &Path,
        mode: &str,
        port: u16,
        health: &str,
    ) -> Self {
        let log = out_dir.join(format!("logs/{name}-{mode}.log"));
        let file = std::fs::File::create(&log).expect("server log");
        let child = command
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let url = format!("http://127.0.0.1:{port}");
        Self { name, child, health: format!("{url}{health}"), url }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_ready(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ok = client.get(&self.health).send().await.is_ok_and(|r| r.status().is_success());
            // Our child must still be running: a port taken by someone else would
            // make it exit while another server answers.
            assert!(self.alive(), "{} exited during start-up; see target/bench/logs", self.name);
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "{} not ready after {READY_TIMEOUT:?}", self.name);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
    }

    /// One `none` request: both must answer 200 with a raw prediction.
    async fn sanity(&self, client: &reqwest::Client, body: &Bytes) -> Value {
        let response = client
            .post(format!("{}/classify?defense=none&top_k=5", self.url))
            .header(reqwest::header::CONTENT_TYPE, "image/jpeg")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "{} answered {status}: {text}", self.name);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {text}", self.name))
    }

    fn cpu_ticks(&self) -> u64 {
        proc_cpu_ticks(self.pid())
    }

    /// A `Vm*` line of /proc/PID/status, in KiB.
    fn status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// utime + stime of a whole process (all its threads), in clock ticks.
fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces:
    // state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(14) + field(15)
}

/// Busy ticks of the whole machine (all cores) from /proc/stat.
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    values.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum()
}

// ---------------------------------------------------------------- contention

/// A separate process (this executable again, with SPIN_ENV set) that keeps one core
/// busy until it is stopped or its parent goes away. It runs in a session of its own
/// (`setsid`), so with the kernel's autogroup scheduling it competes with the servers
/// as another program would, not as one more thread among theirs.
struct Spinner {
    child: Child,
    started: Instant,
    ticks_at_start: u64,
}

impl Spinner {
    fn start() -> Self {
        let exe = std::env::current_exe().expect("current exe");
        let mut command = if Path::new("/usr/bin/setsid").exists() {
            let mut setsid = Command::new("/usr/bin/setsid");
            setsid.arg(exe);
            setsid
        } else {
            Command::new(exe)
        };
        let child = command.env(SPIN_ENV, "1").stdin(Stdio::null()).spawn().expect("start the busy process");
        let ticks_at_start = proc_cpu_ticks(child.id());
        Self { child, started: Instant::now(), ticks_at_start }
    }

    /// Cores the busy process used on average.
    fn finish(mut self) -> f64 {
        let used = proc_cpu_ticks(self.child.id()) - self.ticks_at_start;
        let cores = used as f64 / clock_ticks_per_second() / self.started.elapsed().as_secs_f64();
        let _ = self.child.kill();
        let _ = self.child.wait();
        cores
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spin() -> ! {
    let parent = std::os::unix::process::parent_id();
    let started = Instant::now();
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    loop {
        for _ in 0..5_000_000 {
            x = std::hint::black_box(x ^ (x << 13) ^ (x >> 7));
        }
        // Bounded in time, and gone with the harness.
        if std::os::unix::process::parent_id() != parent || started.elapsed() > Duration::from_secs(3 * 3600) {
            std::process::exit(0);
        }
    }
}

fn clock_ticks_per_second() -> f64 {
    // USER_HZ, the unit of /proc/*/stat; 100 on every common Linux.
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

// ---------------------------------------------------------------- load

#[derive(Clone)]
struct Measurement {
    requests: usize,
    rounds: usize,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_ms_per_request: f64,
    hwm_after_warmup_kib: u64,
    hwm_end_kib: u64,
    rss_end_kib: u64,
    /// Cores used by everything but this server meanwhile (load generator included).
    other_cores: f64,
}

struct Outcome {
    latencies: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
    elapsed: Duration,
}

/// One server's figures over a row, summed over its rounds.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    requests: usize,
    errors: usize,
    first_error: Option<String>,
    elapsed: Duration,
    server_ticks: u64,
    other_ticks: u64,
    hwm_after_warmup_kib: u64,
}

impl Tally {
    fn url(server: &Server, row: &Row) -> String {
        let preset = if server.name == "peer" { row.peer_preset } else { row.preset };
        format!("{}/classify?defense={preset}&top_k=5", server.url)
    }

    /// Warm-up requests: not timed, but their errors count.
    async fn warm_up(&mut self, client: &reqwest::Client, server: &Server, row: &Row) {
        let warmup = drive(client, &Self::url(server, row), &row.body, row.concurrency, row.warmup).await;
        self.errors += warmup.errors;
        self.first_error = self.first_error.take().or(warmup.first_error);
        self.hwm_after_warmup_kib = server.status_kib("VmHWM");
    }

    async fn round(&mut self, client: &reqwest::Client, server: &Server, row: &Row, requests: usize) {
        let (cpu0, busy0) = (server.cpu_ticks(), machine_busy_ticks());
        let outcome = drive(client, &Self::url(server, row), &row.body, row.concurrency, requests).await;
        let (cpu1, busy1) = (server.cpu_ticks(), machine_busy_ticks());
        let server_ticks = cpu1.saturating_sub(cpu0);
        self.server_ticks += server_ticks;
        self.other_ticks += busy1.saturating_sub(busy0).saturating_sub(server_ticks);
        self.elapsed += outcome.elapsed;
        self.requests += requests;
        self.latencies.extend(outcome.latencies);
        self.errors += outcome.errors;
        self.first_error = self.first_error.take().or(outcome.first_error);
    }

    fn finish(mut self, server: &Server, row: &Row) -> Measurement {
        let tick = clock_ticks_per_second();
        let seconds = self.elapsed.as_secs_f64();
        self.latencies.sort();
        Measurement {
            requests: self.requests,
            rounds: row.rounds,
            ok: self.latencies.len(),
            errors: self.errors,
            first_error: self.first_error,
            seconds,
            p50_ms: percentile_ms(&self.latencies, 0.50),
            p99_ms: percentile_ms(&self.latencies, 0.99),
            cpu_ms_per_request: self.server_ticks as f64 / tick * 1000.0 / self.requests as f64,
            hwm_after_warmup_kib: self.hwm_after_warmup_kib,
            hwm_end_kib: server.status_kib("VmHWM"),
            rss_end_kib: server.status_kib("VmRSS"),
            other_cores: self.other_ticks as f64 / tick / seconds,
        }
    }
}

/// Closed loop: `concurrency` clients, each sending the next request when its answer
/// has arrived, until `total` requests have been sent.
async fn drive(client: &reqwest::Client, url: &str, body: &Bytes, concurrency: usize, total: usize) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, url, body, next) = (client.clone(), url.to_owned(), body.clone(), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0, None);
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let sent = Instant::now();
                let result = client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "image/jpeg")
                    .body(body.clone())
                    .send()
                    .await;
                let failure = match result {
                    Ok(response) => {
                        let status = response.status();
                        match response.bytes().await {
                            Ok(_) if status.is_success() => None,
                            Ok(answer) => Some(format!("{status}: {}", String::from_utf8_lossy(&answer))),
                            Err(e) => Some(format!("reading the answer: {e}")),
                        }
                    }
                    Err(e) => Some(e.to_string()),
                };
                match failure {
                    None => latencies.push(sent.elapsed()),
                    Some(message) => {
                        errors += 1;
                        first_error.get_or_insert(message);
                    }
                }
            }
            (latencies, errors, first_error)
        }));
    }
    let mut outcome =
        Outcome { latencies: Vec::with_capacity(total), errors: 0, first_error: None, elapsed: Duration::ZERO };
    for task in tasks {
        let (latencies, errors, first_error) = task.await.expect("client task");
        outcome.latencies.extend(latencies);
        outcome.errors += errors;
        outcome.first_error = outcome.first_error.or(first_error);
    }
    outcome.elapsed = started.elapsed();
    outcome
}

/// Nearest rank.
fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------- report

struct Machine {
    cores: usize,
    cpu: String,
    commit: String,
    /// PANDAGUARD_* and PEER_* variables the servers inherit (configuration overrides).
    overrides: Vec<String>,
}

impl Machine {
    fn describe(root: &Path) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_owned()))
            .unwrap_or_else(|| "unknown CPU".into());
        let git = |args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(root)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        let mut commit = git(&["rev-parse", "--short", "HEAD"]);
        if !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty() {
            commit.push_str(" (modified)");
        }
        let mut overrides: Vec<String> = std::env::vars()
            .filter(|(k, _)| {
                (k.starts_with("PANDAGUARD_") && k != SPIN_ENV && k != "PANDAGUARD_BIN") || k.starts_with("PEER_")
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        overrides.sort();
        Self { cores, cpu, commit, overrides }
    }
}

fn mib(kib: u64) -> u64 {
    kib.div_ceil(1024)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

/// A figure for the table; "–" when there is none (no request succeeded).
fn num(value: f64, decimals: usize) -> String {
    if value.is_finite() { format!("{value:.decimals$}") } else { "–".into() }
}

fn row_line(row: &Row, pg: &Measurement, peer: &Measurement) -> String {
    format!(
        "{:<8} {:<9} C={:<2} n={:<3}  req/s {:>7.2} vs {:>7.2} (x{:.2})  p50 {:>7.1} vs {:>7.1} ms  \
         CPU/req {:>7.1} vs {:>7.1} ms (x{:.2})  errors {}/{}",
        row.label(),
        row.body_name,
        row.concurrency,
        row.requests,
        pg.ok as f64 / pg.seconds,
        peer.ok as f64 / peer.seconds,
        ratio(pg.ok as f64 / pg.seconds, peer.ok as f64 / peer.seconds),
        pg.p50_ms,
        peer.p50_ms,
        pg.cpu_ms_per_request,
        peer.cpu_ms_per_request,
        ratio(pg.cpu_ms_per_request, peer.cpu_ms_per_request),
        pg.errors,
        peer.errors,
    )
}

struct Report<'a> {
    mode: &'a str,
    quick: bool,
    machine: &'a Machine,
    results: &'a [(Row, Measurement, Measurement)],
    start_hwm: Vec<u64>,
    end_hwm: Vec<u64>,
    spin: Option<f64>,
    elapsed: Duration,
}

impl Report<'_> {
    fn markdown(&self) -> String {
        let m = self.machine;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## HTTP load: pandaguard vs Python peer, {} mode{}\n",
            self.mode,
            if self.quick { " (BENCH_QUICK: few requests, figures are not stable)" } else { "" }
        );
        let _ = writeln!(
            s,
            "{} cores ({}), pandaguard at {}; run took {:.0} s.",
            m.cores,
            m.cpu,
            m.commit,
            self.elapsed.as_secs_f64()
        );
        if !m.overrides.is_empty() {
            let _ = writeln!(s, "Not the defaults: the servers inherited {}.", m.overrides.join(" "));
        }
        if let Some(cores) = self.spin {
            let _ = writeln!(s, "A separate busy process used {cores:.2} cores on average during the run.");
        }
        let _ = writeln!(
            s,
            "Closed loop, C clients; pg = pandaguard (release), peer = FastAPI + onnxruntime (benches/python_peer). \
             req/s ratio = pg / peer (> 1: pandaguard serves more); CPU ratio = pg / peer server CPU per request \
             (< 1: pandaguard is cheaper). n = requests per server, in r rounds that alternate between the two \
             servers; p99 is the nearest rank over them. other = cores used by everything else meanwhile (load \
             generator and busy process included), pg/peer; ! = the two differ by {NOISY_CORES} cores or more, so load \
             from elsewhere fell more on one server than on the other.\n"
        );
        s.push_str(
            "| preset | body | C | n | req/s pg | req/s peer | **req/s ratio** | p50 ms pg | p50 ms peer | p99 ms pg | \
             p99 ms peer | CPU ms/req pg | CPU ms/req peer | **CPU ratio** | errors pg/peer | other pg/peer |\n",
        );
        s.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for (row, pg, peer) in self.results {
            let (rps_pg, rps_peer) = (pg.ok as f64 / pg.seconds, peer.ok as f64 / peer.seconds);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} ({}r) | {:.2} | {:.2} | **{}** | {} | {} | {} | {} | {:.1} | {:.1} | **{}** | \
                 {}/{} | {:.2}/{:.2}{} |",
                row.label(),
                row.body_name,
                row.concurrency,
                row.requests,
                row.rounds,
                rps_pg,
                rps_peer,
                num(ratio(rps_pg, rps_peer), 2),
                num(pg.p50_ms, 1),
                num(peer.p50_ms, 1),
                num(pg.p99_ms, 1),
                num(peer.p99_ms, 1),
                pg.cpu_ms_per_request,
                peer.cpu_ms_per_request,
                num(ratio(pg.cpu_ms_per_request, peer.cpu_ms_per_request), 2),
                pg.errors,
                peer.errors,
                pg.other_cores,
                peer.other_cores,
                if (pg.other_cores - peer.other_cores).abs() >= NOISY_CORES { " !" } else { "" },
            );
        }
        let _ = writeln!(
            s,
            "\nPeak RSS (VmHWM, MiB): after start-up pg {} / peer {}; at the end of the run pg {} / peer {}.\n",
            mib(self.start_hwm[0]),
            mib(self.start_hwm[1]),
            mib(self.end_hwm[0]),
            mib(self.end_hwm[1])
        );
        s.push_str(
            "| preset | body | C | pg HWM after warm-up | pg HWM at end | peer HWM after warm-up | peer HWM at end |\n",
        );
        s.push_str("|---|---|--:|--:|--:|--:|--:|\n");
        for (row, pg, peer) in self.results {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                row.label(),
                row.body_name,
                row.concurrency,
                mib(pg.hwm_after_warmup_kib),
                mib(pg.hwm_end_kib),
                mib(peer.hwm_after_warmup_kib),
                mib(peer.hwm_end_kib)
            );
        }
        let errors: Vec<String> = self
            .results
            .iter()
            .flat_map(|(row, pg, peer)| {
                [("pandaguard", pg), ("peer", peer)].into_iter().filter_map(move |(name, m)| {
                    m.first_error.as_ref().map(|e| {
                        format!(
                            "- {name}, {} {} C={}: {} errors, first: {}",
                            row.label(),
                            row.body_name,
                            row.concurrency,
                            m.errors,
                            e
                        )
                    })
                })
            })
            .collect();
        if !errors.is_empty() {
            let _ = writeln!(s, "\nErrors:\n{}", errors.join("\n"));
        }
        s
    }

    fn json(&self) -> Value {
        let measurement = |m: &Measurement| {
            json!({
                "requests": m.requests, "rounds": m.rounds, "ok": m.ok, "errors": m.errors, "first_error": m.first_error,
                "seconds": m.seconds, "req_per_s": m.ok as f64 / m.seconds,
                "p50_ms": m.p50_ms, "p99_ms": m.p99_ms, "cpu_ms_per_request": m.cpu_ms_per_request,
                "vm_hwm_after_warmup_kib": m.hwm_after_warmup_kib, "vm_hwm_end_kib": m.hwm_end_kib,
                "vm_rss_end_kib": m.rss_end_kib, "other_cores": m.other_cores,
            })
        };
        let rows: Vec<Value> = self
            .results
            .iter()
            .map(|(row, pg, peer)| {
                json!({
                    "preset": row.preset, "peer_preset": row.peer_preset, "body": row.body_name, "concurrency": row.concurrency,
                    "warmup_requests": row.warmup, "requests": row.requests,
                    "pandaguard": measurement(pg), "peer": measurement(peer),
                    "req_per_s_ratio": ratio(pg.ok as f64 / pg.seconds, peer.ok as f64 / peer.seconds),
                    "cpu_ratio": ratio(pg.cpu_ms_per_request, peer.cpu_ms_per_request),
                })
            })
            .collect();
        json!({
            "mode": self.mode, "quick": self.quick,
            "machine": {"cores": self.machine.cores, "cpu": self.machine.cpu},
            "environment_overrides": self.machine.overrides,
            "commit": self.machine.commit,
            "busy_process_cores": self.spin,
            "seconds": self.elapsed.as_secs_f64(),
            "vm_hwm_kib": {
                "after_startup": {"pandaguard": self.start_hwm[0], "peer": self.start_hwm[1]},
                "end": {"pandaguard": self.end_hwm[0], "peer": self.end_hwm[1]},
            },
            "rows": rows,
        })
    }
}

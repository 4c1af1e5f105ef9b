//! One typed configuration: `config/default.toml`, then `PANDAGUARD_*` environment
//! variables (nested keys joined by `__`, e.g. `PANDAGUARD_ENGINE__MAX_BATCH_ROWS=16`),
//! then command-line flags. Everything is validated once at start-up so a bad value
//! stops the process with a clear message instead of surfacing on the first request.
//!
//! Owns: the configuration types, their defaults and validation. Must not import:
//! `http`, the pipeline, the engine (the defenses' presets and limits are checked
//! through their own `defense::settings` types).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::defense::{DefenseConfig, Defenses};
use crate::detect::{Action, FingerprintParams, StoreLimits};

/// Environment variables with the `PANDAGUARD_` prefix that are not configuration keys.
const NON_CONFIG_ENV: &[&str] = &["config", "log", "api_keys_file"];

/// Names a file of API keys (one per line); overrides `server.api_keys_file`.
pub const API_KEYS_FILE_ENV: &str = "PANDAGUARD_API_KEYS_FILE";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub runtime: RuntimeConfig,
    pub engine: EngineConfig,
    pub image: ImageConfig,
    pub models: ModelsConfig,
    pub classify: ClassifyConfig,
    pub defense: DefenseConfig,
    pub page: PageConfig,
    pub explore: ExploreConfig,
    pub attack_detection: AttackDetectionConfig,
}

/// The web page at `/` and the sample photos it offers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PageConfig {
    /// Serve the page at `/` (the API works without it).
    pub enabled: bool,
    /// A folder of labelled photos (`labels.csv`: file,class_id,label) offered by
    /// `/samples`; missing or empty = no samples.
    pub samples_dir: Option<PathBuf>,
}

impl Default for PageConfig {
    fn default() -> Self {
        Self { enabled: true, samples_dir: Some(PathBuf::from("testdata/imagenet")) }
    }
}

/// Decision maps (`POST /explore`): a grid of images around one, each classified by the
/// raw model and the defended pipeline. Costly, so off unless enabled, and bounded.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExploreConfig {
    pub enabled: bool,
    /// Cells per side, at most.
    pub max_grid: usize,
    pub default_grid: usize,
    /// Model rows one map may run (cells x rows per cell, plus the attack's queries).
    pub max_rows: usize,
    /// Maps computed at once; one more is answered 503.
    pub max_concurrent: usize,
    /// Cells classified at once (each is admitted like a `/classify` request).
    pub cell_concurrency: usize,
    /// Queries of the short attack that finds an adversarial direction when none is given.
    pub attack_queries: usize,
    /// The whole map must finish within this.
    pub timeout_ms: u64,
}

impl Default for ExploreConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_grid: 41,
            default_grid: 21,
            max_rows: 20_000,
            max_concurrent: 1,
            cell_concurrency: 32,
            attack_queries: 300,
            timeout_ms: 180_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the HTTP server listens on.
    pub bind: String,
    /// Largest accepted request body. Replaces axum's silent 2 MB default.
    pub max_body_bytes: usize,
    /// Deadline of one request from arrival to answer; past it the client gets 504.
    pub request_timeout_ms: u64,
    /// `Retry-After` sent with 503 answers.
    pub retry_after_seconds: u64,
    /// `json` (one object per line, for log shippers) or `text`.
    pub log_format: String,
    /// After SIGTERM/SIGINT: readiness turns 503 at once, serving goes on this long
    /// so the load balancer stops sending traffic before connections are refused.
    pub drain_delay_ms: u64,
    /// Then: how long in-flight requests may take to finish before the process exits.
    pub shutdown_timeout_ms: u64,
    /// A connection must send a request's headers within this long (a slow-header
    /// client is cut off); it also bounds an idle keep-alive connection's wait for its
    /// next request.
    pub header_timeout_ms: u64,
    /// A header a load balancer sets to when it first passed the request on (nginx:
    /// `proxy_set_header X-Request-Start "t=${msec}"`): the time since then counts
    /// against `request_timeout_ms`, so a request retried on this replica after
    /// another one refused it late gets only what is left of its deadline, not a fresh
    /// one. Clock skew between the hosts shifts the deadline by the skew. Empty = off.
    pub request_start_header: String,
    /// Open connections at most; one more is answered 503 and closed. The open-file
    /// limit is raised to fit at start-up.
    pub max_connections: usize,
    /// After an early answer (413, 401, 503 ...), the unread rest of the body is read
    /// and discarded, at most this many bytes and for this long, so a client that sends
    /// its whole body first can read the answer (nginx's lingering close).
    pub linger_max_bytes: u64,
    pub linger_ms: u64,
    /// Keys accepted as `Authorization: Bearer <key>` on every route except health,
    /// `/metrics`, `/openapi.json` and `/docs`. No keys here and no key file = no
    /// authentication.
    pub api_keys: Vec<ApiKey>,
    /// A file of keys, one per line (blank lines and `#` comments ignored), added to
    /// `api_keys`. The environment variable `PANDAGUARD_API_KEYS_FILE` overrides it.
    /// Read at start-up: an unreadable file, or one without keys, stops the process.
    pub api_keys_file: Option<PathBuf>,
}

/// An API key. Its `Debug` form is redacted so that printing the configuration
/// (or an error holding it) never writes a key to a log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Path of `libonnxruntime.so.*`. When unset: `ORT_DYLIB_PATH`, then the project's `.venv`.
    pub ort_dylib_path: Option<PathBuf>,
    /// Threads of the process-wide ONNX Runtime intra-op pool; 0 = available cores.
    pub intra_op_threads: usize,
    pub inter_op_threads: usize,
    /// Let idle ORT threads spin briefly before sleeping (ONNX Runtime's own default
    /// is on). Off here: spinning threads burn the cores that decoding, views and other
    /// processes need, and under contention pandaguard fell to 0.4–0.8× a Python
    /// service's throughput with it on (docs/benchmarks.md).
    pub spin: bool,
    /// Keep freed activation buffers in ONNX Runtime's CPU arena for the next run. Off:
    /// every run allocates from, and returns to, the system allocator (see
    /// docs/benchmarks.md "Memory").
    pub cpu_arena: bool,
    /// glibc only: allocations of at least this many bytes get their own mapping, given
    /// back to the system when freed (0 = glibc's adaptive default); see `runtime.rs`.
    pub malloc_mmap_threshold: usize,
    /// One CPU arena for every session instead of one each (runs take turns, so one
    /// arena sized by the largest single run is enough); see `runtime.rs`.
    pub shared_arena: bool,
    /// ONNX Runtime's memory-pattern planning (buffers pre-planned per input shape). Off:
    /// with dynamic batch sizes it keeps plans per shape and grows memory, for no
    /// measurable speed here (docs/benchmarks.md).
    pub memory_pattern: bool,
    /// `Session::run` calls in flight at once across all models (they share one
    /// thread pool; 1 = take turns, each run gets every core).
    pub max_concurrent_runs: usize,
    /// Runs of at most this many rows count as half a run above: two of them (of
    /// different models) share a turn, since a row or two splits poorly across the
    /// pool's threads (`fast`: one row per model). 0 = every run takes a full turn.
    pub small_run_rows: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Most rows (model inputs) in one `Session::run`.
    pub max_batch_rows: usize,
    /// How long a batch may wait for more rows after its oldest row arrived. With 0,
    /// rows that queue while a batch runs form the next batch (no added latency).
    pub max_wait_ms: u64,
    /// Rows admitted and not yet run, per model. Past this, requests get 503 at once.
    pub queue_capacity_rows: usize,
    /// Most rows one request may submit to one model.
    pub max_rows_per_request: usize,
    /// Run a full batch through each model before reporting ready.
    pub warmup: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    pub max_width: u32,
    pub max_height: u32,
    /// Width × height, checked from the header before any pixel is decoded.
    pub max_pixels: u64,
    /// Upper bound on what the decoder may allocate (`image::Limits::max_alloc`).
    pub max_alloc_bytes: u64,
    /// Decodes running at once (each may hold a full-size bitmap); 0 = 2 × cores.
    pub max_concurrent_decodes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// Folder holding the model cards (`<name>.toml`), ONNX files and label lists.
    pub dir: PathBuf,
    /// Models loaded at start-up; readiness waits for all of them.
    pub load: Vec<String>,
    /// Model used when a request names none.
    pub default: String,
    /// Refuse a model file whose sha256 differs from its card.
    pub verify_sha256: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifyConfig {
    pub default_top_k: usize,
    pub max_top_k: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: "0.0.0.0:8080".into(),
            max_body_bytes: 20 * 1024 * 1024,
            request_timeout_ms: 10_000,
            retry_after_seconds: 1,
            log_format: "json".into(),
            drain_delay_ms: 5_000,
            shutdown_timeout_ms: 30_000,
            header_timeout_ms: 10_000,
            request_start_header: "x-request-start".into(),
            max_connections: 4096,
            linger_max_bytes: 64 * 1024 * 1024,
            linger_ms: 10_000,
            api_keys: Vec::new(),
            api_keys_file: None,
        }
    }
}

impl ServerConfig {
    /// Every accepted API key: `api_keys` plus the lines of `api_keys_file`. An empty
    /// list means authentication is off. Errors name the file or the key's position,
    /// never the key itself.
    pub fn load_api_keys(&self) -> Result<Vec<ApiKey>, String> {
        let mut keys = Vec::new();
        for (index, key) in self.api_keys.iter().enumerate() {
            check_key(key.expose()).map_err(|why| format!("server.api_keys[{index}] {why}"))?;
            keys.push(key.clone());
        }
        if let Some(path) = &self.api_keys_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("server.api_keys_file: cannot read {}: {e}", path.display()))?;
            let mut found = 0;
            for (number, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                check_key(line).map_err(|why| format!("{} line {}: the key {why}", path.display(), number + 1))?;
                keys.push(ApiKey::new(line));
                found += 1;
            }
            if found == 0 {
                return Err(format!("server.api_keys_file: {} holds no keys", path.display()));
            }
        }
        Ok(keys)
    }
}

/// A key must be sendable as a bearer token: visible ASCII, no spaces.
fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("is empty");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be visible ASCII without spaces");
    }
    Ok(())
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            ort_dylib_path: None,
            intra_op_threads: 0,
            inter_op_threads: 1,
            spin: false,
            cpu_arena: true,
            malloc_mmap_threshold: 0,
            shared_arena: true,
            memory_pattern: false,
            max_concurrent_runs: 1,
            small_run_rows: 4,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_batch_rows: 16, max_wait_ms: 0, queue_capacity_rows: 512, max_rows_per_request: 256, warmup: true }
    }
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            max_width: 16_384,
            max_height: 16_384,
            max_pixels: 40_000_000,
            max_alloc_bytes: 512 * 1024 * 1024,
            max_concurrent_decodes: 0,
        }
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("models"),
            load: vec!["efficientnet-lite0".into(), "efficientnet-lite1".into(), "efficientnet-lite2".into()],
            default: "efficientnet-lite0".into(),
            verify_sha256: true,
        }
    }
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        Self { default_top_k: 5, max_top_k: 20 }
    }
}

/// Stateful detection of black-box query attacks (`src/detect/`, README "Stopping
/// query attacks").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttackDetectionConfig {
    /// `off`, `flag` (report in the answer), `refuse` (429 and a cooldown) or
    /// `degrade` (labels without scores).
    pub action: Action,
    /// `memory` (this replica) or `redis://host:port[/db]` (shared by replicas).
    pub store: String,
    /// How long a client's queries are remembered.
    pub window_seconds: u64,
    /// A client's queries remembered at most (the oldest go first).
    pub max_queries_per_client: usize,
    /// Clients remembered at most by the memory store (the least recently seen go first).
    pub max_clients: usize,
    /// Hashes per fingerprint (Blacklight's N).
    pub hashes: usize,
    /// Hashes two queries must share to count as alike (re-encodes and resizes of one
    /// photo often are; unrelated photos share at most a few).
    pub match_threshold: usize,
    /// A query alike to this many earlier queries of the client is an attack.
    pub alike_queries: usize,
    /// Hashes two queries must share to count as nearly identical (what an attack's
    /// small steps and probes are; realistic edits of a photo rarely are).
    pub close_match_threshold: usize,
    /// A query nearly identical to this many earlier queries of the client is an attack.
    pub close_queries: usize,
    /// Width of a pixel quantisation bucket, in 8-bit levels.
    pub quantization: u8,
    /// Quantised values per hashed window, and the step between windows.
    pub window_size: usize,
    pub window_stride: usize,
    /// A window is hashed only when this many of its values differ from the same
    /// channel one pixel earlier: uniformly coloured regions, common to unrelated
    /// photos, are left out.
    pub window_min_changes: usize,
    /// Under `refuse`: how long a detected client is refused.
    pub cooldown_seconds: u64,
    /// Longest wait for Redis (connect, send, answer) before the local store answers.
    pub redis_timeout_ms: u64,
    /// Proxies (addresses or CIDR networks) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
    /// Key of the fingerprints and client digests; the same on every replica. Unset: a
    /// random key per process. Set it through `PANDAGUARD_ATTACK_DETECTION__SECRET`.
    pub secret: Option<DetectionSecret>,
}

impl Default for AttackDetectionConfig {
    fn default() -> Self {
        Self {
            action: Action::Off,
            store: "memory".into(),
            window_seconds: 1800,
            max_queries_per_client: 100,
            max_clients: 1000,
            hashes: 50,
            match_threshold: 15,
            alike_queries: 8,
            close_match_threshold: 40,
            close_queries: 3,
            quantization: 50,
            window_size: 20,
            window_stride: 1,
            window_min_changes: 9,
            cooldown_seconds: 60,
            redis_timeout_ms: 25,
            trusted_proxies: Vec::new(),
            secret: None,
        }
    }
}

impl AttackDetectionConfig {
    pub fn fingerprint_params(&self) -> FingerprintParams {
        FingerprintParams {
            quantization: self.quantization,
            window: self.window_size,
            stride: self.window_stride,
            hashes: self.hashes,
            min_changes: self.window_min_changes,
        }
    }

    pub fn store_limits(&self) -> StoreLimits {
        StoreLimits {
            window: Duration::from_secs(self.window_seconds),
            max_queries_per_client: self.max_queries_per_client,
            max_clients: self.max_clients,
        }
    }

    /// The trusted proxies as networks (`validate` has checked they parse).
    pub fn trusted_networks(&self) -> Vec<Network> {
        self.trusted_proxies.iter().filter_map(|p| Network::parse(p)).collect()
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, message: String| {
            if !ok {
                problems.push(message);
            }
        };
        // Parsing the URL does not connect: a Redis that is down at start-up is a
        // fallback at run time, not a configuration error.
        check(
            self.store == "memory"
                || (self.store.starts_with("redis://") && redis::Client::open(self.store.as_str()).is_ok()),
            format!("attack_detection.store = {:?} must be \"memory\" or a redis:// URL", self.store),
        );
        check(self.window_seconds >= 1, "attack_detection.window_seconds must be at least 1".into());
        check(self.max_queries_per_client >= 1, "attack_detection.max_queries_per_client must be at least 1".into());
        check(self.max_clients >= 1, "attack_detection.max_clients must be at least 1".into());
        check((1..=1024).contains(&self.hashes), "attack_detection.hashes must be between 1 and 1024".into());
        check(
            (1..=self.hashes).contains(&self.match_threshold),
            "attack_detection.match_threshold must be between 1 and attack_detection.hashes".into(),
        );
        // (Only once match_threshold itself is valid: one mistake, one message.)
        check(
            !(1..=self.hashes).contains(&self.match_threshold)
                || (self.match_threshold..=self.hashes).contains(&self.close_match_threshold),
            "attack_detection.close_match_threshold must be between match_threshold and hashes".into(),
        );
        check(self.alike_queries >= 1, "attack_detection.alike_queries must be at least 1".into());
        check(self.close_queries >= 1, "attack_detection.close_queries must be at least 1".into());
        check(self.quantization >= 1, "attack_detection.quantization must be at least 1".into());
        check(self.window_size >= 1, "attack_detection.window_size must be at least 1".into());
        check(self.window_stride >= 1, "attack_detection.window_stride must be at least 1".into());
        check(
            self.window_min_changes <= self.window_size,
            "attack_detection.window_min_changes must be at most attack_detection.window_size".into(),
        );
        check(self.redis_timeout_ms >= 1, "attack_detection.redis_timeout_ms must be at least 1".into());
        for proxy in &self.trusted_proxies {
            check(
                Network::parse(proxy).is_some(),
                format!("attack_detection.trusted_proxies: {proxy:?} is not an address or a CIDR network"),
            );
        }
        check(
            self.secret.as_ref().is_none_or(|s| s.expose().len() >= 16),
            "attack_detection.secret must be at least 16 characters (or unset)".into(),
        );
        problems
    }
}

/// The key of attack detection's fingerprints; redacted in `Debug`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DetectionSecret(String);

impl DetectionSecret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DetectionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DetectionSecret(<redacted>)")
    }
}

/// An address or a CIDR network (`10.0.0.0/8`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(text: &str) -> Option<Network> {
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address.parse::<IpAddr>().ok()?, Some(prefix.parse::<u8>().ok()?)),
            None => (text.trim().parse::<IpAddr>().ok()?, None),
        };
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        (prefix <= bits).then_some(Network { address, prefix })
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        // An IPv4 peer may arrive as an IPv4-mapped IPv6 address on a dual-stack socket.
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
            v4 => v4,
        };
        match (self.address, address) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Values given on the command line; they override the file and the environment.
#[derive(Debug, Default, Serialize)]
pub struct CliOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerOverrides>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<ModelOverrides>,
}

#[derive(Debug, Default, Serialize)]
pub struct ServerOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct ModelOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

impl Config {
    /// Loads defaults ← `file` ← `PANDAGUARD_*` ← CLI, then validates.
    pub fn load(file: Option<&Path>, cli: &CliOverrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::MissingFile(path.to_path_buf()));
            }
            figment = figment.merge(Toml::file(path));
        }
        let config: Config = figment
            .merge(Env::prefixed("PANDAGUARD_").ignore(NON_CONFIG_ENV).split("__"))
            .merge(Serialized::defaults(cli))
            .extract::<Config>()
            .map_err(Box::new)?;
        let mut config = config;
        if let Some(path) = std::env::var_os(API_KEYS_FILE_ENV).filter(|p| !p.is_empty()) {
            config.server.api_keys_file = Some(PathBuf::from(path));
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, message: String| {
            if !ok {
                problems.push(message);
            }
        };
        check(
            self.server.bind.parse::<SocketAddr>().is_ok(),
            format!("server.bind = {:?} is not an address like 0.0.0.0:8080", self.server.bind),
        );
        check(self.server.max_body_bytes >= 1024, "server.max_body_bytes must be at least 1024".into());
        check(
            matches!(self.server.log_format.as_str(), "json" | "text"),
            format!("server.log_format = {:?} must be json or text", self.server.log_format),
        );
        check(self.server.request_timeout_ms > 0, "server.request_timeout_ms must be positive".into());
        check(self.server.header_timeout_ms > 0, "server.header_timeout_ms must be positive".into());
        check(
            self.server.request_start_header.is_empty()
                || axum::http::HeaderName::from_bytes(self.server.request_start_header.as_bytes()).is_ok(),
            format!("server.request_start_header {:?} is not a header name", self.server.request_start_header),
        );
        check(self.server.max_connections >= 1, "server.max_connections must be at least 1".into());
        let keys = self.server.load_api_keys();
        check(keys.is_ok(), keys.err().unwrap_or_default());
        // glibc refuses thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
        check(
            self.runtime.malloc_mmap_threshold <= 32 << 20,
            "runtime.malloc_mmap_threshold must be at most 33554432 (32 MiB; 0 = glibc's default)".into(),
        );
        let engine = &self.engine;
        check(engine.max_batch_rows >= 1, "engine.max_batch_rows must be at least 1".into());
        check(engine.max_rows_per_request >= 1, "engine.max_rows_per_request must be at least 1".into());
        check(
            engine.queue_capacity_rows >= engine.max_rows_per_request,
            format!(
                "engine.queue_capacity_rows ({}) must be at least engine.max_rows_per_request ({}), \
                 or the largest allowed request could never be admitted",
                engine.queue_capacity_rows, engine.max_rows_per_request
            ),
        );
        check(
            self.image.max_width >= 1 && self.image.max_height >= 1 && self.image.max_pixels >= 1,
            "image.max_width, max_height and max_pixels must be positive".into(),
        );
        let explore = &self.explore;
        check(
            explore.max_grid >= 3 && (3..=explore.max_grid).contains(&explore.default_grid),
            "explore.max_grid must be at least 3 and explore.default_grid within 3..=max_grid".into(),
        );
        check(
            explore.max_concurrent >= 1 && explore.cell_concurrency >= 1 && explore.timeout_ms > 0,
            "explore.max_concurrent, cell_concurrency and timeout_ms must be positive".into(),
        );
        check(!self.models.load.is_empty(), "models.load must name at least one model".into());
        check(
            self.models.load.contains(&self.models.default),
            format!("models.default = {:?} is not in models.load {:?}", self.models.default, self.models.load),
        );
        check(
            (1..=self.classify.max_top_k).contains(&self.classify.default_top_k),
            "classify.default_top_k must be between 1 and classify.max_top_k".into(),
        );
        problems.extend(self.defense.problems(&self.models.load, &Defenses::standard()));
        problems.extend(self.attack_detection.problems());
        if problems.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(problems)) }
    }

    pub fn bind_addr(&self) -> SocketAddr {
        // validate() guarantees it parses; fall back to the default rather than panic.
        self.server.bind.parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 8080)))
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn shipped_default_file_parses_and_validates() {
        // Inside a jail: other tests set PANDAGUARD_* variables that Config::load reads.
        figment::Jail::expect_with(|_| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
            Config::load(Some(&path), &CliOverrides::default()).map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn validation_lists_every_problem() {
        let mut config = Config::default();
        config.server.bind = "nowhere".into();
        config.engine.max_batch_rows = 0;
        config.models.default = "missing".into();
        let ConfigError::Invalid(problems) = config.validate().unwrap_err() else { panic!() };
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn environment_and_cli_override_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[engine]\nmax_batch_rows = 8\n[server]\nbind = \"127.0.0.1:1\"\n")?;
            jail.set_env("PANDAGUARD_ENGINE__MAX_WAIT_MS", "7");
            jail.set_env("PANDAGUARD_CONFIG", "ignored");
            let cli = CliOverrides { server: Some(ServerOverrides { bind: Some("127.0.0.1:9".into()) }), models: None };
            let config = Config::load(Some(Path::new("c.toml")), &cli).map_err(|e| e.to_string())?;
            assert_eq!(config.engine.max_batch_rows, 8);
            assert_eq!(config.engine.max_wait_ms, 7);
            assert_eq!(config.server.bind, "127.0.0.1:9");
            Ok(())
        });
    }

    #[test]
    fn api_keys_come_from_the_config_and_a_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("keys.txt", "# service keys\n\n  first-key  \nsecond-key\n# retired: old-key\n")?;
            jail.create_file("c.toml", "[server]\napi_keys = [\"inline-key\"]\napi_keys_file = \"keys.txt\"\n")?;
            let config =
                Config::load(Some(Path::new("c.toml")), &CliOverrides::default()).map_err(|e| e.to_string())?;
            let keys = config.server.load_api_keys().map_err(|e| e.to_string())?;
            let keys: Vec<&str> = keys.iter().map(ApiKey::expose).collect();
            assert_eq!(keys, ["inline-key", "first-key", "second-key"]);
            assert!(!format!("{config:?}").contains("inline-key"), "Debug must redact keys");
            Ok(())
        });
    }

    #[test]
    fn the_environment_variable_names_the_key_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("env-keys.txt", "from-env\n")?;
            jail.set_env(API_KEYS_FILE_ENV, "env-keys.txt");
            let config = Config::load(None, &CliOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.server.api_keys_file.as_deref(), Some(Path::new("env-keys.txt")));
            let keys = config.server.load_api_keys().map_err(|e| e.to_string())?;
            assert_eq!(keys, [ApiKey::new("from-env")]);
            // An unreadable or empty key file stops start-up.
            jail.set_env(API_KEYS_FILE_ENV, "missing.txt");
            let err = Config::load(None, &CliOverrides::default()).unwrap_err().to_string();
            assert!(err.contains("missing.txt"), "{err}");
            jail.create_file("empty.txt", "# nothing yet\n\n")?;
            jail.set_env(API_KEYS_FILE_ENV, "empty.txt");
            let err = Config::load(None, &CliOverrides::default()).unwrap_err().to_string();
            assert!(err.contains("holds no keys"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unusable_keys_are_refused_without_echoing_them() {
        let mut config = Config::default();
        config.server.api_keys = vec![ApiKey::new("has a space")];
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("server.api_keys[0]") && !err.contains("has a space"), "{err}");
    }

    #[test]
    fn attack_detection_is_set_from_the_environment_and_checked() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PANDAGUARD_ATTACK_DETECTION__ACTION", "refuse");
            jail.set_env("PANDAGUARD_ATTACK_DETECTION__STORE", "redis://127.0.0.1:6379");
            jail.set_env("PANDAGUARD_ATTACK_DETECTION__TRUSTED_PROXIES", "[\"10.0.0.0/8\", \"::1\"]");
            let config = Config::load(None, &CliOverrides::default()).map_err(|e| e.to_string())?;
            let detection = &config.attack_detection;
            assert_eq!((detection.action, detection.store.as_str()), (Action::Refuse, "redis://127.0.0.1:6379"));
            assert_eq!(detection.trusted_networks().len(), 2);
            jail.set_env("PANDAGUARD_ATTACK_DETECTION__ACTION", "block");
            assert!(Config::load(None, &CliOverrides::default()).is_err(), "unknown action");
            Ok(())
        });
        let mut config = Config::default();
        config.attack_detection.store = "postgres://x".into();
        config.attack_detection.match_threshold = 51;
        config.attack_detection.window_min_changes = 21;
        config.attack_detection.trusted_proxies = vec!["nginx".into()];
        config.attack_detection.secret = Some(DetectionSecret::new("short"));
        let ConfigError::Invalid(problems) = config.validate().unwrap_err() else { panic!() };
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(!format!("{config:?}").contains("short"), "Debug must redact the secret");
    }

    #[test]
    fn networks_contain_their_addresses() {
        let net = Network::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()) && !net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()), "IPv4-mapped");
        assert!(Network::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
        assert_eq!(Network::parse("10.0.0.0/33"), None);
        assert_eq!(Network::parse("nginx"), None);
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[engine]\nmax_batch_row = 8\n")?;
            let err = Config::load(Some(Path::new("c.toml")), &CliOverrides::default()).unwrap_err();
            assert!(err.to_string().contains("max_batch_row"), "{err}");
            Ok(())
        });
    }
}

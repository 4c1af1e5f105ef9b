//! What every handler can reach: the config, the registered defenses, the pipeline
//! once the models are ready, the metrics handle and whether the replica is draining.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::PrometheusHandle;

use super::ApiError;
use super::auth::ApiKeys;
use crate::config::{Config, Network};
use crate::defense::Defenses;
use crate::detect::Detector;
use crate::pipeline::Pipeline;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    config: Arc<Config>,
    /// The defenses requests may name (parameters are checked before models load).
    defenses: Defenses,
    /// Set once every configured model is loaded and warmed up.
    pipeline: OnceLock<Arc<Pipeline>>,
    draining: AtomicBool,
    metrics: PrometheusHandle,
    api_keys: ApiKeys,
    /// Decision maps computed at once (`explore.max_concurrent`).
    explore_permits: Arc<tokio::sync::Semaphore>,
    /// Query-attack detection; `None` when `attack_detection.action = "off"`.
    detector: Option<Arc<Detector>>,
    /// Proxies whose `X-Forwarded-For` names the client.
    trusted_proxies: Vec<Network>,
}

impl AppState {
    /// Reads the API keys (config and key file). `Config::load` has already checked
    /// that they load; should the file have vanished since, every protected route is
    /// refused (fail closed) rather than served without authentication.
    pub fn new(config: Arc<Config>, metrics: PrometheusHandle) -> Self {
        let api_keys = match config.server.load_api_keys() {
            Ok(keys) => ApiKeys::new(&keys),
            Err(problem) => {
                tracing::error!(%problem, "API keys could not be loaded; refusing every protected request");
                ApiKeys::refuse_all()
            }
        };
        if api_keys.required() {
            tracing::info!("requests need an API key");
        }
        let draining = AtomicBool::new(false);
        let defenses = Defenses::standard();
        let explore_permits = Arc::new(tokio::sync::Semaphore::new(config.explore.max_concurrent));
        let detector = Detector::from_config(&config.attack_detection);
        let trusted_proxies = config.attack_detection.trusted_networks();
        Self(Arc::new(Inner {
            config,
            defenses,
            pipeline: OnceLock::new(),
            draining,
            metrics,
            api_keys,
            explore_permits,
            detector,
            trusted_proxies,
        }))
    }

    pub fn detector(&self) -> Option<&Arc<Detector>> {
        self.0.detector.as_ref()
    }

    pub fn trusted_proxies(&self) -> &[Network] {
        &self.0.trusted_proxies
    }

    pub fn api_keys(&self) -> &ApiKeys {
        &self.0.api_keys
    }

    pub fn config(&self) -> &Config {
        &self.0.config
    }

    pub fn defenses(&self) -> &Defenses {
        &self.0.defenses
    }

    pub fn explore_permits(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.0.explore_permits
    }

    pub fn metrics(&self) -> &PrometheusHandle {
        &self.0.metrics
    }

    pub fn set_pipeline(&self, pipeline: Arc<Pipeline>) {
        let _ = self.0.pipeline.set(pipeline);
    }

    /// The pipeline, or 503 while models are still loading.
    pub fn pipeline(&self) -> Result<&Arc<Pipeline>, ApiError> {
        self.0.pipeline.get().ok_or_else(|| ApiError::NotReady("models are still loading".into()))
    }

    pub fn start_draining(&self) {
        self.0.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Acquire)
    }

    /// Why the replica should not get traffic, or `None` when it should.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.is_draining() {
            return Some("draining: shutting down".into());
        }
        match self.0.pipeline.get() {
            None => Some("models are loading".into()),
            Some(pipeline) if !pipeline.registry().all_alive() => Some("a model engine has stopped".into()),
            Some(_) => None,
        }
    }
}

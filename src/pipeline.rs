//! One classification, start to finish: bytes → decoded image → model input row →
//! engine → probabilities → JSON answer. Used by the HTTP handler and the offline
//! CLI alike, so both give the same answer for the same image.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::api::{ClassifyResponse, Timing};
use crate::config::Config;
use crate::error::ApiError;
use crate::imaging::{DecodeLimits, ModelImage, decode, fit_to_input};
use crate::model::{LoadedModel, ModelRegistry};
use crate::params::ClassifyParams;
use crate::prediction::{predict, softmax};

pub struct Pipeline {
    config: Arc<Config>,
    registry: Arc<ModelRegistry>,
    limits: DecodeLimits,
    /// Bounds concurrent decodes: each may hold a full-resolution bitmap.
    decode_permits: Semaphore,
}

impl Pipeline {
    pub fn new(config: Arc<Config>, registry: Arc<ModelRegistry>) -> Self {
        let limits = DecodeLimits::from(&config.image);
        let permits = match config.image.max_concurrent_decodes {
            0 => 2 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        Self { config, registry, limits, decode_permits: Semaphore::new(permits) }
    }

    pub fn registry(&self) -> &Arc<ModelRegistry> {
        &self.registry
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.config.server.request_timeout_ms)
    }

    fn model(&self, name: Option<&str>) -> Result<&Arc<LoadedModel>, ApiError> {
        let name = name.unwrap_or(self.registry.default_name());
        self.registry.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.registry.names().collect();
            ApiError::invalid_parameter("model", format!("unknown model {name:?}; loaded models: {}", known.join(", ")))
        })
    }

    /// Classifies one image. `started` is when the request arrived; the deadline runs from there.
    pub async fn classify(
        &self,
        body: Bytes,
        params: &ClassifyParams,
        request_id: String,
        started: Instant,
    ) -> Result<ClassifyResponse, ApiError> {
        let deadline = started + self.request_timeout();
        let model = Arc::clone(self.model(params.model.as_deref())?);

        let permit = self
            .decode_permits
            .acquire()
            .await
            .map_err(|_| ApiError::NotReady("the server is shutting down".into()))?;
        let limits = self.limits;
        let spec = model.card.input.clone();
        let prepared = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
            let t0 = Instant::now();
            let image = decode(&body, &limits)?;
            let t1 = Instant::now();
            let fitted = fit_to_input(&image, &spec).map_err(ApiError::Internal)?;
            let row = ModelImage::from_rgb(&fitted).normalized(&spec);
            Ok((row, t1 - t0, t1.elapsed()))
        })
        .await
        .map_err(|e| ApiError::Internal(format!("preprocessing task failed: {e}")))??;
        drop(permit);
        let (row, decode_time, preprocess_time) = prepared;

        let output = model
            .engine
            .infer(row, 1, deadline)
            .await
            .map_err(|e| e.into_api(self.config.server.request_timeout_ms))?;
        let probabilities = softmax(&output.outputs);
        let raw = predict(&probabilities, &model.labels, params.top_k);

        let timing = Timing {
            decode: millis(decode_time),
            preprocess: millis(preprocess_time),
            queue: millis(output.queue_time),
            inference: millis(output.inference_time),
            total: millis(started.elapsed()),
        };
        record_stages(&timing);
        Ok(ClassifyResponse { request_id, model: model.card.name.clone(), raw, timing_ms: timing })
    }
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

fn record_stages(timing: &Timing) {
    for (stage, ms) in [
        ("decode", timing.decode),
        ("preprocess", timing.preprocess),
        ("queue", timing.queue),
        ("inference", timing.inference),
        ("total", timing.total),
    ] {
        metrics::histogram!("pandaguard_stage_seconds", "stage" => stage).record(ms / 1e3);
    }
}

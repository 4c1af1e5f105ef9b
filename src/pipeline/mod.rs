//! One classification, start to finish: bytes → decoded image → views (the raw view
//! and every defense's views, per model) → engine (all views of a model in one
//! submission) → probabilities → per-defense answers → combined defended answer →
//! JSON. Used by the HTTP handler and the offline CLI alike.

mod views;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::RgbImage;
use tokio::sync::Semaphore;

use crate::api::{ClassifyResponse, Prediction, Timing};
use crate::config::Config;
use crate::defense::report::{DefendedPrediction, DefenseReport, combine, mean_probabilities, squeeze_score};
use crate::defense::smooth::{self, CertifyReport, PredictState, Votes};
use crate::defense::{DefenseKind, DefenseSettings, blur, ensemble, saccade};
use crate::engine::EngineOutput;
use crate::error::ApiError;
use crate::imaging::{DecodeLimits, decode};
use crate::model::{LoadedModel, ModelRegistry};
use crate::params::ClassifyParams;
use crate::prediction::{predict, softmax};
use views::{ModelBatch, ViewRequest, Views};

/// Rows drawn per round when CERTIFY tops up its estimation samples.
const CERTIFY_ROUND: usize = 64;

pub struct Pipeline {
    config: Arc<Config>,
    registry: Arc<ModelRegistry>,
    limits: DecodeLimits,
    /// Bounds concurrent decodes: each may hold a full-resolution bitmap.
    decode_permits: Semaphore,
}

/// The engine's answer for one batch, as probabilities per row.
struct BatchResult {
    probabilities: Vec<Vec<f32>>,
}

/// Time and rows spent on a request, accumulated across rounds.
#[derive(Default)]
struct Cost {
    preprocess: Duration,
    views: Duration,
    queue: Duration,
    inference: Duration,
    rows: usize,
    /// (model, rows) of each engine submission.
    batches: Vec<(String, usize)>,
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

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.config.server.request_timeout_ms)
    }

    fn model(&self, name: &str, parameter: &str) -> Result<Arc<LoadedModel>, ApiError> {
        self.registry.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = self.registry.names().collect();
            ApiError::invalid_parameter(
                parameter,
                format!("unknown model {name:?}; loaded models: {}", known.join(", ")),
            )
        })
    }

    /// The ensemble's members: the `models` setting, or every loaded model. Returns
    /// (whether the raw model is a member, the other members).
    fn ensemble_members(
        &self,
        raw: &LoadedModel,
        settings: &DefenseSettings,
    ) -> Result<(bool, Vec<Arc<LoadedModel>>), ApiError> {
        if !settings.defenses.contains(&DefenseKind::Ensemble) {
            return Ok((false, Vec::new()));
        }
        let names: Vec<String> = if settings.models.is_empty() {
            self.registry.names().map(str::to_string).collect()
        } else {
            settings.models.clone()
        };
        let mut members = Vec::new();
        for name in names.iter().filter(|n| **n != raw.card.name) {
            let member = self.model(name, "models")?;
            if member.card.num_classes != raw.card.num_classes || member.card.labels != raw.card.labels {
                return Err(ApiError::invalid_parameter(
                    "models",
                    format!("{name} has other classes than {}", raw.card.name),
                ));
            }
            members.push(member);
        }
        Ok((names.contains(&raw.card.name), members))
    }

    /// Classifies one image: the raw answer and the defended one. `started` is when
    /// the request arrived; the deadline runs from there.
    pub async fn classify(
        &self,
        body: Bytes,
        params: &ClassifyParams,
        request_id: String,
        started: Instant,
    ) -> Result<ClassifyResponse, ApiError> {
        let deadline = started + self.request_timeout();
        let raw_model = self.model(params.model.as_deref().unwrap_or(self.registry.default_name()), "model")?;
        let settings = params.defense.clone();
        let (raw_in_ensemble, others) = self.ensemble_members(&raw_model, &settings)?;
        let seed = params.seed.unwrap_or_else(rand::random);
        let classes = raw_model.card.num_classes;
        let mut predict_state = PredictState::new(u64::from(settings.samples), settings.alpha, classes);

        let (image, decode_time) = self.decode(body).await?;
        let request = ViewRequest {
            settings: settings.clone(),
            seed,
            raw: Arc::clone(&raw_model),
            others,
            raw_in_ensemble,
            first_round: if settings.defenses.contains(&DefenseKind::Smooth) { predict_state.next_round() } else { 0 },
        };
        let image = Arc::new(image);
        let view_image = Arc::clone(&image);
        let Views { batches, layout, fixations, base, preprocess_time, views_time } =
            blocking(move || views::build(&view_image, &request)).await?;
        let mut cost = Cost { preprocess: preprocess_time, views: views_time, ..Cost::default() };
        let models: Vec<Arc<LoadedModel>> = batches.iter().map(|b| Arc::clone(&b.model)).collect();
        let results = self.run(batches, deadline, &mut cost).await?;
        let raw_rows = &results[0].probabilities;
        let labels = &raw_model.labels;
        let raw_probabilities = raw_rows[0].clone();
        let raw = predict(&raw_probabilities, labels, params.top_k);

        let mut reports = Vec::new();
        for kind in &settings.defenses {
            let report = match kind {
                DefenseKind::Smooth => {
                    let first = layout.smooth.clone().unwrap_or(0..0);
                    predict_state.observe(&raw_rows[first.clone()]);
                    let selection = layout.selection.clone().map(|range| &raw_rows[range]);
                    self.smooth(&raw_model, &base, &settings, seed, &mut predict_state, selection, deadline, &mut cost)
                        .await?
                }
                DefenseKind::Blur => {
                    let rows = layout.blur.clone().unwrap_or(0..0);
                    let (gaussian, median) = (&raw_rows[rows.start], &raw_rows[rows.start + 1]);
                    blur::report(gaussian, median, &settings, labels)
                }
                DefenseKind::Saccade => {
                    let crops = layout.saccade.clone().map_or(&raw_rows[0..0], |range| &raw_rows[range]);
                    saccade::report(&fixations, crops, &raw_probabilities, labels)
                }
                DefenseKind::Ensemble => {
                    // Each member: the mean over its plain view and its noisy views.
                    let mut members = Vec::new();
                    if raw_in_ensemble {
                        let noisy = layout.ensemble.clone().map_or(&raw_rows[0..0], |range| &raw_rows[range]);
                        let views =
                            std::iter::once(raw_probabilities.as_slice()).chain(noisy.iter().map(Vec::as_slice));
                        members.push(ensemble::Member {
                            model: &raw_model.card.name,
                            probabilities: mean_probabilities(views),
                            views: 1 + noisy.len(),
                        });
                    }
                    for (model, result) in models.iter().zip(&results).skip(1) {
                        let views = result.probabilities.iter().map(Vec::as_slice);
                        members.push(ensemble::Member {
                            model: &model.card.name,
                            probabilities: mean_probabilities(views),
                            views: result.probabilities.len(),
                        });
                    }
                    ensemble::report(&members, labels)
                }
            };
            reports.push(report);
        }

        let (defended, defended_probabilities, squeeze, suspicious) =
            self.judge(&raw, &raw_probabilities, &reports, labels, params.top_k);
        if suspicious {
            metrics::counter!("pandaguard_suspicious_total", "model" => raw_model.card.name.clone()).increment(1);
        }
        let timing = Timing {
            decode: millis(decode_time),
            preprocess: millis(cost.preprocess),
            views: millis(cost.views),
            queue: millis(cost.queue),
            inference: millis(cost.inference),
            total: millis(started.elapsed()),
        };
        record_stages(&timing);
        Ok(ClassifyResponse {
            request_id,
            model: raw_model.card.name.clone(),
            raw,
            defended,
            defenses: reports,
            suspicious,
            squeeze_score: squeeze,
            preset: params.preset.clone(),
            seed,
            rows: cost.rows,
            timing_ms: timing,
            batches: cost.batches,
            defended_probabilities,
        })
    }

    /// The defended answer with its full probability vector, the squeeze score and
    /// the suspicion flag.
    fn judge(
        &self,
        raw: &Prediction,
        raw_probabilities: &[f32],
        reports: &[DefenseReport],
        labels: &crate::model::Labels,
        top_k: usize,
    ) -> (DefendedPrediction, Vec<f32>, f32, bool) {
        if reports.is_empty() {
            let defended = DefendedPrediction {
                class_id: Some(raw.class_id),
                label: Some(raw.label.clone()),
                confidence: raw.confidence,
                top_k: raw.top_k.clone(),
                abstained: false,
                method: "none (raw)".into(),
            };
            return (defended, raw_probabilities.to_vec(), 0.0, false);
        }
        let (defended, probabilities) = combine(reports, labels, top_k);
        let squeeze = squeeze_score(raw_probabilities, &probabilities);
        let suspicious = defended.class_id != Some(raw.class_id) || squeeze > self.config.defense.squeeze_threshold;
        (defended, probabilities, squeeze, suspicious)
    }

    /// PREDICT's further rounds until its test settles, then CERTIFY when asked.
    #[allow(clippy::too_many_arguments)]
    async fn smooth(
        &self,
        model: &Arc<LoadedModel>,
        base: &crate::imaging::ModelImage,
        settings: &DefenseSettings,
        seed: u64,
        state: &mut PredictState,
        selection: Option<&[Vec<f32>]>,
        deadline: Instant,
        cost: &mut Cost,
    ) -> Result<DefenseReport, ApiError> {
        let noise = views::noise(settings, seed);
        while state.next_round() > 0 {
            let count = state.next_round();
            let drawn = state.votes.total();
            let rows = self.noisy_round(model, base, noise, drawn, count, deadline, cost).await?;
            state.observe(&rows);
        }
        let certificate = match selection {
            Some(selection) => {
                Some(self.certify(model, base, settings, noise, state, selection, deadline, cost).await?)
            }
            None => None,
        };
        let extra = certificate.as_ref().map_or(0, |c| c.estimation_samples.saturating_sub(state.votes.total()));
        let views = (state.votes.total() + extra) as usize + selection.map_or(0, <[_]>::len);
        Ok(smooth::report(state, certificate, settings, &model.labels, views))
    }

    /// CERTIFY: the class from the selection samples, then a Clopper–Pearson bound
    /// from `samples` estimation samples. PREDICT's samples are independent of the
    /// selection samples, so they are the first estimation samples; more are drawn
    /// in rounds, stopping early only to abstain.
    #[allow(clippy::too_many_arguments)]
    async fn certify(
        &self,
        model: &Arc<LoadedModel>,
        base: &crate::imaging::ModelImage,
        settings: &DefenseSettings,
        noise: smooth::Noise,
        state: &PredictState,
        selection: &[Vec<f32>],
        deadline: Instant,
        cost: &mut Cost,
    ) -> Result<CertifyReport, ApiError> {
        let mut selected = Votes::new(model.card.num_classes);
        selected.add_rows(selection);
        let total = u64::from(settings.samples);
        let alpha = settings.alpha;
        let sigma = f64::from(settings.sigma);
        let ((class, selection_votes), _) = selected.top_two();
        if selection_votes == 0 {
            let certificate = crate::stats::certify(sigma, 0, total, alpha);
            return Ok(certify_report(None, &model.labels, selection.len() as u64, 0, certificate));
        }
        let mut drawn = state.votes.total();
        let mut count = state.votes.count(class);
        while drawn < total && !crate::stats::certify_futile(count, drawn, total, alpha) {
            let round = (total - drawn).min(CERTIFY_ROUND as u64) as usize;
            let rows = self.noisy_round(model, base, noise, drawn, round, deadline, cost).await?;
            let mut votes = Votes::new(model.card.num_classes);
            votes.add_rows(&rows);
            count += votes.count(class);
            drawn += round as u64;
        }
        // Samples not drawn after a futile look count as votes against the class, so
        // the bound over all `total` samples stays valid (and below 0.5: abstain).
        let certificate = crate::stats::certify(sigma, count, total, alpha);
        Ok(certify_report(Some(class), &model.labels, selection.len() as u64, drawn, certificate))
    }

    /// Draws `count` noisy rows numbered from `first` and runs them.
    #[allow(clippy::too_many_arguments)]
    async fn noisy_round(
        &self,
        model: &Arc<LoadedModel>,
        base: &crate::imaging::ModelImage,
        noise: smooth::Noise,
        first: u64,
        count: usize,
        deadline: Instant,
        cost: &mut Cost,
    ) -> Result<Vec<Vec<f32>>, ApiError> {
        let (model_for_views, base) = (Arc::clone(model), base.clone());
        let started = Instant::now();
        let batch = blocking(move || Ok(views::noisy_batch(&model_for_views, &base, noise, first, count))).await?;
        cost.views += started.elapsed();
        let mut results = self.run(vec![batch], deadline, cost).await?;
        Ok(results.pop().map(|r| r.probabilities).unwrap_or_default())
    }

    /// Submits each model's rows to its engine, all models at once, and waits.
    async fn run(
        &self,
        batches: Vec<ModelBatch>,
        deadline: Instant,
        cost: &mut Cost,
    ) -> Result<Vec<BatchResult>, ApiError> {
        let timeout_ms = self.config.server.request_timeout_ms;
        let mut pending = Vec::with_capacity(batches.len());
        for batch in batches {
            cost.rows += batch.count;
            cost.batches.push((batch.model.card.name.clone(), batch.count));
            let receiver =
                batch.model.engine.submit(batch.rows, batch.count, deadline).map_err(|e| e.into_api(timeout_ms))?;
            pending.push((batch.model, receiver));
        }
        let mut results = Vec::with_capacity(pending.len());
        for (index, (model, receiver)) in pending.into_iter().enumerate() {
            let output: EngineOutput = receiver
                .await
                .map_err(|_| ApiError::NotReady(format!("the engine of model {} has stopped", model.card.name)))?
                .map_err(|e| e.into_api(timeout_ms))?;
            // Models run concurrently: the first batch's wait is the request's queue time.
            if index == 0 {
                cost.queue += output.queue_time;
            }
            cost.inference += output.inference_time;
            let classes = model.card.num_classes;
            let probabilities = output.outputs.chunks(classes).map(softmax).collect();
            results.push(BatchResult { probabilities });
        }
        Ok(results)
    }

    async fn decode(&self, body: Bytes) -> Result<(RgbImage, Duration), ApiError> {
        let _permit = self
            .decode_permits
            .acquire()
            .await
            .map_err(|_| ApiError::NotReady("the server is shutting down".into()))?;
        let limits = self.limits;
        blocking(move || {
            let started = Instant::now();
            let image = decode(&body, &limits)?;
            Ok((image, started.elapsed()))
        })
        .await
    }
}

fn certify_report(
    class: Option<usize>,
    labels: &crate::model::Labels,
    selection_samples: u64,
    estimation_samples: u64,
    certificate: crate::stats::Certificate,
) -> CertifyReport {
    CertifyReport {
        class_id: class,
        label: class.map(|c| labels.name(c).to_string()),
        selection_samples,
        estimation_samples,
        count: certificate.n_a,
        p_lower: certificate.p_lower,
        radius: certificate.radius,
        max_radius: certificate.max_radius,
        abstained: certificate.radius.is_none(),
    }
}

/// Runs CPU work on the blocking pool, off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::Internal(format!("a worker task failed: {e}")))?
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

fn record_stages(timing: &Timing) {
    for (stage, ms) in [
        ("decode", timing.decode),
        ("preprocess", timing.preprocess),
        ("views", timing.views),
        ("queue", timing.queue),
        ("inference", timing.inference),
        ("total", timing.total),
    ] {
        metrics::histogram!("pandaguard_stage_seconds", "stage" => stage).record(ms / 1e3);
    }
}

//! One classification, start to finish: bytes → decoded image → views (the raw view
//! and every defense's views, per model) → engine (all views of a model and round in
//! one submission) → probabilities → per-defense answers → combined defended answer
//! and the suspicion judgement, as an [`Outcome`]. Used by the HTTP handler, the
//! offline CLI and the red team alike.
//!
//! Owns: the order of the stages, the rounds, the request's cost. Must not import:
//! `http`/axum or `api` (the JSON answer is built from an `Outcome` in `http/`).

mod admission;
mod error;
mod outcome;
mod seed;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::RgbImage;
use tokio::sync::Semaphore;

pub use admission::Admitted;
use admission::{PrepLoad, Preparing};
pub use error::PipelineError;
pub use outcome::{Cost, Outcome};
pub use seed::SeedKey;

use crate::config::Config;
use crate::defense::views::Fitted;
use crate::defense::{
    DefenseError, DefenseOutcome, DefenseRun, Defenses, Outputs, Request, RowRange, Source, Views, combine,
    squeeze_score,
};
use crate::engine::{EngineError, Reservation};
use crate::imaging::{DecodeLimits, decode, fit_to_input};
use crate::model::{LoadedModel, ModelRegistry};
use crate::params::{ClassifyParams, ParamError, ParamProblem};

pub struct Pipeline {
    config: Arc<Config>,
    registry: Arc<ModelRegistry>,
    defenses: Defenses,
    limits: DecodeLimits,
    /// Bounds concurrent decodes: each may hold a full-resolution bitmap.
    decode_permits: Semaphore,
    /// Key of the content-derived seeds.
    seeds: Arc<SeedKey>,
    /// Admitted requests still decoding and making views (admission counts their work).
    preparing: Arc<PrepLoad>,
}

/// A defense at work on a request, with what the pipeline needs to blame it for rows.
struct Running {
    run: Box<dyn DefenseRun>,
    row_parameter: Option<&'static str>,
}

/// An admitted request with its image decoded and fitted to every model.
pub struct Prepared {
    raw: Arc<LoadedModel>,
    runs: Vec<Running>,
    reservations: Vec<(Arc<LoadedModel>, Reservation)>,
    deadline: Instant,
    preparing: Preparing,
    source: Arc<Source>,
    cost: Cost,
}

impl Prepared {
    /// The image as the raw model sees it (8-bit RGB at its input size).
    pub fn model_input(&self) -> &RgbImage {
        self.source.first()
    }

    /// The seed of the request's noise.
    pub fn seed(&self) -> u64 {
        self.source.seed
    }
}

/// A request before its image is decoded: the raw model, the defenses started, and
/// the rows the first round will submit per model.
pub struct Plan {
    raw: Arc<LoadedModel>,
    runs: Vec<Running>,
    /// Every model a view is made for (the raw model first).
    models: Vec<Arc<LoadedModel>>,
    /// Rows of the first round per model, plain views included.
    pub first_round: Vec<(Arc<LoadedModel>, usize)>,
}

impl Pipeline {
    /// A pipeline with the shipped defenses.
    pub fn new(config: Arc<Config>, registry: Arc<ModelRegistry>) -> Self {
        Self::with_defenses(config, registry, Defenses::standard())
    }

    pub fn with_defenses(config: Arc<Config>, registry: Arc<ModelRegistry>, defenses: Defenses) -> Self {
        let limits = DecodeLimits::from(&config.image);
        let permits = match config.image.max_concurrent_decodes {
            0 => 2 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        let seeds = Arc::new(SeedKey::new(config.defense.seed_secret.as_ref()));
        Self {
            config,
            registry,
            defenses,
            limits,
            decode_permits: Semaphore::new(permits),
            seeds,
            preparing: Arc::default(),
        }
    }

    pub fn registry(&self) -> &Arc<ModelRegistry> {
        &self.registry
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn defenses(&self) -> &Defenses {
        &self.defenses
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.config.server.request_timeout_ms)
    }

    /// Parses `key=value` API parameters against this pipeline's config and defenses.
    pub fn params<'a>(
        &self,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<ClassifyParams, ParamError> {
        ClassifyParams::from_pairs(pairs, &self.config, &self.defenses)
    }

    fn model(&self, name: &str, parameter: &str) -> Result<Arc<LoadedModel>, ParamError> {
        self.registry.get(name).cloned().ok_or_else(|| {
            let known = self.registry.names().map(str::to_string).collect();
            ParamError::new(parameter, ParamProblem::UnknownModel { value: name.to_string(), known })
        })
    }

    /// Starts every defense of the request and counts the rows of its first round,
    /// before anything expensive happens: an impossible request is refused here.
    pub fn plan(&self, params: &ClassifyParams) -> Result<Plan, PipelineError> {
        let raw = self.model(params.model.as_deref().unwrap_or(self.registry.default_name()), "model")?;
        let request = Request { settings: &params.defense, raw: &raw, registry: &self.registry };
        let mut runs = Vec::new();
        for name in &params.defense.defenses {
            let defense = self.defenses.get(name).ok_or_else(|| {
                let defenses = self.defenses.names().into_iter().map(String::from).collect();
                let problem = ParamProblem::UnknownDefense { value: name.clone(), presets: Vec::new(), defenses };
                ParamError::new("defense", problem)
            })?;
            let run = defense.start(&request).map_err(defense_param_error)?;
            runs.push(Running { run, row_parameter: defense.row_parameter() });
        }
        let mut models = vec![Arc::clone(&raw)];
        for running in &runs {
            for model in running.run.models() {
                if !models.iter().any(|m| Arc::ptr_eq(m, &model)) {
                    models.push(model);
                }
            }
        }
        // Plain views are shared: one per model that anyone (the raw answer first) uses.
        let mut first_round: Vec<(Arc<LoadedModel>, usize)> = vec![(Arc::clone(&raw), 1)];
        let mut add =
            |model: &Arc<LoadedModel>, rows: usize| match first_round.iter_mut().find(|(m, _)| Arc::ptr_eq(m, model)) {
                Some((_, count)) => *count += rows,
                None => first_round.push((Arc::clone(model), rows)),
            };
        for running in &runs {
            for model in running.run.plain_models().iter().filter(|m| !Arc::ptr_eq(m, &raw)) {
                add(model, 1);
            }
            for (model, rows) in running.run.next_rows() {
                add(&model, rows);
            }
        }
        let plan = Plan { raw, runs, models, first_round };
        for (model, rows) in &plan.first_round {
            self.check_rows(model, *rows, &plan.runs)?;
        }
        Ok(plan)
    }

    /// Decodes `body` under the image limits and fits it to `model`'s input: the image
    /// that model sees (the decision maps' origin).
    pub async fn model_input(&self, body: Bytes, model: &str) -> Result<RgbImage, PipelineError> {
        let model = self.model(model, "model")?;
        let (fitted, _) = self
            .decode_then(body, move |image| Ok(fit_to_input(&image, &model.card.input).map_err(DefenseError::from)?))
            .await?;
        Ok(fitted)
    }

    /// Rows the first round of a request with these parameters runs, over all models
    /// (a request's whole cost unless smoothing asks for more in later rounds).
    pub fn first_round_rows(&self, params: &ClassifyParams) -> Result<usize, PipelineError> {
        Ok(self.plan(params)?.first_round.iter().map(|(_, rows)| rows).sum())
    }

    /// A round may not submit more rows to a model than a request may take; the error
    /// names the parameter of the defense that asked for the most of them.
    fn check_rows(&self, model: &Arc<LoadedModel>, rows: usize, runs: &[Running]) -> Result<(), PipelineError> {
        let max = self.config.engine.max_rows_per_request;
        if rows <= max {
            return Ok(());
        }
        let heaviest = runs
            .iter()
            .filter_map(|r| {
                let mine = r.run.next_rows().into_iter().find(|(m, _)| Arc::ptr_eq(m, model)).map(|(_, n)| n)?;
                Some((mine, r.row_parameter?))
            })
            .max_by_key(|(mine, _)| *mine)
            .map_or("defense", |(_, parameter)| parameter);
        let problem = ParamProblem::TooManyRows { model: model.card.name.clone(), rows, max };
        Err(ParamError::new(heaviest, problem).into())
    }

    /// Classifies one image: the raw answer and the defended one. `started` is when
    /// the request arrived; the deadline runs from there. (Admits, then runs.)
    pub async fn classify(
        &self,
        body: Bytes,
        params: &ClassifyParams,
        started: Instant,
    ) -> Result<Outcome, PipelineError> {
        let admitted = self.admit(params, started + self.request_timeout())?;
        self.run(admitted, body, params, started).await
    }

    /// Runs an admitted request on its image: decode, views, rounds, combination.
    pub async fn run(
        &self,
        admitted: Admitted,
        body: Bytes,
        params: &ClassifyParams,
        started: Instant,
    ) -> Result<Outcome, PipelineError> {
        let prepared = self.prepare(admitted, body, params).await?;
        self.finish(prepared, params, started).await
    }

    /// Decodes the image and fits it to every model the request needs (and derives the
    /// seed): everything before the first view. A caller may look at the result (the
    /// raw model's input, `Prepared::model_input`) before paying for views and inference.
    pub async fn prepare(
        &self,
        mut admitted: Admitted,
        body: Bytes,
        params: &ClassifyParams,
    ) -> Result<Prepared, PipelineError> {
        let fit = self.source_fitter(&mut admitted, params);
        let ((source, preprocess_time), decode_time) = self.decode_then(body, fit).await?;
        Ok(Self::prepared(
            admitted,
            source,
            Cost { decode: decode_time, preprocess: preprocess_time, ..Cost::default() },
        ))
    }

    /// Classifies an image that is already decoded (the decision maps' cells): admits,
    /// fits, runs, like [`Pipeline::classify`] without the bytes.
    pub async fn classify_image(
        &self,
        image: RgbImage,
        params: &ClassifyParams,
        started: Instant,
    ) -> Result<Outcome, PipelineError> {
        let mut admitted = self.admit(params, started + self.request_timeout())?;
        let fit = self.source_fitter(&mut admitted, params);
        let (source, preprocess_time) = blocking(move || fit(image)).await?;
        let prepared = Self::prepared(admitted, source, Cost { preprocess: preprocess_time, ..Cost::default() });
        self.finish(prepared, params, started).await
    }

    /// What turns the decoded image into the request's [`Source`] (on the blocking
    /// pool): fits it to every model the admitted plan needs and derives the seed.
    fn source_fitter(
        &self,
        admitted: &mut Admitted,
        params: &ClassifyParams,
    ) -> impl FnOnce(RgbImage) -> Result<(Source, Duration), PipelineError> + Send + 'static {
        let models = std::mem::take(&mut admitted.plan.models);
        let (seeds, seed) = (Arc::clone(&self.seeds), params.seed);
        move |image| fit_source(image, &models, &seeds, seed)
    }

    fn prepared(admitted: Admitted, source: Source, cost: Cost) -> Prepared {
        let Admitted { plan, reservations, deadline, preparing } = admitted;
        let Plan { raw, runs, .. } = plan;
        Prepared { raw, runs, reservations, deadline, preparing, source: Arc::new(source), cost }
    }

    /// The views, the rounds through the engines, and the combination.
    pub async fn finish(
        &self,
        prepared: Prepared,
        params: &ClassifyParams,
        started: Instant,
    ) -> Result<Outcome, PipelineError> {
        let Prepared { raw, mut runs, mut reservations, deadline, preparing, source, cost, .. } = prepared;
        let mut preparing = Some(preparing);
        let mut cost = cost;
        let seed = source.seed;

        let mut raw_row: Option<RowRange> = None;
        let mut raw_probabilities = Vec::new();
        let mut first = true;
        loop {
            // The first round asks every defense (plain views are only made then);
            // later ones only those that want more rows.
            let taking: Vec<usize> =
                (0..runs.len()).filter(|&i| first || !runs[i].run.next_rows().is_empty()).collect();
            if !first && taking.is_empty() {
                break;
            }
            let round_raw = first.then(|| Arc::clone(&raw));
            let round_source = Arc::clone(&source);
            let building = taking.clone();
            let build = move || {
                let started = Instant::now();
                let mut views = Views::default();
                let raw_range = match round_raw {
                    Some(model) => Some(views.plain(&round_source, &model)?),
                    None => None,
                };
                for &index in &building {
                    runs[index].run.views(&round_source, &mut views)?;
                }
                Ok((runs, views, raw_range, started.elapsed()))
            };
            // The raw model's plain view alone (no defense) is one pass over a
            // model-sized image, tens of microseconds: less than the hand-off to the
            // blocking pool and back would cost, so it is made here.
            let (back, views, raw_range, views_time) =
                if taking.is_empty() { build()? } else { blocking(build).await? };
            runs = back;
            cost.views += views_time;
            if let Some(preparing) = preparing.take() {
                preparing.finished(cost.decode + cost.preprocess + cost.views);
            }
            if raw_range.is_some() {
                raw_row = raw_range;
            }
            let outputs = self.run_round(views, &runs, &mut reservations, deadline, &mut cost).await?;
            if let (true, Some(range)) = (first, raw_row) {
                raw_probabilities = outputs.row(range).to_vec();
            }
            for index in taking {
                runs[index].run.observe(&outputs);
            }
            first = false;
        }

        let defenses: Vec<DefenseOutcome> = runs.into_iter().map(|r| r.run.finish()).collect();
        let defended = combine(&defenses, &raw_probabilities);
        let squeeze =
            if defenses.is_empty() { 0.0 } else { squeeze_score(&raw_probabilities, &defended.probabilities) };
        let raw_class = crate::prediction::argmax(&raw_probabilities);
        let suspicious = !defenses.is_empty()
            && (defended.class_id != Some(raw_class) || squeeze > self.config.defense.squeeze_threshold);
        if suspicious {
            metrics::counter!("pandaguard_suspicious_total", "model" => raw.card.name.clone()).increment(1);
        }
        cost.total = started.elapsed();
        cost.record();
        Ok(Outcome {
            model: raw,
            raw: raw_probabilities,
            defenses,
            defended,
            squeeze_score: squeeze,
            suspicious,
            preset: params.preset.clone(),
            seed,
            cost,
        })
    }

    /// Submits each model's rows of a round to its engine, all models at once, and
    /// waits; the outputs come back as probabilities (per the model's output kind).
    async fn run_round(
        &self,
        views: Views,
        runs: &[Running],
        reservations: &mut [(Arc<LoadedModel>, Reservation)],
        deadline: Instant,
        cost: &mut Cost,
    ) -> Result<Outputs, PipelineError> {
        let batches = views.into_batches();
        for batch in &batches {
            self.check_rows(&batch.model, batch.count, runs)?;
        }
        let mut pending = Vec::with_capacity(batches.len());
        for batch in batches {
            if batch.count == 0 {
                pending.push((batch.model, None));
                continue;
            }
            cost.rows += batch.count;
            cost.batches.push((batch.model.card.name.clone(), batch.count));
            // The first round's rows were reserved at admission; later rounds queue anew.
            let engine = &batch.model.engine;
            let submitted = match reservations.iter_mut().find(|(m, _)| Arc::ptr_eq(m, &batch.model)) {
                Some((_, reservation)) => engine.submit_reserved(reservation, batch.rows, batch.count, deadline),
                None => engine.submit(batch.rows, batch.count, deadline),
            };
            let receiver = submitted.map_err(|e| self.engine_error(&batch.model.card.name, e))?;
            pending.push((batch.model, Some(receiver)));
        }
        let mut slots = Vec::with_capacity(pending.len());
        let mut first = true;
        for (model, receiver) in pending {
            let Some(receiver) = receiver else {
                slots.push(Vec::new());
                continue;
            };
            let name = &model.card.name;
            let output = receiver
                .await
                .map_err(|_| self.engine_error(name, EngineError::Stopped(name.clone())))?
                .map_err(|e| self.engine_error(name, e))?;
            // Models run concurrently: the first batch's wait is the request's queue time.
            if first {
                cost.queue += output.queue_time;
                first = false;
            }
            cost.inference += output.inference_time;
            let kind = model.card.output.kind;
            slots.push(output.outputs.chunks(model.card.num_classes).map(|row| kind.to_probabilities(row)).collect());
        }
        Ok(Outputs::new(slots))
    }

    /// Decodes `body` under the image limits and hands the image to `then`, both in one
    /// trip to the blocking pool (each hand-off between threads costs a wake-up, a
    /// visible part of a small request); also returns the decoding time.
    async fn decode_then<T: Send + 'static>(
        &self,
        body: Bytes,
        then: impl FnOnce(RgbImage) -> Result<T, PipelineError> + Send + 'static,
    ) -> Result<(T, Duration), PipelineError> {
        let _permit = self.decode_permits.acquire().await.map_err(|_| PipelineError::ShuttingDown)?;
        let limits = self.limits;
        blocking(move || {
            let started = Instant::now();
            let image = decode(&body, &limits)?;
            let decode_time = started.elapsed();
            Ok((then(image)?, decode_time))
        })
        .await
    }
}

/// Fits the image to every model and derives the request's seed (the client's, or
/// from the raw model's input): what views are made from, and the time it took.
fn fit_source(
    image: RgbImage,
    models: &[Arc<LoadedModel>],
    seeds: &SeedKey,
    seed: Option<u64>,
) -> Result<(Source, Duration), PipelineError> {
    let started = Instant::now();
    let fitted = Fitted::new(&image, models).map_err(DefenseError::from)?;
    let seed = seed.unwrap_or_else(|| seeds.seed_for(fitted.first().as_raw()));
    Ok((Source::new(image, fitted, seed), started.elapsed()))
}

/// A defense that cannot start names a model parameter the request got wrong.
fn defense_param_error(error: DefenseError) -> PipelineError {
    match error {
        DefenseError::UnknownModel { parameter, name, known } => {
            ParamError::new(parameter, ParamProblem::UnknownModel { value: name, known }).into()
        }
        DefenseError::IncompatibleModel { parameter, name, raw } => {
            ParamError::new(parameter, ParamProblem::IncompatibleModel { value: name, raw }).into()
        }
        DefenseError::NoMembers { precision, loaded } => {
            ParamError::new("defense", ParamProblem::NoModelsOfPrecision { precision: precision.to_string(), loaded })
                .into()
        }
        other => PipelineError::Defense(other),
    }
}

/// Runs CPU work on the blocking pool, off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, PipelineError> + Send + 'static,
) -> Result<T, PipelineError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| PipelineError::Worker(e.to_string()))?
}

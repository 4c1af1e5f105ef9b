//! Oracles: what an attack may query. `RawModel` is the undefended model in-process
//! (logits, batched through its engine); `DefendedPipeline` the whole defended
//! pipeline in-process; `HttpService` a running server, through `POST /classify` only.
//! Each also gives a [`Verdict`] (raw and defended class) for judging a final image.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{ClassifyResponse, ErrorResponse, ModelsResponse};
use crate::attack::oars::Identities;
use crate::attack::{Oracle, OracleError};
use crate::imaging::ModelImage;
use crate::model::LoadedModel;
use crate::params::ClassifyParams;
use crate::pipeline::{Outcome, Pipeline, PipelineError};

/// What a defended system answered for one image: enough to judge an attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub raw: usize,
    /// `None` when the defended answer abstained.
    pub defended: Option<usize>,
    pub suspicious: bool,
}

impl From<&Outcome> for Verdict {
    fn from(outcome: &Outcome) -> Self {
        Verdict { raw: outcome.raw_class(), defended: outcome.defended.class_id, suspicious: outcome.suspicious }
    }
}

impl From<&ClassifyResponse> for Verdict {
    fn from(answer: &ClassifyResponse) -> Self {
        Verdict { raw: answer.raw.class_id, defended: answer.defended.class_id, suspicious: answer.suspicious }
    }
}

/// A pipeline error as an attacker sees it: no capacity (ask again), a refused query,
/// or a failure.
pub fn oracle_error(error: PipelineError) -> OracleError {
    match error {
        e if e.is_overloaded() => OracleError::Overloaded(e.to_string()),
        e @ (PipelineError::Param(_) | PipelineError::Decode(_)) => OracleError::Refused(e.to_string()),
        e => OracleError::Failed(e.to_string()),
    }
}

/// The raw model through its batching engine. Blocking: call from a plain thread
/// (or `spawn_blocking`), never from an async task.
pub struct RawModel {
    model: Arc<LoadedModel>,
    timeout: Duration,
    /// Images scored so far.
    pub queries: usize,
}

impl RawModel {
    pub fn new(model: Arc<LoadedModel>) -> Self {
        Self { model, timeout: Duration::from_secs(60), queries: 0 }
    }
}

impl Oracle for RawModel {
    fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
        let spec = &self.model.card.input;
        let mut rows = Vec::with_capacity(images.len() * self.model.card.row_len());
        for image in images {
            if (image.width, image.height) != (spec.width as usize, spec.height as usize) {
                return Err(OracleError::Refused(format!(
                    "image is {}x{}, the model takes {}x{}",
                    image.width, image.height, spec.width, spec.height
                )));
            }
            image.push_normalized(spec, &mut rows);
        }
        let name = &self.model.card.name;
        let deadline_ms = self.timeout.as_millis() as u64;
        let receiver = self
            .model
            .engine
            .submit(rows, images.len(), Instant::now() + self.timeout)
            .map_err(|e| oracle_error(PipelineError::engine(name, e, deadline_ms)))?;
        let output = receiver
            .blocking_recv()
            .map_err(|_| OracleError::Failed(format!("the engine of {name} stopped")))?
            .map_err(|e| oracle_error(PipelineError::engine(name, e, deadline_ms)))?;
        self.queries += images.len();
        Ok(output.outputs.chunks(self.model.card.num_classes).map(<[f32]>::to_vec).collect())
    }
}

/// Which answer of the service an oracle reads: the raw model's or the defended one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Raw,
    Defended,
}

/// The image as the service receives it: quantized to 8 bits and PNG-encoded
/// (lossless), at the model's input size so the service uses it as it is.
pub fn as_png(image: &ModelImage) -> Result<Vec<u8>, OracleError> {
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .to_rgb()
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| OracleError::Failed(format!("cannot encode a PNG: {e}")))?;
    Ok(out.into_inner())
}

/// Log-probabilities from a full probability vector; an abstention (no vector) gives
/// the uniform distribution, whose margin is 0: never counted as an attack success by
/// the search itself, so the final check (which counts abstentions as errors) decides.
fn log_probabilities(probabilities: &[f32], classes: usize) -> Vec<f32> {
    if probabilities.is_empty() {
        return vec![-(classes as f32).ln(); classes];
    }
    // A floor keeps ln finite for classes no view voted for (smoothing's vote shares).
    probabilities.iter().map(|&p| p.max(1e-12).ln()).collect()
}

/// How an oracle seeds the defense's randomness (the API's `seed`) for the images it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seeds {
    /// A new seed for every image, starting at this one: every query draws new noise,
    /// as a client that leaves the seed to the service sees it.
    Fresh(u64),
    /// The j-th image of every call gets seed `base + j mod period`: with `period` = the
    /// EOT draws, every candidate is scored under the same `period` draws of noise
    /// ("common random numbers"). Comparing two candidates then measures the change
    /// the attack made, not the noise, so a greedy search is not misled by lucky draws.
    /// Any client that may send `seed` can do this; success is still judged with a
    /// seed the attack never used.
    Fixed { base: u64, period: u64 },
}

impl Seeds {
    /// The seeds of the next `count` images.
    fn take(&mut self, count: usize) -> Vec<u64> {
        match self {
            Seeds::Fresh(next) => (0..count)
                .map(|_| {
                    let seed = *next;
                    *next = next.wrapping_add(1);
                    seed
                })
                .collect(),
            Seeds::Fixed { base, period } => {
                (0..count as u64).map(|j| base.wrapping_add(j % (*period).max(1))).collect()
            }
        }
    }
}

/// The whole defended pipeline in-process (decode, views, batched engine runs,
/// combination), scored by its defended probabilities, seeded by [`Seeds`] (fresh by
/// default, as a client of the service sees it). The images of one call are classified
/// concurrently, so their views share engine batches. Blocking: call from a plain thread.
pub struct DefendedPipeline {
    pipeline: Arc<Pipeline>,
    runtime: tokio::runtime::Handle,
    params: ClassifyParams,
    classes: usize,
    seeds: Seeds,
    /// Images classified so far.
    pub queries: usize,
}

impl DefendedPipeline {
    /// `params` are API parameters, e.g. `[("defense", "default")]`.
    pub fn new(
        pipeline: Arc<Pipeline>,
        runtime: tokio::runtime::Handle,
        params: &[(&str, &str)],
        seed: u64,
    ) -> Result<Self, OracleError> {
        let params = pipeline.params(params.iter().copied()).map_err(|e| OracleError::Refused(e.to_string()))?;
        let raw = params.model.clone().unwrap_or_else(|| pipeline.registry().default_name().to_string());
        let classes = pipeline
            .registry()
            .get(&raw)
            .map(|m| m.card.num_classes)
            .ok_or_else(|| OracleError::Refused(format!("model {raw} is not loaded")))?;
        Ok(Self { pipeline, runtime, params, classes, seeds: Seeds::Fresh(seed), queries: 0 })
    }

    /// Seeds the defense as `seeds` says instead of freshly from `seed`.
    pub fn with_seeds(mut self, seeds: Seeds) -> Self {
        self.seeds = seeds;
        self
    }

    /// The full outcome for one image (the next seed; counts as a query).
    pub fn classify(&mut self, image: &ModelImage) -> Result<Outcome, OracleError> {
        let mut outcomes = self.classify_all(std::slice::from_ref(image))?;
        outcomes.pop().ok_or_else(|| OracleError::Failed("no outcome".into()))
    }

    fn classify_all(&mut self, images: &[ModelImage]) -> Result<Vec<Outcome>, OracleError> {
        let mut requests = Vec::with_capacity(images.len());
        for (image, seed) in images.iter().zip(self.seeds.take(images.len())) {
            let mut params = self.params.clone();
            params.seed = Some(seed);
            requests.push((as_png(image)?, params));
        }
        let pipeline = Arc::clone(&self.pipeline);
        let outcomes = self.runtime.block_on(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for (index, (png, params)) in requests.into_iter().enumerate() {
                let pipeline = Arc::clone(&pipeline);
                tasks.spawn(async move { (index, pipeline.classify(png.into(), &params, Instant::now()).await) });
            }
            let mut outcomes = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                outcomes.push(joined.map_err(|e| OracleError::Failed(e.to_string()))?);
            }
            Ok::<_, OracleError>(outcomes)
        })?;
        let mut ordered: Vec<Option<Outcome>> = vec![None; images.len()];
        for (index, outcome) in outcomes {
            ordered[index] = Some(outcome.map_err(oracle_error)?);
        }
        self.queries += images.len();
        ordered
            .into_iter()
            .map(|o| o.ok_or_else(|| OracleError::Failed("a classification went missing".into())))
            .collect()
    }
}

impl Oracle for DefendedPipeline {
    fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
        let classes = self.classes;
        Ok(self
            .classify_all(images)?
            .iter()
            .map(|outcome| log_probabilities(&outcome.defended.probabilities, classes))
            .collect())
    }
}

/// A running pandaguard server, attacked through `POST /classify` only: a black-box test
/// of a deployment. Scores come from the answer's `top_k` (the service lists at most 20
/// classes); the probability mass it leaves out is spread evenly over the other classes,
/// a floor that keeps the margin finite. By default no `seed` is sent: the service
/// draws its own noise for every answer, as for any client, and a server that refuses
/// client seeds (`defense.allow_client_seed = false`) can be attacked too;
/// [`HttpService::with_seeds`] sends seeds (e.g. fixed noise). A 503 (overloaded,
/// not ready) is asked again after its `Retry-After`, a few times, as a patient
/// attacker would. A 429 `query_attack_detected` (the stateful detector) is
/// [`OracleError::Detected`]: counted, never retried here (see [`crate::attack::oars`]).
/// With API keys, requests carry `Authorization: Bearer` of the current one; several
/// keys are the attacker's identities ([`Identities`]).
pub struct HttpService {
    agent: ureq::Agent,
    classify_url: String,
    /// API parameters sent with every request (`defense`, `model`).
    params: Vec<(String, String)>,
    answer: Answer,
    classes: usize,
    /// `None`: the service draws the noise.
    seeds: Option<Seeds>,
    /// Requests sent so far (retries and refused ones included).
    pub queries: usize,
    /// Time spent waiting for the server.
    pub elapsed: Duration,
    /// API keys (empty: none sent) and the index of the one in use.
    keys: Vec<String>,
    key: usize,
    /// Requests refused as part of a query attack (429 `query_attack_detected`).
    pub refusals: usize,
    /// The 1-based number of the first refused request.
    pub first_refusal: Option<usize>,
    /// Per key: until when the server refuses it (its `Retry-After` after a refusal).
    cooling_until: Vec<Option<Instant>>,
}

/// The most classes `/classify` lists.
const HTTP_TOP_K: usize = 20;

/// Times a 503 is asked again before the attack gives up.
const OVERLOAD_RETRIES: usize = 8;

impl HttpService {
    /// `base_url` like `http://host:8080`; `classes` from the model card (`GET /models`).
    pub fn new(base_url: &str, params: Vec<(String, String)>, answer: Answer, classes: usize) -> Self {
        let classify_url = format!("{}/classify", base_url.trim_end_matches('/'));
        Self {
            agent: agent(),
            classify_url,
            params,
            answer,
            classes,
            seeds: None,
            queries: 0,
            elapsed: Duration::ZERO,
            keys: Vec::new(),
            key: 0,
            refusals: 0,
            first_refusal: None,
            cooling_until: Vec::new(),
        }
    }

    /// Sends `Authorization: Bearer KEY` with the first of `keys`; the others are the
    /// identities [`Identities::switch_identity`] moves through.
    pub fn with_keys(mut self, keys: Vec<String>) -> Self {
        self.cooling_until = vec![None; keys.len().max(1)];
        self.keys = keys;
        self.key = 0;
        self
    }

    /// Starts with the `index`-th key (mod their number).
    pub fn with_identity(mut self, index: usize) -> Self {
        self.key = index % self.keys.len().max(1);
        self
    }

    /// Sends the seeds `seeds` gives instead of leaving the noise to the service.
    pub fn with_seeds(mut self, seeds: Seeds) -> Self {
        self.seeds = Some(seeds);
        self
    }

    /// The seeds of the next `count` requests (`None`: the service draws them).
    fn take_seeds(&mut self, count: usize) -> Vec<Option<u64>> {
        match &mut self.seeds {
            Some(seeds) => seeds.take(count).into_iter().map(Some).collect(),
            None => vec![None; count],
        }
    }

    /// The model cards the server lists (`GET /models`), with an API key when given.
    pub fn models(base_url: &str, key: Option<&str>) -> Result<ModelsResponse, OracleError> {
        let url = format!("{}/models", base_url.trim_end_matches('/'));
        let failed = |e: &dyn std::fmt::Display| OracleError::Failed(format!("GET {url}: {e}"));
        let mut request = agent().get(&url);
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let mut response = request.call().map_err(|e| failed(&e))?;
        let text = response.body_mut().read_to_string().map_err(|e| failed(&e))?;
        if !response.status().is_success() {
            return Err(failed(&format!("{}: {text}", response.status())));
        }
        serde_json::from_str(&text).map_err(|e| failed(&format!("not a model list: {e}")))
    }

    /// The full answer for one image (counts as a query).
    pub fn classify(&mut self, image: &ModelImage) -> Result<ClassifyResponse, OracleError> {
        let seed = self.take_seeds(1).into_iter().flatten().next();
        self.classify_seeded(image, seed)
    }

    fn classify_seeded(&mut self, image: &ModelImage, seed: Option<u64>) -> Result<ClassifyResponse, OracleError> {
        let png = as_png(image)?;
        let mut attempt = 0;
        loop {
            match self.post(&png, seed) {
                Err((OracleError::Overloaded(message), retry_after)) if attempt < OVERLOAD_RETRIES => {
                    attempt += 1;
                    tracing::debug!(%message, attempt, "overloaded; asking again");
                    std::thread::sleep(retry_after);
                }
                Err((error, _)) => return Err(error),
                Ok(answer) => return Ok(answer),
            }
        }
    }

    /// One `POST /classify`; on error, how long the server asked to wait.
    fn post(&mut self, png: &[u8], seed: Option<u64>) -> Result<ClassifyResponse, (OracleError, Duration)> {
        let url = &self.classify_url;
        let failed = |e: &dyn std::fmt::Display| (OracleError::Failed(format!("POST {url}: {e}")), Duration::ZERO);
        let started = Instant::now();
        let mut request = self.agent.post(url);
        for (key, value) in &self.params {
            request = request.query(key, value);
        }
        if let Some(seed) = seed {
            request = request.query("seed", seed.to_string());
        }
        if let Some(key) = self.keys.get(self.key) {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let mut response = request
            .query("top_k", HTTP_TOP_K.to_string())
            .header("content-type", "image/png")
            .send(png)
            .map_err(|e| failed(&e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(1), Duration::from_secs);
        let text = response.body_mut().read_to_string().map_err(|e| failed(&e))?;
        self.elapsed += started.elapsed();
        self.queries += 1;
        if status.is_success() {
            return serde_json::from_str(&text).map_err(|e| failed(&format!("unexpected answer: {e}")));
        }
        let parsed = serde_json::from_str::<ErrorResponse>(&text).ok();
        let detected =
            status.as_u16() == 429 && parsed.as_ref().is_some_and(|e| e.error.code == "query_attack_detected");
        let message = parsed
            .map(|e| format!("{status} {}: {}", e.error.code, e.error.message))
            .unwrap_or_else(|| format!("{status}: {text}"));
        if detected {
            self.refusals += 1;
            self.first_refusal.get_or_insert(self.queries);
            if self.cooling_until.len() <= self.key {
                self.cooling_until.resize(self.key + 1, None);
            }
            self.cooling_until[self.key] = Some(Instant::now() + retry_after);
            return Err((OracleError::Detected(message), retry_after));
        }
        let error = match status.as_u16() {
            503 => OracleError::Overloaded(message),
            400..=499 => OracleError::Refused(message),
            _ => OracleError::Failed(message),
        };
        Err((error, retry_after))
    }

    fn scores_of(&self, answer: &ClassifyResponse) -> Vec<f32> {
        let listed = match self.answer {
            Answer::Raw => &answer.raw.top_k,
            Answer::Defended => &answer.defended.top_k,
        };
        if listed.is_empty() {
            return log_probabilities(&[], self.classes);
        }
        let known: f32 = listed.iter().map(|c| c.probability).sum();
        let rest = self.classes.saturating_sub(listed.len()).max(1);
        let floor = ((1.0 - known).max(0.0) / rest as f32).max(1e-12);
        let mut probabilities = vec![floor; self.classes];
        for c in listed {
            if let Some(p) = probabilities.get_mut(c.class_id) {
                *p = c.probability;
            }
        }
        log_probabilities(&probabilities, self.classes)
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(120)))
        .http_status_as_error(false)
        .build()
        .new_agent()
}

impl Identities for HttpService {
    fn identities(&self) -> usize {
        self.keys.len().max(1)
    }

    fn switch_identity(&mut self) {
        self.key = (self.key + 1) % self.keys.len().max(1);
    }

    fn cooldown_left(&self) -> Duration {
        self.cooling_until
            .get(self.key)
            .copied()
            .flatten()
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(Instant::now()))
    }
}

impl Oracle for HttpService {
    fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, OracleError> {
        let mut scores = Vec::with_capacity(images.len());
        for (image, seed) in images.iter().zip(self.take_seeds(images.len())) {
            let answer = self.classify_seeded(image, seed)?;
            scores.push(self.scores_of(&answer));
        }
        Ok(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::Seeds;

    #[test]
    fn fresh_seeds_never_repeat_across_calls() {
        let mut seeds = Seeds::Fresh(10);
        assert_eq!(seeds.take(3), [10, 11, 12]);
        assert_eq!(seeds.take(2), [13, 14]);
    }

    #[test]
    fn fixed_seeds_repeat_the_same_draws_for_every_candidate() {
        let mut seeds = Seeds::Fixed { base: 100, period: 3 };
        // One candidate scored under 3 draws, then two candidates in one batch.
        assert_eq!(seeds.take(3), [100, 101, 102]);
        assert_eq!(seeds.take(6), [100, 101, 102, 100, 101, 102]);
        // EOT 1: every candidate sees the same noise.
        let mut single = Seeds::Fixed { base: 7, period: 1 };
        assert_eq!(single.take(1), single.take(1));
    }
}

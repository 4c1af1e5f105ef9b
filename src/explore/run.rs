//! Computing a decision map through the real pipeline: every cell is an 8-bit image
//! (what a client can send) classified like a `/classify` request — admitted, batched
//! with other traffic, raw and defended in one run — with the same seed for every cell,
//! so the map shows where the labels change and not where the noise happened to.

use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use tokio::task::JoinSet;

use super::ExploreError;
use super::slice::{Direction, Slice, coordinates};
use crate::attack::square::{SquareConfig, square_attack};
use crate::attack::{Goal, Norm};
use crate::config::ExploreConfig;
use crate::imaging::ModelImage;
use crate::params::ClassifyParams;
use crate::pipeline::{Pipeline, PipelineError};
use crate::prediction::argmax;
use crate::redteam::oracle::RawModel;

/// L∞ radius of the short attack that finds an adversarial direction (8/255, the
/// usual ImageNet budget).
const ATTACK_EPSILON: f32 = 8.0 / 255.0;

/// What to map.
pub struct MapRequest {
    /// Model, defenses and seed, as for `/classify` (the seed is shared by all cells).
    pub params: ClassifyParams,
    /// Cells per side.
    pub grid: usize,
    /// Half the side of the map, in `norm` units along the x axis; `None`: 1.5 times the
    /// adversarial example's distance, or 10 in L2 (0.06 in L∞) without one.
    pub radius: Option<f32>,
    pub norm: Norm,
}

/// Where an image of the map came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdversarialSource {
    Given,
    Attack,
}

/// The labels over the grid of one classifier (raw or defended), row by row from the
/// bottom (y = -radius) to the top, each row from x = -radius to +radius.
#[derive(Debug, Clone, Default)]
pub struct SideMap {
    /// `None` where the classifier abstained.
    pub labels: Vec<Option<usize>>,
    /// Probability of the image's own label (`None` when abstaining without scores).
    pub true_probability: Vec<Option<f32>>,
}

#[derive(Debug, Clone)]
pub struct DecisionMap {
    pub model: String,
    pub preset: String,
    pub grid: usize,
    /// Half the side of the map along each axis, in L2 units.
    pub radius_l2: f32,
    /// The same along the x axis in L∞ units (its largest pixel change).
    pub radius_linf: f32,
    pub x_direction: Direction,
    /// L∞ size of one L2 unit along x and along y.
    pub linf_per_unit: (f32, f32),
    /// The adversarial example's x coordinate (L2) and where it came from.
    pub adversarial: Option<(f32, AdversarialSource)>,
    /// The raw model's label of the image itself (the origin).
    pub true_class: usize,
    pub raw: SideMap,
    pub defended: SideMap,
    /// Model rows run: the cells, the origin and the attack's queries.
    pub rows: usize,
    pub seed: u64,
    pub elapsed: Duration,
}

impl DecisionMap {
    /// Every label on either map (the image's own first).
    pub fn classes(&self) -> Vec<usize> {
        let mut classes = vec![self.true_class];
        for label in self.raw.labels.iter().chain(&self.defended.labels).flatten() {
            if !classes.contains(label) {
                classes.push(*label);
            }
        }
        classes
    }
}

/// The rows a map will run at most, before any work: cells (and the origin) at the
/// first round's rows per image, plus the attack's queries when it has to search.
pub fn planned_rows(
    pipeline: &Pipeline,
    request: &MapRequest,
    limits: &ExploreConfig,
    attack: bool,
) -> Result<usize, ExploreError> {
    let per_image = pipeline.first_round_rows(&request.params)?;
    let cells = request.grid * request.grid + 1;
    Ok(cells * per_image + if attack { limits.attack_queries } else { 0 })
}

/// Checks the request against the configured bounds before any work.
pub fn check(
    pipeline: &Pipeline,
    request: &MapRequest,
    limits: &ExploreConfig,
    attack: bool,
) -> Result<usize, ExploreError> {
    if !(3..=limits.max_grid).contains(&request.grid) {
        return Err(ExploreError::Param {
            name: "grid",
            message: format!("must be from 3 to {} cells per side", limits.max_grid),
        });
    }
    if request.radius.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(ExploreError::Param { name: "radius", message: "must be a positive number".into() });
    }
    let rows = planned_rows(pipeline, request, limits, attack)?;
    if rows > limits.max_rows {
        return Err(ExploreError::Param {
            name: "grid",
            message: format!(
                "this map would run {rows} model rows, over the server's limit of {} (explore.max_rows): \
                 choose a smaller grid or a lighter preset",
                limits.max_rows
            ),
        });
    }
    Ok(rows)
}

/// Computes the map of `origin` (the raw model's input) toward `toward` (the same size)
/// or, without one, toward what a short Square Attack on the raw model finds.
pub async fn decision_map(
    pipeline: &Arc<Pipeline>,
    origin: RgbImage,
    toward: Option<RgbImage>,
    request: &MapRequest,
    limits: &ExploreConfig,
    progress: Option<indicatif::ProgressBar>,
) -> Result<DecisionMap, ExploreError> {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(limits.timeout_ms);
    check(pipeline, request, limits, toward.is_none())?;
    let seed = request.params.seed.unwrap_or(0);
    let mut params = request.params.clone();
    params.seed = Some(seed);

    // The origin's own answer names the label whose probability the contours show.
    let at_origin = classify_cell(pipeline, origin.clone(), &params, deadline, limits.timeout_ms).await?;
    let true_class = argmax(&at_origin.raw);
    let mut rows = at_origin.rows;

    let origin_image = ModelImage::from_rgb(&origin);
    let (toward, source) = match toward {
        Some(given) => (Some(ModelImage::from_rgb(&given)), AdversarialSource::Given),
        None => {
            let (found, queries) =
                short_attack(pipeline, &request.params, &origin_image, true_class, seed, limits).await?;
            rows += queries;
            (found, AdversarialSource::Attack)
        }
    };
    let slice = Slice::new(origin_image, toward.as_ref(), seed)?;
    let linf_per_unit = slice.linf_per_unit();
    let radius_l2 = match (request.radius, request.norm, slice.adversarial) {
        (Some(radius), Norm::L2, _) => radius,
        (Some(radius), Norm::Linf, _) => radius / linf_per_unit.0.max(f32::MIN_POSITIVE),
        (None, _, Some(distance)) => 1.5 * distance,
        (None, Norm::L2, None) => 10.0,
        (None, Norm::Linf, None) => 0.06 / linf_per_unit.0.max(f32::MIN_POSITIVE),
    };
    let axis = coordinates(request.grid, radius_l2);
    let cells = request.grid * request.grid;
    if let Some(bar) = &progress {
        bar.set_length(cells as u64);
    }

    let slice = Arc::new(slice);
    let mut raw = SideMap { labels: vec![None; cells], true_probability: vec![None; cells] };
    let mut defended = raw.clone();
    let mut tasks = JoinSet::new();
    let mut next = 0usize;
    let mut done = 0usize;
    while done < cells {
        while next < cells && tasks.len() < limits.cell_concurrency.max(1) {
            let (i, j) = (next / request.grid, next % request.grid);
            let (pipeline, slice, params) = (Arc::clone(pipeline), Arc::clone(&slice), params.clone());
            let (a, b) = (axis[j], axis[i]);
            let timeout_ms = limits.timeout_ms;
            tasks.spawn(async move {
                let image = slice.point(a, b).to_rgb();
                (next, classify_cell(&pipeline, image, &params, deadline, timeout_ms).await)
            });
            next += 1;
        }
        let Some(joined) = tasks.join_next().await else { break };
        let (index, answer) = joined.map_err(|e| ExploreError::Failed(e.to_string()))?;
        let answer = answer?;
        raw.labels[index] = Some(argmax(&answer.raw));
        raw.true_probability[index] = answer.raw.get(true_class).copied();
        defended.labels[index] = answer.defended_class;
        defended.true_probability[index] = answer.defended.get(true_class).copied();
        rows += answer.rows;
        done += 1;
        if let Some(bar) = &progress {
            bar.inc(1);
        }
    }

    let adversarial = slice.adversarial.map(|x| (x, source));
    Ok(DecisionMap {
        model: at_origin.model,
        preset: request.params.preset.clone(),
        grid: request.grid,
        radius_l2,
        radius_linf: radius_l2 * linf_per_unit.0,
        x_direction: slice.x_direction,
        linf_per_unit,
        adversarial,
        true_class,
        raw,
        defended,
        rows,
        seed,
        elapsed: started.elapsed(),
    })
}

/// One cell's answers.
struct CellAnswer {
    model: String,
    raw: Vec<f32>,
    defended: Vec<f32>,
    defended_class: Option<usize>,
    rows: usize,
}

/// Classifies one image like a `/classify` request. A cell refused because the server
/// is busy waits and asks again (the map yields to live traffic) until the map's deadline.
async fn classify_cell(
    pipeline: &Pipeline,
    image: RgbImage,
    params: &ClassifyParams,
    deadline: Instant,
    timeout_ms: u64,
) -> Result<CellAnswer, ExploreError> {
    let mut pause = Duration::from_millis(20);
    loop {
        match pipeline.classify_image(image.clone(), params, Instant::now()).await {
            Ok(outcome) => {
                return Ok(CellAnswer {
                    model: outcome.model.card.name.clone(),
                    defended_class: outcome.defended.class_id,
                    defended: outcome.defended.probabilities,
                    raw: outcome.raw,
                    rows: outcome.cost.rows,
                });
            }
            Err(error) if error.is_overloaded() && Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(error) if error.is_overloaded() => return Err(ExploreError::Timeout { ms: timeout_ms }),
            Err(error) => return Err(ExploreError::Pipeline(error)),
        }
    }
}

/// A short untargeted Square Attack (L∞, 8/255) on the raw model, on a blocking thread:
/// the adversarial example when it succeeds, and the queries it took.
async fn short_attack(
    pipeline: &Pipeline,
    params: &ClassifyParams,
    origin: &ModelImage,
    true_class: usize,
    seed: u64,
    limits: &ExploreConfig,
) -> Result<(Option<ModelImage>, usize), ExploreError> {
    let name = params.model.clone().unwrap_or_else(|| pipeline.registry().default_name().to_string());
    let model = pipeline
        .registry()
        .get(&name)
        .cloned()
        .ok_or_else(|| ExploreError::Invalid(format!("model {name} is not loaded")))?;
    let origin = origin.clone();
    let queries = limits.attack_queries;
    let work = move || {
        let mut oracle = RawModel::new(model);
        let config = SquareConfig::new(Norm::Linf, ATTACK_EPSILON, queries, seed);
        let outcome = square_attack(&mut oracle, &origin, &Goal::Untargeted { true_class }, &config, &mut |_, _| {})
            .map_err(|e| ExploreError::Failed(format!("the short attack failed: {e}")))?;
        Ok::<_, ExploreError>((outcome.success.then_some(outcome.adversarial), outcome.queries))
    };
    // The attack blocks on the engine's replies: never on an async worker thread.
    tokio::task::spawn_blocking(work).await.map_err(|e| ExploreError::Failed(e.to_string()))?
}

impl From<PipelineError> for ExploreError {
    fn from(error: PipelineError) -> Self {
        ExploreError::Pipeline(error)
    }
}

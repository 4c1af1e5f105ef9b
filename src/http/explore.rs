//! `POST /explore`: a decision map around the image in the body (raw bytes, or
//! multipart with `image` and optionally `toward`, an adversarial example). Off unless
//! `explore.enabled`; bounded by `explore.*` (grid, model rows, maps at once, time);
//! every cell is admitted and batched like a `/classify` request, so a map yields to
//! live traffic instead of starving it.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;

use super::classify::{BodyKind, body_kind, read_multipart_fields, read_raw};
use super::observe::RequestContext;
use super::{ApiError, AppState};
use crate::api::{
    ErrorResponse, ExploreAxes, ExploreAxis, ExploreClass, ExploreGrid, ExplorePoint, ExploreResponse, ExploreTiming,
};
use crate::attack::Norm;
use crate::explore::{AdversarialSource, DecisionMap, Direction, MapRequest, SideMap, check, decision_map};
use crate::model::Labels;

/// The query of `POST /explore`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExploreQuery {
    /// Raw model (default: the server's).
    pub model: Option<String>,
    /// Preset name or a comma-separated list of defenses (`none` for no defense).
    pub preset: Option<String>,
    /// Cells per side (3 to `explore.max_grid`).
    pub grid: Option<usize>,
    /// Half the map's side along x, in `norm` units (default: 1.5 times the adversarial
    /// example's distance; without one 10 in L2, 0.06 in L∞).
    pub radius: Option<f32>,
    /// `l2` (default) or `linf`.
    pub norm: Option<String>,
    /// Seed of every cell's defenses (default 0).
    pub seed: Option<u64>,
}

/// Draw a decision map.
///
/// The labels of the raw model and of the defended preset on a grid over the plane
/// through the image spanned by the direction toward an adversarial example (sent as
/// the multipart field `toward`, or found by a short Square Attack on the raw model)
/// and a random orthogonal direction.
#[utoipa::path(post, path = "/explore", tag = "classify",
    security((), ("bearer" = [])),
    params(ExploreQuery),
    request_body(description = "The image, or multipart/form-data with `image` and optionally `toward`",
        content((Vec<u8> = "image/jpeg"), (Vec<u8> = "image/png"), (Vec<u8> = "multipart/form-data"))),
    responses(
        (status = 200, description = "The map", body = ExploreResponse),
        (status = 400, description = "Undecodable image or a malformed body", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key (when keys are configured)", body = ErrorResponse),
        (status = 404, description = "Decision maps are off on this server", body = ErrorResponse),
        (status = 413, description = "Body or image over the limits", body = ErrorResponse),
        (status = 422, description = "Invalid parameter, or a map over explore.max_rows", body = ErrorResponse),
        (status = 503, description = "Another map is being drawn, or the server is overloaded", body = ErrorResponse),
        (status = 504, description = "Not finished within explore.timeout_ms", body = ErrorResponse),
    ))]
pub async fn explore(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let config = state.config().explore.clone();
    if !config.enabled {
        return Err(ApiError::NotFound("decision maps are off on this server (explore.enabled = false)".into()));
    }
    let context = request.extensions().get::<RequestContext>().cloned();
    let query: ExploreQuery = serde_urlencoded::from_str(request.uri().query().unwrap_or(""))
        .map_err(|e| ApiError::InvalidParameter { name: "query".into(), message: e.to_string() })?;
    let pipeline = state.pipeline()?.clone();
    let norm = match query.norm.as_deref().unwrap_or("l2") {
        "l2" => Norm::L2,
        "linf" => Norm::Linf,
        other => {
            return Err(ApiError::InvalidParameter {
                name: "norm".into(),
                message: format!("{other:?} is not a norm; use l2 or linf"),
            });
        }
    };
    let mut pairs: Vec<(&str, String)> = vec![("defense", query.preset.clone().unwrap_or_else(|| "default".into()))];
    if let Some(model) = &query.model {
        pairs.push(("model", model.clone()));
    }
    let params = pipeline.params(pairs.iter().map(|(k, v)| (*k, v.as_str())))?;
    let map_request = MapRequest {
        params: crate::params::ClassifyParams { seed: query.seed, ..params },
        grid: query.grid.unwrap_or(config.default_grid),
        radius: query.radius,
        norm,
    };

    // Refuse from the head what cannot run: a map too large, or one more than allowed.
    let max_body = state.config().server.max_body_bytes;
    let kind = body_kind(request.headers(), max_body)?;
    check(&pipeline, &map_request, &config, true).or_else(|error| {
        // Without the attack (a `toward` given) the map may fit; judged again below.
        check(&pipeline, &map_request, &config, false).map(|_| 0).map_err(|_| error)
    })?;
    let _permit = state.explore_permits().clone().try_acquire_owned().map_err(|_| ApiError::Overloaded {
        message: "another decision map is being drawn (explore.max_concurrent); try again shortly".into(),
        retry_after: Some(5),
    })?;

    let deadline = Instant::now() + Duration::from_millis(config.timeout_ms);
    let fields = tokio::time::timeout_at(deadline.into(), async {
        match kind {
            BodyKind::Raw { declared } => Ok(vec![Some(read_raw(request, max_body, declared).await?), None]),
            BodyKind::Multipart => read_multipart_fields(request, &state, max_body, &["image", "toward"], false).await,
        }
    })
    .await
    .map_err(|_| ApiError::BodyTimeout { deadline_ms: config.timeout_ms })??;
    let mut fields = fields.into_iter();
    let image = fields
        .next()
        .flatten()
        .ok_or_else(|| ApiError::BadRequest("the multipart body has no field named `image`".into()))?;
    let toward = fields.next().flatten();
    if toward.is_none() {
        check(&pipeline, &map_request, &config, true)?;
    }

    let model = map_request.params.model.clone().unwrap_or_else(|| pipeline.registry().default_name().to_string());
    let work = async {
        let origin = pipeline.model_input(image, &model).await?;
        let toward = match toward {
            Some(bytes) => Some(pipeline.model_input(bytes, &model).await?),
            None => None,
        };
        decision_map(&pipeline, origin, toward, &map_request, &config, None).await
    };
    let map = tokio::time::timeout_at(deadline.into(), work)
        .await
        .map_err(|_| ApiError::DeadlineExceeded { deadline_ms: config.timeout_ms })??;
    let labels = &pipeline
        .registry()
        .get(&map.model)
        .map(|m| m.labels.clone())
        .unwrap_or_else(|| Labels::from_names(Vec::new()));
    let request_id = context.map(|c| c.id).unwrap_or_default();
    Ok(Json(explore_response(&map, labels, request_id)).into_response())
}

/// The JSON of a map.
pub fn explore_response(map: &DecisionMap, labels: &Labels, request_id: String) -> ExploreResponse {
    let class = |class_id: usize| ExploreClass { class_id, label: labels.name(class_id).to_string() };
    let grid = |side: &SideMap| ExploreGrid {
        labels: side.labels.iter().map(|l| l.map_or(-1, |c| c as i64)).collect(),
        true_probability: side.true_probability.clone(),
    };
    let direction = |d: Direction| {
        match d {
            Direction::TowardAdversarial => "toward_adversarial",
            Direction::Random => "random",
            Direction::RandomOrthogonal => "random_orthogonal",
        }
        .to_string()
    };
    ExploreResponse {
        request_id,
        model: map.model.clone(),
        preset: map.preset.clone(),
        grid: map.grid,
        radius_l2: map.radius_l2,
        radius_linf: map.radius_linf,
        axes: ExploreAxes {
            x: ExploreAxis { direction: direction(map.x_direction), linf_per_unit: map.linf_per_unit.0 },
            y: ExploreAxis { direction: direction(Direction::RandomOrthogonal), linf_per_unit: map.linf_per_unit.1 },
        },
        adversarial: map.adversarial.map(|(x, source)| ExplorePoint {
            x,
            y: 0.0,
            source: match source {
                AdversarialSource::Given => "given",
                AdversarialSource::Attack => "attack",
            }
            .into(),
        }),
        true_class: class(map.true_class),
        classes: map.classes().into_iter().map(class).collect(),
        raw: grid(&map.raw),
        defended: grid(&map.defended),
        rows: map.rows,
        seed: map.seed,
        timing_ms: ExploreTiming { total: map.elapsed.as_secs_f64() * 1000.0 },
    }
}

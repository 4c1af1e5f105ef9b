//! The web page for people (`GET /`) and what it reads before sending an image:
//! `GET /info` (models, presets, limits) and the bundled sample photos (`GET /samples`,
//! `GET /samples/{file}`). The page is one self-contained file compiled into the binary:
//! no CDN, no build step; the API key it sends lives in its input field only.

use std::path::{Path, PathBuf};

use axum::Json;
use axum::extract::{self, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::classify::RAW_IMAGE_TYPES;
use super::{ApiError, AppState};
use crate::api::{
    ErrorResponse, InfoExplore, InfoInput, InfoLimits, InfoModel, InfoPreset, InfoResponse, Sample, SamplesResponse,
};

const PAGE: &str = include_str!("page/index.html");

/// The page. Public (it holds nothing secret): the routes it calls ask for the key.
pub async fn index(State(state): State<AppState>) -> Result<Response, ApiError> {
    if !state.config().page.enabled {
        return Err(ApiError::NotFound("the web page is off on this server (page.enabled = false)".into()));
    }
    let mut response = PAGE.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Everything the page needs is inline or on this server: forbid the rest.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    Ok(response)
}

/// What a client needs to know before it sends an image.
#[utoipa::path(get, path = "/info", tag = "models",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Models, presets, limits", body = InfoResponse),
        (status = 401, description = "Missing or wrong API key (when keys are configured)", body = ErrorResponse),
        (status = 503, description = "Models are still loading", body = ErrorResponse),
    ))]
pub async fn info(State(state): State<AppState>) -> Result<Json<InfoResponse>, ApiError> {
    let pipeline = state.pipeline()?;
    let config = state.config();
    let registry = pipeline.registry();
    let models = registry
        .models()
        .map(|m| InfoModel {
            name: m.card.name.clone(),
            input: InfoInput { width: m.card.input.width, height: m.card.input.height },
            num_classes: m.card.num_classes,
        })
        .collect();
    let presets = config
        .defense
        .presets
        .iter()
        .map(|(name, preset)| {
            let planned = pipeline
                .params([("defense", name.as_str())])
                .map_err(|e| e.to_string())
                .and_then(|params| pipeline.first_round_rows(&params).map_err(|e| e.to_string()));
            let (rows, unavailable) = match planned {
                Ok(rows) => (Some(rows), None),
                Err(reason) => (None, Some(reason)),
            };
            InfoPreset { name: name.clone(), defenses: preset.defenses.clone(), rows, unavailable }
        })
        .collect();
    let mut content_types: Vec<String> = RAW_IMAGE_TYPES.iter().map(|t| t.to_string()).collect();
    content_types.push("multipart/form-data".into());
    let image = &config.image;
    Ok(Json(InfoResponse {
        default_model: registry.default_name().to_string(),
        default_preset: config.defense.default_preset.clone(),
        models,
        presets,
        defenses: state.defenses().names().into_iter().map(String::from).collect(),
        limits: InfoLimits {
            max_body_bytes: config.server.max_body_bytes,
            max_width: image.max_width,
            max_height: image.max_height,
            max_pixels: image.max_pixels,
            default_top_k: config.classify.default_top_k,
            max_top_k: config.classify.max_top_k,
            content_types,
        },
        allow_client_seed: config.defense.allow_client_seed,
        explore: InfoExplore {
            enabled: config.explore.enabled,
            max_grid: config.explore.max_grid,
            default_grid: config.explore.default_grid,
            max_rows: config.explore.max_rows,
        },
    }))
}

/// The labelled sample photos (`page.samples_dir`, listed in its `labels.csv`).
#[utoipa::path(get, path = "/samples", tag = "models",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Sample photos with their true labels", body = SamplesResponse),
        (status = 401, description = "Missing or wrong API key (when keys are configured)", body = ErrorResponse),
    ))]
pub async fn samples(State(state): State<AppState>) -> Result<Json<SamplesResponse>, ApiError> {
    let Some(dir) = state.config().page.samples_dir.clone() else {
        return Ok(Json(SamplesResponse { samples: Vec::new() }));
    };
    let listed = list_samples(&dir).await;
    let pipeline = state.pipeline().ok();
    let label = |class_id: usize| {
        pipeline
            .and_then(|p| p.registry().get(p.registry().default_name()).map(|m| m.labels.name(class_id).to_string()))
            .unwrap_or_else(|| format!("class {class_id}"))
    };
    let samples =
        listed.into_iter().map(|(file, class_id)| Sample { label: label(class_id), file, class_id }).collect();
    Ok(Json(SamplesResponse { samples }))
}

/// One sample photo. Only files listed in `labels.csv` are served, so no path a
/// client sends can reach anything else.
pub async fn sample_file(
    State(state): State<AppState>,
    extract::Path(file): extract::Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound(format!("no sample photo named {file:?}; see /samples"));
    let dir = state.config().page.samples_dir.clone().ok_or_else(not_found)?;
    if !list_samples(&dir).await.iter().any(|(listed, _)| *listed == file) {
        return Err(not_found());
    }
    let bytes = tokio::fs::read(dir.join(&file)).await.map_err(|_| not_found())?;
    let content_type = match Path::new(&file).extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase) {
        Some(e) if e == "png" => "image/png",
        Some(e) if e == "webp" => "image/webp",
        _ => "image/jpeg",
    };
    let mut response = bytes.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=3600"));
    Ok(response)
}

/// (file, class id) per line of `dir/labels.csv` (`file,class_id` with a header);
/// nothing when the folder or the file is missing. Names with a path in them are skipped.
async fn list_samples(dir: &Path) -> Vec<(String, usize)> {
    let Ok(text) = tokio::fs::read_to_string(dir.join("labels.csv")).await else { return Vec::new() };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split(',');
            let file = fields.next()?.trim().to_string();
            let class_id = fields.next()?.trim().parse().ok()?;
            let plain = PathBuf::from(&file).file_name().is_some_and(|name| name == file.as_str());
            (plain && !file.is_empty()).then_some((file, class_id))
        })
        .collect()
}

//! Liveness and readiness are separate on purpose: a replica that is loading models
//! or draining is alive (do not restart it) but not ready (send no traffic).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::AppState;
use crate::api::HealthResponse;

/// The process is up and serving HTTP. Never touches a model.
#[utoipa::path(get, path = "/health/live", tag = "health",
    responses((status = 200, description = "The process is alive", body = HealthResponse)))]
pub async fn live() -> Json<HealthResponse> {
    Json(HealthResponse { status: "live".into(), reason: None })
}

/// 200 only when every configured model is loaded and warmed up and the replica is not draining.
#[utoipa::path(get, path = "/health/ready", tag = "health",
    responses(
        (status = 200, description = "Ready for traffic", body = HealthResponse),
        (status = 503, description = "Loading models or draining", body = HealthResponse),
    ))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<HealthResponse>) {
    readiness(&state)
}

/// Open Inference Protocol liveness: the same as `/health/live`.
#[utoipa::path(get, path = "/v2/health/live", tag = "health",
    responses((status = 200, description = "The process is alive", body = HealthResponse)))]
pub async fn v2_live() -> Json<HealthResponse> {
    live().await
}

/// Open Inference Protocol readiness: the same as `/health/ready`.
#[utoipa::path(get, path = "/v2/health/ready", tag = "health",
    responses(
        (status = 200, description = "Ready for traffic", body = HealthResponse),
        (status = 503, description = "Loading models or draining", body = HealthResponse),
    ))]
pub async fn v2_ready(State(state): State<AppState>) -> (StatusCode, Json<HealthResponse>) {
    readiness(&state)
}

fn readiness(state: &AppState) -> (StatusCode, Json<HealthResponse>) {
    match state.not_ready_reason() {
        None => (StatusCode::OK, Json(HealthResponse { status: "ready".into(), reason: None })),
        Some(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(HealthResponse { status: "not_ready".into(), reason: Some(reason) }))
        }
    }
}

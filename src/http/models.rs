//! `GET /models`: the loaded models with their cards and queue depth.

use axum::Json;
use axum::extract::State;

use super::{ApiError, AppState};
use crate::api::{ErrorResponse, ModelInfo, ModelsResponse};

/// The loaded models with their cards.
#[utoipa::path(get, path = "/models", tag = "models",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Loaded models", body = ModelsResponse),
        (status = 401, description = "Missing or wrong API key (when keys are configured)", body = ErrorResponse),
        (status = 503, description = "Models are still loading", body = ErrorResponse),
    ))]
pub async fn list(State(state): State<AppState>) -> Result<Json<ModelsResponse>, ApiError> {
    let registry = state.pipeline()?.registry();
    let models = registry
        .models()
        .map(|m| ModelInfo { name: m.card.name.clone(), queued_rows: m.engine.queued_rows(), card: m.card.clone() })
        .collect();
    Ok(Json(ModelsResponse { default: registry.default_name().to_string(), models }))
}

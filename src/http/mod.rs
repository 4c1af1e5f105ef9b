//! The HTTP layer: routes, handlers, middleware. Handlers stay thin: parse, call the
//! pipeline, map errors (one enum, one mapping in `crate::error`).

mod auth;
mod classify;
mod error;
mod health;
mod models;
mod observe;
mod openapi;
mod server;
mod state;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;

pub use openapi::ApiDoc;
pub use server::{ServeError, serve, serve_on, shutdown_signal};
pub use state::AppState;

use crate::error::ApiError;

/// Every route of the service.
pub fn router(state: AppState) -> Router {
    let max_body = state.config().server.max_body_bytes;
    Router::new()
        .route("/classify", post(classify::classify))
        .route("/models", get(models::list))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        // The same probes under the Open Inference Protocol (KServe v2) paths.
        .route("/v2/health/live", get(health::v2_live))
        .route("/v2/health/ready", get(health::v2_ready))
        .route("/metrics", get(observe::metrics))
        .merge(openapi::routes())
        .fallback(|| async { ApiError::NotFound("no such route; see /openapi.json".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // Multipart bodies are limited here; raw bodies by the classify handler itself.
        .layer(DefaultBodyLimit::max(max_body))
        // Inside `observe`: a refused request still gets an id, a metric and a log line.
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe::observe))
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::Internal("the handler panicked".into()))
        }))
        .with_state(state)
}

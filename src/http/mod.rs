//! The HTTP layer: routes, handlers, middleware, and every status code.
//!
//! Owns: the routes (one list here: public and protected routers), the JSON answers
//! built from pipeline outcomes (`answer.rs`), the one error enum and its mapping to
//! statuses (`error.rs`), request ids, metrics and the access log (`observe.rs`), API
//! keys (`auth.rs`), who a client is for query-attack detection (`client.rs`),
//! serving and draining (`server.rs`). Handlers stay thin: parse,
//! call the pipeline, answer. Nothing below this layer imports axum.

pub mod answer;
mod auth;
mod classify;
mod client;
pub mod error;
mod explore;
mod health;
mod linger;
mod models;
mod observe;
mod openapi;
mod page;
mod server;
mod state;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;

pub use error::ApiError;
pub use explore::explore_response;
pub use openapi::ApiDoc;
pub use server::{ServeError, serve, serve_on, shutdown_signal};
pub use state::AppState;

/// Every route of the service: open ones (probes, metrics, documentation) and the
/// ones behind the API key when keys are configured.
pub fn router(state: AppState) -> Router {
    let max_body = state.config().server.max_body_bytes;
    let probes = Router::new()
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        // The same probes under the Open Inference Protocol (KServe v2) paths.
        .route("/v2/health/live", get(health::v2_live))
        .route("/v2/health/ready", get(health::v2_ready))
        .route("/metrics", get(observe::metrics))
        // Probes and scrapes would drown the access log.
        .route_layer(middleware::map_response(observe::quiet));
    // The page itself is public (it holds nothing secret); what it calls is not.
    let public = Router::new().merge(probes).merge(openapi::routes()).route("/", get(page::index));
    let protected = Router::new()
        .route("/classify", post(classify::classify))
        .route("/explore", post(explore::explore))
        .route("/models", get(models::list))
        .route("/info", get(page::info))
        .route("/samples", get(page::samples))
        .route("/samples/{file}", get(page::sample_file))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_key));
    Router::new()
        .merge(public)
        .merge(protected)
        .route_layer(middleware::from_fn(label_route))
        .fallback(auth::not_found)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // Multipart bodies are limited here; raw bodies by the classify handler itself.
        .layer(DefaultBodyLimit::max(max_body))
        // An early answer leaves the unread body to be drained, so the client reads it.
        .layer(middleware::from_fn_with_state(state.clone(), linger::linger))
        // Outermost: a refused or unrouted request still gets an id, a metric and a log line.
        .layer(middleware::from_fn_with_state(state.clone(), observe::observe))
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::Internal("the handler panicked".into()))
        }))
        .with_state(state)
}

/// The route that matched, for metric labels: put on the response, where the outer
/// `observe` middleware (which runs before routing) finds it. Unmatched requests
/// have none and are labelled "other", so arbitrary paths cannot explode the labels.
#[derive(Debug, Clone)]
pub struct RouteLabel(pub String);

async fn label_route(request: Request, next: Next) -> Response {
    let label = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    let mut response = next.run(request).await;
    if let Some(label) = label {
        response.extensions_mut().insert(RouteLabel(label));
    }
    response
}

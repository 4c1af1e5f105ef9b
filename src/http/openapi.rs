//! The OpenAPI document (`/openapi.json`) and Swagger UI (`/docs`), generated from
//! the handlers' annotations so the documented statuses are the real ones.

use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use super::AppState;
use crate::api::{
    ClassScore, ClassifyResponse, DefendedPrediction, DefenseReport, ErrorDetail, ErrorResponse, ExploreAxes,
    ExploreAxis, ExploreClass, ExploreGrid, ExplorePoint, ExploreResponse, ExploreTiming, HealthResponse, InfoExplore,
    InfoInput, InfoLimits, InfoModel, InfoPreset, InfoResponse, ModelInfo, ModelsResponse, Prediction,
    QueryAttackReport, Sample, SamplesResponse, Timing,
};
use crate::defense::Defenses;

#[derive(OpenApi)]
#[openapi(
    info(title = "pandaguard", description = "Image classification with the raw prediction and one defended against adversarial examples"),
    paths(
        super::classify::classify, super::explore::explore, super::models::list, super::page::info,
        super::page::samples, super::health::live, super::health::ready,
        super::health::v2_live, super::health::v2_ready, super::observe::metrics,
    ),
    modifiers(&BearerKeys, &DefenseDetailSchemas),
    components(schemas(
        ClassifyResponse, Prediction, ClassScore, Timing, ErrorResponse, ErrorDetail, ModelsResponse, ModelInfo,
        HealthResponse, DefendedPrediction, DefenseReport, InfoResponse, InfoModel, InfoInput, InfoPreset, InfoLimits,
        InfoExplore, SamplesResponse, Sample, ExploreResponse, ExploreAxes, ExploreAxis, ExplorePoint, ExploreClass,
        ExploreGrid, ExploreTiming, QueryAttackReport,
    )),
    tags(
        (name = "classify", description = "Predictions"),
        (name = "models", description = "Loaded models and their cards"),
        (name = "health", description = "Probes and metrics"),
    )
)]
pub struct ApiDoc;

/// The `bearer` security scheme that `/classify` and `/models` list (optional: it
/// applies only when `server.api_keys` or a key file is configured).
struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            let scheme = HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some("An API key from server.api_keys or the key file, when keys are configured"))
                .build();
            components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
        }
    }
}

/// Each registered defense's `details` schema (and the schemas they refer to), so a
/// new defense documents itself without touching this file.
struct DefenseDetailSchemas;

impl Modify for DefenseDetailSchemas {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            for defense in Defenses::standard().iter() {
                components.schemas.extend(defense.details_schemas());
            }
        }
    }
}

pub fn routes() -> Router<AppState> {
    Router::from(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
}

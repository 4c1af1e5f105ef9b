//! `ApiError` as an HTTP answer: the status from `ApiError::status` and a JSON body.
//! (`Retry-After` is added to every 503 by the observe middleware, which knows the config.)

use axum::Json;
use axum::response::{IntoResponse, Response};

use crate::api::{ErrorDetail, ErrorResponse};
use crate::error::ApiError;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorResponse { error: ErrorDetail { code: self.code().to_string(), message: self.to_string() } };
        (self.status(), Json(body)).into_response()
    }
}

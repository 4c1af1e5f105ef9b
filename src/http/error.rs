//! The one error type a request can end with, the one place where each kind is
//! mapped to an HTTP status and a stable machine-readable code, and the `From` chain
//! from every layer's own error (parameters, decoding, pipeline, engine) into it.
//! (`Retry-After` is added to every 503 by the observe middleware, which knows the config.)

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::api::{ErrorDetail, ErrorResponse};
use crate::engine::EngineError;
use crate::explore::ExploreError;
use crate::imaging::DecodeError;
use crate::params::ParamError;
use crate::pipeline::PipelineError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The body is not an image we can decode (unknown format, truncated, corrupt, empty).
    #[error("{0}")]
    InvalidImage(String),
    /// The request is malformed in a way that is not about one parameter
    /// (e.g. a multipart body without the `image` field).
    #[error("{0}")]
    BadRequest(String),
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// Decodable, but its dimensions exceed the configured limits.
    #[error("{0}")]
    ImageTooLarge(String),
    #[error(
        "unsupported media type {0:?}; send image/jpeg, image/png, image/webp, image/gif, image/bmp, image/tiff, application/octet-stream or multipart/form-data with an `image` field"
    )]
    UnsupportedMediaType(String),
    #[error("invalid parameter `{name}`: {message}")]
    InvalidParameter { name: String, message: String },
    #[error("missing or invalid API key")]
    Unauthorized,
    /// No capacity; `retry_after` (seconds) is when it is worth asking again.
    #[error("the server is overloaded ({message}); retry later")]
    Overloaded { message: String, retry_after: Option<u64> },
    /// The client's recent queries look like a black-box attack (near-identical
    /// images), or it is in the cooldown after one; `retry_after` in seconds.
    #[error("too many near-identical queries from this client: refused for {retry_after} s")]
    QueryAttackDetected { retry_after: u64 },
    #[error("the server is not ready: {0}")]
    NotReady(String),
    #[error("the request did not finish within its deadline of {deadline_ms} ms")]
    DeadlineExceeded { deadline_ms: u64 },
    #[error("the request body did not arrive within {deadline_ms} ms")]
    BodyTimeout { deadline_ms: u64 },
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidImage(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::BodyTooLarge { .. } | ApiError::ImageTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InvalidParameter { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::QueryAttackDetected { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded { .. } | ApiError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable identifier clients can branch on; the message is for people.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidImage(_) => "invalid_image",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::ImageTooLarge(_) => "image_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::InvalidParameter { .. } => "invalid_parameter",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::BodyTimeout { .. } => "body_timeout",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::QueryAttackDetected { .. } => "query_attack_detected",
            ApiError::NotReady(_) => "not_ready",
            ApiError::DeadlineExceeded { .. } => "deadline_exceeded",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The JSON body every error answer carries.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse { error: ErrorDetail { code: self.code().to_string(), message: self.to_string() } }
    }
}

impl From<ParamError> for ApiError {
    fn from(error: ParamError) -> Self {
        ApiError::InvalidParameter { name: error.name, message: error.problem.to_string() }
    }
}

impl From<DecodeError> for ApiError {
    fn from(error: DecodeError) -> Self {
        if error.is_too_large() {
            ApiError::ImageTooLarge(error.to_string())
        } else {
            ApiError::InvalidImage(error.to_string())
        }
    }
}

impl From<PipelineError> for ApiError {
    fn from(error: PipelineError) -> Self {
        match error {
            PipelineError::Param(e) => e.into(),
            PipelineError::Decode(e) => e.into(),
            PipelineError::DeadlineExceeded { deadline_ms } => ApiError::DeadlineExceeded { deadline_ms },
            PipelineError::Overloaded { retry_after, .. } => ApiError::Overloaded {
                message: error.to_string(),
                // Whole seconds, rounded up: a client that waits that long finds the queues drained.
                retry_after: Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)),
            },
            PipelineError::ShuttingDown => ApiError::NotReady(error.to_string()),
            PipelineError::Engine { source, .. } => source.into(),
            PipelineError::Defense(_) | PipelineError::Worker(_) => ApiError::Internal(error.to_string()),
        }
    }
}

impl From<ExploreError> for ApiError {
    fn from(error: ExploreError) -> Self {
        match error {
            ExploreError::Invalid(message) => ApiError::BadRequest(message),
            ExploreError::Param { name, message } => ApiError::InvalidParameter { name: name.to_string(), message },
            ExploreError::Pipeline(e) => e.into(),
            ExploreError::Timeout { ms } => ApiError::DeadlineExceeded { deadline_ms: ms },
            ExploreError::Failed(message) => ApiError::Internal(message),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::QueueFull { .. } | EngineError::Late { .. } => {
                ApiError::Overloaded { message: error.to_string(), retry_after: None }
            }
            EngineError::Stopped(_) => ApiError::NotReady(error.to_string()),
            // The pipeline turns these into the request's own deadline and a named
            // parameter before they get here; reaching this is a bug, not the client's.
            EngineError::DeadlineExceeded
            | EngineError::TooManyRows { .. }
            | EngineError::BadInput { .. }
            | EngineError::RaggedRows { .. }
            | EngineError::Inference(_)
            | EngineError::Start(_) => ApiError::Internal(error.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        let retry_after = match self {
            ApiError::Overloaded { retry_after: Some(seconds), .. }
            | ApiError::QueryAttackDetected { retry_after: seconds } => Some(seconds),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamProblem;

    #[test]
    fn every_layer_maps_to_its_status() {
        let param: ApiError = ParamError::new("sigma", ParamProblem::Repeated).into();
        assert_eq!((param.status(), param.code()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter"));
        assert_eq!(param.to_string(), "invalid parameter `sigma`: given more than once");
        let big: ApiError = PipelineError::Decode(DecodeError::TooLarge {
            width: 9,
            height: 9,
            max_width: 1,
            max_height: 1,
            max_pixels: 1,
        })
        .into();
        assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let bad: ApiError = PipelineError::Decode(DecodeError::Empty).into();
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        let full = EngineError::QueueFull { model: "m".into(), queued: 3, capacity: 3 };
        let overloaded: ApiError = PipelineError::Engine { model: "m".into(), source: full }.into();
        assert_eq!((overloaded.status(), overloaded.code()), (StatusCode::SERVICE_UNAVAILABLE, "overloaded"));
        let late: ApiError = PipelineError::engine("m", EngineError::DeadlineExceeded, 250).into();
        assert_eq!((late.status(), late.to_string().contains("250 ms")), (StatusCode::GATEWAY_TIMEOUT, true));
        let stopped: ApiError = PipelineError::engine("m", EngineError::Stopped("m".into()), 1).into();
        assert_eq!(stopped.code(), "not_ready");
        let attack = ApiError::QueryAttackDetected { retry_after: 60 }.into_response();
        assert_eq!(attack.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(attack.headers().get(header::RETRY_AFTER).unwrap(), "60");
    }
}

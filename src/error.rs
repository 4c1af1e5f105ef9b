//! The one error type a request can end with, and the one place where each kind is
//! mapped to an HTTP status and a stable machine-readable code.

use axum::http::StatusCode;

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
    #[error("the server is overloaded ({0}); retry later")]
    Overloaded(String),
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
    pub fn invalid_parameter(name: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidParameter { name: name.to_string(), message: message.into() }
    }

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
            ApiError::Overloaded(_) | ApiError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
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
            ApiError::Overloaded(_) => "overloaded",
            ApiError::NotReady(_) => "not_ready",
            ApiError::DeadlineExceeded { .. } => "deadline_exceeded",
            ApiError::Internal(_) => "internal",
        }
    }
}

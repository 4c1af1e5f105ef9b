//! `POST /classify`: read the image from the body (raw or multipart), run the
//! pipeline under the request's deadline, answer JSON.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{ConnectInfo, FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use super::observe::{RequestContext, RequestSummary};
use super::{ApiError, AppState, answer, client};
use crate::api::{ClassifyResponse, ErrorResponse, QueryAttackReport, Timing};
use crate::detect::{ClientId, Decision, Detector, Verdict};
use crate::params::{ClassifyParams, ClassifyQuery, ParamError, ParamProblem};

/// Media types taken as a raw image body. The bytes decide the format; the type only
/// has to be plausible. `application/x-www-form-urlencoded` is what
/// `curl --data-binary @photo.jpg` sends when no type is given, so it is accepted too.
pub(super) const RAW_IMAGE_TYPES: &[&str] = &[
    "image/jpeg",
    "image/jpg",
    "image/pjpeg",
    "image/png",
    "image/webp",
    "image/gif",
    "image/bmp",
    "image/x-ms-bmp",
    "image/tiff",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
];

/// Classify an image.
///
/// The body is the image (`Content-Type: image/jpeg|png|webp|gif|bmp|tiff` or
/// `application/octet-stream`), or `multipart/form-data` with a field `image`.
#[utoipa::path(post, path = "/classify", tag = "classify",
    security((), ("bearer" = [])),
    params(ClassifyQuery),
    request_body(description = "The image bytes, or multipart/form-data with an `image` field",
        content(
            (Vec<u8> = "image/jpeg"), (Vec<u8> = "image/png"), (Vec<u8> = "image/webp"), (Vec<u8> = "image/gif"),
            (Vec<u8> = "image/bmp"), (Vec<u8> = "image/tiff"), (Vec<u8> = "application/octet-stream"),
            (Vec<u8> = "multipart/form-data"),
        )),
    responses(
        (status = 200, description = "The prediction", body = ClassifyResponse),
        (status = 400, description = "Undecodable image, or multipart without an `image` field", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key (when keys are configured)", body = ErrorResponse),
        (status = 408, description = "The body did not arrive before the deadline", body = ErrorResponse),
        (status = 413, description = "Body or image dimensions over the limits", body = ErrorResponse),
        (status = 415, description = "Unsupported Content-Type", body = ErrorResponse),
        (status = 422, description = "Invalid query parameter", body = ErrorResponse),
        (status = 429, description = "Query attack detected (`attack_detection.action = refuse`): this client's recent queries are near-identical images, or it is in the cooldown after one; see Retry-After", body = ErrorResponse),
        (status = 503, description = "Overloaded (queue full) or not ready; see Retry-After", body = ErrorResponse),
        (status = 504, description = "Not finished within the request deadline", body = ErrorResponse),
    ))]
pub async fn classify(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let context = request
        .extensions()
        .get::<RequestContext>()
        .cloned()
        .ok_or_else(|| ApiError::Internal("request context missing".into()))?;
    let params = ClassifyParams::from_query(request.uri().query(), state.config(), state.defenses())?;
    if params.seed.is_some() && !state.config().defense.allow_client_seed {
        return Err(ParamError::new("seed", ParamProblem::SeedRefused).into());
    }
    let pipeline = state.pipeline()?;
    let timeout = pipeline.request_timeout();
    let deadline = context.deadline(timeout);
    let deadline_ms = timeout.as_millis() as u64;
    // A retry whose earlier tries (other replicas) used up the whole deadline: the
    // client has been told nothing yet, but there is no time left to tell it more.
    if deadline <= Instant::now() {
        return Err(ApiError::DeadlineExceeded { deadline_ms });
    }

    // Everything that can refuse the request from its head alone, before its body is
    // read: the body's declared size and type, then admission (its rows reserved, or
    // 503 at once when the queues cannot drain before its deadline).
    let max_body = state.config().server.max_body_bytes;
    let kind = body_kind(request.headers(), max_body)?;
    // Query-attack detection knows the client from the head too; a client in its
    // cooldown under `refuse` is turned away before its body is read or decoded.
    let detection = state.detector().map(|detector| {
        let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        let keys_required = state.api_keys().required();
        let id = client::client_id(detector, request.headers(), peer, keys_required, state.trusted_proxies());
        (Arc::clone(detector), id)
    });
    if let Some((detector, id)) = &detection {
        if let Some(left) = cooldown(detector, id).await? {
            return Ok(refusal(left, id, None));
        }
    }
    let admitted = pipeline.admit(&params, deadline)?;

    let body = tokio::time::timeout_at(deadline.into(), read_image(request, kind, &state, max_body))
        .await
        .map_err(|_| ApiError::BodyTimeout { deadline_ms })??;

    // Detection runs between decoding and inference: on the model-input pixels, and
    // before a refused query costs any inference.
    let work = async {
        let prepared = pipeline.prepare(admitted, body, &params).await?;
        let mut verdict = None;
        if let Some((detector, id)) = &detection {
            let checked = inspect(detector, id, prepared.model_input().as_raw().clone()).await?;
            verdict = Some(checked);
            if let Decision::Refuse { .. } = detector.policy().decide(checked.detected) {
                return Ok((None, verdict));
            }
        }
        let outcome = pipeline.finish(prepared, &params, context.arrived).await?;
        Ok::<_, ApiError>((Some(outcome), verdict))
    };
    let (outcome, verdict) = tokio::time::timeout_at(deadline.into(), work)
        .await
        .map_err(|_| ApiError::DeadlineExceeded { deadline_ms })??;
    let Some(outcome) = outcome else {
        // Refused by the policy: the verdict and the client are known.
        let (retry_after, id) = match (&detection, verdict) {
            (Some((detector, id)), Some(_)) => (detector.policy().cooldown, id),
            _ => return Err(ApiError::Internal("a refusal without a verdict".into())),
        };
        return Ok(refusal(retry_after, id, verdict));
    };
    let mut answer = answer::classify_response(&outcome, context.id, params.top_k);
    let decision = match (&detection, verdict) {
        (Some((detector, _)), Some(verdict)) => {
            if detector.policy().reports() {
                let observation = verdict.observation;
                answer.query_attack = Some(QueryAttackReport {
                    detected: verdict.detected,
                    matches: observation.matches,
                    alike: observation.alike,
                    close: observation.close,
                    window: observation.window,
                });
            }
            detector.policy().decide(verdict.detected)
        }
        _ => Decision::Answer,
    };

    let mut summary = RequestSummary {
        model: answer.model.clone(),
        rows: answer.rows,
        suspicious: Some(answer.suspicious),
        ..RequestSummary::default()
    };
    if let (Some((_, id)), Some(verdict)) = (&detection, verdict) {
        summary.detection(id, &verdict);
    }
    let server_timing = server_timing(&answer.timing_ms);
    let mut response = match decision {
        Decision::Degrade => Json(answer::without_scores(&answer)?).into_response(),
        _ => Json(answer).into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&server_timing) {
        response.headers_mut().insert("server-timing", value);
    }
    response.extensions_mut().insert(summary);
    Ok(response)
}

/// The rest of the client's cooldown, when the policy refuses clients (the store may
/// be a network round trip: on the blocking pool).
async fn cooldown(detector: &Arc<Detector>, id: &ClientId) -> Result<Option<Duration>, ApiError> {
    if !detector.policy().refuses() {
        return Ok(None);
    }
    let (detector, id) = (Arc::clone(detector), id.clone());
    tokio::task::spawn_blocking(move || detector.cooldown(&id))
        .await
        .map_err(|e| ApiError::Internal(format!("the detection worker failed: {e}")))
}

/// Fingerprints the model input and consults the client's window, on the blocking pool.
async fn inspect(detector: &Arc<Detector>, id: &ClientId, pixels: Vec<u8>) -> Result<Verdict, ApiError> {
    let (detector, id) = (Arc::clone(detector), id.clone());
    tokio::task::spawn_blocking(move || detector.inspect(&id, &pixels))
        .await
        .map_err(|e| ApiError::Internal(format!("the detection worker failed: {e}")))
}

/// 429 `query_attack_detected` with `Retry-After` (whole seconds, rounded up), and the
/// detection in the access log.
fn refusal(retry_after: Duration, id: &ClientId, verdict: Option<Verdict>) -> Response {
    let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let mut response = ApiError::QueryAttackDetected { retry_after: seconds }.into_response();
    let mut summary = RequestSummary::default();
    match verdict {
        Some(verdict) => summary.detection(id, &verdict),
        None => summary.cooling_down(id),
    }
    response.extensions_mut().insert(summary);
    response
}

/// `Server-Timing` lets browsers and proxies show the stages without parsing the body.
fn server_timing(t: &Timing) -> String {
    format!(
        "decode;dur={}, preprocess;dur={}, views;dur={}, queue;dur={}, inference;dur={}, total;dur={}",
        t.decode, t.preprocess, t.views, t.queue, t.inference, t.total
    )
}

fn media_type(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return Ok(String::new()) };
    let text = value.to_str().map_err(|_| ApiError::UnsupportedMediaType("(not ASCII)".into()))?;
    Ok(text.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

/// How the image travels in the body, from the request's head.
pub(super) enum BodyKind {
    /// The image bytes themselves, with the declared length when there is one.
    Raw {
        declared: Option<u64>,
    },
    Multipart,
}

/// Refuses a declared oversize body and an unsupported type before reading a byte.
pub(super) fn body_kind(headers: &HeaderMap, max_body: usize) -> Result<BodyKind, ApiError> {
    let media_type = media_type(headers)?;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_body as u64) {
        return Err(ApiError::BodyTooLarge { limit: max_body });
    }
    if media_type == "multipart/form-data" {
        Ok(BodyKind::Multipart)
    } else if media_type.is_empty() || RAW_IMAGE_TYPES.contains(&media_type.as_str()) {
        Ok(BodyKind::Raw { declared })
    } else {
        Err(ApiError::UnsupportedMediaType(media_type))
    }
}

async fn read_image(request: Request, kind: BodyKind, state: &AppState, max_body: usize) -> Result<Bytes, ApiError> {
    match kind {
        BodyKind::Multipart => read_multipart(request, state, max_body).await,
        BodyKind::Raw { declared } => read_raw(request, max_body, declared).await,
    }
}

pub(super) async fn read_raw(request: Request, max_body: usize, declared: Option<u64>) -> Result<Bytes, ApiError> {
    let mut body = request.into_body();
    // Trust the declared length only as a capacity hint, and never beyond the limit.
    let mut buffer = BytesMut::with_capacity(declared.map_or(64 * 1024, |n| n as usize).min(max_body));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buffer.len() + data.len() > max_body {
                return Err(ApiError::BodyTooLarge { limit: max_body });
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}

async fn read_multipart(request: Request, state: &AppState, max_body: usize) -> Result<Bytes, ApiError> {
    read_multipart_fields(request, state, max_body, &["image"], true)
        .await?
        .into_iter()
        .next()
        .flatten()
        .ok_or_else(|| ApiError::BadRequest("the multipart body has no field named `image`".into()))
}

/// The fields `names` of a multipart body (each at most once), in that order; with
/// `stop_when_found`, reading ends as soon as all are in.
pub(super) async fn read_multipart_fields(
    request: Request,
    state: &AppState,
    max_body: usize,
    names: &[&str],
    stop_when_found: bool,
) -> Result<Vec<Option<Bytes>>, ApiError> {
    let mut found: Vec<Option<Bytes>> = vec![None; names.len()];
    let mut multipart = Multipart::from_request(request, state)
        .await
        .map_err(|e| ApiError::BadRequest(format!("invalid multipart body: {}", e.body_text())))?;
    let multipart_error = |e: axum::extract::multipart::MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge { limit: max_body }
        } else {
            ApiError::BadRequest(format!("invalid multipart body: {}", e.body_text()))
        }
    };
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        let Some(index) = names.iter().position(|name| field.name() == Some(name)) else { continue };
        if found[index].is_some() {
            return Err(ApiError::BadRequest(format!("the multipart body has more than one `{}` field", names[index])));
        }
        found[index] = Some(field.bytes().await.map_err(multipart_error)?);
        if stop_when_found && found.iter().all(Option::is_some) {
            break;
        }
    }
    Ok(found)
}

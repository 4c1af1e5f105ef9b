//! Early refusals every client can read. A request refused before its body is read
//! (413 from `Content-Length`, 401, 415, 422, 503) is answered at once; if the
//! connection were then closed with the body unread, the kernel would reset it, and a
//! client that sends its whole body before reading (Python's `http.client`, hence
//! `requests` and most SDKs) would see a broken pipe instead of the JSON answer. So,
//! as nginx's lingering close does, the rest of the body is read and discarded after
//! the answer, bounded in bytes (`server.linger_max_bytes`) and time
//! (`server.linger_ms`): a client that keeps sending past either is cut off, so this
//! is not a new slow-client hole.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use super::AppState;

/// The request body, shared between the handler (which may read some of it) and this
/// middleware (which drains what is left once the answer is out).
#[derive(Clone)]
struct SharedBody(Arc<Mutex<Body>>);

impl HttpBody for SharedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        // Only one side polls at a time (the handler, then the drain), so the lock is
        // never contended; a poisoned lock means a panic while polling: end the body.
        match self.0.lock() {
            Ok(mut body) => Pin::new(&mut *body).poll_frame(cx),
            Err(_) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.lock().map_or(true, |body| body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.0.lock().map_or_else(|_| SizeHint::default(), |body| body.size_hint())
    }
}

pub async fn linger(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let shared = SharedBody(Arc::new(Mutex::new(body)));
    let response = next.run(Request::from_parts(parts, Body::new(shared.clone()))).await;
    if !shared.is_end_stream() {
        let server = &state.config().server;
        let (max_bytes, max_time) = (server.linger_max_bytes, Duration::from_millis(server.linger_ms));
        tokio::spawn(drain(shared, max_bytes, max_time));
    }
    response
}

/// Reads and discards up to `max_bytes` for at most `max_time`; then lets go (the
/// connection closes if the client is still sending).
async fn drain(mut body: SharedBody, max_bytes: u64, max_time: Duration) {
    let mut read = 0u64;
    let reading = async {
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len() as u64);
            if read > max_bytes {
                return false;
            }
        }
        true
    };
    let finished = matches!(tokio::time::timeout(max_time, reading).await, Ok(true));
    metrics::counter!("pandaguard_lingering_bodies_total", "outcome" => if finished { "drained" } else { "cut_off" })
        .increment(1);
}

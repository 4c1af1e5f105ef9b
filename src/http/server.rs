//! Process lifecycle of `pandaguard serve`: bind, load models in the background
//! (alive but not ready meanwhile), serve, and drain on SIGTERM/SIGINT.
//!
//! The drain, in order (README "Deploying behind a load balancer"):
//! 1. signal → `/health/ready` answers 503 at once; everything else is still served;
//! 2. `server.drain_delay_ms` later the listener closes (new connections are
//!    refused, idle keep-alive connections are closed);
//! 3. in-flight requests get up to `server.shutdown_timeout_ms` to finish;
//! 4. the process exits 0.
//!
//! A replica that is still loading models has never been ready, so no load balancer
//! routes to it: a signal then skips the drain delay. A model that cannot be loaded
//! ends the process with an error (non-zero exit) and readiness never turns 200.
//!
//! Connections are served by hyper's HTTP/1 builder directly (not `axum::serve`), for
//! what a replica exposed without a proxy in front needs: a header-read timeout
//! (`server.header_timeout_ms`; it also bounds how long an idle keep-alive connection
//! waits for its next request), and a cap on open connections
//! (`server.max_connections`), past which a connection is answered 503 and closed.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tower::ServiceExt;

use super::{ApiError, AppState, router};
use crate::config::Config;
use crate::model::ModelRegistry;
use crate::pipeline::Pipeline;
use crate::{runtime, telemetry};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Runtime(#[from] runtime::RuntimeError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("model loading failed: {0}")]
    Models(#[from] crate::model::LoadError),
    #[error("model loading failed: the loader panicked: {0}")]
    Loader(String),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the server until a shutdown signal has been handled. Returns an error (and
/// the process exits non-zero) when ONNX Runtime or a model cannot be loaded.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    // Take over SIGTERM/SIGINT before anything slow (loading ONNX Runtime, binding):
    // until a handler is installed the default action kills the process, and a
    // replica stopped early in its start-up would exit 143 instead of 0.
    let signal = listen_for_shutdown();
    // Fail before listening when the runtime library is missing: one clear line.
    runtime::environment(&config.runtime)?;
    raise_open_file_limit(config.server.max_connections);
    let addr = config.bind_addr();
    let listener =
        TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr: addr.to_string(), source })?;
    serve_on(config, listener, signal).await
}

/// Serves on an already bound listener until `signal` completes, then drains.
/// (Tests bind port 0 and pass a signal they control.)
pub async fn serve_on(
    config: Config,
    listener: TcpListener,
    signal: impl Future<Output = &'static str> + Send + 'static,
) -> Result<(), ServeError> {
    let config = Arc::new(config);
    runtime::environment(&config.runtime)?;
    let state = AppState::new(Arc::clone(&config), telemetry::metrics_handle());
    tracing::info!(addr = %listener.local_addr()?, "listening; loading models");

    let stop_accepting = Arc::new(Notify::new());
    let stop = drain(state.clone(), signal, Arc::clone(&stop_accepting));
    let server = accept_until(listener, router(state.clone()), &config.server, stop);
    tokio::pin!(server);

    let loader_config = Arc::clone(&config);
    let loader = tokio::task::spawn_blocking(move || ModelRegistry::load(&loader_config));
    let registry = tokio::select! {
        loaded = loader => match loaded {
            Ok(Ok(registry)) => Arc::new(registry),
            Ok(Err(error)) => {
                tracing::error!(message = %error, "model loading failed; exiting");
                return Err(ServeError::Models(error));
            }
            Err(join) => return Err(ServeError::Loader(join.to_string())),
        },
        // A signal during loading: the drain future runs and the server ends. (The
        // blocking loader cannot be interrupted; the runtime waits for it on exit.)
        connections = &mut server => {
            finish(connections, Duration::from_millis(config.server.shutdown_timeout_ms)).await;
            tracing::info!("stopped before the models were loaded");
            return Ok(());
        }
    };
    let pipeline = Pipeline::with_defenses(Arc::clone(&config), Arc::clone(&registry), state.defenses().clone());
    state.set_pipeline(Arc::new(pipeline));
    if state.is_draining() {
        tracing::info!(models = ?registry.names().collect::<Vec<_>>(), "models loaded while draining; staying not ready");
    } else {
        tracing::info!(models = ?registry.names().collect::<Vec<_>>(), "ready");
    }

    // After the listener closes, in-flight requests get `shutdown_timeout` to finish.
    let connections = (&mut server).await;
    finish(connections, Duration::from_millis(config.server.shutdown_timeout_ms)).await;
    registry.close();
    tracing::info!("stopped");
    Ok(())
}

/// Accepts connections until `stop` completes, then closes the listener; returns the
/// open connections, which the caller lets finish.
async fn accept_until(
    listener: TcpListener,
    router: Router,
    config: &crate::config::ServerConfig,
    stop: impl Future<Output = ()>,
) -> GracefulShutdown {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(Duration::from_millis(config.header_timeout_ms));
    let connections = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refusal = refusal_bytes();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or the peer reset before accept: carry on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics::counter!("pandaguard_connections_refused_total").increment(1);
            tokio::spawn(refuse(stream, Arc::clone(&refusal)));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = router.clone().map_request(move |mut request: axum::extract::Request<_>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request
        });
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = connections.watch(connection);
        let open = Arc::clone(&open);
        tokio::spawn(async move {
            let now_open = open.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
            metrics::gauge!("pandaguard_open_connections").set(now_open as f64);
            // Errors here are the client's (reset, header timeout, malformed request).
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            let now_open = open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) - 1;
            metrics::gauge!("pandaguard_open_connections").set(now_open as f64);
            drop(slot);
        });
    }
    drop(listener);
    connections
}

/// Lets open connections finish their requests for at most `timeout`.
async fn finish(connections: GracefulShutdown, timeout: Duration) {
    if tokio::time::timeout(timeout, connections.shutdown()).await.is_err() {
        tracing::warn!(timeout_ms = timeout.as_millis() as u64, "in-flight requests did not finish in time; exiting");
    }
}

/// The answer to a connection over `server.max_connections`: 503 with the service's
/// JSON error, then close.
fn refusal_bytes() -> Arc<Vec<u8>> {
    let error = ApiError::Overloaded { message: "too many open connections".into(), retry_after: Some(1) };
    let body = serde_json::to_vec(&error.body()).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    Arc::new([head.into_bytes(), body].concat())
}

/// Writes the refusal and reads what the client sends for a moment (so its request is
/// not answered by a reset), bounded to one second and 64 KiB.
async fn refuse(mut stream: TcpStream, refusal: Arc<Vec<u8>>) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        if stream.write_all(&refusal).await.is_ok() && stream.shutdown().await.is_ok() {
            let mut sink = [0u8; 4096];
            let mut read = 0;
            while let Ok(n) = stream.read(&mut sink).await {
                read += n;
                if n == 0 || read > 64 * 1024 {
                    break;
                }
            }
        }
    })
    .await;
}

/// Room for `max_connections` sockets plus the process's own files (models, logs, the
/// listener, ONNX Runtime's): the soft limit is raised towards the hard one.
fn raise_open_file_limit(max_connections: usize) {
    let wanted = max_connections as u64 + 256;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => tracing::warn!(
            limit,
            max_connections,
            "the open-file limit is below server.max_connections + 256; connections past it fail to be accepted"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Completes when the server should stop accepting: after a signal, readiness turns
/// 503 at once, and the replica keeps serving for `drain_delay` so the load
/// balancer notices before connections are refused. A replica that never became
/// ready gets no traffic, so it stops at once.
async fn drain(state: AppState, signal: impl Future<Output = &'static str>, stop_accepting: Arc<Notify>) {
    let signal = signal.await;
    state.start_draining();
    let was_ready = state.pipeline().is_ok();
    let delay = if was_ready { Duration::from_millis(state.config().server.drain_delay_ms) } else { Duration::ZERO };
    tracing::info!(signal, drain_delay_ms = delay.as_millis() as u64, was_ready, "draining: readiness is now 503");
    tokio::time::sleep(delay).await;
    tracing::info!("no longer accepting connections; finishing in-flight requests");
    stop_accepting.notify_one();
}

/// Completes on the first SIGTERM or SIGINT (Ctrl-C). The handlers are installed
/// only when this future is first polled; `serve` installs them at once instead.
pub async fn shutdown_signal() -> &'static str {
    listen_for_shutdown().await
}

/// Installs the SIGTERM and SIGINT handlers now (must be called inside the tokio
/// runtime) and returns a future that completes on the first of them.
fn listen_for_shutdown() -> impl Future<Output = &'static str> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        for (name, registered) in [("SIGTERM", term.as_ref().err()), ("SIGINT", int.as_ref().err())] {
            if let Some(e) = registered {
                tracing::warn!(signal = name, error = %e, "cannot handle this signal; it will end the process without a drain");
            }
        }
        async move {
            let term = async {
                match term {
                    Ok(mut term) => term.recv().await.map(|()| "SIGTERM"),
                    Err(_) => None,
                }
            };
            let int = async {
                match int {
                    Ok(mut int) => int.recv().await.map(|()| "SIGINT"),
                    Err(_) => None,
                }
            };
            tokio::pin!(term, int);
            // A stream that cannot deliver (None) must not end the wait: only a signal may.
            let mut term_done = false;
            let mut int_done = false;
            loop {
                tokio::select! {
                    name = &mut term, if !term_done => match name { Some(name) => return name, None => term_done = true },
                    name = &mut int, if !int_done => match name { Some(name) => return name, None => int_done = true },
                    else => std::future::pending::<()>().await,
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

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

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::{AppState, router};
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
    let server = axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(drain(state.clone(), signal, Arc::clone(&stop_accepting)))
        .into_future();
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
        result = &mut server => {
            tracing::info!("stopped before the models were loaded");
            return result.map_err(ServeError::Io);
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
    let shutdown_timeout = Duration::from_millis(config.server.shutdown_timeout_ms);
    let result = tokio::select! {
        result = &mut server => result.map_err(ServeError::Io),
        _ = async { stop_accepting.notified().await; tokio::time::sleep(shutdown_timeout).await } => {
            tracing::warn!(timeout_ms = config.server.shutdown_timeout_ms, "in-flight requests did not finish in time; exiting");
            Ok(())
        }
    };
    registry.close();
    tracing::info!("stopped");
    result
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

//! Process lifecycle of `pandaguard serve`: bind, load models in the background
//! (alive but not ready meanwhile), serve, and drain on SIGTERM/SIGINT.

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
    Models(String),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the server until a shutdown signal has been handled. Returns an error (and
/// the process exits non-zero) when ONNX Runtime or a model cannot be loaded.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    // Fail before listening when the runtime library is missing: one clear line.
    runtime::environment(&config.runtime)?;
    let addr = config.bind_addr();
    let listener =
        TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr: addr.to_string(), source })?;
    serve_on(config, listener, shutdown_signal()).await
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
            Ok(Err(message)) => return Err(ServeError::Models(message)),
            Err(join) => return Err(ServeError::Models(format!("the loader panicked: {join}"))),
        },
        // A signal during loading: the drain future runs and the server ends.
        result = &mut server => return result.map_err(ServeError::Io),
    };
    state.set_pipeline(Arc::new(Pipeline::new(Arc::clone(&config), Arc::clone(&registry))));
    tracing::info!(models = ?registry.names().collect::<Vec<_>>(), "ready");

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
/// balancer notices before connections are refused.
async fn drain(state: AppState, signal: impl Future<Output = &'static str>, stop_accepting: Arc<Notify>) {
    let signal = signal.await;
    let delay = Duration::from_millis(state.config().server.drain_delay_ms);
    tracing::info!(signal, drain_delay_ms = delay.as_millis() as u64, "draining: readiness is now 503");
    state.start_draining();
    tokio::time::sleep(delay).await;
    tracing::info!("no longer accepting connections; finishing in-flight requests");
    stop_accepting.notify_one();
}

pub async fn shutdown_signal() -> &'static str {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                name = ctrl_c => name,
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await
}

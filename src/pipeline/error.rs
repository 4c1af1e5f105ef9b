//! Why a classification failed, by stage, with what the HTTP layer needs to pick a
//! status (and nothing of HTTP itself).

use crate::defense::DefenseError;
use crate::engine::EngineError;
use crate::imaging::DecodeError;
use crate::params::ParamError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PipelineError {
    /// The request asks for something the parameters do not allow (a model that is
    /// not loaded, more rows than a request may take).
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A model's engine refused or failed the rows (queue full, deadline, stopped).
    #[error("{source}")]
    Engine { model: String, source: EngineError },
    /// A defense could not build its views (an internal error: resize, planning).
    #[error(transparent)]
    Defense(#[from] DefenseError),
    /// Admission refused the request: its rows could not run before its deadline
    /// (`reason` "deadline") or a queue is full ("queue_full"). `retry_after` is how
    /// long the queues take to drain.
    #[error("the queues take {:.1} s to drain, past this request's deadline ({reason})", retry_after.as_secs_f64())]
    Overloaded { reason: &'static str, retry_after: std::time::Duration },
    /// The request's deadline passed while it was being worked on.
    #[error("the request did not finish within its deadline of {deadline_ms} ms")]
    DeadlineExceeded { deadline_ms: u64 },
    /// The server stops: no new work is started.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A blocking task (decode, views) panicked or was cancelled.
    #[error("a worker task failed: {0}")]
    Worker(String),
}

impl PipelineError {
    /// An engine's refusal or failure; a deadline that passed in the queue is the
    /// request's deadline (`deadline_ms`), whichever stage it passed in.
    pub fn engine(model: &str, source: EngineError, deadline_ms: u64) -> Self {
        match source {
            EngineError::DeadlineExceeded => PipelineError::DeadlineExceeded { deadline_ms },
            source => PipelineError::Engine { model: model.to_string(), source },
        }
    }

    /// The service is overloaded: retrying later (or elsewhere) may succeed.
    pub fn is_overloaded(&self) -> bool {
        matches!(
            self,
            PipelineError::Overloaded { .. }
                | PipelineError::Engine { source: EngineError::QueueFull { .. } | EngineError::Late { .. }, .. }
        )
    }
}

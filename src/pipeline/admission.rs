//! Admission before any expensive work: a request reserves the rows of its first
//! round on every model it needs when it arrives, and is refused at once when the
//! queues ahead of it cannot drain before its deadline. The drain time comes from each
//! engine's measured cost per row; the models share one run gate (`runtime.
//! max_concurrent_runs` at a time), so their queues drain one after another.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Pipeline, PipelineError, Plan};
use crate::engine::{EngineError, Reservation};
use crate::model::LoadedModel;
use crate::params::ClassifyParams;

/// A request that holds its first round's rows and a deadline it can make.
pub struct Admitted {
    pub(super) plan: Plan,
    pub(super) reservations: Vec<(Arc<LoadedModel>, Reservation)>,
    pub(super) deadline: Instant,
}

impl Pipeline {
    /// Plans the request, reserves its first round's rows, and refuses it (503
    /// `overloaded`, with how long the queues take to drain) when the rows ahead of it
    /// and its own cannot run before `deadline`. Costs microseconds: no decoding, no views.
    pub fn admit(&self, params: &ClassifyParams, deadline: Instant) -> Result<Admitted, PipelineError> {
        let plan = self.plan(params)?;
        let mut reservations = Vec::with_capacity(plan.first_round.len());
        for (model, rows) in &plan.first_round {
            let reservation = model.engine.reserve(*rows).map_err(|e| self.engine_error(&model.card.name, e))?;
            reservations.push((Arc::clone(model), reservation));
        }
        // Our own rows are in the queues now: the estimate is when our last row has run.
        let drain = self.drain_time();
        metrics::gauge!("pandaguard_admission_drain_seconds").set(drain.as_secs_f64());
        if Instant::now() + drain + self.margin() > deadline {
            return Err(self.overloaded("deadline"));
        }
        Ok(Admitted { plan, reservations, deadline })
    }

    /// How long every queue takes to drain at its measured cost per row.
    pub fn drain_time(&self) -> Duration {
        let serial: Duration =
            self.registry.models().map(|m| m.engine.row_cost() * m.engine.queued_rows() as u32).sum();
        serial / self.config.runtime.max_concurrent_runs.max(1) as u32
    }

    /// Room kept for what is not inference (decoding, views, answering): a tenth of
    /// the request timeout, at least 100 ms.
    fn margin(&self) -> Duration {
        (self.request_timeout() / 10).max(Duration::from_millis(100))
    }

    /// An engine's refusal or failure as the pipeline reports it: a full queue and a
    /// request shed as late are overload (503 with the drain time), a deadline passed
    /// in the queue is the request's deadline.
    pub(super) fn engine_error(&self, model: &str, error: EngineError) -> PipelineError {
        match error {
            EngineError::QueueFull { .. } => self.overloaded("queue_full"),
            EngineError::Late { .. } => self.overloaded("late"),
            error => PipelineError::engine(model, error, self.config.server.request_timeout_ms),
        }
    }

    /// The refusal of an overloaded server, with the drain time as its retry hint.
    fn overloaded(&self, reason: &'static str) -> PipelineError {
        metrics::counter!("pandaguard_admission_refused_total", "reason" => reason).increment(1);
        PipelineError::Overloaded { reason, retry_after: self.drain_time() }
    }
}

//! Admission before any expensive work: a request reserves the rows of its first
//! round on every model it needs when it arrives, and is refused at once when the
//! queues ahead of it cannot drain before its deadline. The drain time comes from each
//! engine's measured cost per row; the models share one run gate (`runtime.
//! max_concurrent_runs` at a time), so their queues drain one after another. The
//! admitted requests still decoding and making views compete with inference for the
//! same cores, so their measured cost counts too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    pub(super) preparing: Preparing,
}

/// The share added to the estimated drain time before admission compares it with the
/// deadline: costs are measured on a quieter machine than a burst makes, and a request
/// refused at once is a cheap 503 where one admitted and run late is a 504.
const ADMISSION_SLACK: f64 = 0.25;

/// The CPU work admitted requests do before their first rows run (decode, fit to the
/// models, the first round's views): how many are at it and what it takes.
#[derive(Default)]
pub(super) struct PrepLoad {
    pending: AtomicUsize,
    /// Nanoseconds per request, a moving average (0 until the first request).
    cost_ns: AtomicU64,
}

impl PrepLoad {
    fn enter(self: &Arc<Self>) -> Preparing {
        self.pending.fetch_add(1, Ordering::AcqRel);
        Preparing { load: Arc::clone(self), done: false }
    }

    /// The work still to do, spread over the cores it shares with inference.
    fn work(&self) -> Duration {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let pending = u32::try_from(self.pending.load(Ordering::Acquire)).unwrap_or(u32::MAX);
        Duration::from_nanos(self.cost_ns.load(Ordering::Acquire)).saturating_mul(pending) / cores
    }
}

/// One admitted request's place among those preparing; leaving (or dropping it)
/// takes it out of the count.
pub struct Preparing {
    load: Arc<PrepLoad>,
    done: bool,
}

impl Preparing {
    /// The request's rows are built: records what that took (moving a fifth of the way).
    pub(super) fn finished(mut self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let _ = self.load.cost_ns.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
            Some(if old == 0 { took } else { (4 * old + took) / 5 })
        });
        self.leave();
    }

    fn leave(&mut self) {
        if !self.done {
            self.done = true;
            self.load.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Preparing {
    fn drop(&mut self) {
        self.leave();
    }
}

impl Pipeline {
    /// Plans the request, reserves its first round's rows, and refuses it (503
    /// `overloaded`, with how long the queues take to drain) when the rows ahead of it
    /// and its own cannot run before `deadline`. Costs microseconds: no decoding, no views.
    pub fn admit(&self, params: &ClassifyParams, deadline: Instant) -> Result<Admitted, PipelineError> {
        let plan = self.plan(params)?;
        let preparing = self.preparing.enter();
        let mut reservations = Vec::with_capacity(plan.first_round.len());
        for (model, rows) in &plan.first_round {
            let reservation = model.engine.reserve(*rows).map_err(|e| self.engine_error(&model.card.name, e))?;
            reservations.push((Arc::clone(model), reservation));
        }
        // Our own rows are in the queues now: the estimate is when our last row has run.
        let drain = self.drain_time();
        metrics::gauge!("pandaguard_admission_drain_seconds").set(drain.as_secs_f64());
        if Instant::now() + drain.mul_f64(1.0 + ADMISSION_SLACK) + self.margin() > deadline {
            return Err(self.overloaded("deadline"));
        }
        Ok(Admitted { plan, reservations, deadline, preparing })
    }

    /// How long the admitted work takes: every queue at its measured cost per row (the
    /// queues take turns at the run gate), plus the preparation still to do.
    pub fn drain_time(&self) -> Duration {
        let serial: Duration = self.registry.models().map(|m| m.engine.queued_work()).sum();
        serial / self.config.runtime.max_concurrent_runs.max(1) as u32 + self.preparing.work()
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
        // Every queued row has a deadline within one request timeout, so by then the
        // queues are empty whatever the estimate says.
        PipelineError::Overloaded { reason, retry_after: self.drain_time().min(self.request_timeout()) }
    }
}

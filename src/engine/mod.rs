//! The inference engine: one dynamic batcher per model.
//!
//! A request submits one or many rows (model input tensors) with a deadline. A worker
//! on a dedicated OS thread owns the model's session, gathers rows from the queue
//! until `max_batch_rows` or `max_wait`, runs them together and hands every request
//! its rows' outputs. Admission is counted in rows and fails fast when the queue is
//! full, so overload turns into quick 503s instead of slow time-outs. A request may
//! reserve its rows when it arrives ([`Engine::reserve`]) and submit them once its
//! image is decoded; reserved rows count as queued. The worker measures what a row
//! costs ([`Engine::row_cost`]), so callers can tell how long the queue takes to drain.
//!
//! Owns: the queues, the worker threads, the shared run gate, `EngineError`. Must not
//! import: `http`, the pipeline, `defense`, `imaging`, model cards — it batches rows of
//! floats for one session and knows nothing of what they mean.

mod onnx;
mod rows;
mod worker;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use onnx::{OnnxRunner, SessionMemory};
pub use rows::Rows;

/// Something that turns a batch of rows into a batch of outputs; in production an
/// ONNX Runtime session (`OnnxRunner`). Owned by exactly one worker thread.
pub trait BatchRunner: 'static {
    /// `input` holds `rows` rows of `row_len` floats back to back; the answer holds
    /// `rows` rows of `output_len` floats.
    fn run(&mut self, input: &[f32], rows: usize) -> Result<Vec<f32>, String>;
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Model name, for thread names, logs and metric labels.
    pub name: String,
    /// Floats per input row.
    pub row_len: usize,
    /// Floats per output row.
    pub output_len: usize,
    pub max_batch_rows: usize,
    pub max_wait: Duration,
    pub capacity_rows: usize,
    pub max_rows_per_request: usize,
    /// Run one full batch (and one single row) before `start` returns.
    pub warmup: bool,
    /// Shared by every engine of the process: how many `Session::run` may be in
    /// flight at once.
    pub gate: Arc<RunGate>,
}

/// A counting gate over `Session::run` across all models. All sessions share one
/// intra-op thread pool sized to the cores; two runs at once would each bring their
/// calling thread on top of the pool and oversubscribe the CPU, so by default runs
/// take turns and each gets every core.
///
/// Small runs are the exception: a run of a row or two splits poorly across the pool's
/// threads, so two such runs (of different models: `fast` sends one row to each of
/// three) share a turn. Each large run weighs a full permit, each small run half of
/// one (`small_rows`: most rows a run may have to count as small; 0 = none).
///
/// Turns are first come, first served (a ticket queue): a worker that has just run
/// queues behind the workers already waiting, so busy engines alternate batch by batch
/// and none starves. That makes waits predictable, and the gate knows the engines
/// behind it so a worker can estimate how long its rows wait ([`RunGate::wait_for`]).
pub struct RunGate {
    permits: usize,
    small_rows: usize,
    turns: Mutex<Turns>,
    changed: Condvar,
    members: Mutex<Vec<Weak<Shared>>>,
}

/// Tickets handed out, the ticket that may start next, and the half-permits in use.
#[derive(Default)]
struct Turns {
    issued: u64,
    next: u64,
    halves_in_use: usize,
}

impl std::fmt::Debug for RunGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunGate")
            .field("permits", &self.permits)
            .field("small_rows", &self.small_rows)
            .finish_non_exhaustive()
    }
}

impl RunGate {
    pub fn new(permits: usize) -> Self {
        Self::with_small_runs(permits, 0)
    }

    /// A gate on which runs of at most `small_rows` rows take half a permit.
    pub fn with_small_runs(permits: usize, small_rows: usize) -> Self {
        Self {
            permits: permits.max(1),
            small_rows,
            turns: Mutex::new(Turns::default()),
            changed: Condvar::new(),
            members: Mutex::new(Vec::new()),
        }
    }

    /// How many (large) runs may be in flight at once.
    pub fn permits(&self) -> usize {
        self.permits
    }

    /// Waits for the turn of a run of `rows` rows.
    fn acquire(&self, rows: usize) -> RunPermit<'_> {
        let halves = if rows <= self.small_rows { 1 } else { 2 };
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = turns.issued;
        turns.issued += 1;
        while ticket != turns.next || turns.halves_in_use + halves > 2 * self.permits {
            turns = self.changed.wait(turns).unwrap_or_else(|p| p.into_inner());
        }
        turns.next += 1;
        turns.halves_in_use += halves;
        // The next ticket may fit beside this run.
        self.changed.notify_all();
        RunPermit { gate: self, halves }
    }

    fn join(&self, engine: &Arc<Shared>) {
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members.retain(|m| m.strong_count() > 0);
        members.push(Arc::downgrade(engine));
    }

    /// How long until `rows` more rows of engine `me` have run, when they are queued
    /// behind `ahead` rows of its own: its batches, and since busy engines alternate
    /// batch by batch, up to one batch of every other engine's queued rows before each
    /// of ours, at each engine's measured cost per row.
    fn wait_for(&self, me: &Shared, ahead: usize, rows: usize) -> Duration {
        let own_rows = ahead + rows;
        let own_batches = own_rows.div_ceil(me.options.max_batch_rows.max(1));
        let members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let others: Duration = members
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|other| !std::ptr::eq(Arc::as_ptr(other), me))
            .map(|other| {
                let queued = other.queued_rows.load(Ordering::Acquire);
                let interleaved = queued.min(own_batches.saturating_mul(other.options.max_batch_rows));
                other.row_cost().saturating_mul(u32::try_from(interleaved).unwrap_or(u32::MAX))
            })
            .sum();
        let own = me.row_cost().saturating_mul(u32::try_from(own_rows).unwrap_or(u32::MAX));
        (own + others) / self.permits as u32
    }
}

struct RunPermit<'a> {
    gate: &'a RunGate,
    halves: usize,
}

impl Drop for RunPermit<'_> {
    fn drop(&mut self) {
        let mut turns = self.gate.turns.lock().unwrap_or_else(|p| p.into_inner());
        turns.halves_in_use = turns.halves_in_use.saturating_sub(self.halves);
        drop(turns);
        self.gate.changed.notify_all();
    }
}

/// What a request gets back: its rows' outputs in order, and where its time went.
#[derive(Debug, Clone)]
pub struct EngineOutput {
    pub outputs: Vec<f32>,
    pub rows: usize,
    /// From admission until the first of its rows entered a batch.
    pub queue_time: Duration,
    /// Sum of the `Session::run` calls its rows took part in.
    pub inference_time: Duration,
    pub batches: usize,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("queue of model {model} is full ({queued} of {capacity} rows waiting)")]
    QueueFull { model: String, queued: usize, capacity: usize },
    #[error("{rows} rows requested from model {model}, at most {max} per request")]
    TooManyRows { model: String, rows: usize, max: usize },
    #[error("input has {got} floats, expected {expected}")]
    BadInput { got: usize, expected: usize },
    #[error("input parts are not whole rows of {row_len} floats")]
    RaggedRows { row_len: usize },
    #[error("deadline passed while waiting in the queue")]
    DeadlineExceeded,
    /// Shed before running: behind the rows ahead of it, at the measured cost per row,
    /// it would finish after its deadline.
    #[error("the queue of model {model} cannot run this request before its deadline")]
    Late { model: String },
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("the engine of model {0} has stopped")]
    Stopped(String),
    /// The runner could not be built or warmed up.
    #[error("{0}")]
    Start(String),
}

type Reply = oneshot::Sender<Result<EngineOutput, EngineError>>;

/// One request's rows while they wait and run.
struct Job {
    input: Rows,
    rows: usize,
    /// Rows already handed to a batch.
    next_row: usize,
    outputs: Vec<f32>,
    reply: Reply,
    deadline: Instant,
    enqueued_at: Instant,
    started_at: Option<Instant>,
    inference_time: Duration,
    batches: usize,
}

impl Job {
    fn remaining(&self) -> usize {
        self.rows - self.next_row
    }
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    options: EngineOptions,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Rows admitted and not yet run: reserved, queued or in partially run jobs.
    queued_rows: AtomicUsize,
    /// Nanoseconds one row costs in a `Session::run`, a moving average over batches
    /// (0 until the first batch).
    row_cost_ns: AtomicU64,
    alive: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A poisoned lock only means a thread panicked while holding it; the queue
        // itself is still consistent (every mutation is a single push or drain).
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn release_rows(&self, rows: usize) {
        let left = self.queued_rows.fetch_sub(rows, Ordering::AcqRel) - rows;
        metrics::gauge!("pandaguard_queue_rows", "model" => self.options.name.clone()).set(left as f64);
    }

    /// Takes `rows` more of the queue's capacity, or says how full it is.
    fn admit_rows(&self, rows: usize) -> Result<usize, EngineError> {
        let options = &self.options;
        if rows > options.max_rows_per_request {
            return Err(EngineError::TooManyRows {
                model: options.name.clone(),
                rows,
                max: options.max_rows_per_request,
            });
        }
        if !self.alive.load(Ordering::Acquire) {
            return Err(EngineError::Stopped(options.name.clone()));
        }
        let admitted = self.queued_rows.fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
            (queued + rows <= options.capacity_rows).then_some(queued + rows)
        });
        match admitted {
            Ok(before) => {
                metrics::gauge!("pandaguard_queue_rows", "model" => options.name.clone()).set((before + rows) as f64);
                Ok(before + rows)
            }
            Err(queued) => {
                metrics::counter!("pandaguard_rejected_total", "model" => options.name.clone(), "reason" => "queue_full")
                    .increment(1);
                Err(EngineError::QueueFull { model: options.name.clone(), queued, capacity: options.capacity_rows })
            }
        }
    }

    /// Folds a batch's measured cost into the per-row average, a quarter of the way: a
    /// few batches follow a lasting change (another process on the cores), while the
    /// short spike of a burst's arrival (hundreds of connections, decodes and views at
    /// once) does not make every queued request look late. (Moving halfway up at once,
    /// as this did before, shed half the admitted requests of a burst as late that
    /// would have finished in time.)
    fn record_cost(&self, elapsed: Duration, rows: usize) {
        let per_row = (elapsed.as_nanos() / rows.max(1) as u128).min(u128::from(u64::MAX)) as u64;
        let next = |old: u64| match old {
            0 => per_row,
            old => (3 * old + per_row) / 4,
        };
        let old = self.row_cost_ns.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| Some(next(old)));
        let cost = next(old.unwrap_or(0));
        metrics::gauge!("pandaguard_row_cost_seconds", "model" => self.options.name.clone()).set(cost as f64 / 1e9);
    }

    fn row_cost(&self) -> Duration {
        Duration::from_nanos(self.row_cost_ns.load(Ordering::Acquire))
    }

    /// Rows admitted and not yet run, at the measured cost per row.
    fn queued_work(&self) -> Duration {
        self.row_cost().saturating_mul(u32::try_from(self.queued_rows.load(Ordering::Acquire)).unwrap_or(u32::MAX))
    }
}

/// Rows of a queue's capacity held for one request until it submits them (or is
/// dropped, which gives them back).
pub struct Reservation {
    shared: Arc<Shared>,
    rows: usize,
}

impl Reservation {
    pub fn rows(&self) -> usize {
        self.rows
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.rows > 0 {
            self.shared.release_rows(self.rows);
        }
    }
}

/// Handle to one model's batcher. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts the worker thread, which builds its runner with `make_runner` (so the
    /// session lives and dies on the thread that owns it) and warms it up. Blocks
    /// until the runner is ready or failed.
    pub fn start<R, F>(options: EngineOptions, make_runner: F) -> Result<Engine, EngineError>
    where
        R: BatchRunner,
        F: FnOnce() -> Result<R, String> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            options: options.clone(),
            queue: Mutex::new(Queue { jobs: VecDeque::new(), closed: false }),
            wake: Condvar::new(),
            queued_rows: AtomicUsize::new(0),
            row_cost_ns: AtomicU64::new(0),
            alive: AtomicBool::new(true),
        });
        options.gate.join(&shared);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("engine-{}", options.name))
            .spawn(move || {
                let runner = make_runner().and_then(|mut runner| {
                    if options.warmup {
                        let (elapsed, rows) = warm_up(&mut runner, &options)?;
                        // A full batch is what a loaded queue runs: the first cost estimate.
                        worker_shared.record_cost(elapsed, rows);
                    }
                    Ok(runner)
                });
                match runner {
                    Ok(runner) => {
                        let _ = ready_tx.send(Ok(()));
                        worker::run(&worker_shared, runner);
                    }
                    Err(message) => {
                        let _ = ready_tx.send(Err(message));
                    }
                }
                worker_shared.alive.store(false, Ordering::Release);
            })
            .map_err(|e| EngineError::Start(format!("cannot spawn the engine thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Engine { shared }),
            Ok(Err(message)) => Err(EngineError::Start(message)),
            Err(_) => Err(EngineError::Start("the engine thread exited while loading the model".into())),
        }
    }

    pub fn options(&self) -> &EngineOptions {
        &self.shared.options
    }

    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    pub fn queued_rows(&self) -> usize {
        self.shared.queued_rows.load(Ordering::Acquire)
    }

    /// Measured cost of one row in a `Session::run` (zero before the first batch).
    pub fn row_cost(&self) -> Duration {
        self.shared.row_cost()
    }

    /// Rows admitted and not yet run, at the measured cost per row.
    pub fn queued_work(&self) -> Duration {
        self.shared.queued_work()
    }

    /// Holds `rows` of the queue's capacity for a request that submits them later (with
    /// [`Engine::submit_reserved`]), or refuses at once when the queue is full.
    pub fn reserve(&self, rows: usize) -> Result<Reservation, EngineError> {
        self.shared.admit_rows(rows)?;
        Ok(Reservation { shared: Arc::clone(&self.shared), rows })
    }

    /// Admits `rows` rows or refuses at once. The returned receiver yields the
    /// outputs; dropping it withdraws the rows that have not run yet.
    pub fn submit(
        &self,
        input: impl Into<Rows>,
        rows: usize,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Result<EngineOutput, EngineError>>, EngineError> {
        let mut reservation = Reservation { shared: Arc::clone(&self.shared), rows: 0 };
        self.submit_reserved(&mut reservation, input, rows, deadline)
    }

    /// Submits `rows` rows, taking them from `reservation` first (rows beyond it are
    /// admitted as by [`Engine::submit`]).
    pub fn submit_reserved(
        &self,
        reservation: &mut Reservation,
        input: impl Into<Rows>,
        rows: usize,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Result<EngineOutput, EngineError>>, EngineError> {
        let input = input.into();
        let options = &self.shared.options;
        if rows == 0 || input.len() != rows * options.row_len {
            return Err(EngineError::BadInput { got: input.len(), expected: rows.max(1) * options.row_len });
        }
        if !input.rows_align(options.row_len) {
            return Err(EngineError::RaggedRows { row_len: options.row_len });
        }
        if !Arc::ptr_eq(&reservation.shared, &self.shared) {
            return Err(EngineError::BadInput { got: rows, expected: 0 });
        }
        if rows > options.max_rows_per_request {
            return Err(EngineError::TooManyRows {
                model: options.name.clone(),
                rows,
                max: options.max_rows_per_request,
            });
        }
        if !self.is_alive() {
            return Err(EngineError::Stopped(options.name.clone()));
        }
        let covered = reservation.rows.min(rows);
        if rows > covered {
            self.shared.admit_rows(rows - covered)?;
        }
        // From here the job owns these rows: the worker releases them as they run.
        reservation.rows -= covered;
        let (reply, receiver) = oneshot::channel();
        let job = Job {
            input,
            rows,
            next_row: 0,
            outputs: Vec::with_capacity(rows * options.output_len),
            reply,
            deadline,
            enqueued_at: Instant::now(),
            started_at: None,
            inference_time: Duration::ZERO,
            batches: 0,
        };
        {
            let mut queue = self.shared.lock();
            if queue.closed {
                drop(queue);
                self.shared.release_rows(rows);
                return Err(EngineError::Stopped(options.name.clone()));
            }
            queue.jobs.push_back(job);
        }
        self.shared.wake.notify_one();
        Ok(receiver)
    }

    /// Submits and waits. Dropping the future cancels the rows that have not run.
    pub async fn infer(
        &self,
        input: impl Into<Rows>,
        rows: usize,
        deadline: Instant,
    ) -> Result<EngineOutput, EngineError> {
        let receiver = self.submit(input, rows, deadline)?;
        match receiver.await {
            Ok(result) => result,
            Err(_) => Err(EngineError::Stopped(self.shared.options.name.clone())),
        }
    }

    /// Stops admitting; the worker finishes what is queued and exits.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

/// Runs a full batch twice, then a single row; returns the second full batch's time
/// and rows (the first pays for allocating the session's buffers: not what a row costs).
fn warm_up<R: BatchRunner>(runner: &mut R, options: &EngineOptions) -> Result<(Duration, usize), String> {
    let mut full = (Duration::ZERO, options.max_batch_rows);
    for (run, rows) in [options.max_batch_rows, options.max_batch_rows, 1].into_iter().enumerate() {
        let input = vec![0.0f32; rows * options.row_len];
        let started = Instant::now();
        let output = runner.run(&input, rows).map_err(|e| format!("warm-up with {rows} rows failed: {e}"))?;
        if run == 1 {
            full.0 = started.elapsed();
        }
        if output.len() != rows * options.output_len {
            return Err(format!(
                "warm-up with {rows} rows returned {} floats, expected {}",
                output.len(),
                rows * options.output_len
            ));
        }
    }
    Ok(full)
}

#[cfg(test)]
mod tests;

//! Batching logic with a stand-in runner whose output reveals which row it saw and
//! how large the batch was. (The real model is exercised by the integration tests.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// Output per row: [the row's first float, rows in this batch].
struct EchoRunner {
    batches: Arc<Mutex<Vec<usize>>>,
    delay: Duration,
    fail_when_first_is: Option<f32>,
    panic_when_first_is: Option<f32>,
}

impl BatchRunner for EchoRunner {
    fn run(&mut self, input: &[f32], rows: usize) -> Result<Vec<f32>, String> {
        std::thread::sleep(self.delay);
        let row_len = input.len() / rows;
        let firsts: Vec<f32> = (0..rows).map(|r| input[r * row_len]).collect();
        if self.panic_when_first_is.is_some_and(|v| firsts.contains(&v)) {
            panic!("runner exploded");
        }
        if self.fail_when_first_is.is_some_and(|v| firsts.contains(&v)) {
            return Err("bad batch".into());
        }
        self.batches.lock().unwrap().push(rows);
        Ok(firsts.iter().flat_map(|f| [*f, rows as f32]).collect())
    }
}

fn options(max_batch_rows: usize, capacity_rows: usize) -> EngineOptions {
    EngineOptions {
        name: "echo".into(),
        row_len: 4,
        output_len: 2,
        max_batch_rows,
        max_wait: Duration::from_millis(20),
        capacity_rows,
        max_rows_per_request: capacity_rows,
        warmup: false,
        gate: Arc::new(RunGate::new(1)),
    }
}

fn start(options: EngineOptions, delay: Duration) -> (Engine, Arc<Mutex<Vec<usize>>>) {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let runner_batches = Arc::clone(&batches);
    let engine = Engine::start(options, move || {
        Ok(EchoRunner { batches: runner_batches, delay, fail_when_first_is: None, panic_when_first_is: None })
    })
    .unwrap();
    (engine, batches)
}

/// `rows` rows whose first floats are start, start+1, ...
fn rows_from(start: f32, rows: usize) -> Vec<f32> {
    (0..rows).flat_map(|r| [start + r as f32, 0.0, 0.0, 0.0]).collect()
}

fn later(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

#[tokio::test]
async fn concurrent_requests_share_batches_and_get_their_own_rows() {
    let (engine, batches) = start(options(32, 256), Duration::from_millis(5));
    let mut handles = Vec::new();
    for request in 0..8 {
        let engine = engine.clone();
        handles.push(tokio::spawn(async move {
            let start = request as f32 * 100.0;
            let out = engine.infer(rows_from(start, 3), 3, later(5000)).await.unwrap();
            (start, out)
        }));
    }
    for handle in handles {
        let (start, out) = handle.await.unwrap();
        let firsts: Vec<f32> = out.outputs.chunks(2).map(|o| o[0]).collect();
        assert_eq!(firsts, vec![start, start + 1.0, start + 2.0]);
    }
    let batches = batches.lock().unwrap().clone();
    assert_eq!(batches.iter().sum::<usize>(), 24);
    assert!(batches.len() < 8, "8 concurrent requests ran in {} batches: {batches:?}", batches.len());
    assert_eq!(engine.queued_rows(), 0);
}

#[tokio::test]
async fn a_large_request_is_split_into_full_batches_in_order() {
    let (engine, batches) = start(options(8, 256), Duration::ZERO);
    let out = engine.infer(rows_from(0.0, 20), 20, later(5000)).await.unwrap();
    let firsts: Vec<f32> = out.outputs.chunks(2).map(|o| o[0]).collect();
    assert_eq!(firsts, (0..20).map(|i| i as f32).collect::<Vec<_>>());
    assert_eq!(*batches.lock().unwrap(), vec![8, 8, 4]);
    assert_eq!(out.batches, 3);
}

#[tokio::test]
async fn admission_is_counted_in_rows_and_refuses_fast_when_full() {
    let (engine, _) = start(options(4, 10), Duration::from_millis(200));
    let first = engine.submit(rows_from(0.0, 8), 8, later(5000)).unwrap();
    let started = Instant::now();
    let refused = engine.submit(rows_from(0.0, 4), 4, later(5000)).unwrap_err();
    assert!(matches!(refused, EngineError::QueueFull { .. }), "{refused:?}");
    assert!(started.elapsed() < Duration::from_millis(50));
    // Two more rows still fit.
    let second = engine.submit(rows_from(50.0, 2), 2, later(5000)).unwrap();
    assert!(first.await.unwrap().is_ok());
    assert!(second.await.unwrap().is_ok());
    assert_eq!(engine.queued_rows(), 0);
}

#[tokio::test]
async fn reserved_rows_count_as_queued_until_submitted_or_dropped() {
    let (engine, _) = start(options(4, 10), Duration::from_millis(20));
    let mut reservation = engine.reserve(6).unwrap();
    assert_eq!((reservation.rows(), engine.queued_rows()), (6, 6));
    // The queue is full for others while the rows are held.
    assert!(matches!(engine.reserve(5), Err(EngineError::QueueFull { queued: 6, .. })));
    let dropped = engine.reserve(4).unwrap();
    drop(dropped);
    assert_eq!(engine.queued_rows(), 6, "a dropped reservation gives its rows back");
    // Submitting 4 of the 6 takes them from the reservation; the other 2 are released with it.
    let reply = engine.submit_reserved(&mut reservation, rows_from(0.0, 4), 4, later(5000)).unwrap();
    assert_eq!((reservation.rows(), engine.queued_rows()), (2, 6));
    drop(reservation);
    let output = reply.await.unwrap().unwrap();
    assert_eq!(output.rows, 4);
    assert_eq!(engine.queued_rows(), 0);
    // More rows than reserved are admitted on top (here 3 reserved, 5 submitted).
    let mut small = engine.reserve(3).unwrap();
    let reply = engine.submit_reserved(&mut small, rows_from(10.0, 5), 5, later(5000)).unwrap();
    assert_eq!((small.rows(), engine.queued_rows()), (0, 5));
    assert!(reply.await.unwrap().is_ok());
    assert_eq!(engine.queued_rows(), 0);
}

#[tokio::test]
async fn the_worker_measures_what_a_row_costs() {
    let (engine, _) = start(options(4, 64), Duration::from_millis(40));
    assert_eq!(engine.row_cost(), Duration::ZERO, "nothing measured before the first batch");
    engine.infer(rows_from(0.0, 4), 4, later(5000)).await.unwrap();
    let cost = engine.row_cost();
    // A 40 ms batch of 4 rows: about 10 ms a row (sleep overshoots, never undershoots).
    assert!(cost >= Duration::from_millis(10) && cost < Duration::from_millis(40), "{cost:?}");
}

#[tokio::test]
async fn a_request_that_cannot_finish_behind_the_queue_is_shed_as_late() {
    // 4-row batches of 80 ms: 20 ms a row once measured.
    let (engine, _) = start(options(4, 64), Duration::from_millis(80));
    engine.infer(rows_from(0.0, 4), 4, later(5000)).await.unwrap();
    let ahead = engine.submit(rows_from(10.0, 16), 16, later(5000)).unwrap();
    // Behind 16 rows (about 320 ms), 4 more rows cannot make a 300 ms deadline, even if
    // the worker has already started on the first 4 of them...
    let late = engine.submit(rows_from(50.0, 4), 4, later(300)).unwrap();
    // ...but can make a 2 s one.
    let in_time = engine.submit(rows_from(60.0, 4), 4, later(2000)).unwrap();
    let started = Instant::now();
    assert!(matches!(late.await.unwrap(), Err(EngineError::Late { .. })));
    // ...and it is told so within about one batch, not at its deadline.
    assert!(started.elapsed() < Duration::from_millis(250), "shed at once, not at the deadline");
    assert!(ahead.await.unwrap().is_ok());
    assert!(in_time.await.unwrap().is_ok());
    assert_eq!(engine.queued_rows(), 0);
}

#[tokio::test]
async fn oversized_and_malformed_submissions_are_refused() {
    let (engine, _) = start(options(4, 10), Duration::ZERO);
    assert!(matches!(engine.submit(rows_from(0.0, 11), 11, later(100)), Err(EngineError::TooManyRows { .. })));
    assert!(matches!(engine.submit(vec![0.0; 5], 1, later(100)), Err(EngineError::BadInput { .. })));
    assert!(matches!(engine.submit(Vec::new(), 0, later(100)), Err(EngineError::BadInput { .. })));
}

#[tokio::test]
async fn rows_of_a_departed_client_are_dropped_before_inference() {
    let (engine, batches) = start(options(4, 256), Duration::from_millis(100));
    let blocker = engine.submit(rows_from(0.0, 4), 4, later(5000)).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await; // the worker is now busy with it
    let abandoned = engine.submit(rows_from(10.0, 4), 4, later(5000)).unwrap();
    drop(abandoned);
    let kept = engine.infer(rows_from(20.0, 2), 2, later(5000)).await.unwrap();
    assert_eq!(kept.outputs[0], 20.0);
    assert!(blocker.await.unwrap().is_ok());
    assert_eq!(*batches.lock().unwrap(), vec![4, 2], "the abandoned rows must not run");
    assert_eq!(engine.queued_rows(), 0);
}

#[tokio::test]
async fn a_request_past_its_deadline_is_answered_without_running() {
    let (engine, batches) = start(options(4, 256), Duration::from_millis(150));
    let blocker = engine.submit(rows_from(0.0, 4), 4, later(5000)).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let late = engine.infer(rows_from(10.0, 1), 1, later(50)).await.unwrap_err();
    assert!(matches!(late, EngineError::DeadlineExceeded), "{late:?}");
    assert!(blocker.await.unwrap().is_ok());
    assert_eq!(*batches.lock().unwrap(), vec![4]);
}

#[tokio::test]
async fn a_failing_or_panicking_batch_fails_its_requests_and_the_worker_lives_on() {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let runner_batches = Arc::clone(&batches);
    let engine = Engine::start(options(1, 256), move || {
        Ok(EchoRunner {
            batches: runner_batches,
            delay: Duration::ZERO,
            fail_when_first_is: Some(13.0),
            panic_when_first_is: Some(66.0),
        })
    })
    .unwrap();
    let failed = engine.infer(rows_from(13.0, 1), 1, later(5000)).await.unwrap_err();
    assert!(matches!(failed, EngineError::Inference(_)), "{failed:?}");
    let panicked = engine.infer(rows_from(66.0, 1), 1, later(5000)).await.unwrap_err();
    assert!(matches!(panicked, EngineError::Inference(ref m) if m.contains("panicked")), "{panicked:?}");
    let fine = engine.infer(rows_from(1.0, 1), 1, later(5000)).await.expect("after failures");
    assert_eq!(fine.outputs, vec![1.0, 1.0]);
    assert!(engine.is_alive());
    assert_eq!(engine.queued_rows(), 0);
}

#[tokio::test]
async fn a_closed_engine_finishes_queued_work_and_refuses_new_work() {
    let (engine, _) = start(options(4, 256), Duration::from_millis(30));
    let queued = engine.submit(rows_from(0.0, 2), 2, later(5000)).unwrap();
    engine.close();
    assert!(queued.await.unwrap().is_ok());
    assert!(matches!(engine.submit(rows_from(0.0, 1), 1, later(5000)), Err(EngineError::Stopped(_))));
}

#[test]
fn a_runner_that_fails_to_load_is_reported() {
    let err =
        Engine::start(options(4, 16), || -> Result<EchoRunner, String> { Err("no such file".into()) }).err().unwrap();
    assert_eq!(err.to_string(), "no such file");
    assert!(matches!(err, EngineError::Start(_)));
}

/// Two engines behind one gate, as every model of a process is.
fn two_engines(delay: Duration) -> (Engine, Engine, Arc<Mutex<Vec<&'static str>>>) {
    let gate = Arc::new(RunGate::new(1));
    let order = Arc::new(Mutex::new(Vec::new()));
    let engine = |name: &'static str| {
        let order = Arc::clone(&order);
        let options = EngineOptions { name: name.into(), gate: Arc::clone(&gate), ..options(4, 64) };
        Engine::start(options, move || Ok(NamedRunner { name, order, delay })).unwrap()
    };
    (engine("a"), engine("b"), order)
}

/// Records which engine ran each batch; answers zeros.
struct NamedRunner {
    name: &'static str,
    order: Arc<Mutex<Vec<&'static str>>>,
    delay: Duration,
}

impl BatchRunner for NamedRunner {
    fn run(&mut self, _input: &[f32], rows: usize) -> Result<Vec<f32>, String> {
        std::thread::sleep(self.delay);
        self.order.lock().unwrap().push(self.name);
        Ok(vec![0.0; rows * 2])
    }
}

#[tokio::test]
async fn busy_engines_behind_one_gate_take_turns_batch_by_batch() {
    let (a, b, order) = two_engines(Duration::from_millis(20));
    // Six batches queued on each engine at once: neither may run two batches in a row
    // while the other has one waiting (a worker that has just run queues behind it).
    let first = a.submit(rows_from(0.0, 24), 24, later(5000)).unwrap();
    let second = b.submit(rows_from(0.0, 24), 24, later(5000)).unwrap();
    assert!(first.await.unwrap().is_ok());
    assert!(second.await.unwrap().is_ok());
    let order = order.lock().unwrap().clone();
    assert_eq!(order.len(), 12, "{order:?}");
    let repeats = order.windows(2).filter(|w| w[0] == w[1]).count();
    assert!(repeats <= 1, "batches did not alternate: {order:?}");
}

#[tokio::test]
async fn a_job_is_late_behind_another_engines_queue_at_the_same_gate() {
    // 4-row batches of 80 ms: 20 ms a row once measured, on both engines.
    let (a, b, _) = two_engines(Duration::from_millis(80));
    a.infer(rows_from(0.0, 4), 4, later(5000)).await.unwrap();
    b.infer(rows_from(0.0, 4), 4, later(5000)).await.unwrap();
    // Engine a holds 24 rows (six batches, about 480 ms). Engine b's queue is empty, but
    // its 8 rows take two turns at the gate, each after one of a's batches: about
    // 2 x (80 + 80) ms. A 250 ms deadline cannot be made; counting b's own queue
    // alone (160 ms) would have said it could.
    let ahead = a.submit(rows_from(10.0, 24), 24, later(5000)).unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let late = b.submit(rows_from(50.0, 8), 8, later(250)).unwrap();
    let in_time = b.submit(rows_from(60.0, 4), 4, later(3000)).unwrap();
    assert!(matches!(late.await.unwrap(), Err(EngineError::Late { .. })));
    assert!(in_time.await.unwrap().is_ok());
    assert!(ahead.await.unwrap().is_ok());
    assert_eq!(a.queued_rows() + b.queued_rows(), 0);
}

/// Rows kept partly at half precision reach the runner in order, widened, whether a
/// batch takes them whole, split, or mixed with another request's; a request whose
/// rows do not split into whole rows per part is refused.
#[tokio::test]
async fn half_precision_rows_are_widened_in_order_across_batches() {
    let (engine, batches) = start(options(3, 64), Duration::from_millis(5));
    let mut mixed = Rows::new();
    mixed.push_full_with(|v| v.extend(rows_from(1.0, 1)));
    mixed.push_half(&rows_from(2.0, 3)); // 2, 3, 4: exact at half precision
    mixed.push_full_with(|v| v.extend(rows_from(5.0, 1)));
    let other = engine.infer(rows_from(100.0, 2), 2, later(5000));
    let out = engine.infer(mixed, 5, later(5000));
    let (other, out) = tokio::join!(other, out);
    let firsts = |o: &EngineOutput| o.outputs.chunks(2).map(|row| row[0]).collect::<Vec<f32>>();
    assert_eq!(firsts(&out.unwrap()), [1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(firsts(&other.unwrap()), [100.0, 101.0]);
    assert!(batches.lock().unwrap().iter().all(|&rows| rows <= 3));

    let mut ragged = Rows::new();
    ragged.push_half(&[1.0, 2.0]); // half a row, then a row and a half
    ragged.push_full_with(|v| v.extend([3.0, 4.0, 5.0, 6.0, 7.0, 8.0]));
    assert!(matches!(engine.submit(ragged, 2, later(5000)), Err(EngineError::RaggedRows { row_len: 4 })));
}

/// Records when each of its runs started and ended.
struct TimedRunner {
    runs: Arc<Mutex<Vec<(Instant, Instant)>>>,
    delay: Duration,
}

impl BatchRunner for TimedRunner {
    fn run(&mut self, _input: &[f32], rows: usize) -> Result<Vec<f32>, String> {
        let started = Instant::now();
        std::thread::sleep(self.delay);
        self.runs.lock().unwrap().push((started, Instant::now()));
        Ok(vec![0.0; rows * 2])
    }
}

/// Single-row runs of two models share a turn on a gate with `small_rows = 1`; larger
/// runs still take turns, and so do small ones on a gate without the allowance.
#[tokio::test]
async fn small_runs_of_two_models_share_a_turn_and_large_ones_do_not() {
    async fn overlapping_pairs(small_rows: usize, rows: usize) -> usize {
        let gate = Arc::new(RunGate::with_small_runs(1, small_rows));
        let runs = Arc::new(Mutex::new(Vec::new()));
        let engine = |name: &str| {
            let runs = Arc::clone(&runs);
            let options = EngineOptions { name: name.into(), gate: Arc::clone(&gate), ..options(4, 64) };
            Engine::start(options, move || Ok(TimedRunner { runs, delay: Duration::from_millis(60) })).unwrap()
        };
        let (a, b) = (engine("a"), engine("b"));
        let (x, y) = tokio::join!(
            a.infer(rows_from(0.0, rows), rows, later(5000)),
            b.infer(rows_from(0.0, rows), rows, later(5000))
        );
        assert!(x.is_ok() && y.is_ok());
        let runs = runs.lock().unwrap().clone();
        assert_eq!(runs.len(), 2);
        let ((s0, e0), (s1, e1)) = (runs[0], runs[1]);
        usize::from(s0 < e1 && s1 < e0)
    }
    assert_eq!(overlapping_pairs(1, 1).await, 1, "two single-row runs should overlap");
    assert_eq!(overlapping_pairs(1, 2).await, 0, "two-row runs are not small here");
    assert_eq!(overlapping_pairs(0, 1).await, 0, "no allowance: runs take turns");
}

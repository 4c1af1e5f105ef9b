//! The batching loop that owns a model's runner.
//!
//! Jobs move from the shared queue into the worker's private `active` list in
//! arrival order. Each round drops jobs nobody waits for, waits (at most until the
//! oldest waiting row is `max_wait` old) for enough rows to fill a batch, takes rows
//! front to back up to `max_batch_rows` — a large request may be split across
//! batches and a batch may mix requests — runs them, and answers finished jobs.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use super::{BatchRunner, EngineError, EngineOutput, Job, Shared};

/// Rows of one job that take part in a batch: `rows` rows starting at `first_row`.
struct Segment {
    job: usize,
    first_row: usize,
    rows: usize,
}

pub(super) fn run<R: BatchRunner>(shared: &Arc<Shared>, mut runner: R) {
    let options = &shared.options;
    let model = options.name.clone();
    let mut active: VecDeque<Job> = VecDeque::new();
    let mut batch_input: Vec<f32> = Vec::with_capacity(options.max_batch_rows * options.row_len);

    loop {
        if active.is_empty() && !receive(shared, &mut active, None) {
            return; // closed and drained
        }
        // Look at what arrived during the last batch even when `active` could fill the
        // next one: a job that cannot finish in time must be shed now, not once the
        // rows ahead of it have run and its deadline has passed.
        take_queued(shared, &mut active);
        retire_abandoned(shared, &mut active);
        let Some(oldest) = active.front().map(|job| job.enqueued_at) else { continue };

        // Wait for a full batch, but never keep the oldest row waiting past max_wait.
        let fill_until = oldest + options.max_wait;
        while pending_rows(&active) < options.max_batch_rows && Instant::now() < fill_until {
            if !receive(shared, &mut active, Some(fill_until)) {
                break;
            }
        }
        retire_abandoned(shared, &mut active);

        let segments = plan_batch(&active, options.max_batch_rows);
        let rows: usize = segments.iter().map(|s| s.rows).sum();
        if rows == 0 {
            continue;
        }
        // Waiting for the gate counts as queue time, not inference time.
        let permit = shared.options.gate.acquire(rows);
        let started = Instant::now();
        for segment in &segments {
            active[segment.job].started_at.get_or_insert(started);
        }

        // A batch that is a slice of one request's full-precision rows runs straight
        // from its buffer; anything else is gathered (and widened) into `batch_input`.
        let row_len = options.row_len;
        let span = |segment: &Segment| segment.first_row * row_len..(segment.first_row + segment.rows) * row_len;
        let lent = match segments.as_slice() {
            [only] => active[only.job].input.contiguous(span(only)),
            _ => None,
        };
        let input: &[f32] = match lent {
            Some(rows) => rows,
            None => {
                batch_input.clear();
                for segment in &segments {
                    active[segment.job].input.write(span(segment), &mut batch_input);
                }
                &batch_input
            }
        };

        let result = catch_unwind(AssertUnwindSafe(|| runner.run(input, rows)))
            .unwrap_or_else(|_| Err("the model runner panicked".to_string()))
            .and_then(|outputs| {
                if outputs.len() == rows * options.output_len {
                    Ok(outputs)
                } else {
                    Err(format!("model returned {} floats for {rows} rows", outputs.len()))
                }
            });
        let elapsed = started.elapsed();
        drop(permit);
        metrics::histogram!("pandaguard_batch_rows", "model" => model.clone()).record(rows as f64);
        metrics::histogram!("pandaguard_inference_seconds", "model" => model.clone()).record(elapsed.as_secs_f64());
        shared.record_cost(elapsed, rows);
        shared.release_rows(rows);

        match result {
            Ok(outputs) => {
                let mut offset = 0;
                for segment in &segments {
                    let job = &mut active[segment.job];
                    let len = segment.rows * options.output_len;
                    job.outputs.extend_from_slice(&outputs[offset..offset + len]);
                    offset += len;
                    job.next_row += segment.rows;
                    job.inference_time += elapsed;
                    job.batches += 1;
                }
                // Rows are taken front to back, so finished jobs are a prefix.
                while active.front().is_some_and(|job| job.remaining() == 0) {
                    if let Some(job) = active.pop_front() {
                        finish(job);
                    }
                }
            }
            Err(message) => {
                tracing::error!(model = %model, rows, error = %message, "batch failed");
                // Fail every job that had rows in the failed batch; the worker carries on.
                // Their batch rows were released above; release the rest of each job.
                for segment in &segments {
                    active[segment.job].next_row += segment.rows;
                }
                let failed: Vec<usize> = segments.iter().map(|s| s.job).collect();
                for (index, job) in std::mem::take(&mut active).into_iter().enumerate() {
                    if failed.contains(&index) {
                        shared.release_rows(job.remaining());
                        let _ = job.reply.send(Err(EngineError::Inference(message.clone())));
                    } else {
                        active.push_back(job);
                    }
                }
            }
        }
    }
}

/// Moves newly queued jobs into `active`. Without a deadline it blocks until there
/// is a job; returns false when the queue is closed and empty.
fn receive(shared: &Shared, active: &mut VecDeque<Job>, until: Option<Instant>) -> bool {
    let mut queue = shared.lock();
    loop {
        if !queue.jobs.is_empty() {
            active.extend(queue.jobs.drain(..));
            return true;
        }
        if queue.closed {
            return !active.is_empty();
        }
        match until {
            None => queue = shared.wake.wait(queue).unwrap_or_else(|poisoned| poisoned.into_inner()),
            Some(until) => {
                let now = Instant::now();
                if now >= until {
                    return true;
                }
                queue = shared.wake.wait_timeout(queue, until - now).unwrap_or_else(|p| p.into_inner()).0;
                if Instant::now() >= until && queue.jobs.is_empty() {
                    return true;
                }
            }
        }
    }
}

/// Moves whatever is queued into `active` without waiting.
fn take_queued(shared: &Shared, active: &mut VecDeque<Job>) {
    active.extend(shared.lock().jobs.drain(..));
}

/// Drops jobs whose client has gone (nobody would read the answer), answers jobs whose
/// deadline passed before their rows could run, and sheds jobs that have not started and
/// cannot finish in time (`Late`: the caller answers 503, so a load balancer can try
/// another replica, instead of a 504 after the whole deadline).
///
/// A job's rows wait behind the rows ahead of it in this queue and, since the engines
/// alternate at the run gate, behind a batch of every other busy engine per batch of
/// ours ([`super::RunGate::wait_for`]). Admission already refused what its estimate
/// could not fit with room to spare; this catches what got slower since.
fn retire_abandoned(shared: &Shared, active: &mut VecDeque<Job>) {
    let now = Instant::now();
    let gate = &shared.options.gate;
    let mut rows_ahead = 0usize;
    for job in std::mem::take(active) {
        let (reason, error) = if job.reply.is_closed() {
            ("client_gone", EngineError::DeadlineExceeded)
        } else if now >= job.deadline {
            ("deadline", EngineError::DeadlineExceeded)
        } else if job.next_row == 0 && now + gate.wait_for(shared, rows_ahead, job.remaining()) > job.deadline {
            ("late", EngineError::Late { model: shared.options.name.clone() })
        } else {
            rows_ahead += job.remaining();
            active.push_back(job);
            continue;
        };
        let model = shared.options.name.clone();
        metrics::counter!("pandaguard_rows_dropped_total", "model" => model, "reason" => reason)
            .increment(job.remaining() as u64);
        shared.release_rows(job.remaining());
        let _ = job.reply.send(Err(error));
    }
}

fn pending_rows(active: &VecDeque<Job>) -> usize {
    active.iter().map(Job::remaining).sum()
}

fn plan_batch(active: &VecDeque<Job>, max_rows: usize) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut budget = max_rows;
    for (index, job) in active.iter().enumerate() {
        if budget == 0 {
            break;
        }
        let take = job.remaining().min(budget);
        if take > 0 {
            segments.push(Segment { job: index, first_row: job.next_row, rows: take });
            budget -= take;
        }
    }
    segments
}

fn finish(job: Job) {
    let queue_time = job.started_at.map(|s| s.duration_since(job.enqueued_at)).unwrap_or_default();
    let output = EngineOutput {
        outputs: job.outputs,
        rows: job.rows,
        queue_time,
        inference_time: job.inference_time,
        batches: job.batches,
    };
    let _ = job.reply.send(Ok(output));
}

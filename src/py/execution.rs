//! Execution: how a worker runs a task. Sync calls run on the worker's
//! thread, coroutines on the engine's event loop (their outcome comes back
//! through `AsyncDone`); a failed attempt is retried with backoff or fails the
//! task; timeouts, panics and the thread's life with the interpreter.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::handle::{CurrentTask, TaskResult};
use super::runtime::{runtime, Runtime};
use super::shared::Shared;
use super::task::{epoch_now, import_name, Job, Outcome, Status};
use crate::interpreter::{is_awaitable, lazy_event_loop, AsyncOutcome, ParkOnForcedUnwind};
use crate::tasks::pool::{Runner, WorkerSlot};
use crate::tasks::scheduler::Pop;
use crate::tasks::series::Event;
use crate::tasks::stats::{new_histogram, record_micros};
use hdrhistogram::Histogram;
use parking_lot::Mutex;

/// NOTE: a worker runs ready tasks back to back for up to 2 ms under one
/// attach; with 5 ms (CPython's switch interval) other threads waited too long.
const BATCH_BUDGET: Duration = Duration::from_millis(2);

impl Shared {
    /// Starts the task's attempt and runs it on this worker thread.
    fn run_one(&self, py: Python<'_>, rt: &Runtime, slot: &WorkerSlot, job: Job) {
        let begun = Instant::now();
        let Some(attempt) = job.begin(begun) else {
            self.finish_one(py);
            return;
        };
        if let Some(store) = &self.store {
            store.started(job.id(), epoch_now());
        }
        if let Some(row) = job.take_stored() {
            self.observer.attach_stored(&job, &row.name, &row.queue);
            match super::store_bridge::resolve_call(py, rt, &row) {
                Ok(call) => job.set_call(call),
                Err(reason) => {
                    let exc = rt.make_error(
                        py,
                        &rt.not_restartable_error,
                        format!("task {} ({}) cannot run here: {reason}", job.id(), row.name),
                    );
                    self.complete(py, job, Status::Failed, Outcome::Error(exc.unbind()), true);
                    return;
                }
            }
        }
        let Some((func, args, kwargs, no_retry)) = job.call_parts(py) else {
            self.finish_one(py);
            return;
        };
        if self.observer.is_on() {
            if attempt == 1 {
                self.observer
                    .waited(&job, begun.saturating_duration_since(job.created));
            }
            self.observer.record(&job, Event::Started, None, None);
        }
        let token = self.next_token.fetch_add(1, SeqCst);
        if let Some(limit) = job.timeout {
            self.watchdog.arm(&slot.deadline, limit, token);
        }
        let profiled = self.profiling.then(|| import_name(func.bind(py)));
        let started = Instant::now();
        let current = CurrentTask::enter(&job, self.me.clone());
        let result = func
            .bind(py)
            .call(args.bind(py), kwargs.as_ref().map(|k| k.bind(py)));
        drop(current);
        if job.timeout.is_some() {
            self.watchdog.disarm(&slot.deadline);
            if slot.deadline.take_fired() == token {
                consume_interrupt(py, rt);
            }
        }
        if let Some(name) = profiled {
            self.record_profile(name, started.elapsed(), result.is_err());
        }
        let awaitable = matches!(&result, Ok(value) if is_awaitable(value));
        let returned_itself = awaitable
            && matches!(&result, Ok(value)
                if value.cast::<TaskResult>().is_ok_and(|h| Arc::ptr_eq(&h.get().state, &job)));
        match result {
            Ok(_) if returned_itself => {
                // Awaiting it would wait for itself until its timeout, and again on each retry.
                self.ran(&job, &slot.histogram, started.elapsed());
                let exc = pyo3::exceptions::PyRuntimeError::new_err(format!(
                    "task {} returned its own handle; a task cannot wait for itself",
                    job.id()
                ));
                let exc = exc.into_value(py).into_any();
                self.complete(py, job, Status::Failed, Outcome::Error(exc), true);
            }
            Ok(value) if awaitable => self.start_async(py, rt, job, value, attempt),
            Ok(value) => {
                self.ran(&job, &slot.histogram, started.elapsed());
                self.succeed(py, rt, job, value);
            }
            Err(err) => {
                self.ran(&job, &slot.histogram, started.elapsed());
                let exc = self.attempt_error(py, rt, &job, err);
                self.fail_attempt(py, rt, job, exc, no_retry);
            }
        }
    }

    /// A task returned `value`. On a shared store the value must be JSON
    /// (the process that queued it reads it back); if not, the task fails
    /// with a `TypeError` saying so, without retries.
    fn succeed(&self, py: Python<'_>, rt: &Runtime, job: Job, value: Bound<'_, PyAny>) {
        if self.store.is_some() {
            if let Err(err) = rt.json_dumps.bind(py).call1((&value,)) {
                let exc = pyo3::exceptions::PyTypeError::new_err(format!(
                    "task {} returned {}, which is not JSON, and a shared store keeps results as JSON: {}",
                    job.id(),
                    crate::errors::describe(&value),
                    err.value(py)
                ));
                let exc = exc.into_value(py).into_any();
                self.complete(py, job, Status::Failed, Outcome::Error(exc), true);
                return;
            }
        }
        self.complete(
            py,
            job,
            Status::Completed,
            Outcome::Value(value.unbind()),
            true,
        );
    }

    fn record_profile(&self, name: String, took: Duration, failed: bool) {
        let mut profile = self.profile.lock();
        let entry = match profile.get_mut(&name) {
            Some(e) => e,
            None => match new_histogram() {
                Ok(h) => profile.entry(name).or_insert((h, 0)),
                Err(_) => return,
            },
        };
        record_micros(&mut entry.0, took);
        entry.1 += u64::from(failed);
    }

    /// Turns a worker-thread interrupt into `TaskTimeoutError`.
    fn attempt_error<'py>(
        &self,
        py: Python<'py>,
        rt: &Runtime,
        job: &Job,
        err: PyErr,
    ) -> Bound<'py, PyAny> {
        if err.is_instance(py, rt.interrupt.bind(py)) {
            self.timeout_error(py, rt, job)
        } else {
            err.into_value(py).into_bound(py).into_any()
        }
    }

    fn timeout_error<'py>(&self, py: Python<'py>, rt: &Runtime, job: &Job) -> Bound<'py, PyAny> {
        self.counters.timed_out.fetch_add(1, SeqCst);
        let ms = job.timeout.map_or(0, |t| t.as_millis());
        let exc = rt.make_error(
            py,
            &rt.timeout_error,
            format!("task {} exceeded its timeout of {ms} ms", job.id()),
        );
        self.observer
            .record(job, Event::TimedOut, job.last_run(), Some(&exc));
        exc
    }

    /// One attempt's run time: the workers' histogram, the task's last run
    /// and its series.
    fn ran(&self, job: &Job, histogram: &Mutex<Histogram<u64>>, took: Duration) {
        record_micros(&mut histogram.lock(), took);
        job.last_run_us
            .store((took.as_micros() as u64).max(1), SeqCst);
        self.observer.ran(job, took);
    }

    /// Hands a coroutine (or other awaitable) to the engine's event loop.
    fn start_async(
        &self,
        py: Python<'_>,
        rt: &Runtime,
        job: Job,
        awaitable: Bound<'_, PyAny>,
        attempt: u32,
    ) {
        let submitted = self.event_loop(py, rt).and_then(|aio| {
            let done = Py::new(
                py,
                AsyncDone {
                    shared: self.me.clone(),
                    job: job.clone(),
                    attempt,
                    started: Instant::now(),
                },
            )?;
            let timeout = job.timeout.map(|t| t.as_secs_f64());
            let handle = TaskResult::new(job.clone(), self.me.clone());
            // NOTE: counted before submitting: submitting releases the GIL, and
            // the coroutine may finish (and be counted out) before it returns.
            self.counters.async_running.fetch_add(1, SeqCst);
            let sent = aio
                .bind(py)
                .call_method1("submit", (awaitable, timeout, done, handle));
            if sent.is_err() {
                self.counters.async_running.fetch_sub(1, SeqCst);
            }
            sent.map(|_| ())
        });
        match submitted {
            Ok(()) => {}
            Err(err) => {
                let exc = err.into_value(py).into_bound(py).into_any();
                self.fail_attempt(py, rt, job, exc, None);
            }
        }
    }

    fn event_loop(&self, py: Python<'_>, rt: &Runtime) -> PyResult<Py<PyAny>> {
        lazy_event_loop(py, &self.aio, &self.aio_closed, &rt.event_loop)
    }

    /// A failed attempt: retry with backoff if allowed, else fail the task.
    fn fail_attempt(
        &self,
        py: Python<'_>,
        rt: &Runtime,
        job: Job,
        exc: Bound<'_, PyAny>,
        no_retry: Option<Py<PyAny>>,
    ) {
        job.push_error(exc.clone().unbind());
        let attempts = job.attempts();
        let retryable = exc.is_instance_of::<pyo3::exceptions::PyException>()
            && !exc.is_instance(rt.non_retryable.bind(py)).unwrap_or(false)
            && !no_retry
                .as_ref()
                .is_some_and(|types| exc.is_instance(types.bind(py)).unwrap_or(false));
        if retryable && attempts <= job.max_retries {
            let delay = self.backoff.delay(attempts, &mut self.rng.lock());
            job.set_status(if delay.is_zero() {
                Status::Pending
            } else {
                Status::Retrying
            });
            match self.sched.requeue(job.lane, job.clone(), delay) {
                Ok(()) => {
                    self.counters.retried.fetch_add(1, SeqCst);
                    self.observer
                        .record(&job, Event::Retrying, job.last_run(), Some(&exc));
                    return;
                }
                Err(_) => job.set_status(Status::Running),
            }
        }
        self.complete(py, job, Status::Failed, Outcome::Error(exc.unbind()), true);
    }
}

impl Runner<Job> for Shared {
    fn run(&self, slot: &WorkerSlot, first: Job, more: &mut dyn FnMut() -> Option<Job>) {
        Python::attach(|py| {
            let Ok(rt) = runtime(py) else {
                self.sched.ack(1);
                return;
            };
            let started = Instant::now();
            let mut job = first;
            loop {
                let held = job.clone();
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let guard = ParkOnForcedUnwind;
                    self.run_one(py, rt, slot, job);
                    guard.disarm();
                }));
                if let Err(panic) = outcome {
                    self.counters.panicked.fetch_add(1, SeqCst);
                    let msg = crate::tasks::pool::panic_message(panic.as_ref());
                    let exc = rt.make_error(
                        py,
                        &rt.panic_error,
                        format!("catzilla panicked while running task {}: {msg}", held.id()),
                    );
                    if !held.status().is_final() {
                        self.complete(py, held, Status::Failed, Outcome::Error(exc.unbind()), true);
                    }
                }
                if started.elapsed() >= BATCH_BUDGET {
                    break;
                }
                match more() {
                    Some(next) => job = next,
                    None => break,
                }
            }
        });
    }

    fn thread_main(&self, slot: &WorkerSlot, body: &mut dyn FnMut()) {
        // NOTE: the worker stays attached for its whole life and detaches only
        // to wait, so its Python thread state (and threading.local data)
        // persists, and timeouts can target it by thread id.
        Python::attach(|_py| {
            // SAFETY: reads the calling thread's id; no preconditions.
            let ident = unsafe { pyo3::ffi::PyThread_get_thread_ident() };
            slot.ident.store(ident as u64, SeqCst);
            body();
        });
    }

    fn wait(&self, pop: &(dyn Fn() -> Pop<Job> + Sync)) -> Pop<Job> {
        Python::attach(|py| py.detach(pop))
    }

    fn panicked(&self, message: String) {
        self.counters.panicked.fetch_add(1, SeqCst);
        Python::attach(|py| {
            if let Ok(rt) = runtime(py) {
                rt.log(
                    py,
                    "error",
                    format!("worker recovered from a panic: {message}"),
                    None,
                );
            }
        });
    }
}

/// Completion of a coroutine task, called on the event loop thread.
#[pyclass(frozen, module = "catzilla._catzilla")]
pub struct AsyncDone {
    shared: Weak<Shared>,
    job: Job,
    attempt: u32,
    started: Instant,
}

#[pymethods]
impl AsyncDone {
    fn __call__(&self, py: Python<'_>, kind: u8, value: Bound<'_, PyAny>) -> PyResult<()> {
        let guard = ParkOnForcedUnwind;
        let done = match self.shared.upgrade() {
            Some(shared) => shared.async_done(py, self, kind, value),
            None => Ok(()),
        };
        guard.disarm();
        done
    }
}

impl Shared {
    fn async_done(
        &self,
        py: Python<'_>,
        done: &AsyncDone,
        kind: u8,
        value: Bound<'_, PyAny>,
    ) -> PyResult<()> {
        // NOTE: counted out at the end, once the task's callbacks ran or its
        // retry is queued, so `drain` never sees a gap with nothing counted.
        let _running = super::shared::CountDown(&self.counters.async_running);
        let rt = runtime(py)?;
        let job = done.job.clone();
        self.ran(&job, &self.async_histogram, done.started.elapsed());
        if job.attempts() != done.attempt {
            return Ok(());
        }
        match AsyncOutcome::from_code(kind) {
            AsyncOutcome::Ok => self.succeed(py, rt, job, value),
            AsyncOutcome::Timeout => {
                let exc = self.timeout_error(py, rt, &job);
                let no_retry = job.call_parts(py).and_then(|p| p.3);
                self.fail_attempt(py, rt, job, exc, no_retry);
            }
            AsyncOutcome::Error => {
                let no_retry = job.call_parts(py).and_then(|p| p.3);
                self.fail_attempt(py, rt, job, value, no_retry);
            }
            AsyncOutcome::Cancelled => {
                let exc = rt.make_error(
                    py,
                    &rt.cancelled_error,
                    format!(
                        "task {} was cancelled while it ran on the event loop",
                        job.id()
                    ),
                );
                self.complete(
                    py,
                    job,
                    Status::Cancelled,
                    Outcome::Cancelled(exc.unbind()),
                    true,
                );
            }
        }
        Ok(())
    }
}

/// Lets a fired timeout's interrupt that the task's call returned before
/// seeing be raised now, on this thread, and drops it, so it cannot hit the
/// next task. Harmless when the task already took it.
///
/// NOTE: clearing it with `PyThreadState_SetAsyncExc(id, NULL)` instead leaves
/// CPython 3.11's interpreter-wide "async exception pending" flag set with no
/// exception to raise; code under `sys.settrace` (debuggers, coverage,
/// Hypothesis) then loops forever on its next call.
fn consume_interrupt(py: Python<'_>, rt: &Runtime) {
    // Running any Python code checks for a pending asynchronous exception.
    if let Err(err) = py.run(c"pass", None, None) {
        if !err.is_instance(py, rt.interrupt.bind(py)) {
            err.print(py);
        }
    }
}

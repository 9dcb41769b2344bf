//! `BackgroundTasks`' native core: admission, the Python side of workers,
//! retries, timeouts, coroutines, retention and shutdown.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use pyo3::prelude::*;

use super::errors::{describe, Error, Result};
use super::runtime::{is_awaitable, lazy_event_loop, runtime, ParkOnForcedUnwind, Runtime};
use super::task::epoch_now;
use super::task::{
    parse_id, run_callbacks, CurrentTask, Job, Key, KeyMap, NewTask, Outcome, Status, TaskResult,
    TaskState,
};
use crate::store::sqlite::{Row, SqliteStore};
use crate::tasks::backoff::{Backoff, Rng};
use crate::tasks::pool::{Pool, Runner, WorkerSlot};
use crate::tasks::scheduler::{Pop, Rejected, Scheduler};
use crate::tasks::stats::{new_histogram, record_micros, RateWindow, Sample, Sampler};
use crate::tasks::sysinfo::process_cpu_ns;
use crate::tasks::watchdog::Watchdog;

const SHARDS: usize = 16;
/// NOTE: a worker runs ready tasks back to back for up to 2 ms under one
/// attach; with 5 ms (CPython's switch interval) other threads waited too long.
const BATCH_BUDGET: Duration = Duration::from_millis(2);
const RECORD_BYTES: u64 = std::mem::size_of::<TaskState>() as u64 + 96;

#[derive(Default)]
pub struct Counters {
    pub submitted: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub cancelled: AtomicU64,
    pub retried: AtomicU64,
    pub timed_out: AtomicU64,
    pub rejected: AtomicU64,
    pub evicted: AtomicU64,
    pub panicked: AtomicU64,
    pub async_running: AtomicU64,
    pub pending_bytes: AtomicU64,
}

pub(crate) struct Retention {
    pub(crate) order: VecDeque<(Instant, Key, u64)>,
    pub(crate) bytes: u64,
}

pub(crate) struct Defaults {
    pub(crate) lane: usize,
    pub(crate) delay: Duration,
    pub(crate) max_retries: u32,
    pub(crate) timeout: Option<Duration>,
}

pub struct Shared {
    pub(crate) me: Weak<Shared>,
    /// The process it runs in; unusable in a forked child.
    pub(crate) born: super::fork::Born,
    pub(crate) origin: Instant,
    pub(crate) prefix: u32,
    pub(crate) next_seq: AtomicU64,
    pub(crate) next_token: AtomicU64,
    pub(crate) sched: Arc<Scheduler<Job>>,
    pub(crate) watchdog: Arc<Watchdog>,
    pub(crate) pool: Mutex<Option<Arc<Pool<Job>>>>,
    pub(crate) backoff: Backoff,
    pub(crate) rng: Mutex<Rng>,
    pub(crate) defaults: Defaults,
    pub(crate) counters: Counters,
    pub(crate) registry: Vec<Mutex<KeyMap<Job>>>,
    pub(crate) retention: Mutex<Retention>,
    pub(crate) pool_bytes: u64,
    pub(crate) result_ttl: Duration,
    pub(crate) queue_size: usize,
    pub(crate) rate: Mutex<RateWindow>,
    pub(crate) async_histogram: Mutex<Histogram<u64>>,
    pub(crate) sampler: Mutex<Sampler>,
    pub(crate) aio: Mutex<Option<Py<PyAny>>>,
    /// Periodic tasks and their thread, from the first one added.
    pub(crate) periodics: Mutex<Option<Arc<super::periodic::Periodics>>>,
    pub(crate) aio_closed: std::sync::atomic::AtomicBool,
    /// Durable storage, when configured.
    pub(crate) store: Option<Arc<SqliteStore>>,
    /// With storage: refuse tasks that could not run again after a restart.
    pub(crate) storage_strict: bool,
    /// Set by shutdown: tasks it cancels stay pending in the store.
    pub(crate) shutting_down: std::sync::atomic::AtomicBool,
    pub(crate) profiling: bool,
    /// Per-function run times and failures, kept when profiling is on.
    pub(crate) profile: Mutex<HashMap<String, (Histogram<u64>, u64)>>,
}

/// `module.qualname` of a callable, as tasks are registered and profiled by.
pub fn import_name(func: &Bound<'_, PyAny>) -> String {
    let part = |attr: &str| {
        func.getattr(attr)
            .ok()
            .and_then(|v| v.extract::<String>().ok())
    };
    match (part("__module__"), part("__qualname__")) {
        (Some(m), Some(q)) => format!("{m}.{q}"),
        (None, Some(q)) => q,
        _ => describe(func),
    }
}

impl Shared {
    pub(crate) fn shard(&self, key: Key) -> &Mutex<KeyMap<Job>> {
        &self.registry[(key.1 % SHARDS as u64) as usize]
    }

    pub fn lookup(&self, id: &str) -> Option<Job> {
        let key = parse_id(id)?;
        self.shard(key).lock().get(&key).cloned()
    }

    /// Every registered task that matches, in no particular order.
    pub fn jobs_where(&self, mut keep: impl FnMut(&Job) -> bool) -> Vec<Job> {
        let mut out = Vec::new();
        for shard in &self.registry {
            out.extend(shard.lock().values().filter(|j| keep(j)).cloned());
        }
        out
    }

    pub fn pool(&self) -> Option<Arc<Pool<Job>>> {
        self.pool.lock().clone()
    }

    pub fn retained(&self) -> (usize, u64) {
        let r = self.retention.lock();
        (r.order.len(), r.bytes)
    }

    /// Drops finished records past the TTL or beyond the memory budget.
    pub fn evict(&self, now: Instant) {
        let mut gone = Vec::new();
        {
            let mut r = self.retention.lock();
            while let Some(&(at, key, bytes)) = r.order.front() {
                let expired = now.saturating_duration_since(at) >= self.result_ttl;
                if !expired && r.bytes <= self.pool_bytes {
                    break;
                }
                r.order.pop_front();
                r.bytes = r.bytes.saturating_sub(bytes);
                gone.push(key);
            }
        }
        if gone.is_empty() {
            return;
        }
        self.counters.evicted.fetch_add(gone.len() as u64, SeqCst);
        let removed: Vec<Job> = gone
            .into_iter()
            .filter_map(|key| self.shard(key).lock().remove(&key))
            .collect();
        drop(removed);
    }

    fn retain(&self, py: Python<'_>, job: &Job) {
        let bytes = RECORD_BYTES.saturating_add(job.result_size(py));
        let now = Instant::now();
        {
            let mut r = self.retention.lock();
            r.order.push_back((now, job.key(), bytes));
            r.bytes = r.bytes.saturating_add(bytes);
        }
        self.evict(now);
    }

    pub(crate) fn parse_lane(&self, rt: &Runtime, priority: &Bound<'_, PyAny>) -> Result<usize> {
        rt.priorities
            .iter()
            .position(|p| p.bind(priority.py()).is(priority))
            .ok_or_else(|| {
                Error::WrongType("priority", "a TaskPriority member", describe(priority))
            })
    }

    /// Starts the task's attempt and runs it on this worker thread.
    fn run_one(&self, py: Python<'_>, rt: &Runtime, slot: &WorkerSlot, job: Job) {
        let Some(attempt) = job.begin(Instant::now()) else {
            self.finish_one(py);
            return;
        };
        if let Some(store) = &self.store {
            store.started(job.id(), i64::from(attempt), epoch_now());
        }
        let Some((func, args, kwargs, no_retry)) = job.call_parts(py) else {
            self.finish_one(py);
            return;
        };
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
                // NOTE: the interrupt may still be pending if the call returned
                // before Python checked for it; clear it so it cannot hit the
                // next task on this thread.
                // SAFETY: attached; a null exception clears the pending one.
                unsafe {
                    pyo3::ffi::PyThreadState_SetAsyncExc(
                        slot.ident.load(SeqCst) as std::os::raw::c_long,
                        std::ptr::null_mut(),
                    );
                }
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
                record_micros(&mut slot.histogram.lock(), started.elapsed());
                let exc = pyo3::exceptions::PyRuntimeError::new_err(format!(
                    "task {} returned its own handle; a task cannot wait for itself",
                    job.id()
                ));
                let exc = exc.into_value(py).into_any();
                self.complete(py, job, Status::Failed, Outcome::Error(exc), true);
            }
            Ok(value) if awaitable => self.start_async(py, rt, job, value, attempt),
            Ok(value) => {
                record_micros(&mut slot.histogram.lock(), started.elapsed());
                self.complete(
                    py,
                    job,
                    Status::Completed,
                    Outcome::Value(value.unbind()),
                    true,
                );
            }
            Err(err) => {
                record_micros(&mut slot.histogram.lock(), started.elapsed());
                let exc = self.attempt_error(py, rt, &job, err);
                self.fail_attempt(py, rt, job, exc, no_retry);
            }
        }
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
        rt.make_error(
            py,
            &rt.timeout_error,
            format!("task {} exceeded its timeout of {ms} ms", job.id()),
        )
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
            match self.sched.retry(job.lane, job.clone(), delay) {
                Ok(()) => {
                    self.counters.retried.fetch_add(1, SeqCst);
                    if let Some(store) = &self.store {
                        store.waiting(job.id(), "retrying");
                    }
                    return;
                }
                Err(_) => job.set_status(Status::Running),
            }
        }
        self.complete(py, job, Status::Failed, Outcome::Error(exc.unbind()), true);
    }

    /// Records a final state, then runs callbacks outside every lock.
    pub fn complete(
        &self,
        py: Python<'_>,
        job: Job,
        status: Status,
        outcome: Outcome,
        in_flight: bool,
    ) {
        let (callbacks, call) = job.finish(py, status, outcome);
        drop(call);
        if let Some(store) = &self.store {
            let at_shutdown =
                status == Status::Cancelled && self.shutting_down.load(SeqCst) && !in_flight;
            if !at_shutdown {
                self.store_outcome(py, store, &job, status);
            }
        }
        match status {
            Status::Completed => self.counters.completed.fetch_add(1, SeqCst),
            Status::Failed => self.counters.failed.fetch_add(1, SeqCst),
            _ => self.counters.cancelled.fetch_add(1, SeqCst),
        };
        self.counters.pending_bytes.fetch_sub(job.footprint, SeqCst);
        if status != Status::Cancelled {
            self.rate.lock().record(1, Instant::now());
        }
        if in_flight {
            self.finish_one(py);
        }
        self.retain(py, &job);
        if !callbacks.is_empty() {
            match Bound::new(py, TaskResult::new(job, Weak::new())) {
                Ok(handle) => run_callbacks(py, &handle, callbacks),
                Err(err) => err.print(py),
            }
        }
    }

    /// Writes a final state to the store: the result as JSON (its repr when
    /// it is not JSON) or the error as `{"type", "message", "traceback"}`.
    fn store_outcome(&self, py: Python<'_>, store: &SqliteStore, job: &Job, status: Status) {
        let Ok(rt) = runtime(py) else { return };
        let (result, error) = match job.outcome_object(py) {
            Some((true, value)) => {
                let dumps = rt.json_dumps.bind(py);
                let text = dumps
                    .call1((&value,))
                    .or_else(|_| value.repr().and_then(|r| dumps.call1((r,))))
                    .and_then(|t| t.extract::<String>())
                    .ok();
                (text, None)
            }
            Some((false, exc)) => {
                let text = rt
                    .encode_error
                    .bind(py)
                    .call1((exc,))
                    .and_then(|t| t.extract::<String>())
                    .ok();
                (None, text)
            }
            None => (None, None),
        };
        let name = match status {
            Status::Completed => "completed",
            Status::Failed => "failed",
            _ => "cancelled",
        };
        store.finished(job.id(), name, result, error, epoch_now());
    }

    pub fn cancel(&self, py: Python<'_>, job: &Job) -> PyResult<bool> {
        let Some(taken) = self.sched.cancel(job.lane, |j| Arc::ptr_eq(j, job)) else {
            return Ok(false);
        };
        let rt = runtime(py)?;
        let exc = rt.make_error(
            py,
            &rt.cancelled_error,
            format!("task {} was cancelled", job.id()),
        );
        self.complete(
            py,
            taken,
            Status::Cancelled,
            Outcome::Cancelled(exc.unbind()),
            false,
        );
        Ok(true)
    }

    pub(crate) fn submit(
        self: &Arc<Self>,
        task: NewTask,
        delay: Duration,
        row: Option<Row>,
    ) -> Result<Job> {
        let footprint = task.footprint;
        let key = (task.prefix, task.seq);
        let job = Arc::new(TaskState::new(task));
        let replaced = self.shard(key).lock().insert(key, job.clone());
        drop(replaced); // outside the lock: dropping Python objects may run Python
                        // NOTE: the row goes to the store before the task can start, so the
                        // store sees its insert before any update.
        let stored = match (&self.store, row) {
            (Some(store), Some(row)) => {
                store.insert(row);
                Some(store)
            }
            _ => None,
        };
        match self.sched.submit(job.lane, job.clone(), delay) {
            Ok(all_busy) => {
                self.counters.submitted.fetch_add(1, SeqCst);
                self.counters.pending_bytes.fetch_add(footprint, SeqCst);
                if all_busy {
                    if let Some(pool) = self.pool() {
                        pool.maybe_grow();
                    }
                }
                Ok(job)
            }
            Err(rejected) => {
                let removed = self.shard(key).lock().remove(&key);
                drop(removed);
                if let Some(store) = stored {
                    store.delete(job.id());
                }
                match rejected {
                    Rejected::Full(item, capacity) => {
                        drop(item);
                        self.counters.rejected.fetch_add(1, SeqCst);
                        Err(Error::QueueFull(capacity))
                    }
                    Rejected::Closed(item) => {
                        drop(item);
                        Err(Error::ShutDown)
                    }
                }
            }
        }
    }

    /// One in-flight task is done; after a large backlog drained, gives
    /// memory back to the system.
    fn finish_one(&self, py: Python<'_>) {
        if self.sched.finish(1) {
            py.detach(|| self.release_memory());
        }
    }

    /// Shrinks the registry's tables where a burst left them mostly empty,
    /// and asks the allocator to return its free pages.
    fn release_memory(&self) {
        for shard in &self.registry {
            let mut map = shard.lock();
            if map.len() < map.capacity() / 4 {
                map.shrink_to_fit();
            }
        }
        // NOTE: glibc keeps freed memory for reuse: after a burst of 200k
        // tasks had drained, about 60% of what it took stayed resident; with
        // malloc_trim, about 17%. One call per drained burst.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim has no preconditions; it only returns free pages.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    pub fn sample(&self, pool_cpu: u64, busy_ns: u64) -> Sample {
        Sample {
            at: Instant::now(),
            busy_ns,
            worker_cpu_ns: pool_cpu,
            process_cpu_ns: process_cpu_ns(),
        }
    }
}

impl Runner<Job> for Shared {
    fn run(&self, slot: &WorkerSlot, first: Job, more: &mut dyn FnMut() -> Option<Job>) {
        Python::attach(|py| {
            let Ok(rt) = runtime(py) else {
                self.sched.finish(1);
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

/// Outcome codes passed by `catzilla._aio` to `AsyncDone`.
const AIO_OK: u8 = 0;
const AIO_ERROR: u8 = 1;
const AIO_TIMEOUT: u8 = 2;

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
        let rt = runtime(py)?;
        self.counters.async_running.fetch_sub(1, SeqCst);
        record_micros(&mut self.async_histogram.lock(), done.started.elapsed());
        let job = done.job.clone();
        if job.attempts() != done.attempt {
            return Ok(());
        }
        match kind {
            AIO_OK => self.complete(
                py,
                job,
                Status::Completed,
                Outcome::Value(value.unbind()),
                true,
            ),
            AIO_TIMEOUT => {
                let exc = self.timeout_error(py, rt, &job);
                let no_retry = job.call_parts(py).and_then(|p| p.3);
                self.fail_attempt(py, rt, job, exc, no_retry);
            }
            AIO_ERROR => {
                let no_retry = job.call_parts(py).and_then(|p| p.3);
                self.fail_attempt(py, rt, job, value, no_retry);
            }
            _ => {
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

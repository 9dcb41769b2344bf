//! One task's shared state, and `TaskResult`, the handle Python code holds.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use super::engine::Shared;
use super::errors::{describe, Error};
use super::fork::Born;
use super::runtime::{runtime, ParkOnForcedUnwind};

pub const STATUS_COUNT: usize = 7;

/// Where a task stands; the numbers index `TaskStatus` members in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Pending = 0,
    Scheduled = 1,
    Running = 2,
    Retrying = 3,
    Completed = 4,
    Failed = 5,
    Cancelled = 6,
}

impl Status {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Status::Pending,
            1 => Status::Scheduled,
            2 => Status::Running,
            3 => Status::Retrying,
            4 => Status::Completed,
            5 => Status::Failed,
            _ => Status::Cancelled,
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    fn is_waiting(self) -> bool {
        matches!(self, Status::Pending | Status::Scheduled | Status::Retrying)
    }
}

/// What to call, released as soon as the task reaches a final state.
pub struct Call {
    pub func: Py<PyAny>,
    pub args: Py<PyTuple>,
    pub kwargs: Option<Py<PyDict>>,
    /// Exception classes that fail the task at once, from `@task(no_retry_for=...)`.
    pub no_retry: Option<Py<PyAny>>,
}

pub enum Outcome {
    Pending,
    Value(Py<PyAny>),
    Error(Py<PyAny>),
    Cancelled(Py<PyAny>),
}

struct Inner {
    call: Option<Call>,
    /// The function, kept after the arguments are released, for `name`.
    func: Option<Py<PyAny>>,
    outcome: Outcome,
    errors: Vec<Py<PyAny>>,
    callbacks: Vec<Py<PyAny>>,
    progress: f64,
    step: Option<Box<str>>,
    /// When it became final, in ns from the clock anchor.
    finished_ns: Option<u64>,
}

/// Seconds since the Unix epoch, for timestamps users read.
pub use crate::clock::epoch_now;

/// One reading of both clocks, so task timestamps are taken from the cheap
/// monotonic clock and turned into wall-clock time only when read.
fn anchor() -> (Instant, f64) {
    static ANCHOR: std::sync::OnceLock<(Instant, f64)> = std::sync::OnceLock::new();
    *ANCHOR.get_or_init(|| (Instant::now(), epoch_now()))
}

/// Nanoseconds from the anchor to `at` (at least 1, so 0 can mean "never").
fn anchor_ns(at: Instant) -> u64 {
    (at.saturating_duration_since(anchor().0).as_nanos() as u64).max(1)
}

fn epoch_of_ns(ns: u64) -> f64 {
    anchor().1 + ns as f64 / 1e9
}

thread_local! {
    static CURRENT: std::cell::RefCell<Option<(Job, Weak<Shared>)>> = const { std::cell::RefCell::new(None) };
}

/// Marks `job` as the task running on this thread until the guard drops.
pub struct CurrentTask;

impl CurrentTask {
    pub fn enter(job: &Job, shared: Weak<Shared>) -> Self {
        CURRENT.with(|c| *c.borrow_mut() = Some((job.clone(), shared)));
        CurrentTask
    }
}

impl Drop for CurrentTask {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

/// The handle of the sync task running on this thread, if any.
#[pyfunction]
pub fn _current_task() -> Option<TaskResult> {
    CURRENT.with(|c| {
        c.borrow()
            .as_ref()
            .map(|(job, shared)| TaskResult::new(job.clone(), shared.clone()))
    })
}

pub struct TaskState {
    pub seq: u64,
    pub prefix: u32,
    pub lane: usize,
    pub max_retries: u32,
    pub timeout: Option<Duration>,
    pub created: Instant,
    /// Estimated bytes this task holds while it is not finished.
    pub footprint: u64,
    status: AtomicU8,
    attempts: AtomicU32,
    /// When the first attempt started, in ns from the clock anchor; 0: never.
    first_start_ns: AtomicU64,
    inner: Mutex<Inner>,
    done: Condvar,
}

pub type Job = Arc<TaskState>;

impl TaskState {
    /// Shows the garbage collector the Python objects this task holds. A
    /// task whose lock is taken right now is skipped: the collector then
    /// only sees fewer references, which keeps objects alive, never frees them.
    pub fn traverse(&self, visit: &pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        let Some(inner) = self.inner.try_lock() else {
            return Ok(());
        };
        if let Some(call) = &inner.call {
            visit.call(&call.func)?;
            visit.call(&call.args)?;
            visit.call(&call.kwargs)?;
            visit.call(&call.no_retry)?;
        }
        visit.call(&inner.func)?;
        match &inner.outcome {
            Outcome::Value(v) | Outcome::Error(v) | Outcome::Cancelled(v) => visit.call(v)?,
            Outcome::Pending => {}
        }
        for o in inner.errors.iter().chain(&inner.callbacks) {
            visit.call(o)?;
        }
        Ok(())
    }
}

/// The function, arguments, keyword arguments and no-retry exception classes of a call.
pub type CallParts = (
    Py<PyAny>,
    Py<PyTuple>,
    Option<Py<PyDict>>,
    Option<Py<PyAny>>,
);

pub fn format_id(prefix: u32, seq: u64) -> String {
    format!("{prefix:08x}{seq:012x}")
}

/// A task's identity: the prefix of the engine that created it and its
/// sequence number. Tasks recovered from storage keep theirs.
pub type Key = (u32, u64);

/// A cheap multiply-rotate hasher for task keys. NOTE: keys are sequence
/// numbers the engine makes itself (a lookup by an outside id never inserts),
/// so they need no protection against crafted collisions; with it, the end
/// to end run of 200k no-op tasks came out about 2% faster than with SipHash.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub type KeyMap<V> = std::collections::HashMap<Key, V, std::hash::BuildHasherDefault<KeyHasher>>;

/// The key inside a task id, or None when `id` is not a task id.
pub fn parse_id(id: &str) -> Option<Key> {
    if id.len() != 20 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let prefix = u32::from_str_radix(&id[..8], 16).ok()?;
    let seq = u64::from_str_radix(&id[8..], 16).ok()?;
    Some((prefix, seq))
}

pub struct NewTask {
    pub seq: u64,
    pub prefix: u32,
    pub lane: usize,
    pub max_retries: u32,
    pub timeout: Option<Duration>,
    pub delayed: bool,
    pub footprint: u64,
    pub call: Call,
    /// Callbacks attached from the start (a periodic run's bookkeeping).
    pub callbacks: Vec<Py<PyAny>>,
}

impl TaskState {
    pub fn new(t: NewTask) -> Self {
        let status = if t.delayed {
            Status::Scheduled
        } else {
            Status::Pending
        };
        Self {
            seq: t.seq,
            prefix: t.prefix,
            lane: t.lane,
            max_retries: t.max_retries,
            timeout: t.timeout,
            created: Instant::now(),
            footprint: t.footprint,
            status: AtomicU8::new(status as u8),
            attempts: AtomicU32::new(0),
            first_start_ns: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                call: Some(t.call),
                func: None,
                outcome: Outcome::Pending,
                errors: Vec::new(),
                callbacks: t.callbacks,
                progress: 0.0,
                step: None,
                finished_ns: None,
            }),
            done: Condvar::new(),
        }
    }

    pub fn id(&self) -> String {
        format_id(self.prefix, self.seq)
    }

    pub fn key(&self) -> Key {
        (self.prefix, self.seq)
    }

    pub fn status(&self) -> Status {
        Status::from_u8(self.status.load(SeqCst))
    }

    pub fn set_status(&self, s: Status) {
        self.status.store(s as u8, SeqCst);
    }

    /// A delayed task or retry fell due: it now waits in a ready lane.
    pub fn mark_ready(&self) {
        let _ = self.status.compare_exchange(
            Status::Scheduled as u8,
            Status::Pending as u8,
            SeqCst,
            SeqCst,
        );
        let _ = self.status.compare_exchange(
            Status::Retrying as u8,
            Status::Pending as u8,
            SeqCst,
            SeqCst,
        );
    }

    pub fn attempts(&self) -> u32 {
        self.attempts.load(SeqCst)
    }

    /// Moves a waiting task to running and counts the attempt; false if it
    /// was cancelled or finished meanwhile.
    pub fn begin(&self, now: Instant) -> Option<u32> {
        let cur = self.status.load(SeqCst);
        if !Status::from_u8(cur).is_waiting() {
            return None;
        }
        self.status
            .compare_exchange(cur, Status::Running as u8, SeqCst, SeqCst)
            .ok()?;
        let _ = self
            .first_start_ns
            .compare_exchange(0, anchor_ns(now), SeqCst, SeqCst);
        Some(self.attempts.fetch_add(1, SeqCst) + 1)
    }

    /// The callable and its arguments, for one attempt.
    pub fn call_parts(&self, py: Python<'_>) -> Option<CallParts> {
        let inner = self.inner.lock();
        inner.call.as_ref().map(|c| {
            (
                c.func.clone_ref(py),
                c.args.clone_ref(py),
                c.kwargs.as_ref().map(|k| k.clone_ref(py)),
                c.no_retry.as_ref().map(|k| k.clone_ref(py)),
            )
        })
    }

    pub fn push_error(&self, exc: Py<PyAny>) {
        self.inner.lock().errors.push(exc);
    }

    /// Records the final outcome, wakes waiters and hands back the
    /// callbacks to run. Released objects are dropped by the caller, after
    /// the lock is gone, since dropping them may run Python code.
    pub fn finish(
        &self,
        py: Python<'_>,
        status: Status,
        outcome: Outcome,
    ) -> (Vec<Py<PyAny>>, Option<Call>) {
        let mut inner = self.inner.lock();
        if self.status().is_final() {
            return (Vec::new(), None);
        }
        inner.outcome = outcome;
        let call = inner.call.take();
        // The function stays (for `name`); the arguments go.
        inner.func = call.as_ref().map(|c| c.func.clone_ref(py));
        inner.finished_ns = Some(anchor_ns(Instant::now()));
        if status == Status::Completed {
            inner.progress = 100.0;
        }
        let callbacks = std::mem::take(&mut inner.callbacks);
        self.set_status(status);
        drop(inner);
        self.done.notify_all();
        (callbacks, call)
    }

    /// The final value (true) or exception (false), once there is one.
    pub fn outcome_object<'py>(&self, py: Python<'py>) -> Option<(bool, Bound<'py, PyAny>)> {
        let inner = self.inner.lock();
        match &inner.outcome {
            Outcome::Value(v) => Some((true, v.clone_ref(py).into_bound(py))),
            Outcome::Error(e) | Outcome::Cancelled(e) => {
                Some((false, e.clone_ref(py).into_bound(py)))
            }
            Outcome::Pending => None,
        }
    }

    /// Shallow size of the stored result, from `sys.getsizeof`.
    pub fn result_size(&self, py: Python<'_>) -> u64 {
        let inner = self.inner.lock();
        let value = match &inner.outcome {
            // None is the commonest result; its size is nothing worth a call.
            Outcome::Value(v) if v.is_none(py) => return 0,
            Outcome::Value(v) | Outcome::Error(v) | Outcome::Cancelled(v) => v.clone_ref(py),
            Outcome::Pending => return 0,
        };
        drop(inner);
        runtime(py)
            .ok()
            .and_then(|rt| rt.getsizeof.bind(py).call1((value,)).ok())
            .and_then(|n| n.extract::<u64>().ok())
            .unwrap_or(0)
    }

    fn outcome(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        // NOTE: the error is made once the lock is released: making it runs
        // Python, which may hand the GIL to a worker that then waits for this
        // lock to finish the task.
        let got = match &self.inner.lock().outcome {
            Outcome::Value(v) => Ok(v.clone_ref(py)),
            Outcome::Error(e) | Outcome::Cancelled(e) => Err(Some(e.clone_ref(py))),
            Outcome::Pending => Err(None),
        };
        got.map_err(|exc| match exc {
            Some(e) => PyErr::from_value(e.into_bound(py)),
            None => Error::NotReady(self.id()).into(),
        })
    }
}

#[pyclass(frozen, weakref, module = "catzilla._catzilla")]
pub struct TaskResult {
    pub state: Job,
    pub shared: Weak<Shared>,
    born: Born,
}

impl TaskResult {
    /// The handle of a task of a live engine.
    pub fn of(state: Job, shared: &Arc<Shared>) -> Self {
        Self {
            state,
            shared: Arc::downgrade(shared),
            born: shared.born,
        }
    }

    pub fn new(state: Job, shared: Weak<Shared>) -> Self {
        let born = shared.upgrade().map_or_else(Born::here, |s| s.born);
        Self {
            state,
            shared,
            born,
        }
    }
}

/// Runs each callback with the task handle, logging any that raise.
pub fn run_callbacks(py: Python<'_>, handle: &Bound<'_, TaskResult>, callbacks: Vec<Py<PyAny>>) {
    let guard = ParkOnForcedUnwind;
    for cb in callbacks {
        if let Err(err) = cb.bind(py).call1((handle,)) {
            if let Ok(rt) = runtime(py) {
                let exc = err.into_value(py).into_bound(py).into_any();
                rt.log(
                    py,
                    "error",
                    format!(
                        "callback {} of task {} raised",
                        describe(cb.bind(py)),
                        handle.get().state.id()
                    ),
                    Some(&exc),
                );
            }
        }
    }
    guard.disarm();
}

#[pymethods]
impl TaskResult {
    /// The task's unique id.
    #[getter]
    fn task_id(&self) -> String {
        self.state.id()
    }

    /// The task's current `TaskStatus`.
    #[getter]
    fn status(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let rt = runtime(py)?;
        Ok(rt.statuses[self.state.status() as usize].clone_ref(py))
    }

    /// The task's `TaskPriority`.
    #[getter]
    fn priority(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let rt = runtime(py)?;
        Ok(rt.priorities[self.state.lane].clone_ref(py))
    }

    /// Attempts started so far.
    #[getter]
    fn attempts(&self) -> u32 {
        self.state.attempts()
    }

    /// The task function's import name, `module.qualname`.
    #[getter]
    fn name(&self, py: Python<'_>) -> PyResult<String> {
        self.born.check()?;
        let func = {
            let inner = self.state.inner.lock();
            inner
                .call
                .as_ref()
                .map(|c| c.func.clone_ref(py))
                .or_else(|| inner.func.as_ref().map(|f| f.clone_ref(py)))
        };
        Ok(func
            .map(|f| super::engine::import_name(f.bind(py)))
            .unwrap_or_default())
    }

    /// Progress in percent (0-100), as the task last reported it; 100 once completed.
    #[getter]
    fn progress(&self) -> PyResult<f64> {
        self.born.check()?;
        Ok(self.state.inner.lock().progress)
    }

    /// The step the task last reported, if any.
    #[getter]
    fn current_step(&self) -> PyResult<Option<String>> {
        self.born.check()?;
        Ok(self.state.inner.lock().step.as_deref().map(str::to_string))
    }

    /// When the task was added, in seconds since the Unix epoch.
    #[getter]
    fn created_at(&self) -> f64 {
        epoch_of_ns(anchor_ns(self.state.created))
    }

    /// When its first attempt started, in seconds since the Unix epoch.
    #[getter]
    fn started_at(&self) -> Option<f64> {
        let ns = self.state.first_start_ns.load(SeqCst);
        (ns != 0).then(|| epoch_of_ns(ns))
    }

    /// When it reached a final state, in seconds since the Unix epoch.
    #[getter]
    fn finished_at(&self) -> Option<f64> {
        self.state.inner.lock().finished_ns.map(epoch_of_ns)
    }

    /// Reports progress: `percent` from 0 to 100 and an optional step name.
    #[pyo3(signature = (percent, step=None))]
    fn set_progress(
        &self,
        percent: &Bound<'_, PyAny>,
        step: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.born.check()?;
        let value = super::args::number("percent", percent, "a number from 0 to 100")?;
        let step = match step.filter(|s| !s.is_none()) {
            Some(s) => Some(super::args::text("step", s)?),
            None => None,
        };
        if self.state.status().is_final() {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
                "task {} has finished; its progress can no longer change",
                self.state.id()
            )));
        }
        if !(0.0..=100.0).contains(&value) {
            return Err(Error::BadValue(
                "percent",
                format!("must be between 0 and 100, got {value}"),
            )
            .into());
        }
        {
            let mut inner = self.state.inner.lock();
            inner.progress = value;
            if let Some(text) = &step {
                inner.step = Some(text.as_str().into());
            }
        }
        if let Some(store) = self.shared.upgrade().and_then(|s| s.store.clone()) {
            store.progress(self.state.id(), value, step);
        }
        Ok(())
    }

    /// The exception of every failed attempt, oldest first.
    #[getter]
    fn errors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.born.check()?;
        let errors: Vec<Py<PyAny>> = {
            let inner = self.state.inner.lock();
            inner.errors.iter().map(|e| e.clone_ref(py)).collect()
        };
        PyList::new(py, errors)
    }

    /// True once the task completed, failed or was cancelled.
    fn is_ready(&self) -> bool {
        self.state.status().is_final()
    }

    /// Blocks until the task finishes and returns its value, or raises its
    /// final exception. Raises `TimeoutError` after `timeout` seconds.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        self.born.check()?;
        let limit = super::args::seconds_or_none("timeout", timeout)?;
        let deadline = limit.and_then(|d| Instant::now().checked_add(d));
        loop {
            if self.state.status().is_final() {
                return self.state.outcome(py);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::Timeout(format!(
                    "task {} did not finish within {} s",
                    self.state.id(),
                    limit.unwrap_or_default().as_secs_f64()
                ))
                .into());
            }
            // NOTE: waits in slices so Ctrl+C (a pending signal) is seen within 100 ms.
            let slice = now + Duration::from_millis(100);
            let until = deadline.map_or(slice, |d| d.min(slice));
            let state = &self.state;
            py.detach(|| {
                let mut inner = state.inner.lock();
                if !state.status().is_final() {
                    state.done.wait_until(&mut inner, until);
                }
            });
            py.check_signals()?;
        }
    }

    /// The value of a completed task; raises the final exception of a failed
    /// or cancelled one, and `TaskNotReadyError` while it has not finished.
    fn result(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.born.check()?;
        self.state.outcome(py)
    }

    /// The final exception of a failed or cancelled task, else None.
    fn exception(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.born.check()?;
        let inner = self.state.inner.lock();
        Ok(match &inner.outcome {
            Outcome::Error(e) | Outcome::Cancelled(e) => Some(e.clone_ref(py)),
            _ => None,
        })
    }

    /// Cancels the task if it has not started; returns whether it did.
    fn cancel(&self, py: Python<'_>) -> PyResult<bool> {
        self.born.check()?;
        match self.shared.upgrade() {
            Some(shared) => shared.cancel(py, &self.state),
            None => Ok(false),
        }
    }

    /// Calls `fn(task_result)` once the task finishes, at once if it has.
    fn add_callback(slf: &Bound<'_, Self>, func: &Bound<'_, PyAny>) -> PyResult<()> {
        slf.get().born.check()?;
        if !func.is_callable() {
            return Err(Error::WrongType("callback", "callable", describe(func)).into());
        }
        let state = &slf.get().state;
        {
            let mut inner = state.inner.lock();
            if !state.status().is_final() {
                inner.callbacks.push(func.clone().unbind());
                return Ok(());
            }
        }
        run_callbacks(slf.py(), slf, vec![func.clone().unbind()]);
        Ok(())
    }

    fn __await__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.get().born.check()?;
        let rt = runtime(slf.py())?;
        rt.await_result
            .bind(slf.py())
            .call1((slf,))?
            .call_method0("__await__")
    }

    fn __repr__(&self) -> String {
        format!(
            "<TaskResult {} {:?} attempts={}>",
            self.state.id(),
            self.state.status(),
            self.state.attempts()
        )
    }
}

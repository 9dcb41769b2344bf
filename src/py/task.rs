//! One task's state, shared by the engine, its workers and the handles.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::runtime::runtime;
use crate::errors::{describe, Error};

pub use crate::tasks::status::Status;

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

/// A function to call once a task is final.
pub enum Callback {
    /// `add_done_callback`: called with the task's handle, whatever the outcome.
    Done(Py<PyAny>),
    /// `add_callback`: called with the task's value, on success only.
    Value(Py<PyAny>),
}

impl Callback {
    pub fn func(&self) -> &Py<PyAny> {
        match self {
            Callback::Done(f) | Callback::Value(f) => f,
        }
    }
}

pub(super) struct Inner {
    pub(super) call: Option<Call>,
    /// The function, kept after the arguments are released, for `name`.
    pub(super) func: Option<Py<PyAny>>,
    pub(super) outcome: Outcome,
    pub(super) errors: Vec<Py<PyAny>>,
    pub(super) callbacks: Vec<Callback>,
    pub(super) progress: f64,
    pub(super) step: Option<Box<str>>,
    /// When it became final, in ns from the clock anchor.
    pub(super) finished_ns: Option<u64>,
    /// A task claimed from the store that another process queued: its
    /// function's import name and JSON arguments, resolved when it runs.
    pub(super) stored: Option<Box<crate::store::Row>>,
}

/// Seconds since the Unix epoch, for timestamps users read.
pub use crate::clock::epoch_now;

/// One reading of both clocks, so task timestamps are taken from the cheap
/// monotonic clock and turned into wall-clock time only when read.
fn anchor() -> (Instant, f64) {
    static ANCHOR: std::sync::OnceLock<(Instant, f64)> = std::sync::OnceLock::new();
    *ANCHOR.get_or_init(|| (Instant::now(), epoch_now()))
}

/// Reads the clocks for the anchor now, if not yet: before any task is made,
/// so no task's creation time comes before it (it would read as the anchor).
pub fn set_anchor() {
    anchor();
}

/// Nanoseconds from the anchor to `at` (at least 1, so 0 can mean "never").
pub fn anchor_ns(at: Instant) -> u64 {
    (at.saturating_duration_since(anchor().0).as_nanos() as u64).max(1)
}

pub fn epoch_of_ns(ns: u64) -> f64 {
    anchor().1 + ns as f64 / 1e9
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
    /// Queued by this process (not claimed from another one's).
    pub local: bool,
    status: AtomicU8,
    attempts: AtomicU32,
    /// When the first attempt started, in ns from the clock anchor; 0: never.
    pub(super) first_start_ns: AtomicU64,
    /// How long the last attempt ran, in µs.
    pub last_run_us: AtomicU64,
    /// Its name, lane and queue's counts, while observation is on.
    pub series: std::sync::OnceLock<Arc<crate::tasks::series::Series>>,
    pub(super) inner: Mutex<Inner>,
    pub(super) done: Condvar,
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
        for o in inner
            .errors
            .iter()
            .chain(inner.callbacks.iter().map(Callback::func))
        {
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
    pub callbacks: Vec<Callback>,
    /// Its series, when observation was on as it was made.
    pub series: Option<Arc<crate::tasks::series::Series>>,
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
            local: true,
            status: AtomicU8::new(status as u8),
            attempts: AtomicU32::new(0),
            first_start_ns: AtomicU64::new(0),
            last_run_us: AtomicU64::new(0),
            series: t.series.map(std::sync::OnceLock::from).unwrap_or_default(),
            inner: Mutex::new(Inner {
                call: Some(t.call),
                func: None,
                outcome: Outcome::Pending,
                errors: Vec::new(),
                callbacks: t.callbacks,
                progress: 0.0,
                step: None,
                finished_ns: None,
                stored: None,
            }),
            done: Condvar::new(),
        }
    }

    /// A task claimed from the store that another process queued; None when
    /// its id is not one of ours (a foreign record).
    pub fn from_row(row: crate::store::Row, attempts: u32) -> Option<Self> {
        let (prefix, seq) = parse_id(&row.task_id)?;
        let timeout = (row.timeout_ms > 0.0 && row.timeout_ms.is_finite())
            .then(|| Duration::from_secs_f64(row.timeout_ms / 1000.0));
        Some(Self {
            seq,
            prefix,
            lane: usize::try_from(row.priority)
                .unwrap_or(0)
                .min(crate::tasks::lanes::LANES - 1),
            max_retries: u32::try_from(row.max_retries).unwrap_or(0),
            timeout,
            created: Instant::now(),
            footprint: 200,
            local: false,
            status: AtomicU8::new(Status::Pending as u8),
            attempts: AtomicU32::new(attempts),
            first_start_ns: AtomicU64::new(0),
            last_run_us: AtomicU64::new(0),
            series: std::sync::OnceLock::new(),
            inner: Mutex::new(Inner {
                call: None,
                func: None,
                outcome: Outcome::Pending,
                errors: Vec::new(),
                callbacks: Vec::new(),
                progress: row.progress,
                step: row.current_step.as_deref().map(Into::into),
                finished_ns: None,
                stored: Some(Box::new(row)),
            }),
            done: Condvar::new(),
        })
    }

    /// The stored call of a task claimed from another process, once: it is
    /// resolved into a live call before its first attempt here.
    pub fn take_stored(&self) -> Option<Box<crate::store::Row>> {
        self.inner.lock().stored.take()
    }

    /// Gives the task its live call (resolved from the store).
    pub fn set_call(&self, call: Call) {
        self.inner.lock().call = Some(call);
    }

    pub fn set_attempts(&self, n: u32) {
        self.attempts.store(n, SeqCst);
    }

    /// What the store says of this task, run in another process: its
    /// attempts and when it first started (seconds since the epoch).
    pub fn ran_elsewhere(&self, attempts: u32, started_at: Option<f64>) {
        self.attempts.fetch_max(attempts, SeqCst);
        if let Some(at) = started_at.filter(|t| t.is_finite()) {
            let ns = ((at - anchor().1) * 1e9).max(1.0) as u64;
            let _ = self.first_start_ns.compare_exchange(0, ns, SeqCst, SeqCst);
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

    /// How long the last attempt ran, if one did.
    pub fn last_run(&self) -> Option<Duration> {
        match self.last_run_us.load(SeqCst) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
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
    /// None when the task was already final (nothing changed).
    pub fn finish(
        &self,
        py: Python<'_>,
        status: Status,
        outcome: Outcome,
    ) -> Option<(Vec<Callback>, Option<Call>)> {
        let mut inner = self.inner.lock();
        if self.status().is_final() {
            drop(inner);
            drop(outcome); // after the lock: dropping Python objects may run Python
            return None;
        }
        inner.outcome = outcome;
        // The function stays (for `name`); the arguments go, except for a
        // failed task's, which it keeps so that it can be retried.
        inner.func = inner.call.as_ref().map(|c| c.func.clone_ref(py));
        let call = if status == Status::Failed {
            None
        } else {
            inner.call.take()
        };
        inner.finished_ns = Some(anchor_ns(Instant::now()));
        if status == Status::Completed {
            inner.progress = 100.0;
        }
        let callbacks = std::mem::take(&mut inner.callbacks);
        self.set_status(status);
        drop(inner);
        self.done.notify_all();
        Some((callbacks, call))
    }

    /// When it became final, in ns from the clock anchor; None before.
    pub fn finished_ns(&self) -> Option<u64> {
        self.inner.lock().finished_ns
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

    pub fn outcome(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
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

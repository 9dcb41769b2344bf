//! Periodic tasks: schedules whose runs the engine queues as ordinary tasks.
//!
//! One thread per engine (started with its first schedule) sleeps on the
//! `Ticker` until the next run is due. At each firing it decides (paused,
//! still running, claimed by another process) and queues the run through
//! the same path as `add_task`, then arms the next due time of the schedule.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::admission::{prepare, CallOptions, Prepared};
use super::handle::TaskResult;
use super::runtime::runtime;
use super::shared::Shared;
use super::task::{epoch_now, format_id, Job, Status};
use crate::errors::{describe, Error, Result};
use crate::interpreter::ParkOnForcedUnwind;
use crate::tasks::backoff::Rng;
use crate::tasks::periodic::{instant_of, Missed, Spec, Ticker};

/// One recurring task.
pub struct Schedule {
    id: u64,
    name: String,
    spec: Spec,
    func: Py<PyAny>,
    args: Py<PyTuple>,
    kwargs: Option<Py<PyDict>>,
    priority: Option<Py<PyAny>>,
    max_retries: Option<Py<PyAny>>,
    timeout_ms: Option<Py<PyAny>>,
    /// Most seconds a run is moved later at random (0: exactly on time).
    jitter: f64,
    overlap: bool,
    failures: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The next due time from the schedule, and when it will really fire.
    due: Option<f64>,
    fire_at: Option<f64>,
    last_run_at: Option<f64>,
    last_result_id: Option<String>,
    last_job: Option<Job>,
    runs: u64,
    skipped: u64,
    paused: bool,
    cancelled: bool,
    /// The next runs, built ahead under the GIL, so that a firing can queue
    /// one without waiting for the GIL.
    ahead: Vec<Prepared>,
}

/// Where an engine keeps its `Periodics`, made with its first schedule.
pub type PeriodicsSlot = Mutex<Option<Arc<Periodics>>>;

/// The schedules of one engine and the thread that fires them.
pub struct Periodics {
    ticker: Ticker,
    schedules: Mutex<HashMap<u64, Arc<Schedule>>>,
    next_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
    rng: Mutex<Rng>,
}

impl Periodics {
    fn new() -> Self {
        Self {
            ticker: Ticker::default(),
            schedules: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            thread: Mutex::new(None),
            rng: Mutex::new(Rng::new(epoch_now().to_bits())),
        }
    }

    fn name_taken(name: &str) -> Error {
        Error::BadValue(
            "name",
            format!("{name:?} is already the name of a periodic task"),
        )
    }

    fn name_free(&self, name: &str) -> Result<()> {
        if self.schedules.lock().values().any(|s| s.name == name) {
            return Err(Self::name_taken(name));
        }
        Ok(())
    }

    /// Arms the schedule's next firing: its due time plus its jitter.
    fn arm(&self, s: &Schedule, st: &mut State) {
        let Some(due) = st.due else {
            st.fire_at = None;
            return;
        };
        let jitter = if s.jitter > 0.0 {
            let r = self.rng.lock().next_u64();
            s.jitter * (r >> 11) as f64 / (1u64 << 53) as f64
        } else {
            0.0
        };
        let fire_at = due + jitter;
        st.fire_at = Some(fire_at);
        self.ticker
            .arm(s.id, instant_of(fire_at, epoch_now(), Instant::now()));
    }

    /// Stops the thread; schedules stay readable but never fire again.
    pub fn stop(&self, py: Python<'_>) {
        self.ticker.stop();
        let thread = self.thread.lock().take();
        // The ticker thread itself may end up here (an engine dropped by a
        // collection that a firing ran): it cannot join itself.
        if let Some(t) = thread.filter(|t| t.thread().id() != std::thread::current().id()) {
            py.detach(|| t.join()).ok();
        }
    }

    /// Shows the collector what the schedules hold.
    pub fn traverse(&self, visit: &pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        let Some(map) = self.schedules.try_lock() else {
            return Ok(());
        };
        for s in map.values() {
            visit.call(&s.func)?;
            visit.call(&s.args)?;
            visit.call(&s.kwargs)?;
            visit.call(&s.priority)?;
            visit.call(&s.max_retries)?;
            visit.call(&s.timeout_ms)?;
            if let Some(st) = s.state.try_lock() {
                if let Some(job) = &st.last_job {
                    job.traverse(visit)?;
                }
                for run in &st.ahead {
                    let call = &run.task.call;
                    visit.call(&call.func)?;
                    visit.call(&call.args)?;
                    visit.call(&call.kwargs)?;
                    visit.call(&call.no_retry)?;
                    for cb in &run.task.callbacks {
                        visit.call(cb.func())?;
                    }
                }
            }
        }
        Ok(())
    }

    pub fn clear(&self) {
        let gone = std::mem::take(&mut *self.schedules.lock());
        for s in gone.values() {
            self.ticker.disarm(s.id);
            let runs = std::mem::take(&mut s.state.lock().ahead);
            drop(runs);
        }
        drop(gone);
    }
}

/// A new schedule's settings, checked by `add`.
pub struct NewSchedule<'py> {
    pub func: Bound<'py, PyAny>,
    pub args: Bound<'py, PyTuple>,
    pub kwargs: Option<Bound<'py, PyDict>>,
    pub every: Option<f64>,
    pub cron: Option<String>,
    pub timezone: String,
    pub priority: Option<Bound<'py, PyAny>>,
    pub max_retries: Option<Bound<'py, PyAny>>,
    pub timeout_ms: Option<Bound<'py, PyAny>>,
    pub start_at: Option<f64>,
    pub jitter_ms: f64,
    pub overlap: bool,
    pub missed: String,
    pub name: String,
}

/// Registers a schedule on the engine and arms its first run.
pub fn add(
    py: Python<'_>,
    shared: &Arc<Shared>,
    slot: &PeriodicsSlot,
    new: NewSchedule<'_>,
) -> Result<PeriodicTask> {
    let rt = runtime(py)?;
    if !new.func.is_callable() {
        return Err(Error::WrongType("func", "callable", describe(&new.func)));
    }
    let now = epoch_now();
    let mut spec = match (new.every, &new.cron) {
        (Some(_), Some(_)) => {
            return Err(Error::Usage(
                "give either every= (an interval) or cron= (a cron expression), not both"
                    .to_string(),
            ))
        }
        (None, None) => {
            return Err(Error::Usage(
                "a periodic task needs every= (an interval) or cron= (a cron expression)"
                    .to_string(),
            ))
        }
        (Some(period), None) => {
            if new.timezone != "UTC" {
                return Err(Error::BadValue(
                    "timezone",
                    "only applies to cron= schedules".to_string(),
                ));
            }
            Spec::every(period, new.start_at.unwrap_or(now))
                .map_err(|e| Error::BadValue("every", e))?
        }
        (None, Some(pattern)) => {
            if new.start_at.is_some() {
                return Err(Error::BadValue(
                    "start_at",
                    "only applies to every= schedules (a cron expression names its own times)"
                        .to_string(),
                ));
            }
            Spec::cron(pattern, &new.timezone).map_err(|e| {
                if e.contains("time zone") {
                    Error::BadValue("timezone", e)
                } else {
                    Error::BadValue("cron", e)
                }
            })?
        }
    };
    if !(new.jitter_ms.is_finite() && new.jitter_ms >= 0.0) {
        return Err(Error::BadValue(
            "jitter_ms",
            format!("must be a finite number >= 0, got {}", new.jitter_ms),
        ));
    }
    let missed = match new.missed.as_str() {
        "run_once" => Missed::RunOnce,
        "skip" => Missed::Skip,
        other => {
            return Err(Error::BadValue(
                "missed",
                format!("must be 'run_once' or 'skip', got {other:?}"),
            ))
        }
    };
    if new.name.is_empty() {
        return Err(Error::BadValue("name", "must not be empty".to_string()));
    }
    // The options are checked now, so a bad one fails here, not at every run.
    if let Some(p) = &new.priority {
        rt.lane_of(p)?;
    }
    if let Some(v) = &new.max_retries {
        super::args::count("max_retries", v)?;
    }
    if let Some(v) = &new.timeout_ms {
        super::args::millis("timeout_ms", v)?;
    }
    let periodics = periodics_of(shared, slot)?;
    // Checked before the store records the schedule under this name, and
    // again as it is added (another thread may have taken the name meanwhile).
    periodics.name_free(&new.name)?;
    let mut state = State::default();
    let mut last_due = None;
    if let Some(store) = shared.store.as_ref().filter(|s| !s.is_degraded()) {
        let anchor = match spec {
            Spec::Every { anchor, .. } => anchor,
            Spec::Cron { .. } => 0.0,
        };
        let record = py
            .detach(|| store.open_schedule(&new.name, &spec.describe(), anchor))
            .map_err(|e| Error::Storage(e.0))?;
        if let Spec::Every { period, .. } = spec {
            spec = Spec::every(period, record.anchor).map_err(|e| Error::BadValue("every", e))?;
        }
        state.last_run_at = record.last_run_at;
        state.last_result_id = record.last_task_id;
        state.runs = u64::try_from(record.runs).unwrap_or(0);
        last_due = record.last_due;
    }
    state.due = match last_due.and_then(|last| spec.last_between(last, now)) {
        Some(missed_due) if missed == Missed::RunOnce => Some(missed_due),
        _ => spec.next_after(now),
    };
    let schedule = Arc::new(Schedule {
        id: periodics.next_id.fetch_add(1, SeqCst),
        name: new.name,
        spec,
        func: new.func.unbind(),
        args: new.args.unbind(),
        kwargs: new.kwargs.filter(|k| !k.is_empty()).map(Bound::unbind),
        priority: new.priority.map(Bound::unbind),
        max_retries: new.max_retries.map(Bound::unbind),
        timeout_ms: new.timeout_ms.map(Bound::unbind),
        jitter: new.jitter_ms / 1000.0,
        overlap: new.overlap,
        failures: AtomicU64::new(0),
        state: Mutex::new(state),
    });
    // Building one now also checks what every run needs (strict storage).
    let first = build_run(py, shared, &schedule)?;
    {
        let mut map = periodics.schedules.lock();
        if map.values().any(|s| s.name == schedule.name) {
            return Err(Periodics::name_taken(&schedule.name));
        }
        map.insert(schedule.id, schedule.clone());
    }
    schedule.state.lock().ahead.push(first);
    refill(py, shared, &schedule);
    {
        let mut st = schedule.state.lock();
        periodics.arm(&schedule, &mut st);
    }
    Ok(PeriodicTask {
        schedule,
        periodics: Arc::downgrade(&periodics),
    })
}

/// The engine's schedules, in the order they were added (cancelled ones left out).
pub fn list(slot: &PeriodicsSlot) -> Vec<PeriodicTask> {
    let Some(periodics) = slot.lock().clone() else {
        return Vec::new();
    };
    let mut all: Vec<Arc<Schedule>> = periodics.schedules.lock().values().cloned().collect();
    all.sort_by_key(|s| s.id);
    all.into_iter()
        .map(|schedule| PeriodicTask {
            schedule,
            periodics: Arc::downgrade(&periodics),
        })
        .collect()
}

/// The engine's `Periodics`, with its thread started on first use.
fn periodics_of(shared: &Arc<Shared>, slot: &PeriodicsSlot) -> Result<Arc<Periodics>> {
    if shared.sched.is_closed() {
        return Err(Error::ShutDown);
    }
    let mut slot = slot.lock();
    if let Some(p) = slot.as_ref() {
        return Ok(p.clone());
    }
    let periodics = Arc::new(Periodics::new());
    let weak_shared = Arc::downgrade(shared);
    let weak_periodics = Arc::downgrade(&periodics);
    let thread = std::thread::Builder::new()
        .name("catzilla-periodic".into())
        .spawn(move || {
            let Some(p) = weak_periodics.upgrade() else {
                return;
            };
            p.ticker.run(|id| {
                if let Some(shared) = weak_shared.upgrade() {
                    fire(&shared, &p, id);
                }
            });
        })
        .map_err(Error::Thread)?;
    *periodics.thread.lock() = Some(thread);
    *slot = Some(periodics.clone());
    Ok(periodics)
}

/// One firing of schedule `id`: arm the next, then queue this run if it should go.
fn fire(shared: &Arc<Shared>, periodics: &Periodics, id: u64) {
    let Some(s) = periodics.schedules.lock().get(&id).cloned() else {
        return;
    };
    let now = epoch_now();
    let due = {
        let mut st = s.state.lock();
        let Some(due) = st.due.filter(|_| !st.cancelled) else {
            return;
        };
        // NOTE: the next run comes from the schedule, never from when this one
        // runs or ends; runs a suspended process slept through collapse into this one.
        st.due = s.spec.next_after(due.max(now));
        periodics.arm(&s, &mut st);
        let running = st.last_job.as_ref().is_some_and(|j| !j.status().is_final());
        if st.paused {
            return;
        }
        if running && !s.overlap {
            st.skipped += 1;
            return;
        }
        due
    };
    let seq = shared.next_seq.fetch_add(1, SeqCst);
    let task_id = format_id(shared.prefix, seq);
    let claim = shared
        .store
        .as_ref()
        .filter(|store| !store.is_degraded())
        .map(|store| store.claim_run(&s.name, due, &task_id, now));
    if let Some(Ok(false)) = claim {
        return; // another process on the store runs this one
    }
    // NOTE: the fast path queues the run built ahead without the GIL: under
    // GIL contention, each wait for it costs a switch interval (5 ms) or more,
    // and a firing that waited would fall behind its schedule.
    let ready = s.state.lock().ahead.pop();
    let queued = match ready {
        Some(run) => submit_run(shared, &s, run, seq, &task_id, now),
        None => Python::attach(|py| {
            let guard = ParkOnForcedUnwind;
            let queued = build_run(py, shared, &s)
                .map_err(Error::Python)
                .and_then(|run| submit_run(shared, &s, run, seq, &task_id, now));
            refill(py, shared, &s); // holding the GIL now anyway
            guard.disarm();
            queued
        }),
    };
    let problem = match (queued, claim) {
        (Err(e), _) => Some((
            "error",
            format!("periodic task {:?}: its run could not be queued", s.name),
            Some(e),
        )),
        (Ok(()), Some(Err(e))) => Some((
            "warning",
            format!(
                "periodic task {:?}: could not record its run in storage ({e}); ran it anyway",
                s.name
            ),
            None,
        )),
        _ => None,
    };
    if let Some((level, message, err)) = problem {
        if err.is_some() {
            s.failures.fetch_add(1, SeqCst);
        }
        Python::attach(|py| {
            let guard = ParkOnForcedUnwind;
            if let Ok(rt) = runtime(py) {
                let exc = err.map(|e| PyErr::from(e).into_value(py).into_bound(py).into_any());
                rt.log(py, level, message, exc.as_ref());
            }
            guard.disarm();
        });
    }
}

/// Queues a built run under its reserved id; needs no GIL.
fn submit_run(
    shared: &Arc<Shared>,
    s: &Schedule,
    mut run: Prepared,
    seq: u64,
    task_id: &str,
    now: f64,
) -> Result<()> {
    run.task.seq = seq;
    if let Some(row) = run.row.as_mut() {
        row.task_id = task_id.to_string();
        row.created_at = now;
        row.due_at = now;
        row.status = Status::Pending.as_str().to_string();
    }
    let job = shared.submit(run.task, run.delay, run.row)?;
    let previous = {
        let mut st = s.state.lock();
        st.last_run_at = Some(now);
        st.last_result_id = Some(job.id());
        st.runs += 1;
        st.last_job.replace(job)
    };
    drop(previous); // outside the lock: dropping Python objects may run Python
    Ok(())
}

/// Called as each run ends: counts a failure, and builds the next run ahead
/// while this worker holds the GIL anyway.
#[pyclass(frozen, module = "catzilla._catzilla")]
pub struct RunEnded {
    schedule: Weak<Schedule>,
    shared: Weak<Shared>,
}

#[pymethods]
impl RunEnded {
    fn __call__(&self, handle: &Bound<'_, TaskResult>) {
        let Some(s) = self.schedule.upgrade() else {
            return;
        };
        if handle.get().state.status() == Status::Failed {
            s.failures.fetch_add(1, SeqCst);
        }
        if let Some(shared) = self.shared.upgrade() {
            refill(handle.py(), &shared, &s);
        }
    }
}

/// Runs kept built ahead per schedule: enough for firings to keep their
/// times while workers wait for the GIL (runs may overlap with overlap=True).
const AHEAD: usize = 4;

/// Tops up the runs built ahead, while the caller holds the GIL anyway.
fn refill(py: Python<'_>, shared: &Arc<Shared>, s: &Arc<Schedule>) {
    loop {
        {
            let st = s.state.lock();
            if st.cancelled || st.ahead.len() >= AHEAD {
                return;
            }
        }
        let Ok(run) = build_run(py, shared, s) else {
            return;
        };
        let mut st = s.state.lock();
        if st.cancelled || st.ahead.len() >= AHEAD {
            return;
        }
        st.ahead.push(run);
    }
}

/// Builds one run of `s` with `add_task`'s rules, its end watched by `RunEnded`.
fn build_run(py: Python<'_>, shared: &Arc<Shared>, s: &Arc<Schedule>) -> PyResult<Prepared> {
    let mut run = prepare(
        py,
        shared,
        s.func.bind(py),
        s.args.bind(py),
        s.kwargs.as_ref().map(|k| k.bind(py)),
        CallOptions {
            priority: s.priority.as_ref().map(|v| v.bind(py)),
            delay_ms: None,
            max_retries: s.max_retries.as_ref().map(|v| v.bind(py)),
            timeout_ms: s.timeout_ms.as_ref().map(|v| v.bind(py)),
            queue: None,
        },
    )?;
    let watch = Bound::new(
        py,
        RunEnded {
            schedule: Arc::downgrade(s),
            shared: Arc::downgrade(shared),
        },
    )?;
    run.task
        .callbacks
        .push(super::task::Callback::Done(watch.into_any().unbind()));
    run.delay = std::time::Duration::ZERO;
    run.task.delayed = false;
    Ok(run)
}

/// A recurring task; see the stub for the contract.
#[pyclass(frozen, module = "catzilla._catzilla")]
pub struct PeriodicTask {
    schedule: Arc<Schedule>,
    periodics: Weak<Periodics>,
}

impl PeriodicTask {
    fn set_paused(&self, paused: bool, verb: &str) -> PyResult<()> {
        {
            let mut st = self.schedule.state.lock();
            if !st.cancelled {
                st.paused = paused;
                return Ok(());
            }
        }
        // NOTE: made once the lock is released: making a Python error runs
        // Python, and a worker ending a run takes this lock under the GIL.
        Err(Error::BadValue(
            "periodic task",
            format!("{:?} is cancelled and cannot be {verb}", self.schedule.name),
        )
        .into())
    }
}

#[pymethods]
impl PeriodicTask {
    #[getter]
    fn name(&self) -> String {
        self.schedule.name.clone()
    }

    /// The schedule, as text: `every 60.0 s` or `cron "0 3 * * *" (UTC)`.
    #[getter]
    fn schedule(&self) -> String {
        self.schedule.spec.describe()
    }

    /// When the next run fires, in seconds since the Unix epoch; None once cancelled.
    #[getter]
    fn next_run_at(&self) -> Option<f64> {
        let st = self.schedule.state.lock();
        st.fire_at.filter(|_| !st.cancelled)
    }

    #[getter]
    fn last_run_at(&self) -> Option<f64> {
        self.schedule.state.lock().last_run_at
    }

    #[getter]
    fn last_result_id(&self) -> Option<String> {
        self.schedule.state.lock().last_result_id.clone()
    }

    /// Runs queued so far (with storage, counting those of earlier processes).
    #[getter]
    fn runs(&self) -> u64 {
        self.schedule.state.lock().runs
    }

    /// Runs of this process that ended failed, or could not be queued.
    #[getter]
    fn failures(&self) -> u64 {
        self.schedule.failures.load(SeqCst)
    }

    /// Firings skipped because the previous run was still going (overlap=False).
    #[getter]
    fn skipped(&self) -> u64 {
        self.schedule.state.lock().skipped
    }

    #[getter]
    fn overlap(&self) -> bool {
        self.schedule.overlap
    }

    #[getter]
    fn is_paused(&self) -> bool {
        self.schedule.state.lock().paused
    }

    #[getter]
    fn is_cancelled(&self) -> bool {
        self.schedule.state.lock().cancelled
    }

    /// Stops queuing runs until `resume()`; the schedule keeps its times.
    fn pause(&self) -> PyResult<()> {
        self.set_paused(true, "paused")
    }

    fn resume(&self) -> PyResult<()> {
        self.set_paused(false, "resumed")
    }

    /// Stops the schedule for good; a run already queued still runs.
    /// Returns whether it was active.
    fn cancel(&self) -> bool {
        let (was, ahead) = {
            let mut st = self.schedule.state.lock();
            let was = !st.cancelled;
            st.cancelled = true;
            st.due = None;
            st.fire_at = None;
            (was, std::mem::take(&mut st.ahead))
        };
        drop(ahead); // outside the lock: dropping Python objects may run Python
        if let Some(p) = self.periodics.upgrade() {
            p.ticker.disarm(self.schedule.id);
            let removed = p.schedules.lock().remove(&self.schedule.id);
            drop(removed);
        }
        was
    }

    fn __repr__(&self) -> String {
        let st = self.schedule.state.lock();
        format!(
            "<PeriodicTask {:?} {} runs={} next_run_at={}{}>",
            self.schedule.name,
            self.schedule.spec.describe(),
            st.runs,
            st.fire_at
                .map_or_else(|| "None".to_string(), |t| format!("{t:.3}")),
            if st.cancelled {
                " cancelled"
            } else if st.paused {
                " paused"
            } else {
                ""
            }
        )
    }
}

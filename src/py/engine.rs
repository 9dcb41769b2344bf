//! `Engine`, the native base of `catzilla.background_tasks.BackgroundTasks`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use super::args;
use super::engine::{Counters, Defaults, Retention, Shared};
use super::errors::{describe, Error, Result};
use super::runtime::{close_event_loop, log_in_background, runtime};
use super::stats::EngineStats;
use super::task::{Call, Job, KeyMap, NewTask, Outcome, Status, TaskResult};
use crate::store::sqlite::{Row, SqliteStore};
use crate::tasks::backoff::{Backoff, Rng};
use crate::tasks::pool::{Pool, PoolConfig};
use crate::tasks::scheduler::Scheduler;
use crate::tasks::stats::{new_histogram, summary_ms, RateWindow, Sampler};
use crate::tasks::sysinfo::resident_bytes;
use crate::tasks::watchdog::Watchdog;

const MB: f64 = 1024.0 * 1024.0;

/// `TaskFunction._catzilla_options`: the function, then its defaults.
type TaskFunctionOptions<'py> = (
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
);

#[pyclass(frozen, subclass, module = "catzilla._catzilla")]
pub struct Engine {
    shared: Arc<Shared>,
    watchdog_thread: Mutex<Option<JoinHandle<()>>>,
    report: Mutex<Option<Py<PyDict>>>,
    /// Held while a shutdown runs; `stopper` names its thread.
    stopping: Mutex<()>,
    stopper: Mutex<Option<std::thread::ThreadId>>,
}

fn timeout_of(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// The store row of a new task: its import name and its arguments as JSON,
/// or the reason it could not run again after a restart.
fn durable_row(
    py: Python<'_>,
    rt: &super::runtime::Runtime,
    shared: &Shared,
    task: &NewTask,
    delay: Duration,
) -> PyResult<Row> {
    let func = task.call.func.bind(py);
    let name = super::engine::import_name(func);
    let mut reason = None;
    if name.contains("<lambda>") || name.contains("<locals>") {
        reason = Some(format!(
            "{name} is a lambda or a local function, which cannot be imported again"
        ));
    }
    let dumps = rt.json_dumps.bind(py);
    let args = match dumps.call1((task.call.args.bind(py),)) {
        Ok(text) => Some(text.extract::<String>()?),
        Err(err) => {
            reason.get_or_insert_with(|| format!("its arguments are not JSON: {}", err.value(py)));
            None
        }
    };
    let kwargs = match &task.call.kwargs {
        None => Some("{}".to_string()),
        Some(k) => match dumps.call1((k.bind(py),)) {
            Ok(text) => Some(text.extract::<String>()?),
            Err(err) => {
                reason.get_or_insert_with(|| {
                    format!("its keyword arguments are not JSON: {}", err.value(py))
                });
                None
            }
        },
    };
    if shared.storage_strict {
        if let Some(why) = &reason {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "func cannot be stored durably (storage_strict=True): {why}"
            )));
        }
    }
    let now = super::task::epoch_now();
    Ok(Row {
        task_id: super::task::format_id(task.prefix, task.seq),
        name,
        status: if delay.is_zero() {
            "pending"
        } else {
            "scheduled"
        }
        .into(),
        priority: task.lane as i64,
        attempts: 0,
        max_retries: i64::from(task.max_retries),
        timeout_ms: task.timeout.map_or(0.0, |t| t.as_secs_f64() * 1000.0),
        due_at: now + delay.as_secs_f64(),
        progress: 0.0,
        args: reason.is_none().then_some(args).flatten(),
        kwargs: reason.is_none().then_some(kwargs).flatten(),
        not_restartable: reason,
        created_at: now,
        ..Default::default()
    })
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (*, workers, min_workers, max_workers, queue_size, enable_auto_scaling,
        memory_pool_mb, enable_profiling, result_ttl, retry_backoff_ms, retry_backoff_cap_ms,
        starvation_ms, idle_timeout, default_priority, default_delay_ms, default_max_retries,
        default_timeout_ms, storage, storage_strict))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        workers: usize,
        min_workers: usize,
        max_workers: usize,
        queue_size: usize,
        enable_auto_scaling: bool,
        memory_pool_mb: f64,
        enable_profiling: bool,
        result_ttl: f64,
        retry_backoff_ms: f64,
        retry_backoff_cap_ms: f64,
        starvation_ms: f64,
        idle_timeout: f64,
        default_priority: &Bound<'_, PyAny>,
        default_delay_ms: &Bound<'_, PyAny>,
        default_max_retries: &Bound<'_, PyAny>,
        default_timeout_ms: &Bound<'_, PyAny>,
        storage: Option<String>,
        storage_strict: bool,
    ) -> PyResult<Self> {
        let rt = runtime(py)?;
        let secs = |name: &'static str, v: f64| -> Result<Duration> {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::BadValue(
                    name,
                    format!("must be a finite number >= 0, got {v}"),
                ));
            }
            Duration::try_from_secs_f64(v)
                .map_err(|_| Error::BadValue(name, format!("is too large: {v}")))
        };
        let origin = Instant::now();
        let lane = rt
            .priorities
            .iter()
            .position(|p| p.bind(py).is(default_priority))
            .ok_or_else(|| {
                Error::WrongType(
                    "priority",
                    "a TaskPriority member",
                    describe(default_priority),
                )
            })?;
        let defaults = Defaults {
            lane,
            delay: args::millis("delay_ms", default_delay_ms)?,
            max_retries: args::count("max_retries", default_max_retries)?,
            timeout: timeout_of(args::millis("timeout_ms", default_timeout_ms)?),
        };
        let sched = Arc::new(
            Scheduler::new(queue_size, secs("starvation_ms", starvation_ms / 1000.0)?)
                .with_due_hook(Box::new(|job: &Job| job.mark_ready())),
        );
        let seed = origin.elapsed().as_nanos() as u64
            ^ u64::from(std::process::id()).rotate_left(32)
            ^ (std::ptr::addr_of!(origin) as u64);
        let mut rng = Rng::new(seed);
        let prefix = (rng.next_u64() >> 32) as u32;
        let watchdog = Arc::new(Watchdog::new(origin));
        let backoff = Backoff {
            base: secs("retry_backoff_ms", retry_backoff_ms / 1000.0)?,
            cap: secs("retry_backoff_cap_ms", retry_backoff_cap_ms / 1000.0)?,
        };
        let result_ttl = secs("result_ttl", result_ttl)?;
        let store = match storage {
            Some(path) => Some(Arc::new(
                py.detach(|| SqliteStore::open(&path, result_ttl, Box::new(log_degraded)))
                    .map_err(|e| PyErr::from_value(rt.make_error(py, &rt.storage_error, e.0)))?,
            )),
            None => None,
        };
        let idle_timeout = secs("idle_timeout", idle_timeout)?;
        let async_histogram = new_histogram().map_err(Error::from)?;
        let first_sample = crate::tasks::stats::Sample {
            at: origin,
            busy_ns: 0,
            worker_cpu_ns: 0,
            process_cpu_ns: crate::tasks::sysinfo::process_cpu_ns(),
        };
        let shared = Arc::new_cyclic(|me| Shared {
            me: me.clone(),
            origin,
            prefix,
            next_seq: AtomicU64::new(1),
            next_token: AtomicU64::new(1),
            sched: sched.clone(),
            watchdog: watchdog.clone(),
            pool: Mutex::new(None),
            backoff,
            rng: Mutex::new(rng),
            defaults,
            counters: Counters::default(),
            registry: (0..16).map(|_| Mutex::new(KeyMap::default())).collect(),
            retention: Mutex::new(Retention {
                order: VecDeque::new(),
                bytes: 0,
            }),
            pool_bytes: (memory_pool_mb.max(0.0) * MB) as u64,
            result_ttl,
            queue_size,
            rate: Mutex::new(RateWindow::new(Duration::from_secs(10), origin)),
            async_histogram: Mutex::new(async_histogram),
            sampler: Mutex::new(Sampler::new(first_sample, Duration::from_secs(1))),
            aio: Mutex::new(None),
            periodics: Mutex::new(None),
            aio_closed: std::sync::atomic::AtomicBool::new(false),
            store,
            storage_strict,
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            profiling: enable_profiling,
            profile: Mutex::new(HashMap::new()),
            born: super::fork::Born::here(),
        });
        let cfg = PoolConfig {
            initial: workers,
            min: min_workers.min(workers),
            max: max_workers.max(workers),
            autoscale: enable_auto_scaling,
            idle_timeout,
            grow_interval: Duration::ZERO,
        };
        let pool = Pool::new(sched.clone(), shared.clone(), cfg, origin).map_err(Error::from)?;
        *shared.pool.lock() = Some(pool.clone());
        pool.start().map_err(Error::Thread)?;
        let slots = pool.slots().clone();
        let dog = watchdog.clone();
        let watchdog_thread = std::thread::Builder::new()
            .name("catzilla-watchdog".into())
            .spawn(move || {
                dog.run(
                    &slots,
                    |s| &s.deadline,
                    |i, token| {
                        Python::try_attach(|py| {
                            let slot = &slots[i];
                            if slot.deadline.token() != token {
                                return;
                            }
                            let Ok(rt) = runtime(py) else { return };
                            slot.deadline.mark_fired(token);
                            // SAFETY: attached; the id names a live worker thread that is
                            // running the armed task (checked through the token above).
                            unsafe {
                                pyo3::ffi::PyThreadState_SetAsyncExc(
                                    slot.ident.load(SeqCst) as std::os::raw::c_long,
                                    rt.interrupt.as_ptr(),
                                );
                            }
                        });
                    },
                )
            })
            .map_err(Error::Thread)?;
        Ok(Self {
            shared,
            watchdog_thread: Mutex::new(Some(watchdog_thread)),
            report: Mutex::new(None),
            stopping: Mutex::new(()),
            stopper: Mutex::new(None),
        })
    }

    /// Queues `func(*args, **kwargs)`; see the stub for the full contract.
    #[pyo3(signature = (func, *args, priority=None, delay_ms=None, max_retries=None, timeout_ms=None, **kwargs))]
    #[allow(clippy::too_many_arguments)]
    fn add_task(
        &self,
        py: Python<'_>,
        func: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
        priority: Option<&Bound<'_, PyAny>>,
        delay_ms: Option<&Bound<'_, PyAny>>,
        max_retries: Option<&Bound<'_, PyAny>>,
        timeout_ms: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<TaskResult> {
        self.shared.born.check()?;
        let p = prepare(
            py,
            &self.shared,
            func,
            args,
            kwargs,
            TaskOptions {
                priority,
                delay_ms,
                max_retries,
                timeout_ms,
            },
        )?;
        let job = self.shared.submit(p.task, p.delay, p.row)?;
        Ok(TaskResult::of(job, &self.shared))
    }

    /// Registers a periodic task; `BackgroundTasks.add_periodic_task` checks
    /// and converts the arguments first.
    #[pyo3(signature = (func, args, kwargs, *, every, cron, timezone, priority, max_retries, timeout_ms, start_at, jitter_ms, overlap, missed, name))]
    #[allow(clippy::too_many_arguments)]
    fn _add_periodic<'py>(
        &self,
        py: Python<'py>,
        func: Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
        kwargs: Option<Bound<'py, PyDict>>,
        every: Option<f64>,
        cron: Option<String>,
        timezone: String,
        priority: Option<Bound<'py, PyAny>>,
        max_retries: Option<Bound<'py, PyAny>>,
        timeout_ms: Option<Bound<'py, PyAny>>,
        start_at: Option<f64>,
        jitter_ms: f64,
        overlap: bool,
        missed: String,
        name: String,
    ) -> PyResult<super::periodic::PeriodicTask> {
        self.shared.born.check()?;
        let new = super::periodic::NewSchedule {
            func,
            args,
            kwargs,
            every,
            cron,
            timezone,
            priority,
            max_retries,
            timeout_ms,
            start_at,
            jitter_ms,
            overlap,
            missed,
            name,
        };
        Ok(super::periodic::add(py, &self.shared, new)?)
    }

    /// The periodic tasks not cancelled, in the order they were added.
    fn _periodic_tasks(&self) -> PyResult<Vec<super::periodic::PeriodicTask>> {
        self.shared.born.check()?;
        Ok(super::periodic::list(&self.shared))
    }

    /// The handle of a task by id, while the engine still retains it.
    fn get_result(&self, task_id: &Bound<'_, PyAny>) -> PyResult<Option<TaskResult>> {
        self.shared.born.check()?;
        let Ok(text) = task_id.cast::<PyString>() else {
            return Err(Error::WrongType("task_id", "a str", describe(task_id)).into());
        };
        let Ok(id) = text.to_str() else {
            return Ok(None); // not valid text, so no task's id
        };
        self.shared.evict(Instant::now());
        Ok(self
            .shared
            .lookup(id)
            .map(|job| TaskResult::of(job, &self.shared)))
    }

    /// Handles of retained tasks, newest first, optionally only those whose
    /// status is `status` (a `TaskStatus` member), at most `limit` of them.
    #[pyo3(signature = (status=None, limit=100))]
    fn _list(
        &self,
        py: Python<'_>,
        status: Option<&Bound<'_, PyAny>>,
        limit: usize,
    ) -> PyResult<Vec<TaskResult>> {
        self.shared.born.check()?;
        let rt = runtime(py)?;
        let wanted = match status {
            None => None,
            Some(s) => Some(
                rt.statuses
                    .iter()
                    .position(|m| m.bind(py).is(s))
                    .ok_or_else(|| {
                        Error::WrongType("status", "a TaskStatus member or None", describe(s))
                    })?,
            ),
        };
        self.shared.evict(Instant::now());
        let mut jobs = self
            .shared
            .jobs_where(|j| wanted.is_none_or(|w| j.status() as usize == w));
        jobs.sort_unstable_by_key(|j| std::cmp::Reverse(j.seq));
        jobs.truncate(limit);
        Ok(jobs
            .into_iter()
            .map(|j| TaskResult::new(j, Arc::downgrade(&self.shared)))
            .collect())
    }

    /// A snapshot of every statistic.
    fn get_stats(&self, py: Python<'_>) -> PyResult<EngineStats> {
        self.shared.born.check()?;
        Ok(py.detach(|| self.stats()))
    }

    /// Per-function run times, collected when `enable_profiling` is on.
    fn get_profile<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.shared.born.check()?;
        // Read under the lock, build Python objects after: building them can
        // run Python code (GC), which must not happen while a worker may be
        // waiting on this lock with the GIL.
        type Row = (String, u64, u64, (f64, f64, f64), f64);
        let rows: Vec<Row> = self
            .shared
            .profile
            .lock()
            .iter()
            .map(|(name, (hist, failures))| {
                (
                    name.clone(),
                    hist.len(),
                    *failures,
                    summary_ms(hist),
                    hist.max() as f64 / 1000.0,
                )
            })
            .collect();
        let out = PyDict::new(py);
        for (name, count, failures, (avg, p95, p99), max) in rows {
            let entry = PyDict::new(py);
            entry.set_item("count", count)?;
            entry.set_item("failures", failures)?;
            entry.set_item("avg_ms", avg)?;
            entry.set_item("p95_ms", p95)?;
            entry.set_item("p99_ms", p99)?;
            entry.set_item("max_ms", max)?;
            out.set_item(name, entry)?;
        }
        Ok(out)
    }

    /// Rows of unfinished tasks in the store (pending, scheduled, running,
    /// retrying), oldest first; empty without storage.
    fn _stored_unfinished<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.shared.born.check()?;
        let Some(store) = &self.shared.store else {
            return Ok(Vec::new());
        };
        let rows = py
            .detach(|| {
                store.flush(Duration::from_secs(10));
                store.load(&["pending", "scheduled", "running", "retrying"])
            })
            .map_err(|e| storage_err(py, e.0))?;
        rows.iter().map(|r| row_dict(py, r)).collect()
    }

    /// One stored row by id, or None.
    fn _stored<'py>(&self, py: Python<'py>, task_id: &str) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.shared.born.check()?;
        let Some(store) = &self.shared.store else {
            return Ok(None);
        };
        let row = py
            .detach(|| {
                store.flush(Duration::from_secs(10));
                store.get(task_id)
            })
            .map_err(|e| storage_err(py, e.0))?;
        row.map(|r| row_dict(py, &r)).transpose()
    }

    /// The newest stored rows, optionally with one status (its value text).
    #[pyo3(signature = (status, limit))]
    fn _stored_list<'py>(
        &self,
        py: Python<'py>,
        status: Option<String>,
        limit: usize,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.shared.born.check()?;
        let Some(store) = &self.shared.store else {
            return Ok(Vec::new());
        };
        let rows = py
            .detach(|| {
                store.flush(Duration::from_secs(10));
                store.list(status.as_deref(), limit)
            })
            .map_err(|e| storage_err(py, e.0))?;
        rows.iter().map(|r| row_dict(py, r)).collect()
    }

    /// Runs a stored task again under its own id (restart recovery).
    #[pyo3(signature = (task_id, func, args, kwargs, priority, delay_ms, max_retries, timeout_ms))]
    #[allow(clippy::too_many_arguments)]
    fn _resubmit(
        &self,
        task_id: &str,
        func: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
        kwargs: &Bound<'_, PyDict>,
        priority: usize,
        delay_ms: f64,
        max_retries: u32,
        timeout_ms: f64,
    ) -> PyResult<TaskResult> {
        self.shared.born.check()?;
        let Some((prefix, seq)) = super::task::parse_id(task_id) else {
            return Err(
                Error::BadValue("task_id", format!("is not a task id: {task_id:?}")).into(),
            );
        };
        let delay = Duration::try_from_secs_f64(delay_ms.max(0.0) / 1000.0).unwrap_or_default();
        let timeout = Duration::try_from_secs_f64(timeout_ms.max(0.0) / 1000.0).unwrap_or_default();
        let task = NewTask {
            seq,
            prefix,
            lane: priority.min(3),
            max_retries,
            timeout: timeout_of(timeout),
            delayed: !delay.is_zero(),
            footprint: 200 + 8 * args.len() as u64,
            call: Call {
                func: func.clone().unbind(),
                args: args.clone().unbind(),
                kwargs: (!kwargs.is_empty()).then(|| kwargs.clone().unbind()),
                no_retry: None,
            },
            callbacks: Vec::new(),
        };
        let job = self.shared.submit(task, delay, None)?;
        if let Some(store) = &self.shared.store {
            store.waiting(
                job.id(),
                if delay.is_zero() {
                    "pending"
                } else {
                    "scheduled"
                },
            );
        }
        Ok(TaskResult::of(job, &self.shared))
    }

    /// Marks a stored task failed for good, with the reason.
    fn _store_fail(&self, task_id: String, error_json: String) -> PyResult<()> {
        self.shared.born.check()?;
        if let Some(store) = &self.shared.store {
            store.finished(
                task_id,
                "failed",
                None,
                Some(error_json),
                super::task::epoch_now(),
            );
        }
        Ok(())
    }

    /// Waits until everything handed to the store is committed; returns
    /// whether it was within `timeout` seconds. True without storage.
    #[pyo3(name = "_flush")]
    fn flush(&self, py: Python<'_>, timeout: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.shared.born.check()?;
        let timeout = args::seconds("timeout", timeout)?;
        let Some(store) = &self.shared.store else {
            return Ok(true);
        };
        Ok(py.detach(|| store.flush(timeout)))
    }

    /// The first error writing to storage, once writes have failed; None otherwise.
    #[getter]
    fn storage_error(&self) -> PyResult<Option<String>> {
        self.shared.born.check()?;
        Ok(self.shared.store.as_ref().and_then(|s| s.failure()))
    }

    /// Lets the garbage collector see through a shut-down engine to what its
    /// tasks hold, so a task that refers back to its engine does not leak both.
    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        if self.shared.born.is_elsewhere() {
            return Ok(());
        }
        // NOTE: a running engine is alive by intent, like a running thread, so
        // its tasks are shown only once it is shut down: walking 200k retained
        // tasks made each full collection about 60 ms longer, a pause a web app
        // would feel with a million retained results.
        if self.shared.shutting_down.load(SeqCst) {
            for shard in &self.shared.registry {
                let Some(map) = shard.try_lock() else {
                    continue;
                };
                for job in map.values() {
                    job.traverse(&visit)?;
                }
            }
        }
        if let Some(aio) = self.shared.aio.try_lock() {
            visit.call(&*aio)?;
        }
        if let Some(periodics) = self.shared.periodics.try_lock() {
            if let Some(p) = periodics.as_ref() {
                p.traverse(&visit)?;
            }
        }
        Ok(())
    }

    /// Breaks a reference cycle through the engine by forgetting its tasks.
    fn __clear__(&self) {
        if self.shared.born.is_elsewhere() {
            return;
        }
        for shard in &self.shared.registry {
            let forgotten = std::mem::take(&mut *shard.lock());
            drop(forgotten);
        }
        let periodics = self.shared.periodics.lock().clone();
        if let Some(p) = periodics {
            p.clear();
        }
    }

    /// True once `shutdown` has run, and in a child process made by
    /// `os.fork()` (the engine's threads stayed in the parent).
    #[getter]
    fn is_shutdown(&self) -> bool {
        self.shared.born.is_elsewhere() || self.shared.sched.is_closed()
    }

    /// True in a child process made by `os.fork()` after this engine started:
    /// it cannot run tasks here, and every call raises `EngineShutdownError`.
    #[getter]
    fn is_forked(&self) -> bool {
        self.shared.born.is_elsewhere()
    }

    /// Stops the engine; see the stub for the contract. Returns a report.
    #[pyo3(name = "_shutdown")]
    fn shutdown(
        &self,
        py: Python<'_>,
        wait_for_completion: &Bound<'_, PyAny>,
        timeout: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyDict>> {
        self.shared.born.check()?;
        let wait_for_completion = args::flag("wait_for_completion", wait_for_completion)?;
        let timeout = args::seconds("timeout", timeout)?;
        // One shutdown at a time; later callers get the first one's report.
        // A callback that the shutdown itself runs (a cancelled task's, say)
        // and that calls it again would wait for itself: it gets an error.
        let me = std::thread::current().id();
        let _stopping = loop {
            if let Some(guard) = self.stopping.try_lock() {
                break guard;
            }
            if *self.stopper.lock() == Some(me) {
                return Err(Error::Reentrant(
                    "shutdown() was called again by code that shutdown() is running \
                     (a task callback, say); the engine is already shutting down",
                )
                .into());
            }
            py.detach(|| std::thread::sleep(Duration::from_millis(5)));
            py.check_signals()?;
        };
        *self.stopper.lock() = Some(me);
        let ran = self.shutdown_once(py, wait_for_completion, timeout);
        *self.stopper.lock() = None;
        ran
    }
}

impl Engine {
    /// The first shutdown stops the engine and keeps its report; later ones
    /// return that report.
    fn shutdown_once(
        &self,
        py: Python<'_>,
        wait_for_completion: bool,
        timeout: Duration,
    ) -> PyResult<Py<PyDict>> {
        if let Some(report) = self.report.lock().as_ref() {
            return Ok(report.clone_ref(py));
        }
        let (report, interrupted) = self.stop(py, wait_for_completion, timeout)?;
        *self.report.lock() = Some(report.clone_ref(py));
        match interrupted {
            Some(err) => Err(err),
            None => Ok(report),
        }
    }

    /// Stops the engine; returns the report, and the exception a signal
    /// handler raised if one cut the drain short.
    fn stop(
        &self,
        py: Python<'_>,
        wait: bool,
        timeout: Duration,
    ) -> PyResult<(Py<PyDict>, Option<PyErr>)> {
        let rt = runtime(py)?;
        let shared = &self.shared;
        let deadline = crate::tasks::scheduler::due_after(Instant::now(), timeout);
        let periodics = shared.periodics.lock().clone();
        if let Some(p) = periodics {
            p.stop(py);
        }
        shared.sched.close_intake();
        // NOTE: waits in 50 ms slices so a signal (a second Ctrl+C) can cut the
        // drain short; what is left is then cancelled and reported as usual.
        let mut interrupted = None;
        if wait {
            loop {
                let until = deadline.min(Instant::now() + Duration::from_millis(50));
                if py.detach(|| shared.sched.wait_settled(deadline, until))
                    || Instant::now() >= deadline
                {
                    break;
                }
                if let Err(err) = py.check_signals() {
                    interrupted = Some(err);
                    break;
                }
            }
        }
        let wait = wait && interrupted.is_none();
        shared.shutting_down.store(true, SeqCst);
        let left = shared.sched.stop();
        let mut cancelled = Vec::with_capacity(left.len());
        for job in left {
            cancelled.push(job.id());
            let exc = rt.make_error(
                py,
                &rt.cancelled_error,
                format!(
                    "task {} was cancelled: the engine shut down before it ran",
                    job.id()
                ),
            );
            shared.complete(
                py,
                job,
                Status::Cancelled,
                Outcome::Cancelled(exc.unbind()),
                false,
            );
        }
        shared.watchdog.stop();
        let in_flight = shared.jobs_where(|j| !j.status().is_final());
        let aio = close_event_loop(&shared.aio, &shared.aio_closed);
        if let Some(aio) = aio {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_secs_f64();
            aio.bind(py)
                .call_method1("stop", (if wait { left } else { 0.0 },))?;
        }
        let pool = shared.pool.lock().take();
        let join_by = if wait { deadline } else { Instant::now() };
        if let Some(pool) = pool {
            py.detach(|| pool.join_until(join_by.max(Instant::now() + Duration::from_millis(50))));
        }
        let watchdog = self.watchdog_thread.lock().take();
        if let Some(t) = watchdog {
            py.detach(|| t.join()).ok();
        }
        let mut running = Vec::new();
        for job in in_flight {
            match job.status() {
                Status::Cancelled => cancelled.push(job.id()),
                s if !s.is_final() => running.push(job.id()),
                _ => {}
            }
        }
        if !cancelled.is_empty() {
            rt.log(
                py,
                "warning",
                format!(
                    "shutdown cancelled {} task(s) that had not finished{}: {}",
                    cancelled.len(),
                    if shared.store.is_some() {
                        " (queued ones stay pending in storage and run again after a restart)"
                    } else {
                        ""
                    },
                    preview(&cancelled)
                ),
                None,
            );
        }
        if !running.is_empty() {
            rt.log(
                py,
                "warning",
                format!(
                    "{} task(s) were still running when shutdown returned{}: {}",
                    running.len(),
                    if shared.store.is_some() {
                        " (unless they finish first, storage keeps them as running and \
                         they run again after a restart)"
                    } else {
                        ""
                    },
                    preview(&running)
                ),
                None,
            );
        }
        // NOTE: with tasks still running the store stays open (until the
        // engine is dropped), so they can record their end; otherwise it is
        // closed now, and the file is the program's again (to delete, say).
        if let Some(store) = &shared.store {
            if running.is_empty() {
                py.detach(|| store.close(Duration::from_secs(10)));
            } else {
                py.detach(|| store.flush(Duration::from_secs(10)));
            }
        }
        let report = PyDict::new(py);
        report.set_item("drained", cancelled.is_empty() && running.is_empty())?;
        report.set_item("cancelled", PyList::new(py, &cancelled)?)?;
        report.set_item("still_running", PyList::new(py, &running)?)?;
        Ok((report.unbind(), interrupted))
    }

    fn stats(&self) -> EngineStats {
        let shared = &self.shared;
        let now = Instant::now();
        shared.evict(now);
        let depths = shared.sched.depths();
        let pool = shared.pool().map(|p| p.snapshot()).unwrap_or_default();
        let usage = {
            let sample = shared.sample(pool.cpu_ns, pool.busy_ns);
            shared.sampler.lock().usage(sample, pool.live.max(1))
        };
        let mut merged = shared.async_histogram.lock().clone();
        if let Some(p) = shared.pool() {
            for slot in p.slots().iter() {
                let _ = merged.add(&*slot.histogram.lock());
            }
        }
        let (avg, p95, p99) = summary_ms(&merged);
        let c = &shared.counters;
        let completed = c.completed.load(SeqCst);
        let failed = c.failed.load(SeqCst);
        let (retained, retained_bytes) = shared.retained();
        let ready = depths.ready();
        let total_queued = ready + depths.scheduled;
        let pool_mb = shared.pool_bytes as f64 / MB;
        let retained_mb = retained_bytes as f64 / MB;
        EngineStats {
            critical_queue_size: depths.lanes[0],
            high_queue_size: depths.lanes[1],
            normal_queue_size: depths.lanes[2],
            low_queue_size: depths.lanes[3],
            scheduled_tasks: depths.scheduled,
            total_queued,
            queue_pressure: if shared.queue_size == 0 {
                100.0
            } else {
                total_queued as f64 * 100.0 / shared.queue_size as f64
            },
            running_tasks: depths.in_flight,
            async_tasks_running: c.async_running.load(SeqCst),
            active_workers: pool.busy,
            idle_workers: pool.live.saturating_sub(pool.busy),
            total_workers: pool.live,
            avg_worker_utilization: usage.utilization,
            tasks_per_second: shared.rate.lock().per_second(now),
            avg_execution_time_ms: avg,
            p95_execution_time_ms: p95,
            p99_execution_time_ms: p99,
            memory_usage_mb: resident_bytes() as f64 / MB,
            memory_efficiency: if pool_mb > 0.0 {
                (100.0 - retained_mb * 100.0 / pool_mb).clamp(0.0, 100.0)
            } else {
                0.0
            },
            worker_cpu_usage: usage.worker_cpu,
            worker_memory_usage: c.pending_bytes.load(SeqCst) as f64 / MB,
            engine_cpu_usage: usage.process_cpu,
            engine_memory_usage: retained_mb,
            total_tasks_submitted: c.submitted.load(SeqCst),
            total_tasks_processed: completed,
            failed_tasks: failed,
            cancelled_tasks: c.cancelled.load(SeqCst),
            retry_count: c.retried.load(SeqCst),
            timeout_count: c.timed_out.load(SeqCst),
            rejected_tasks: c.rejected.load(SeqCst),
            error_rate: if completed + failed == 0 {
                0.0
            } else {
                failed as f64 * 100.0 / (completed + failed) as f64
            },
            retained_results: retained,
            evicted_results: c.evicted.load(SeqCst),
            starvation_promotions: depths.promoted,
            workers_started: pool.grown,
            workers_stopped: pool.shrunk,
            panics_contained: c.panicked.load(SeqCst),
            storage_degraded: shared.store.as_ref().is_some_and(|s| s.is_degraded()),
            storage_error: shared.store.as_ref().and_then(|s| s.failure()),
            uptime_seconds: now.duration_since(shared.origin).as_secs_f64(),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // NOTE: in a forked child the engine's threads, and any lock they
        // held, stayed in the parent: touching them could deadlock.
        if self.shared.born.is_elsewhere() || self.report.lock().is_some() {
            return;
        }
        Python::try_attach(|py| match self.stop(py, false, Duration::ZERO) {
            Err(err) | Ok((_, Some(err))) => err.print(py),
            Ok(_) => {}
        });
    }
}

/// Per-call options of `add_task`; None takes the task's or engine's default.
pub struct TaskOptions<'a, 'py> {
    pub priority: Option<&'a Bound<'py, PyAny>>,
    pub delay_ms: Option<&'a Bound<'py, PyAny>>,
    pub max_retries: Option<&'a Bound<'py, PyAny>>,
    pub timeout_ms: Option<&'a Bound<'py, PyAny>>,
}

/// A task ready to submit: made under the GIL, submitted without it.
pub struct Prepared {
    pub task: NewTask,
    pub delay: Duration,
    pub row: Option<Row>,
}

/// Checks and builds a task with `add_task`'s rules (defaults, `@task`
/// options, the durable row); the engine's `add_task` and each periodic run
/// come through here.
pub fn prepare(
    py: Python<'_>,
    shared: &Arc<Shared>,
    func: &Bound<'_, PyAny>,
    args: &Bound<'_, PyTuple>,
    kwargs: Option<&Bound<'_, PyDict>>,
    options: TaskOptions<'_, '_>,
) -> PyResult<Prepared> {
    let TaskOptions {
        priority,
        delay_ms,
        max_retries,
        timeout_ms,
    } = options;
    let rt = runtime(py)?;
    let d = &shared.defaults;
    let (mut lane, mut delay, mut retries, mut timeout) =
        (d.lane, d.delay, d.max_retries, d.timeout);
    let mut no_retry = None;
    let mut func = func.clone();
    if func.get_type().is(rt.task_function_type.bind(py)) {
        let opts = func.getattr("_catzilla_options")?;
        let (inner, p, dl, mr, to, nr): TaskFunctionOptions<'_> = opts.extract()?;
        if let Some(p) = p {
            lane = shared.parse_lane(rt, &p)?;
        }
        if let Some(dl) = dl {
            delay = args::millis("delay_ms", &dl)?;
        }
        if let Some(mr) = mr {
            retries = args::count("max_retries", &mr)?;
        }
        if let Some(to) = to {
            timeout = timeout_of(args::millis("timeout_ms", &to)?);
        }
        no_retry = nr.map(Bound::unbind);
        func = inner;
    }
    if !func.is_callable() {
        return Err(Error::WrongType("func", "callable", describe(&func)).into());
    }
    if let Some(p) = priority {
        lane = shared.parse_lane(rt, p)?;
    }
    if let Some(v) = delay_ms {
        delay = args::millis("delay_ms", v)?;
    }
    if let Some(v) = max_retries {
        retries = args::count("max_retries", v)?;
    }
    if let Some(v) = timeout_ms {
        timeout = timeout_of(args::millis("timeout_ms", v)?);
    }
    let kw_len = kwargs.map_or(0, |k| k.len()) as u64;
    let footprint = 200 + 8 * args.len() as u64 + if kw_len > 0 { 100 + 48 * kw_len } else { 0 };
    let task = NewTask {
        seq: shared.next_seq.fetch_add(1, SeqCst),
        prefix: shared.prefix,
        lane,
        max_retries: retries,
        timeout,
        delayed: !delay.is_zero(),
        footprint,
        call: Call {
            func: func.unbind(),
            args: args.clone().unbind(),
            kwargs: kwargs.filter(|k| !k.is_empty()).map(|k| k.clone().unbind()),
            no_retry,
        },
        callbacks: Vec::new(),
    };
    let row = match &shared.store {
        Some(_) => Some(durable_row(py, rt, shared, &task, delay)?),
        None => None,
    };
    Ok(Prepared { task, delay, row })
}

/// Logs, once, that the store stopped taking writes. Called on the store's
/// thread, which never attaches: dropping a store joins it under the GIL.
fn log_degraded(reason: &str) {
    log_in_background("error", reason.to_string());
}

fn preview(ids: &[String]) -> String {
    let shown: Vec<&str> = ids.iter().take(10).map(String::as_str).collect();
    let more = ids.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

fn storage_err(py: Python<'_>, message: String) -> PyErr {
    match runtime(py) {
        Ok(rt) => PyErr::from_value(rt.make_error(py, &rt.storage_error, message)),
        Err(e) => e.into(),
    }
}

fn row_dict<'py>(py: Python<'py>, r: &Row) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("task_id", &r.task_id)?;
    d.set_item("name", &r.name)?;
    d.set_item("status", &r.status)?;
    d.set_item("priority", r.priority)?;
    d.set_item("attempts", r.attempts)?;
    d.set_item("max_retries", r.max_retries)?;
    d.set_item("timeout_ms", r.timeout_ms)?;
    d.set_item("due_at", r.due_at)?;
    d.set_item("progress", r.progress)?;
    d.set_item("current_step", &r.current_step)?;
    d.set_item("args", &r.args)?;
    d.set_item("kwargs", &r.kwargs)?;
    d.set_item("not_restartable", &r.not_restartable)?;
    d.set_item("result", &r.result)?;
    d.set_item("error", &r.error)?;
    d.set_item("created_at", r.created_at)?;
    d.set_item("started_at", r.started_at)?;
    d.set_item("finished_at", r.finished_at)?;
    Ok(d)
}

//! `Engine`, the native base of `catzilla.background_tasks.BackgroundTasks`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use super::admission::{prepare, timeout_of, CallOptions};
use super::args;
use super::handle::TaskResult;
use super::periodic::PeriodicsSlot;
use super::runtime::{log_in_background, runtime};
use super::shared::{Counters, Defaults, Retention, Shared};
use super::stats::{EngineStats, MB};
use super::store_queue::StoreQueue;
use super::task::{Job, KeyMap, Outcome, Status};
use crate::errors::{describe, Error, Result};
use crate::interpreter::close_event_loop;
use crate::store::redis::RedisStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{SharedConfig, SharedStore};
use crate::tasks::backoff::{Backoff, Rng};
use crate::tasks::pool::{Pool, PoolConfig};
use crate::tasks::queue::Queue;
use crate::tasks::scheduler::Scheduler;
use crate::tasks::stats::{new_histogram, summary_ms, RateWindow, Sampler};
use crate::tasks::watchdog::Watchdog;

#[pyclass(frozen, subclass, module = "catzilla._catzilla")]
pub struct Engine {
    shared: Arc<Shared>,
    watchdog_thread: Mutex<Option<JoinHandle<()>>>,
    report: Mutex<Option<Py<PyDict>>>,
    /// Periodic tasks and their thread, from the first one added.
    periodics: PeriodicsSlot,
    /// Held while a shutdown runs; `stopper` names its thread.
    stopping: Mutex<()>,
    stopper: Mutex<Option<std::thread::ThreadId>>,
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (*, workers, min_workers, max_workers, queue_size, enable_auto_scaling,
        memory_pool_mb, enable_profiling, result_ttl, retry_backoff_ms, retry_backoff_cap_ms,
        starvation_ms, idle_timeout, default_priority, default_delay_ms, default_max_retries,
        default_timeout_ms, storage, storage_prefix, queues, lease_timeout, flush_timeout))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        workers: usize,
        min_workers: usize,
        max_workers: usize,
        queue_size: usize,
        enable_auto_scaling: bool,
        memory_pool_mb: &Bound<'_, PyAny>,
        enable_profiling: bool,
        result_ttl: &Bound<'_, PyAny>,
        retry_backoff_ms: &Bound<'_, PyAny>,
        retry_backoff_cap_ms: &Bound<'_, PyAny>,
        starvation_ms: &Bound<'_, PyAny>,
        idle_timeout: &Bound<'_, PyAny>,
        default_priority: &Bound<'_, PyAny>,
        default_delay_ms: &Bound<'_, PyAny>,
        default_max_retries: &Bound<'_, PyAny>,
        default_timeout_ms: &Bound<'_, PyAny>,
        storage: Option<String>,
        storage_prefix: String,
        queues: Vec<String>,
        lease_timeout: &Bound<'_, PyAny>,
        flush_timeout: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let rt = runtime(py)?;
        super::task::set_anchor();
        let origin = Instant::now();
        let lane = rt.lane_of(default_priority)?;
        let defaults = Defaults {
            lane,
            delay: args::millis("delay_ms", default_delay_ms)?,
            max_retries: args::count("max_retries", default_max_retries)?,
            timeout: timeout_of(args::millis("timeout_ms", default_timeout_ms)?),
        };
        let starvation = args::millis("starvation_ms", starvation_ms)?;
        let seed = origin.elapsed().as_nanos() as u64
            ^ u64::from(std::process::id()).rotate_left(32)
            ^ (std::ptr::addr_of!(origin) as u64);
        let mut rng = Rng::new(seed);
        let prefix = (rng.next_u64() >> 32) as u32;
        let watchdog = Arc::new(Watchdog::new(origin));
        let backoff = Backoff {
            base: args::millis("retry_backoff_ms", retry_backoff_ms)?,
            cap: args::millis("retry_backoff_cap_ms", retry_backoff_cap_ms)?,
        };
        let result_ttl = args::span("result_ttl", result_ttl)?;
        let flush_timeout = args::span("flush_timeout", flush_timeout)?;
        let store: Option<Arc<dyn SharedStore>> = match storage {
            Some(url) => {
                let cfg = SharedConfig {
                    owner: owner_id(rng.next_u64()),
                    lease: args::positive_span("lease_timeout", lease_timeout)?,
                    starvation,
                    retention: result_ttl,
                };
                Some(open_store(py, &url, &storage_prefix, cfg)?)
            }
            None => None,
        };
        let store_queue = store
            .as_ref()
            .map(|store| Arc::new(StoreQueue::new(store.clone(), queues, workers, queue_size)));
        let sched: Arc<dyn Queue<Job>> = match &store_queue {
            Some(q) => q.clone(),
            None => Arc::new(
                Scheduler::new(queue_size, starvation)
                    .with_due_hook(Box::new(|job: &Job| job.mark_ready())),
            ),
        };
        let pool_bytes =
            (args::positive("memory_pool_mb", memory_pool_mb, "a number of MB")? * MB) as u64;
        let idle_timeout = args::positive_span("idle_timeout", idle_timeout)?;
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
            store_queue: store_queue.clone(),
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
            pool_bytes,
            result_ttl,
            queue_size,
            rate: Mutex::new(RateWindow::new(Duration::from_secs(10), origin)),
            async_histogram: Mutex::new(async_histogram),
            sampler: Mutex::new(Sampler::new(first_sample, Duration::from_secs(1))),
            aio: Mutex::new(None),
            aio_closed: std::sync::atomic::AtomicBool::new(false),
            store,
            flush_timeout,
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            profiling: enable_profiling,
            profile: Mutex::new(HashMap::new()),
            observer: super::observe::Observer::default(),
            born: super::fork::Born::here(),
        });
        let cfg = PoolConfig {
            initial: workers,
            min: min_workers.min(workers),
            // No workers at all: a process that only queues tasks for others.
            max: if workers == 0 {
                0
            } else {
                max_workers.max(workers)
            },
            autoscale: enable_auto_scaling && workers > 0,
            idle_timeout,
            grow_interval: Duration::ZERO,
        };
        let pool = Pool::new(sched.clone(), shared.clone(), cfg, origin).map_err(Error::from)?;
        *shared.pool.lock() = Some(pool.clone());
        pool.start().map_err(Error::Thread)?;
        if let Some(q) = &store_queue {
            q.start(&shared).map_err(Error::Thread)?;
        }
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
            periodics: Mutex::new(None),
            stopping: Mutex::new(()),
            stopper: Mutex::new(None),
        })
    }

    /// Queues `func(*args, **kwargs)`; see the stub for the full contract.
    #[pyo3(signature = (func, *args, priority=None, delay_ms=None, max_retries=None, timeout_ms=None, queue=None, compile_to_c=None, **kwargs))]
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
        queue: Option<&Bound<'_, PyAny>>,
        compile_to_c: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<TaskResult> {
        self.shared.born.check()?;
        if compile_to_c.is_some() {
            // catzilla 0.2's option: accepted, with its DeprecationWarning.
            runtime(py)?.warn_compile_to_c.call0(py)?;
        }
        let p = prepare(
            py,
            &self.shared,
            func,
            args,
            kwargs,
            CallOptions {
                priority,
                delay_ms,
                max_retries,
                timeout_ms,
                queue,
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
        Ok(super::periodic::add(
            py,
            &self.shared,
            &self.periodics,
            new,
        )?)
    }

    /// The periodic tasks not cancelled, in the order they were added.
    fn _periodic_tasks(&self) -> PyResult<Vec<super::periodic::PeriodicTask>> {
        self.shared.born.check()?;
        Ok(super::periodic::list(&self.periodics))
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
    #[pyo3(signature = (status, limit))]
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
        // NOTE: detached: a scan of many retained tasks (the dashboard lists
        // several statuses every second) must not hold the GIL meanwhile.
        let shared = &self.shared;
        let jobs = py.detach(|| {
            shared.evict(Instant::now());
            let mut jobs = shared.jobs_where(|j| wanted.is_none_or(|w| j.status() as usize == w));
            jobs.sort_unstable_by_key(|j| std::cmp::Reverse(j.seq));
            jobs.truncate(limit);
            jobs
        });
        Ok(jobs
            .into_iter()
            .map(|j| TaskResult::of(j, &self.shared))
            .collect())
    }

    /// A snapshot of every statistic.
    fn get_stats(&self, py: Python<'_>) -> PyResult<EngineStats> {
        self.shared.born.check()?;
        Ok(py.detach(|| EngineStats::read(&self.shared)))
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

    /// Runs again, under their own ids, the tasks an earlier run left
    /// unfinished in the store; see `BackgroundTasks.recover`. Returns the
    /// ids resubmitted and the ids marked failed for good.
    fn _recover(&self, py: Python<'_>) -> PyResult<(Vec<String>, Vec<String>)> {
        self.shared.born.check()?;
        let done = super::store_bridge::recover(py, &self.shared)?;
        Ok((done.requeued, done.failed))
    }

    /// This process's id on the shared store (`host:pid:random`), the owner
    /// of its leases; None without a store.
    #[getter]
    fn owner_id(&self) -> Option<String> {
        self.shared.store.as_ref().map(|s| s.config().owner.clone())
    }

    /// The named queues this process's workers serve (with a store).
    #[getter]
    fn queues(&self) -> Vec<String> {
        self.shared
            .store_queue
            .as_ref()
            .map(|q| q.queues().to_vec())
            .unwrap_or_default()
    }

    /// One stored row by id, or None.
    fn _stored<'py>(&self, py: Python<'py>, task_id: &str) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.shared.born.check()?;
        super::store_bridge::stored(py, &self.shared, task_id)
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
        super::store_bridge::stored_list(py, &self.shared, status.as_deref(), limit)
    }

    /// How many tasks wait (ready or delayed) in each named queue of the
    /// store; None without a store.
    fn _queue_depths(&self, py: Python<'_>, queues: Vec<String>) -> PyResult<Option<Vec<u64>>> {
        self.shared.born.check()?;
        super::store_bridge::waiting(py, &self.shared, queues)
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

    /// Waits, detached, until nothing is queued, scheduled, running, awaiting
    /// a retry or running its callbacks, for up to `timeout` seconds; returns
    /// whether it got there. Runs signal handlers every 50 ms.
    fn _settle(&self, py: Python<'_>, timeout: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.shared.born.check()?;
        let timeout = args::seconds("timeout", timeout)?;
        let deadline = crate::clock::due_after(Instant::now(), timeout);
        let never = crate::clock::due_after(Instant::now(), Duration::MAX);
        let shared = &self.shared;
        loop {
            let until = deadline.min(Instant::now() + Duration::from_millis(50));
            // NOTE: settled, then quiet, then settled again: a callback that
            // queues a task does so before it is counted out.
            let idle = py.detach(|| loop {
                if shared.sched.wait_settled(never, until)
                    && shared.quiet()
                    && shared.sched.wait_settled(never, Instant::now())
                {
                    return true;
                }
                if Instant::now() >= until {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            });
            if idle {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            py.check_signals()?;
        }
    }

    /// Handles of retained tasks that became final after the mark `after`
    /// (0: since the start), in the order they did, and the new mark.
    fn _finished_since(&self, py: Python<'_>, after: u64) -> PyResult<(Vec<TaskResult>, u64)> {
        self.shared.born.check()?;
        let shared = &self.shared;
        let done = py.detach(|| {
            shared.evict(Instant::now());
            let mut done: Vec<(u64, Job)> = shared
                .jobs_where(|j| j.status().is_final())
                .into_iter()
                .filter_map(|j| j.finished_ns().filter(|&ns| ns > after).map(|ns| (ns, j)))
                .collect();
            done.sort_unstable_by_key(|(ns, j)| (*ns, j.seq));
            done
        });
        let mark = done.last().map_or(after, |(ns, _)| *ns);
        let handles = done
            .into_iter()
            .map(|(_, j)| TaskResult::of(j, &self.shared))
            .collect();
        Ok((handles, mark))
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
        if let Some(periodics) = self.periodics.try_lock() {
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
        let periodics = self.periodics.lock().clone();
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
        // The hooks hear of the last tasks before shutdown returns.
        py.detach(|| self.shared.observer.close());
        *self.stopper.lock() = None;
        ran
    }

    /// Queues a failed task's call again, as a new task with the same
    /// priority, retries, timeout and queue; `ValueError` for a task that
    /// is unknown, not failed, or whose call this process does not hold.
    fn _retry(&self, py: Python<'_>, task_id: &str) -> PyResult<TaskResult> {
        self.shared.born.check()?;
        let job = self.shared.lookup(task_id).ok_or_else(|| {
            Error::Usage(format!(
                "task_id {task_id:?} names no task this engine holds"
            ))
        })?;
        let status = job.status();
        if status != Status::Failed {
            return Err(Error::Usage(format!(
                "task {task_id} is {}; only a failed task can be retried",
                status.as_str()
            ))
            .into());
        }
        let p = super::admission::prepare_retry(py, &self.shared, &job)?;
        let job = self.shared.submit(p.task, p.delay, p.row)?;
        Ok(TaskResult::of(job, &self.shared))
    }

    /// Turns on per-series counts (by task name, priority and queue).
    fn _observe(&self) -> PyResult<()> {
        self.shared.born.check()?;
        self.shared.observer.enable();
        Ok(())
    }

    /// Hands task events of `kinds` to `sink(batch, dropped)` on a thread
    /// of its own (observation turns on); None stops.
    #[pyo3(signature = (sink, kinds=Vec::new()))]
    fn _set_event_sink(
        &self,
        py: Python<'_>,
        sink: Option<Py<PyAny>>,
        kinds: Vec<String>,
    ) -> PyResult<()> {
        self.shared.born.check()?;
        self.shared
            .observer
            .set_sink(py, sink, &kinds)
            .map_err(|e| {
                pyo3::exceptions::PyRuntimeError::new_err(format!(
                    "cannot start the task events thread: {e}"
                ))
            })
    }

    /// Every series: `(name, lane, queue, counts by event name,
    /// duration (buckets, count, sum), wait (buckets, count, sum))`, the
    /// buckets cumulative at `bounds` (seconds, ascending).
    #[allow(clippy::type_complexity)]
    fn _series(
        &self,
        py: Python<'_>,
    ) -> PyResult<Vec<(String, usize, String, Py<PyDict>, Timings, Timings)>> {
        self.shared.born.check()?;
        let read: Vec<_> = self
            .shared
            .observer
            .table()
            .all()
            .into_iter()
            .map(|s| {
                let counts: Vec<(&'static str, u64)> = crate::tasks::series::Event::ALL
                    .iter()
                    .map(|e| (e.name(), s.counted(*e)))
                    .collect();
                let (duration, wait) = (s.durations(), s.waits());
                (s, counts, duration, wait)
            })
            .collect();
        read.into_iter()
            .map(|(s, counts, duration, wait)| {
                let d = PyDict::new(py);
                for (k, v) in counts {
                    d.set_item(k, v)?;
                }
                Ok((
                    s.name.to_string(),
                    s.lane,
                    s.queue.to_string(),
                    d.unbind(),
                    duration,
                    wait,
                ))
            })
            .collect()
    }

    /// Run-time percentiles (p50, p95, p99) in ms over every observed attempt.
    fn _latency(&self) -> PyResult<(f64, f64, f64)> {
        self.shared.born.check()?;
        let h = self.shared.run_times();
        if h.is_empty() {
            return Ok((0.0, 0.0, 0.0));
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Ok((ms(0.5), ms(0.95), ms(0.99)))
    }
}

/// A histogram as cumulative bucket counts, count and sum (seconds).
type Timings = (Vec<u64>, u64, f64);

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
        let deadline = crate::clock::due_after(Instant::now(), timeout);
        let periodics = self.periodics.lock().clone();
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
        // With a store, the tasks this process waits for that run elsewhere
        // are not its own to report: only those running here are.
        let in_flight = match &shared.store_queue {
            Some(_) => shared.jobs_where(|j| j.status() == Status::Running),
            None => shared.jobs_where(|j| !j.status().is_final()),
        };
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
        let mut unfinished = Vec::new();
        for job in in_flight {
            match job.status() {
                Status::Cancelled => cancelled.push(job.id()),
                s if !s.is_final() => {
                    running.push(job.id());
                    unfinished.push(job);
                }
                _ => {}
            }
        }
        let mut handed_back = Vec::new();
        if shared.store_queue.is_some() {
            let waiting: Vec<String> = shared
                .jobs_where(|j| j.local && j.status().is_waiting())
                .iter()
                .map(|j| j.id())
                .collect();
            if !waiting.is_empty() {
                rt.log(
                    py,
                    "warning",
                    format!(
                        "shutdown left {} task(s) it queued waiting in the shared queue \
                         (any process serving their queue runs them): {}",
                        waiting.len(),
                        preview(&waiting)
                    ),
                    None,
                );
            }
        }
        if let Some(q) = &shared.store_queue {
            // Another process takes them now; their end here is not recorded.
            q.hand_back(&unfinished);
            handed_back = std::mem::take(&mut running);
            let by = crate::clock::due_after(Instant::now(), Duration::from_secs(2)).max(deadline);
            py.detach(|| q.join(by));
        }
        if !handed_back.is_empty() {
            rt.log(
                py,
                "warning",
                format!(
                    "{} task(s) still running at shutdown went back to the shared queue, \
                     to run again in any process: {}",
                    handed_back.len(),
                    preview(&handed_back)
                ),
                None,
            );
        }
        if !cancelled.is_empty() {
            rt.log(
                py,
                "warning",
                format!(
                    "shutdown cancelled {} task(s) that had not finished{}: {}",
                    cancelled.len(),
                    if shared.store.is_some() {
                        " (queued ones stay in the shared queue)"
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
                py.detach(|| store.close(shared.flush_timeout));
            } else {
                py.detach(|| store.flush(shared.flush_timeout));
            }
        }
        let report = PyDict::new(py);
        report.set_item(
            "drained",
            cancelled.is_empty() && running.is_empty() && handed_back.is_empty(),
        )?;
        report.set_item("cancelled", PyList::new(py, &cancelled)?)?;
        report.set_item("still_running", PyList::new(py, &running)?)?;
        report.set_item("handed_back", PyList::new(py, &handed_back)?)?;
        Ok((report.unbind(), interrupted))
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

/// Logs, once, that the store stopped taking writes. Called on the store's
/// thread, which never attaches: dropping a store joins it under the GIL.
fn log_degraded(reason: &str) {
    log_in_background("error", reason.to_string());
}

/// This process's id on a shared store: host, pid and a random part (a
/// new one per engine, so a restarted pid is never taken for the old one).
fn owner_id(random: u64) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().replace(':', "_"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}:{:08x}", std::process::id(), random as u32)
}

/// Opens the store a storage URL names (the Python side checked its form).
fn open_store(
    py: Python<'_>,
    url: &str,
    prefix: &str,
    cfg: SharedConfig,
) -> Result<Arc<dyn SharedStore>> {
    if let Some(path) = url.strip_prefix("sqlite:///") {
        let store = py
            .detach(|| SqliteStore::open(path, cfg, Box::new(log_degraded)))
            .map_err(|e| Error::Storage(e.0))?;
        return Ok(Arc::new(store));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        let store = py
            .detach(|| RedisStore::open(url, prefix, cfg, Box::new(log_degraded)))
            .map_err(|e| Error::Storage(e.0))?;
        return Ok(Arc::new(store));
    }
    Err(Error::BadValue(
        "storage",
        format!("must be sqlite:///path, redis://host:port/db or rediss://..., got {url:?}"),
    ))
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

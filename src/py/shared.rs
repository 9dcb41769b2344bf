//! `Shared`: what an engine shares with its workers, timer and handles: the
//! registry of tasks, how a task ends (completion, cancellation, the store's
//! record), retention of finished tasks, and the counters.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use pyo3::prelude::*;

use super::handle::{run_callbacks, Owner, TaskResult};
use super::runtime::runtime;
use super::store_queue::StoreQueue;
use super::task::epoch_now;
use super::task::{parse_id, Job, Key, KeyMap, NewTask, Outcome, Status, TaskState};
use crate::errors::{Error, Result};
use crate::store::{Row, SharedStore};
use crate::tasks::backoff::{Backoff, Rng};
use crate::tasks::pool::Pool;
use crate::tasks::queue::Queue;
use crate::tasks::scheduler::Rejected;
use crate::tasks::series::Event;
use crate::tasks::stats::{RateWindow, Sample, Sampler};
use crate::tasks::sysinfo::process_cpu_ns;
use crate::tasks::watchdog::Watchdog;

const SHARDS: usize = 16;
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
    /// Tasks with callbacks between their final state and the end of those
    /// callbacks (which may queue more work: `drain` waits for them).
    pub concluding: AtomicU64,
}

/// Counts one down when dropped, however the scope ends.
pub(crate) struct CountDown<'a>(pub(crate) &'a AtomicU64);

impl Drop for CountDown<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
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
    /// Where tasks wait for a worker: the in-memory lanes and timer, or
    /// the store (`store_queue`).
    pub(crate) sched: Arc<dyn Queue<Job>>,
    pub(crate) store_queue: Option<Arc<StoreQueue>>,
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
    pub(crate) aio_closed: std::sync::atomic::AtomicBool,
    /// The shared store (and queue), when configured.
    pub(crate) store: Option<Arc<dyn SharedStore>>,
    /// How long reads and shutdown wait for the store to commit what it was handed.
    pub(crate) flush_timeout: Duration,
    /// Set by shutdown: tasks it cancels stay pending in the store.
    pub(crate) shutting_down: std::sync::atomic::AtomicBool,
    pub(crate) profiling: bool,
    /// Per-function run times and failures, kept when profiling is on.
    pub(crate) profile: Mutex<HashMap<String, (Histogram<u64>, u64)>>,
    /// Per-series counts and task events, once asked for.
    pub(crate) observer: super::observe::Observer,
}

impl Owner for Shared {
    fn born(&self) -> super::fork::Born {
        self.born
    }

    fn cancel(&self, py: Python<'_>, job: &Job) -> PyResult<bool> {
        Shared::cancel(self, py, job)
    }

    fn progress(&self, job: &Job, percent: f64, step: Option<String>) {
        if let Some(store) = &self.store {
            store.progress(job.id(), percent, step);
        }
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

    /// Every attempt's run time: the workers' histograms and the event loop's.
    pub fn run_times(&self) -> Histogram<u64> {
        let mut merged = self.async_histogram.lock().clone();
        if let Some(p) = self.pool() {
            for slot in p.slots().iter() {
                let _ = merged.add(&*slot.histogram.lock());
            }
        }
        merged
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

    /// Records a final state, then runs callbacks outside every lock.
    pub fn complete(
        &self,
        py: Python<'_>,
        job: Job,
        status: Status,
        outcome: Outcome,
        in_flight: bool,
    ) {
        self.conclude(py, job, status, outcome, in_flight, true)
    }

    /// A task this process queued was finished by another process: its
    /// handle gets the stored outcome.
    pub fn finished_elsewhere(&self, py: Python<'_>, row: Row) {
        let Some(job) = self.lookup(&row.task_id) else {
            return;
        };
        if job.status().is_final() {
            return;
        }
        let Ok(rt) = runtime(py) else { return };
        let Some(status) = Status::parse(&row.status).filter(|s| s.is_final()) else {
            return;
        };
        let outcome = match status {
            Status::Completed => {
                let value = match row.result.as_deref() {
                    Some(text) => rt.json_loads.bind(py).call1((text,)),
                    None => Ok(py.None().into_bound(py)),
                };
                match value {
                    Ok(v) => Outcome::Value(v.unbind()),
                    Err(e) => Outcome::Error(e.into_value(py).into_any()),
                }
            }
            _ => {
                let exc = rt.stored_error(py, &row.task_id, row.error.as_deref());
                if status == Status::Cancelled {
                    Outcome::Cancelled(exc.unbind())
                } else {
                    Outcome::Error(exc.unbind())
                }
            }
        };
        job.ran_elsewhere(u32::try_from(row.attempts).unwrap_or(0), row.started_at);
        self.conclude(py, job, status, outcome, false, false);
    }

    /// Fails every task this process queued that has not started here:
    /// the store they wait in stopped (`reason`).
    pub fn fail_awaited(&self, py: Python<'_>, reason: &str) {
        for job in self.jobs_where(|j| j.local && j.status().is_waiting()) {
            let err: PyErr = Error::Storage(format!(
                "task {} is lost with the store it waited in: {reason}",
                job.id()
            ))
            .into();
            let exc = err.into_value(py).into_any();
            self.conclude(py, job, Status::Failed, Outcome::Error(exc), false, false);
        }
    }

    fn conclude(
        &self,
        py: Python<'_>,
        job: Job,
        status: Status,
        outcome: Outcome,
        in_flight: bool,
        record: bool,
    ) {
        // A task already final (its news came first, say) is not counted,
        // settled or recorded twice; a worker's slot is still given back.
        let Some((callbacks, call)) = job.finish(py, status, outcome) else {
            if in_flight {
                self.finish_one(py);
            }
            return;
        };
        drop(call);
        // NOTE: counted only with callbacks (they may queue more work), from
        // before the worker's slot is given back until they ran: then `drain`
        // never sees a gap. Tasks without callbacks pay nothing.
        let _concluding = (!callbacks.is_empty()).then(|| {
            self.counters.concluding.fetch_add(1, SeqCst);
            CountDown(&self.counters.concluding)
        });
        if self.observer.is_on() {
            let (event, ran) = match status {
                Status::Completed => (Event::Succeeded, job.last_run()),
                Status::Failed => (Event::Failed, job.last_run()),
                _ => (Event::Cancelled, None),
            };
            // The error is read only for a hook that will get it.
            let error = match status {
                Status::Failed if self.observer.wants(event) => {
                    job.outcome_object(py).map(|(_, e)| e)
                }
                _ => None,
            };
            self.observer.record(&job, event, ran, error.as_ref());
        }
        if let Some(queue) = &self.store_queue {
            queue.settled(&job);
        }
        if let (Some(store), true) = (&self.store, record) {
            let at_shutdown = status == Status::Cancelled && self.shutting_down.load(SeqCst);
            if !at_shutdown {
                self.store_outcome(py, store.as_ref(), &job, status);
            } else if in_flight {
                // A coroutine the stopping event loop cancelled: it goes back
                // to the shared queue for another process, not cancelled there.
                store.release(vec![job.id()]);
            }
        }
        match status {
            Status::Completed => self.counters.completed.fetch_add(1, SeqCst),
            Status::Failed => self.counters.failed.fetch_add(1, SeqCst),
            _ => self.counters.cancelled.fetch_add(1, SeqCst),
        };
        if job.local {
            self.counters.pending_bytes.fetch_sub(job.footprint, SeqCst);
        }
        if status != Status::Cancelled {
            self.rate.lock().record(1, Instant::now());
        }
        if in_flight {
            self.finish_one(py);
        }
        self.retain(py, &job);
        if !callbacks.is_empty() {
            match Bound::new(py, TaskResult::new(job, Weak::<Shared>::new())) {
                Ok(handle) => run_callbacks(py, &handle, callbacks),
                Err(err) => err.print(py),
            }
        }
    }

    /// Writes a final state to the store: the result as JSON (its repr when
    /// it is not JSON) or the error as `{"type", "message", "traceback"}`.
    fn store_outcome(&self, py: Python<'_>, store: &dyn SharedStore, job: &Job, status: Status) {
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
            Some((false, exc)) => (None, rt.error_json(&exc)),
            None => (None, None),
        };
        store.finished(job.id(), status, result, error, epoch_now());
    }

    pub fn cancel(&self, py: Python<'_>, job: &Job) -> PyResult<bool> {
        let rt = runtime(py)?;
        let exc = rt.make_error(
            py,
            &rt.cancelled_error,
            format!("task {} was cancelled", job.id()),
        );
        let Some(taken) = self.sched.cancel(job.lane, &mut |j| Arc::ptr_eq(j, job)) else {
            // With a store, the task may still wait there for any process.
            let Some(store) = self.store.as_ref().filter(|_| job.status().is_waiting()) else {
                return Ok(false);
            };
            let error = rt.error_json(&exc).unwrap_or_default();
            let id = job.id();
            let cancelled = py
                .detach(|| store.cancel_queued(&id, &error))
                .map_err(|e| Error::Storage(e.0))?;
            if cancelled {
                self.conclude(
                    py,
                    job.clone(),
                    Status::Cancelled,
                    Outcome::Cancelled(exc.unbind()),
                    false,
                    false,
                );
            }
            return Ok(cancelled);
        };
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
        if let (Some(store), Some(_)) = (&self.store, &row) {
            if let Some(why) = store.unavailable() {
                let removed = self.shard(key).lock().remove(&key);
                drop(removed);
                return Err(Error::Storage(format!("cannot queue the task: {why}")));
            }
        }
        // NOTE: with a store, `push` only admits the task (intake, capacity)
        // and the row written after it is what queues it: a refused task
        // never reaches the store, where another process could run it.
        match self.sched.push(job.lane, job.clone(), delay) {
            Ok(all_busy) => {
                if let (Some(store), Some(mut row)) = (&self.store, row) {
                    row.origin = Some(store.config().owner.clone());
                    store.insert(row);
                }
                self.counters.submitted.fetch_add(1, SeqCst);
                self.counters.pending_bytes.fetch_add(footprint, SeqCst);
                self.observer.record(&job, Event::Submitted, None, None);
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

    /// Whether no task is past its queue but not yet done with: none on the
    /// event loop, none running its callbacks, no task event waiting for the
    /// app's hooks, and, with a store, none that this process submitted and
    /// is not final (it may run elsewhere).
    pub(crate) fn quiet(&self) -> bool {
        if self.counters.async_running.load(SeqCst) > 0
            || self.counters.concluding.load(SeqCst) > 0
            || self.observer.pending_events() > 0
        {
            return false;
        }
        self.store_queue.is_none()
            || self
                .jobs_where(|j| j.local && !j.status().is_final())
                .is_empty()
    }

    /// One in-flight task is done; after a large backlog drained, gives
    /// memory back to the system.
    pub(crate) fn finish_one(&self, py: Python<'_>) {
        if self.sched.ack(1) {
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

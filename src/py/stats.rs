//! `EngineStats`: one consistent reading of the engine's measurements.

use std::sync::atomic::Ordering::SeqCst;
use std::time::Instant;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::shared::Shared;
use crate::tasks::stats::summary_ms;
use crate::tasks::sysinfo::resident_bytes;

pub const MB: f64 = 1024.0 * 1024.0;

macro_rules! engine_stats {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty ),* $(,)?) => {
        /// A snapshot of the engine's statistics; see the docs for each field.
        #[pyclass(frozen, module = "catzilla._catzilla")]
        #[derive(Clone, Debug, Default)]
        pub struct EngineStats {
            $( $(#[$doc])* #[pyo3(get)] pub $name: $ty, )*
        }

        #[pymethods]
        impl EngineStats {
            /// `EngineStats(**fields)`: a reading made by hand (zeros for the
            /// fields not given), e.g. for tests and code written for catzilla 0.2.
            #[new]
            #[pyo3(signature = (**fields))]
            fn py_new(fields: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
                let mut stats = Self::default();
                for (key, value) in fields.into_iter().flat_map(|f| f.iter()) {
                    let key: String = key.extract()?;
                    match key.as_str() {
                        $( stringify!($name) => {
                            stats.$name = value.extract().map_err(|_| {
                                pyo3::exceptions::PyTypeError::new_err(format!(
                                    "EngineStats {}: expected {}, got {}",
                                    key,
                                    stringify!($ty),
                                    crate::errors::describe(&value)
                                ))
                            })?;
                        } )*
                        _ => {
                            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                                "EngineStats() got an unexpected keyword argument {key:?}"
                            )))
                        }
                    }
                }
                Ok(stats)
            }

            /// Every field as a JSON-ready dict.
            fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                let d = PyDict::new(py);
                $( d.set_item(stringify!($name), self.$name.clone())?; )*
                Ok(d)
            }

            fn __repr__(&self) -> String {
                let mut parts = Vec::new();
                $( parts.push(format!("{}={:?}", stringify!($name), self.$name)); )*
                format!("EngineStats({})", parts.join(", "))
            }
        }
    };
}

engine_stats! {
    critical_queue_size: usize,
    high_queue_size: usize,
    normal_queue_size: usize,
    low_queue_size: usize,
    /// Delayed tasks and retries waiting for their due time.
    scheduled_tasks: usize,
    /// Ready plus scheduled tasks.
    total_queued: usize,
    /// total_queued as a percentage of queue_size.
    queue_pressure: f64,
    /// Tasks being run: on workers and on the event loop.
    running_tasks: usize,
    async_tasks_running: u64,
    active_workers: usize,
    idle_workers: usize,
    total_workers: usize,
    /// Percentage of worker time spent running tasks, over the sample window.
    avg_worker_utilization: f64,
    /// Tasks finished per second over the last 10 seconds.
    tasks_per_second: f64,
    avg_execution_time_ms: f64,
    p95_execution_time_ms: f64,
    p99_execution_time_ms: f64,
    /// Resident memory of the whole process, MB.
    memory_usage_mb: f64,
    /// Percentage of memory_pool_mb still free for retained results.
    memory_efficiency: f64,
    /// CPU used by worker threads, percent of one core, over the sample window.
    worker_cpu_usage: f64,
    /// Estimated MB held by tasks not yet finished.
    worker_memory_usage: f64,
    /// CPU used by the whole process, percent of one core, over the sample window.
    engine_cpu_usage: f64,
    /// Estimated MB held by retained results of finished tasks.
    engine_memory_usage: f64,
    total_tasks_submitted: u64,
    /// Tasks that completed successfully.
    total_tasks_processed: u64,
    failed_tasks: u64,
    cancelled_tasks: u64,
    /// Retries scheduled after failed attempts.
    retry_count: u64,
    /// Attempts stopped by their timeout.
    timeout_count: u64,
    /// add_task calls refused because the queue was full.
    rejected_tasks: u64,
    /// Percentage of finished tasks that failed.
    error_rate: f64,
    retained_results: usize,
    evicted_results: u64,
    /// Times the starvation guard served a lower lane first.
    starvation_promotions: u64,
    workers_started: u64,
    workers_stopped: u64,
    panics_contained: u64,
    /// True once durable storage stopped taking writes; the engine runs on in memory.
    storage_degraded: bool,
    /// Why durable storage stopped, once it has; None otherwise.
    storage_error: Option<String>,
    uptime_seconds: f64,
}

impl EngineStats {
    /// Reads every statistic of `shared` now; needs no GIL.
    pub fn read(shared: &Shared) -> Self {
        let now = Instant::now();
        shared.evict(now);
        let depths = shared.sched.depths();
        let pool = shared.pool().map(|p| p.snapshot()).unwrap_or_default();
        let usage = {
            let sample = shared.sample(pool.cpu_ns, pool.busy_ns);
            shared.sampler.lock().usage(sample, pool.live.max(1))
        };
        let (avg, p95, p99) = summary_ms(&shared.run_times());
        let c = &shared.counters;
        let completed = c.completed.load(SeqCst);
        let failed = c.failed.load(SeqCst);
        let (retained, retained_bytes) = shared.retained();
        let ready = depths.ready();
        let total_queued = ready + depths.scheduled;
        let pool_mb = shared.pool_bytes as f64 / MB;
        let retained_mb = retained_bytes as f64 / MB;
        Self {
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

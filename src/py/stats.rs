//! `EngineStats`: one consistent reading of the engine's measurements.

use pyo3::prelude::*;
use pyo3::types::PyDict;

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

//! The PyO3 layer: adapts the pure core in `tasks` to Python.

pub mod admission;
pub mod args;
pub mod engine;
pub mod execution;
pub mod fork;
pub mod handle;
pub mod observe;
pub mod periodic;
pub mod runtime;
pub mod shared;
pub mod stats;
pub mod store_bridge;
pub mod store_queue;
pub mod task;

use pyo3::prelude::*;

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<engine::Engine>()?;
    m.add_class::<handle::TaskResult>()?;
    m.add_class::<admission::TaskDefaults>()?;
    m.add_class::<stats::EngineStats>()?;
    m.add_class::<periodic::PeriodicTask>()?;
    m.add("TASK_BUCKETS", crate::tasks::series::TASK_BUCKETS.to_vec())?;
    m.add_function(wrap_pyfunction!(runtime::_init_runtime, m)?)?;
    #[cfg(feature = "test-hooks")]
    m.add_function(wrap_pyfunction!(_panic_probe, m)?)?;
    m.add_function(wrap_pyfunction!(handle::_current_task, m)?)?;
    m.add_function(wrap_pyfunction!(fork::_after_fork_in_child, m)?)?;
    Ok(())
}

/// Panics in Rust, on purpose: lets the tests show that a Rust panic inside
/// a task fails that task and never kills a worker. Only in builds with the
/// `test-hooks` feature, which the test command turns on.
#[cfg(feature = "test-hooks")]
#[pyfunction]
fn _panic_probe(message: &str) -> PyResult<()> {
    std::panic::panic_any(format!("panic probe: {message}"))
}

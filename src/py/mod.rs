//! The PyO3 layer: adapts the pure core in `tasks` to Python.

pub mod args;
pub mod background;
pub mod engine;
pub mod errors;
pub mod fork;
pub mod periodic;
pub mod runtime;
pub mod stats;
pub mod task;

use pyo3::prelude::*;

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<background::Engine>()?;
    m.add_class::<task::TaskResult>()?;
    m.add_class::<stats::EngineStats>()?;
    m.add_class::<engine::AsyncDone>()?;
    m.add_class::<periodic::PeriodicTask>()?;
    m.add_class::<periodic::RunEnded>()?;
    m.add_function(wrap_pyfunction!(runtime::_init_runtime, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_probe, m)?)?;
    m.add_function(wrap_pyfunction!(task::_current_task, m)?)?;
    m.add_function(wrap_pyfunction!(fork::_after_fork_in_child, m)?)?;
    Ok(())
}

/// Panics in Rust, on purpose: lets the tests show that a Rust panic inside
/// a task fails that task and never kills a worker.
#[pyfunction]
fn _panic_probe(message: &str) -> PyResult<()> {
    std::panic::panic_any(format!("panic probe: {message}"))
}

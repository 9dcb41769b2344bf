//! Python objects the native layer needs, handed over once by
//! `catzilla.background_tasks` at import: enums, exception classes, helpers.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use crate::errors::{describe, Classes, Error, Result};
use crate::interpreter::ParkOnForcedUnwind;
use crate::tasks::status::Status;

pub struct Runtime {
    pub priorities: Vec<Py<PyAny>>,
    pub statuses: Vec<Py<PyAny>>,
    pub timeout_error: Py<PyAny>,
    pub cancelled_error: Py<PyAny>,
    pub panic_error: Py<PyAny>,
    pub interrupt: Py<PyAny>,
    pub non_retryable: Py<PyAny>,
    pub task_function_type: Py<PyAny>,
    pub getsizeof: Py<PyAny>,
    pub event_loop: Py<PyAny>,
    pub report: Py<PyAny>,
    pub await_result: Py<PyAny>,
    pub json_dumps: Py<PyAny>,
    pub json_loads: Py<PyAny>,
    pub encode_error: Py<PyAny>,
    /// `module.qualname` -> the object it names, or LookupError.
    pub resolve: Py<PyAny>,
    pub not_restartable_error: Py<PyAny>,
    /// (task id, stored error JSON or None) -> the exception to raise for it.
    pub rebuild_error: Py<PyAny>,
    /// `TaskStats`, what `TaskResult.get_stats()` returns.
    pub task_stats: Py<PyAny>,
    /// Warns that `add_task(compile_to_c=...)` (catzilla 0.2's) does nothing.
    pub warn_compile_to_c: Py<PyAny>,
}

static RUNTIME: PyOnceLock<Runtime> = PyOnceLock::new();

pub fn runtime(py: Python<'_>) -> Result<&'static Runtime> {
    RUNTIME.get(py).ok_or(Error::NotInitialized)
}

fn item(spec: &Bound<'_, PyDict>, key: &str) -> PyResult<Py<PyAny>> {
    spec.get_item(key)?
        .map(Bound::unbind)
        .ok_or_else(|| pyo3::exceptions::PyKeyError::new_err(format!("runtime spec lacks {key:?}")))
}

fn items(spec: &Bound<'_, PyDict>, key: &str) -> PyResult<Vec<Py<PyAny>>> {
    let seq = item(spec, key)?;
    seq.bind(spec.py())
        .try_iter()?
        .map(|v| v.map(Bound::unbind))
        .collect()
}

/// Called once by `catzilla.background_tasks`; later calls are ignored.
#[pyfunction]
pub fn _init_runtime(spec: &Bound<'_, PyDict>) -> PyResult<()> {
    let py = spec.py();
    let rt = Runtime {
        priorities: items(spec, "priorities")?,
        statuses: items(spec, "statuses")?,
        timeout_error: item(spec, "TaskTimeoutError")?,
        cancelled_error: item(spec, "TaskCancelledError")?,
        panic_error: item(spec, "TaskPanicError")?,
        interrupt: item(spec, "TaskInterrupt")?,
        non_retryable: item(spec, "NonRetryableError")?,
        task_function_type: item(spec, "TaskFunction")?,
        getsizeof: item(spec, "getsizeof")?,
        event_loop: item(spec, "EventLoopThread")?,
        report: item(spec, "report")?,
        await_result: item(spec, "await_result")?,
        json_dumps: item(spec, "json_dumps")?,
        json_loads: item(spec, "json_loads")?,
        encode_error: item(spec, "encode_error")?,
        resolve: item(spec, "resolve")?,
        not_restartable_error: item(spec, "NotRestartableError")?,
        rebuild_error: item(spec, "rebuild_error")?,
        task_stats: item(spec, "TaskStats")?,
        warn_compile_to_c: item(spec, "warn_compile_to_c")?,
    };
    if rt.priorities.len() != 4 {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "runtime spec: expected 4 priorities",
        ));
    }
    // The Python enum and the store spell statuses as `Status::as_str` does.
    let values: Vec<String> = rt
        .statuses
        .iter()
        .map(|s| s.bind(py).getattr("value")?.extract())
        .collect::<PyResult<_>>()?;
    let expected: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
    if values != expected {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "runtime spec: TaskStatus values {values:?} differ from the core's {expected:?}"
        )));
    }
    crate::errors::set_classes(
        py,
        Classes {
            queue_full: item(spec, "TaskQueueFullError")?,
            shutdown: item(spec, "EngineShutdownError")?,
            not_ready: item(spec, "TaskNotReadyError")?,
            storage: item(spec, "StorageError")?,
        },
    );
    let _ = RUNTIME.set(py, rt);
    Ok(())
}

impl Runtime {
    /// Logs through the `catzilla.tasks` logger: `level` is a `logging` level name.
    pub fn log(
        &self,
        py: Python<'_>,
        level: &str,
        message: String,
        exc: Option<&Bound<'_, PyAny>>,
    ) {
        let exc = exc.map(|e| e.clone().unbind()).unwrap_or_else(|| py.None());
        if let Err(err) = self.report.bind(py).call1((level, message, exc)) {
            err.print(py);
        }
    }

    /// The lane of a `TaskPriority` member.
    pub fn lane_of(&self, priority: &Bound<'_, PyAny>) -> Result<usize> {
        self.priorities
            .iter()
            .position(|p| p.bind(priority.py()).is(priority))
            .ok_or_else(|| {
                Error::WrongType("priority", "a TaskPriority member", describe(priority))
            })
    }

    /// A task's error as the store keeps it (JSON of its type, message and
    /// traceback); None if it cannot be encoded.
    pub fn error_json(&self, exc: &Bound<'_, PyAny>) -> Option<String> {
        self.encode_error
            .bind(exc.py())
            .call1((exc,))
            .and_then(|t| t.extract::<String>())
            .ok()
    }

    /// The exception for an error another process stored (see `rebuild_error`).
    pub fn stored_error<'py>(
        &self,
        py: Python<'py>,
        task_id: &str,
        error: Option<&str>,
    ) -> Bound<'py, PyAny> {
        match self.rebuild_error.bind(py).call1((task_id, error)) {
            Ok(exc) => exc,
            Err(err) => err.into_value(py).into_bound(py).into_any(),
        }
    }

    pub fn make_error<'py>(
        &self,
        py: Python<'py>,
        class: &Py<PyAny>,
        message: String,
    ) -> Bound<'py, PyAny> {
        match class.bind(py).call1((message,)) {
            Ok(exc) => exc,
            Err(err) => err.into_value(py).into_bound(py).into_any(),
        }
    }
}

/// Logs from a thread that must never wait for the GIL (the store's writer,
/// say): the message goes to a short-lived thread of its own, which attaches
/// and logs. Whoever waits for the calling thread (a drop path holding the
/// GIL, for one) then never waits, through it, for the GIL.
///
/// NOTE: messages from such threads are rare (a store that fails says so
/// once), so a thread per message is cheaper than keeping one alive.
pub fn log_in_background(level: &'static str, message: String) {
    let spawned = std::thread::Builder::new()
        .name("catzilla-log".into())
        .spawn(move || {
            let guard = ParkOnForcedUnwind;
            let told = Python::try_attach(|py| {
                if let Ok(rt) = runtime(py) {
                    rt.log(py, level, message.clone(), None);
                    return true;
                }
                false
            });
            guard.disarm();
            if told != Some(true) {
                eprintln!("catzilla: {message}");
            }
        });
    if let Err(e) = spawned {
        eprintln!("catzilla: cannot start a thread to log ({e})");
    }
}

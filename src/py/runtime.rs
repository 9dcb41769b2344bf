//! Python objects the native layer needs, handed over once by
//! `catzilla.background_tasks` at import: enums, exception classes, helpers.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use super::errors::{Error, Result};

pub struct Runtime {
    pub priorities: Vec<Py<PyAny>>,
    pub statuses: Vec<Py<PyAny>>,
    pub queue_full_error: Py<PyAny>,
    pub shutdown_error: Py<PyAny>,
    pub not_ready_error: Py<PyAny>,
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
    pub storage_error: Py<PyAny>,
    pub json_dumps: Py<PyAny>,
    pub encode_error: Py<PyAny>,
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
        queue_full_error: item(spec, "TaskQueueFullError")?,
        shutdown_error: item(spec, "EngineShutdownError")?,
        not_ready_error: item(spec, "TaskNotReadyError")?,
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
        storage_error: item(spec, "StorageError")?,
        json_dumps: item(spec, "json_dumps")?,
        encode_error: item(spec, "encode_error")?,
    };
    if rt.priorities.len() != 4 || rt.statuses.len() != super::task::STATUS_COUNT {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "runtime spec: expected 4 priorities and 7 statuses",
        ));
    }
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

/// Whether a value a task or handler returned must be awaited: a coroutine
/// or another awaitable. Common plain results are ruled out by exact type
/// first, so they never pay for the attribute lookup.
pub fn is_awaitable(value: &Bound<'_, PyAny>) -> bool {
    use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
    if value.is_none()
        || value.is_exact_instance_of::<PyDict>()
        || value.is_exact_instance_of::<PyString>()
        || value.is_exact_instance_of::<PyInt>()
        || value.is_exact_instance_of::<PyList>()
        || value.is_exact_instance_of::<PyFloat>()
        || value.is_exact_instance_of::<PyBool>()
        || value.is_exact_instance_of::<PyTuple>()
    {
        return false;
    }
    value.get_type().hasattr("__await__").unwrap_or(false)
}

/// The event loop thread kept in `cell`, started with `factory()` on first
/// use. Once `closed` is set (under the cell's lock, by shutdown) no loop is
/// started any more and this raises `RuntimeError`.
///
/// NOTE: the loop is created without holding the lock: starting its thread
/// releases the GIL, and a thread blocked on the lock while holding the GIL
/// would deadlock with it. If two threads race, the loser's loop is stopped.
pub fn lazy_event_loop(
    py: Python<'_>,
    cell: &parking_lot::Mutex<Option<Py<PyAny>>>,
    closed: &std::sync::atomic::AtomicBool,
    factory: &Py<PyAny>,
) -> PyResult<Py<PyAny>> {
    use std::sync::atomic::Ordering::SeqCst;
    let shut = || {
        pyo3::exceptions::PyRuntimeError::new_err(
            "the event loop is shut down: no coroutine can start any more",
        )
    };
    {
        let slot = cell.lock();
        if let Some(l) = slot.as_ref() {
            return Ok(l.clone_ref(py));
        }
        if closed.load(SeqCst) {
            return Err(shut());
        }
    }
    let created = factory.bind(py).call0()?.unbind();
    let mut slot = cell.lock();
    if closed.load(SeqCst) || slot.is_some() {
        let existing = slot.as_ref().map(|l| l.clone_ref(py));
        drop(slot);
        created.bind(py).call_method1("stop", (0.0,))?;
        return existing.ok_or_else(shut);
    }
    *slot = Some(created.clone_ref(py));
    Ok(created)
}

/// Closes `cell` for good and hands back the loop it held, to be stopped.
pub fn close_event_loop(
    cell: &parking_lot::Mutex<Option<Py<PyAny>>>,
    closed: &std::sync::atomic::AtomicBool,
) -> Option<Py<PyAny>> {
    let mut slot = cell.lock();
    closed.store(true, std::sync::atomic::Ordering::SeqCst);
    slot.take()
}

/// Parks the thread forever if it is unwound by something other than a Rust
/// panic. Create it before running Python code on a thread and `disarm` it
/// after.
///
/// NOTE: while the interpreter finalizes, CPython (before 3.14) ends any
/// thread that takes the GIL back (a task returning from `time.sleep`, say)
/// with `pthread_exit`, a forced unwind. Rust cannot catch that unwind: a
/// `catch_unwind` on the way (ours, PyO3's or the thread's own) aborts the
/// whole process. Parking here stops the unwind before any of them; the
/// process is exiting anyway. PyO3 does the same in its own attach paths.
pub struct ParkOnForcedUnwind;

impl ParkOnForcedUnwind {
    pub fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for ParkOnForcedUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        loop {
            std::thread::park();
        }
    }
}

//! Living with the interpreter, for the task engine and the web layer alike:
//! which results must be awaited, the event loop thread kept per engine or
//! server, and threads that run Python while the process may be exiting.

use pyo3::prelude::*;

/// How a coroutine ended, as `catzilla._aio` reports it to the native
/// done-callbacks (the task engine's and the server's). The codes reach
/// Python as the module's `ASYNC_*` constants, so they are written here only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AsyncOutcome {
    Ok = 0,
    Error = 1,
    Timeout = 2,
    Cancelled = 3,
}

impl AsyncOutcome {
    const ALL: [(AsyncOutcome, &'static str); 4] = [
        (AsyncOutcome::Ok, "ASYNC_OK"),
        (AsyncOutcome::Error, "ASYNC_ERROR"),
        (AsyncOutcome::Timeout, "ASYNC_TIMEOUT"),
        (AsyncOutcome::Cancelled, "ASYNC_CANCELLED"),
    ];

    /// The outcome of a code; an unknown one counts as cancelled.
    pub fn from_code(code: u8) -> Self {
        Self::ALL
            .iter()
            .map(|(o, _)| *o)
            .find(|o| *o as u8 == code)
            .unwrap_or(AsyncOutcome::Cancelled)
    }

    /// Adds the `ASYNC_*` constants to the module.
    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        for (outcome, name) in Self::ALL {
            m.add(name, outcome as u8)?;
        }
        Ok(())
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

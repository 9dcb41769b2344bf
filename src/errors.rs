//! Every error the native module raises, mapped to Python in one place.
//!
//! Needs nothing else of the crate: the exception classes it raises are
//! handed to it once, at import, by `catzilla.background_tasks`.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// catzilla's own exception classes (declared in `catzilla.errors`).
pub struct Classes {
    pub queue_full: Py<PyAny>,
    pub shutdown: Py<PyAny>,
    pub not_ready: Py<PyAny>,
    pub storage: Py<PyAny>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

/// Called once at import; later calls are ignored.
pub fn set_classes(py: Python<'_>, classes: Classes) {
    let _ = CLASSES.set(py, classes);
}

/// The errors of the native layer. Python exception classes live in
/// `catzilla.errors`; this is the only place that turns errors into them.
#[derive(Debug)]
pub enum Error {
    /// An argument of the wrong type: (argument, expectation, what was given).
    WrongType(&'static str, &'static str, String),
    /// An argument with a bad value: (argument, what is wrong).
    BadValue(&'static str, String),
    QueueFull(usize),
    ShutDown,
    /// Used in a child process after `os.fork()`; holds the pid it was made in.
    Forked(u32),
    /// The durable store could not be read or written.
    Storage(String),
    /// A combination of arguments that does not go together; the whole message.
    Usage(String),
    NotReady(String),
    Timeout(String),
    /// A call made again from inside itself, which would wait for itself.
    Reentrant(&'static str),
    /// `catzilla.background_tasks` was not imported before the native module was used.
    NotInitialized,
    /// Starting an OS thread failed.
    Thread(std::io::Error),
    Internal(String),
    Python(PyErr),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<PyErr> for Error {
    fn from(e: PyErr) -> Self {
        Error::Python(e)
    }
}

impl From<hdrhistogram::CreationError> for Error {
    fn from(e: hdrhistogram::CreationError) -> Self {
        Error::Internal(format!("histogram: {e:?}"))
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> Self {
        Python::attach(|py| to_pyerr(py, e))
    }
}

fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
    let custom = |pick: fn(&Classes) -> &Py<PyAny>, msg: String| match CLASSES.get(py) {
        Some(classes) => match pick(classes).bind(py).call1((msg.clone(),)) {
            Ok(exc) => PyErr::from_value(exc),
            Err(err) => err,
        },
        None => PyRuntimeError::new_err(msg),
    };
    match e {
        Error::WrongType(arg, expected, got) => {
            PyTypeError::new_err(format!("{arg} must be {expected}, got {got}"))
        }
        Error::BadValue(arg, what) => PyValueError::new_err(format!("{arg} {what}")),
        Error::QueueFull(capacity) => custom(
            |c| &c.queue_full,
            format!(
                "task queue is full: {capacity} tasks are waiting (queue_size={capacity}); \
                 retry later or raise queue_size"
            ),
        ),
        Error::ShutDown => custom(
            |c| &c.shutdown,
            "the background task engine is shut down and accepts no new tasks".to_string(),
        ),
        Error::Forked(pid) => custom(
            |c| &c.shutdown,
            format!(
                "this background task engine was started in process {pid} and does not run \
                 in this child process (pid {}) made by os.fork(); start a new engine in the \
                 child (a Catzilla app does so by itself on its next task call)",
                std::process::id()
            ),
        ),
        Error::Storage(msg) => custom(|c| &c.storage, msg),
        Error::Usage(msg) => PyValueError::new_err(msg),
        Error::NotReady(id) => custom(|c| &c.not_ready, format!("task {id} has not finished yet")),
        Error::Timeout(msg) => pyo3::exceptions::PyTimeoutError::new_err(msg),
        Error::Reentrant(msg) => PyRuntimeError::new_err(msg),
        Error::NotInitialized => PyRuntimeError::new_err(
            "catzilla's native module is not initialised; import catzilla.background_tasks first",
        ),
        Error::Thread(err) => {
            PyRuntimeError::new_err(format!("could not start a worker thread: {err}"))
        }
        Error::Internal(msg) => PyRuntimeError::new_err(format!("catzilla internal error: {msg}")),
        Error::Python(err) => err,
    }
}

/// Describes a Python value for an error message: its type and a short repr.
pub fn describe(value: &Bound<'_, PyAny>) -> String {
    let ty = value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    let mut repr = value
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "<unrepresentable>".into());
    if repr.len() > 60 {
        let cut = (0..=60)
            .rev()
            .find(|i| repr.is_char_boundary(*i))
            .unwrap_or(0);
        repr.truncate(cut);
        repr.push_str("...");
    }
    format!("{ty} {repr}")
}

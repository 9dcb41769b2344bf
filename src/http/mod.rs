//! The web layer: hyper 1 on tokio for I/O, Python handlers on their own threads.

pub mod access;
pub mod forwarded;
pub mod json;
pub mod metrics;
pub mod request;
pub mod response;
pub mod router;
pub mod routes;
pub mod server;
pub mod stream;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use crate::errors::Error;

/// Python objects the web layer needs, handed over by `catzilla.web`.
pub struct HttpRuntime {
    pub json_loads: Py<PyAny>,
    pub bad_request: Py<PyAny>,
    pub http_error: Py<PyAny>,
    pub report: Py<PyAny>,
    pub event_loop: Py<PyAny>,
    /// `access(lines, dropped)`: logs a batch of access log lines.
    pub access: Py<PyAny>,
    /// `start_stream(content, sink, event_loop_or_None)`: starts a
    /// streaming response's producer.
    pub start_stream: Py<PyAny>,
}

static HTTP_RUNTIME: PyOnceLock<HttpRuntime> = PyOnceLock::new();

pub fn http_runtime(py: Python<'_>) -> Result<&'static HttpRuntime, Error> {
    HTTP_RUNTIME.get(py).ok_or(Error::NotInitialized)
}

/// Called once by `catzilla.web`; later calls are ignored.
#[pyfunction]
pub fn _init_http(spec: &Bound<'_, PyDict>) -> PyResult<()> {
    let get = |key: &str| -> PyResult<Py<PyAny>> {
        spec.get_item(key)?.map(Bound::unbind).ok_or_else(|| {
            pyo3::exceptions::PyKeyError::new_err(format!("http spec lacks {key:?}"))
        })
    };
    let rt = HttpRuntime {
        json_loads: get("json_loads")?,
        bad_request: get("BadRequestError")?,
        http_error: get("HTTPError")?,
        report: get("report")?,
        event_loop: get("EventLoopThread")?,
        access: get("access")?,
        start_stream: get("start_stream")?,
    };
    let _ = HTTP_RUNTIME.set(spec.py(), rt);
    Ok(())
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<request::Request>()?;
    m.add_class::<response::Response>()?;
    m.add_class::<response::JSONResponse>()?;
    m.add_class::<response::HTMLResponse>()?;
    m.add_class::<response::PlainTextResponse>()?;
    m.add_class::<response::StreamingResponse>()?;
    stream::init_pymodule(m)?;
    m.add("HTTP_BUCKETS", metrics::HTTP_BUCKETS.to_vec())?;
    m.add_class::<server::Server>()?;
    m.add_class::<routes::Routes>()?;
    m.add_function(wrap_pyfunction!(_init_http, m)?)?;
    Ok(())
}

//! `Request`: what a handler receives. Python objects are built lazily, on
//! the handler thread, only for the parts a handler reads.

use std::net::SocketAddr;

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict};

use super::http_runtime;

#[pyclass(frozen, module = "catzilla._catzilla")]
pub struct Request {
    method: http::Method,
    uri: http::Uri,
    header_map: http::HeaderMap,
    raw_body: Bytes,
    params: Vec<(String, String)>,
    peer: Option<SocketAddr>,
    headers_cache: PyOnceLock<Py<PyDict>>,
    query_cache: PyOnceLock<Py<PyDict>>,
    params_cache: PyOnceLock<Py<PyDict>>,
}

impl Request {
    pub fn new(
        parts: http::request::Parts,
        body: Bytes,
        params: Vec<(String, String)>,
        peer: Option<SocketAddr>,
    ) -> Self {
        Self {
            method: parts.method,
            uri: parts.uri,
            header_map: parts.headers,
            raw_body: body,
            params,
            peer,
            headers_cache: PyOnceLock::new(),
            query_cache: PyOnceLock::new(),
            params_cache: PyOnceLock::new(),
        }
    }

    pub fn method_str(&self) -> &str {
        self.method.as_str()
    }

    pub fn path_str(&self) -> &str {
        self.uri.path()
    }
}

#[pymethods]
impl Request {
    /// The HTTP method, upper case.
    #[getter]
    fn method(&self) -> &str {
        self.method.as_str()
    }

    /// The path, without the query string.
    #[getter]
    fn path(&self) -> &str {
        self.uri.path()
    }

    /// The raw query string ("" when there is none).
    #[getter]
    fn query_string(&self) -> &str {
        self.uri.query().unwrap_or("")
    }

    /// Headers by lower-case name; repeated headers are joined with ", ".
    #[getter]
    fn headers(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        self.headers_cache
            .get_or_try_init(py, || {
                let d = PyDict::new(py);
                for name in self.header_map.keys() {
                    let joined = self
                        .header_map
                        .get_all(name)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect::<Vec<_>>()
                        .join(", ");
                    d.set_item(name.as_str(), joined)?;
                }
                Ok(d.unbind())
            })
            .map(|d| d.clone_ref(py))
    }

    /// Query parameters, decoded; the first value wins for repeated names.
    #[getter]
    fn query_params(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        self.query_cache
            .get_or_try_init(py, || {
                let d = PyDict::new(py);
                let query = self.uri.query().unwrap_or("");
                for (k, v) in form_urlencoded::parse(query.as_bytes()) {
                    if !d.contains(k.as_ref())? {
                        d.set_item(k.as_ref(), v.as_ref())?;
                    }
                }
                Ok(d.unbind())
            })
            .map(|d| d.clone_ref(py))
    }

    /// Values of the route's `{name}` parameters, decoded.
    #[getter]
    fn path_params(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        self.params_cache
            .get_or_try_init(py, || {
                let d = PyDict::new(py);
                for (k, v) in &self.params {
                    d.set_item(k, v)?;
                }
                Ok(d.unbind())
            })
            .map(|d| d.clone_ref(py))
    }

    /// The raw body.
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.raw_body)
    }

    /// The client's (host, port), when known.
    #[getter]
    fn client(&self) -> Option<(String, u16)> {
        self.peer.map(|a| (a.ip().to_string(), a.port()))
    }

    /// The body decoded as UTF-8 (invalid bytes are replaced).
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw_body).into_owned()
    }

    /// The body parsed as JSON. Raises `BadRequestError` (an `HTTPError` with
    /// status 400, and a `ValueError`) when it is not valid JSON.
    fn json(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let rt = http_runtime(py)?;
        match rt
            .json_loads
            .bind(py)
            .call1((PyBytes::new(py, &self.raw_body),))
        {
            Ok(v) => Ok(v.unbind()),
            Err(err) => {
                let msg = format!("request body is not valid JSON: {}", err.value(py));
                Err(PyErr::from_value(rt.bad_request.bind(py).call1((msg,))?))
            }
        }
    }

    fn __repr__(&self) -> String {
        format!("<Request {} {}>", self.method, self.uri)
    }
}

/// The first transfer coding other than a single, final `chunked`, if any:
/// catzilla decodes only chunked bodies, so anything else is refused.
pub fn unsupported_transfer_coding(headers: &http::HeaderMap) -> Option<String> {
    let mut codings = Vec::new();
    for value in headers.get_all(http::header::TRANSFER_ENCODING) {
        let Ok(text) = value.to_str() else {
            return Some(String::from_utf8_lossy(value.as_bytes()).into_owned());
        };
        codings.extend(
            text.split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty()),
        );
    }
    match codings.as_slice() {
        [] => None,
        [only] if only == "chunked" => None,
        _ => codings
            .iter()
            .find(|c| *c != "chunked")
            .cloned()
            .or_else(|| Some("chunked, chunked".to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codings(values: &[&str]) -> Option<String> {
        let mut headers = http::HeaderMap::new();
        for v in values {
            headers.append(
                http::header::TRANSFER_ENCODING,
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        unsupported_transfer_coding(&headers)
    }

    #[test]
    fn only_a_single_chunked_coding_is_accepted() {
        assert_eq!(codings(&[]), None);
        assert_eq!(codings(&["chunked"]), None);
        assert_eq!(codings(&[" Chunked "]), None);
        assert_eq!(codings(&["gzip, chunked"]).as_deref(), Some("gzip"));
        assert_eq!(codings(&["bogus", "chunked"]).as_deref(), Some("bogus"));
        assert_eq!(
            codings(&["chunked, chunked"]).as_deref(),
            Some("chunked, chunked")
        );
        assert_eq!(
            codings(&["chunked", "chunked"]).as_deref(),
            Some("chunked, chunked")
        );
    }
}

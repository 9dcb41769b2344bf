//! `Response` and its JSON, HTML and plain-text kinds, and the conversion of
//! whatever a handler returns into an HTTP response.

use bytes::Bytes;
use http_body_util::{Either, Full};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use super::json::to_json;
use super::stream::{StreamBody, StreamSink};

/// A whole body, or one streamed as Python produces it.
pub type HttpBody = Either<Full<Bytes>, StreamBody>;
pub type HttpResponse = http::Response<HttpBody>;

/// A whole body.
pub fn full(bytes: Bytes) -> HttpBody {
    Either::Left(Full::new(bytes))
}

/// What a streaming response needs from the server that sends it.
pub trait Streams {
    /// A new sink and body, the body ending when the server stops.
    fn channel(&self) -> (StreamSink, StreamBody);
    /// Starts producing `content` into `sink`.
    fn start(&self, content: &Bound<'_, PyAny>, sink: Py<StreamSink>) -> PyResult<()>;
}

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

/// An HTTP response: a body, a status code, headers and a content type.
#[pyclass(subclass, frozen, module = "catzilla._catzilla")]
pub struct Response {
    status: u16,
    body: Bytes,
    content_type: String,
    headers: PyOnceLock<Py<PyDict>>,
}

fn check_status(status: i64) -> PyResult<u16> {
    if (100..=599).contains(&status) {
        Ok(status as u16)
    } else {
        Err(PyValueError::new_err(format!(
            "status_code must be between 100 and 599, got {status}"
        )))
    }
}

fn body_bytes(body: Option<&Bound<'_, PyAny>>) -> PyResult<Bytes> {
    match body {
        None => Ok(Bytes::new()),
        Some(b) if b.is_none() => Ok(Bytes::new()),
        Some(b) => {
            if let Ok(s) = b.cast::<PyString>() {
                Ok(Bytes::from(s.to_cow()?.into_owned()))
            } else if let Ok(bytes) = b.cast::<PyBytes>() {
                Ok(Bytes::copy_from_slice(bytes.as_bytes()))
            } else {
                Err(PyTypeError::new_err(format!(
                    "body must be str or bytes, got {}",
                    b.get_type().name()?
                )))
            }
        }
    }
}

impl Response {
    fn build(
        py: Python<'_>,
        status: i64,
        body: Bytes,
        content_type: String,
        headers: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let cell = PyOnceLock::new();
        if let Some(h) = headers {
            let _ = cell.set(py, h.copy()?.unbind());
        }
        Ok(Self {
            status: check_status(status)?,
            body,
            content_type,
            headers: cell,
        })
    }

    fn to_http(&self, py: Python<'_>) -> PyResult<HttpResponse> {
        self.with_body(py, full(self.body.clone()))
    }

    fn with_body(&self, py: Python<'_>, body: HttpBody) -> PyResult<HttpResponse> {
        let bad = |e: &dyn std::fmt::Display| {
            PyValueError::new_err(format!("invalid response header: {e}"))
        };
        let mut resp = http::Response::new(body);
        *resp.status_mut() = http::StatusCode::from_u16(self.status).map_err(|e| bad(&e))?;
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_str(&self.content_type).map_err(|e| bad(&e))?,
        );
        if let Some(extra) = self.headers.get(py) {
            for (k, v) in extra.bind(py).iter() {
                let name = http::HeaderName::from_bytes(k.str()?.to_cow()?.as_bytes())
                    .map_err(|e| bad(&e))?;
                let value =
                    http::HeaderValue::from_str(&v.str()?.to_cow()?).map_err(|e| bad(&e))?;
                if name == http::header::CONTENT_TYPE {
                    headers.insert(name, value);
                } else {
                    headers.append(name, value);
                }
            }
        }
        Ok(resp)
    }
}

#[pymethods]
impl Response {
    #[new]
    #[pyo3(signature = (body=None, status_code=200, headers=None, content_type=None))]
    fn new(
        py: Python<'_>,
        body: Option<&Bound<'_, PyAny>>,
        status_code: i64,
        headers: Option<&Bound<'_, PyDict>>,
        content_type: Option<String>,
    ) -> PyResult<Self> {
        let body = body_bytes(body)?;
        Self::build(
            py,
            status_code,
            body,
            content_type.unwrap_or_else(|| TEXT.into()),
            headers,
        )
    }

    /// The HTTP status code.
    #[getter]
    fn status_code(&self) -> u16 {
        self.status
    }

    /// The body as bytes.
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.body)
    }

    /// The Content-Type header's value.
    #[getter]
    fn content_type(&self) -> &str {
        &self.content_type
    }

    /// Extra headers; a mutable dict.
    #[getter]
    fn headers(&self, py: Python<'_>) -> Py<PyDict> {
        self.headers
            .get_or_init(py, || PyDict::new(py).unbind())
            .clone_ref(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "<Response {} {} ({} bytes)>",
            self.status,
            self.content_type,
            self.body.len()
        )
    }
}

/// A response whose body is `data` serialized as JSON.
#[pyclass(extends = Response, subclass, frozen, module = "catzilla._catzilla")]
pub struct JSONResponse;

#[pymethods]
impl JSONResponse {
    #[new]
    #[pyo3(signature = (data=None, status_code=200, headers=None))]
    fn new(
        py: Python<'_>,
        data: Option<&Bound<'_, PyAny>>,
        status_code: i64,
        headers: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let body = match data {
            Some(d) => to_json(d)?,
            None => b"null".to_vec(),
        };
        let base = Response::build(py, status_code, Bytes::from(body), JSON.into(), headers)?;
        Ok(PyClassInitializer::from(base).add_subclass(JSONResponse))
    }
}

macro_rules! text_response {
    ($name:ident, $content_type:expr, $doc:literal) => {
        #[doc = $doc]
        #[pyclass(extends = Response, subclass, frozen, module = "catzilla._catzilla")]
        pub struct $name;

        #[pymethods]
        impl $name {
            #[new]
            #[pyo3(signature = (body=None, status_code=200, headers=None))]
            fn new(
                py: Python<'_>,
                body: Option<&Bound<'_, PyAny>>,
                status_code: i64,
                headers: Option<&Bound<'_, PyDict>>,
            ) -> PyResult<PyClassInitializer<Self>> {
                let content_type = String::from($content_type);
                let base =
                    Response::build(py, status_code, body_bytes(body)?, content_type, headers)?;
                Ok(PyClassInitializer::from(base).add_subclass($name))
            }
        }
    };
}

text_response!(HTMLResponse, HTML, "A response with an HTML body.");
text_response!(
    PlainTextResponse,
    TEXT,
    "A response with a plain-text body."
);

/// A response whose body is sent as `content` produces it: an iterator or
/// async iterator of str or bytes chunks, sent with chunked encoding.
#[pyclass(extends = Response, subclass, frozen, module = "catzilla._catzilla")]
pub struct StreamingResponse {
    content: Py<PyAny>,
}

#[pymethods]
impl StreamingResponse {
    #[new]
    #[pyo3(signature = (content, status_code=200, headers=None, media_type=None))]
    fn new(
        py: Python<'_>,
        content: Bound<'_, PyAny>,
        status_code: i64,
        headers: Option<&Bound<'_, PyDict>>,
        media_type: Option<String>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let iterable = content.hasattr("__aiter__")? || content.hasattr("__iter__")?;
        if !iterable || content.is_instance_of::<PyString>() || content.is_instance_of::<PyBytes>()
        {
            return Err(PyTypeError::new_err(format!(
                "content must be an iterator or async iterator of str or bytes chunks, got {}",
                content.get_type().name()?
            )));
        }
        let media_type = media_type.unwrap_or_else(|| "application/octet-stream".into());
        let base = Response::build(py, status_code, Bytes::new(), media_type, headers)?;
        Ok(
            PyClassInitializer::from(base).add_subclass(StreamingResponse {
                content: content.unbind(),
            }),
        )
    }

    /// What produces the body.
    #[getter]
    fn content(&self, py: Python<'_>) -> Py<PyAny> {
        self.content.clone_ref(py)
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.content)
    }
}

/// A JSON response built in Rust, for errors and plain dict results.
pub fn json_response(status: u16, body: Vec<u8>) -> HttpResponse {
    let mut resp = http::Response::new(full(Bytes::from(body)));
    *resp.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(JSON),
    );
    resp
}

/// `{"error": message, ...extra}` with `status`.
pub fn error_response(status: u16, message: &str, extra: &[(&str, &str)]) -> HttpResponse {
    let mut body = serde_json::Map::new();
    body.insert("error".into(), serde_json::Value::String(message.into()));
    for (k, v) in extra {
        body.insert((*k).into(), serde_json::Value::String((*v).into()));
    }
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    json_response(status, bytes)
}

/// Converts a handler's return value: a `Response`, a dict or list (JSON),
/// a pydantic model (JSON), a str (plain text), bytes, or None (204 No Content).
pub fn to_http(value: &Bound<'_, PyAny>, streams: &dyn Streams) -> PyResult<HttpResponse> {
    let py = value.py();
    if let Ok(streaming) = value.cast::<StreamingResponse>() {
        let (sink, body) = streams.channel();
        let sink = Py::new(py, sink)?;
        let base = streaming.as_super().get();
        let resp = base.with_body(py, Either::Right(body))?;
        streams.start(streaming.get().content.bind(py), sink)?;
        return Ok(resp);
    }
    if let Ok(resp) = value.cast::<Response>() {
        return resp.get().to_http(py);
    }
    if value.is_instance_of::<PyDict>() || value.is_instance_of::<PyList>() {
        return Ok(json_response(200, to_json(value)?));
    }
    if let Ok(s) = value.cast::<PyString>() {
        return Response::build(
            py,
            200,
            Bytes::from(s.to_cow()?.into_owned()),
            TEXT.into(),
            None,
        )?
        .to_http(py);
    }
    if let Ok(b) = value.cast::<PyBytes>() {
        let body = Bytes::copy_from_slice(b.as_bytes());
        return Response::build(py, 200, body, "application/octet-stream".into(), None)?
            .to_http(py);
    }
    if let Some(text) = super::json::model_json(value)? {
        return Ok(json_response(200, text.into_bytes()));
    }
    if value.is_none() {
        let mut resp = http::Response::new(full(Bytes::new()));
        *resp.status_mut() = http::StatusCode::NO_CONTENT;
        return Ok(resp);
    }
    Err(PyTypeError::new_err(format!(
        "a handler must return a Response, dict, list, model, str, bytes or None, not {}",
        value.get_type().name()?
    )))
}

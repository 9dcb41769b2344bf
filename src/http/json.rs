//! Python values to JSON bytes, written in Rust for handler responses.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

const MAX_DEPTH: usize = 200;

/// Serializes `value` as JSON: dict, list, tuple, str, int, float, bool and
/// None, plus pydantic models (as pydantic writes them), enums (their value)
/// and date/time objects (ISO 8601 text).
/// Non-finite floats become `null`. Anything else raises `TypeError`.
pub fn to_json(value: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    write(value, &mut out, 0)?;
    Ok(out)
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    // serde_json writes a correctly escaped string; writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn write(value: &Bound<'_, PyAny>, out: &mut Vec<u8>, depth: usize) -> PyResult<()> {
    if depth > MAX_DEPTH {
        return Err(PyValueError::new_err(
            "value is nested too deeply to serialize as JSON",
        ));
    }
    if value.is_none() {
        out.extend_from_slice(b"null");
    } else if let Ok(s) = value.cast::<PyString>() {
        write_str(&s.to_cow()?, out);
    } else if let Ok(b) = value.cast::<PyBool>() {
        out.extend_from_slice(if b.is_true() { b"true" } else { b"false" });
    } else if let Ok(i) = value.cast::<PyInt>() {
        match i.extract::<i64>() {
            Ok(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Err(_) => out.extend_from_slice(i.str()?.to_cow()?.as_bytes()),
        }
    } else if let Ok(f) = value.cast::<PyFloat>() {
        let v = f.value();
        if v.is_finite() {
            let _ = serde_json::to_writer(&mut *out, &v);
        } else {
            out.extend_from_slice(b"null");
        }
    } else if let Ok(d) = value.cast::<PyDict>() {
        out.push(b'{');
        // NOTE: a snapshot of the items: code run while writing (isoformat,
        // an enum's value) may change the dict, and iterating it live panics.
        let items = d.items();
        for (n, item) in items.iter().enumerate() {
            let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
            if n > 0 {
                out.push(b',');
            }
            write_key(&k, out)?;
            out.push(b':');
            write(&v, out, depth + 1)?;
        }
        out.push(b'}');
    } else if let Ok(l) = value.cast::<PyList>() {
        out.push(b'[');
        let items = l.to_tuple();
        for (n, v) in items.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            write(&v, out, depth + 1)?;
        }
        out.push(b']');
    } else if let Ok(t) = value.cast::<PyTuple>() {
        out.push(b'[');
        for (n, v) in t.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            write(&v, out, depth + 1)?;
        }
        out.push(b']');
    } else if let Some(text) = model_json(value)? {
        out.extend_from_slice(text.as_bytes());
    } else if let Some(inner) = enum_value(value)? {
        write(&inner, out, depth + 1)?;
    } else if value.hasattr("isoformat")? {
        let text = value.call_method0("isoformat")?;
        write_str(&text.str()?.to_cow()?, out);
    } else {
        let ty = value.get_type().name()?;
        return Err(PyTypeError::new_err(format!(
            "Object of type {ty} is not JSON serializable"
        )));
    }
    Ok(())
}

/// A pydantic model instance as JSON, written by pydantic itself; None for
/// anything else.
pub fn model_json(value: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
    if value.is_instance_of::<pyo3::types::PyType>() || !value.hasattr("__pydantic_serializer__")? {
        return Ok(None);
    }
    let text = value.call_method0("model_dump_json")?;
    Ok(Some(text.extract()?))
}

fn enum_value<'py>(value: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let enum_type = value.py().import("enum")?.getattr("Enum")?;
    if value.is_instance(&enum_type)? {
        Ok(Some(value.getattr("value")?))
    } else {
        Ok(None)
    }
}

fn write_key(key: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> PyResult<()> {
    if let Ok(s) = key.cast::<PyString>() {
        write_str(&s.to_cow()?, out);
        return Ok(());
    }
    if key.is_none() {
        write_str("null", out);
    } else if let Ok(b) = key.cast::<PyBool>() {
        write_str(if b.is_true() { "true" } else { "false" }, out);
    } else if key.is_instance_of::<PyInt>() || key.is_instance_of::<PyFloat>() {
        write_str(&key.str()?.to_cow()?, out);
    } else {
        let ty = key.get_type().name()?;
        return Err(PyTypeError::new_err(format!(
            "keys must be str, int, float, bool or None, not {ty}"
        )));
    }
    Ok(())
}

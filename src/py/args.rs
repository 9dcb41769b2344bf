//! Python arguments to Rust values, with errors that name the argument.

use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt, PyString};

use crate::errors::{describe, Error, Result};

/// A number as `f64`. A bool or a non-number is a `WrongType`; an int too
/// large for a double becomes an infinity of its sign, for the caller's range check.
pub fn number(name: &'static str, v: &Bound<'_, PyAny>, expected: &'static str) -> Result<f64> {
    if v.is_instance_of::<PyBool>() {
        return Err(Error::WrongType(name, expected, describe(v)));
    }
    match v.extract::<f64>() {
        Ok(x) => Ok(x),
        Err(_) if v.is_instance_of::<PyInt>() => Ok(if v.lt(0).unwrap_or(false) {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        }),
        Err(_) => Err(Error::WrongType(name, expected, describe(v))),
    }
}

/// Milliseconds: a finite number >= 0 that a `Duration` holds.
pub fn millis(name: &'static str, v: &Bound<'_, PyAny>) -> Result<Duration> {
    let ms = number(name, v, "a number of milliseconds")?;
    if !ms.is_finite() || ms < 0.0 {
        return Err(Error::BadValue(
            name,
            format!("must be a finite number >= 0, got {}", short(v)),
        ));
    }
    Duration::try_from_secs_f64(ms / 1000.0)
        .map_err(|_| Error::BadValue(name, format!("is too large: {ms} ms")))
}

/// Seconds, or None for no limit.
pub fn seconds_or_none(
    name: &'static str,
    v: Option<&Bound<'_, PyAny>>,
) -> Result<Option<Duration>> {
    match v.filter(|v| !v.is_none()) {
        Some(v) => seconds(name, v).map(Some),
        None => Ok(None),
    }
}

/// Seconds: a finite number >= 0. More than a `Duration` holds (some 10^19 s)
/// is as good as no limit: `Duration::MAX`.
pub fn seconds(name: &'static str, v: &Bound<'_, PyAny>) -> Result<Duration> {
    let s = number(name, v, "a number of seconds")?;
    if !s.is_finite() || s < 0.0 {
        return Err(Error::BadValue(
            name,
            format!("must be a finite number of seconds >= 0, got {}", short(v)),
        ));
    }
    Ok(Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX))
}

/// A finite number > 0.
pub fn positive(name: &'static str, v: &Bound<'_, PyAny>, expected: &'static str) -> Result<f64> {
    let x = number(name, v, expected)?;
    if !x.is_finite() || x <= 0.0 {
        return Err(Error::BadValue(
            name,
            format!("must be a finite number > 0, got {}", short(v)),
        ));
    }
    Ok(x)
}

/// A span of seconds the engine keeps (a TTL, say): a finite number >= 0
/// that a `Duration` holds; more is an error, not "no limit".
pub fn span(name: &'static str, v: &Bound<'_, PyAny>) -> Result<Duration> {
    let s = seconds(name, v)?;
    if s == Duration::MAX {
        return Err(Error::BadValue(
            name,
            format!("is too large: {} s", short(v)),
        ));
    }
    Ok(s)
}

/// A span of seconds, > 0.
pub fn positive_span(name: &'static str, v: &Bound<'_, PyAny>) -> Result<Duration> {
    let s = span(name, v)?;
    if s.is_zero() {
        return Err(Error::BadValue(
            name,
            format!("must be > 0 seconds, got {}", short(v)),
        ));
    }
    Ok(s)
}

/// A count from 0 to `u32::MAX`.
pub fn count(name: &'static str, v: &Bound<'_, PyAny>) -> Result<u32> {
    if v.is_instance_of::<PyBool>() || !v.is_instance_of::<PyInt>() {
        return Err(Error::WrongType(name, "an int", describe(v)));
    }
    v.extract::<u32>().map_err(|_| {
        Error::BadValue(
            name,
            format!("must be from 0 to {}, got {}", u32::MAX, short(v)),
        )
    })
}

/// A bool, and only a bool.
pub fn flag(name: &'static str, v: &Bound<'_, PyAny>) -> Result<bool> {
    v.cast::<PyBool>()
        .map(|b| b.is_true())
        .map_err(|_| Error::WrongType(name, "a bool", describe(v)))
}

/// A str that is valid text (no lone surrogates).
pub fn text(name: &'static str, v: &Bound<'_, PyAny>) -> Result<String> {
    let s = v
        .cast::<PyString>()
        .map_err(|_| Error::WrongType(name, "a str", describe(v)))?;
    s.to_str()
        .map(str::to_string)
        .map_err(|_| Error::BadValue(name, format!("is not valid text: {}", describe(v))))
}

/// A value for a message, cut short (a huge int has thousands of digits).
fn short(v: &Bound<'_, PyAny>) -> String {
    let d = describe(v);
    d.split_once(' ')
        .map_or(d.clone(), |(_, repr)| repr.to_string())
}

//! The engine's side of its durable store, for Python: stored rows by id or
//! status, and recovery, which runs again the tasks an earlier run left
//! unfinished, building each one through admission as `add_task` does.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyInt, PyTuple};

use super::admission::{prepare, CallOptions, Prepared};
use super::runtime::{runtime, Runtime};
use super::shared::Shared;
use super::task::{epoch_now, parse_id, Status};
use crate::errors::{Error, Result};
use crate::store::{Records, Row, StoreError};

/// What `recover` did: the ids run again, and the ids marked failed for good.
#[derive(Default)]
pub struct Recovered {
    pub resubmitted: Vec<String>,
    pub failed: Vec<String>,
}

/// Runs again the unfinished tasks of the store (pending, scheduled,
/// retrying, or running when their process ended) under their own ids:
/// at-least-once. A task this engine already has is left alone. One that
/// cannot run again (stored without its arguments, a function that no longer
/// imports, corrupt data) is marked failed with a `NotRestartableError`.
pub fn recover(py: Python<'_>, shared: &Arc<Shared>) -> PyResult<Recovered> {
    let rt = runtime(py)?;
    let mut done = Recovered::default();
    let Some(store) = &shared.store else {
        return Ok(done);
    };
    let unfinished: Vec<Status> = Status::ALL.into_iter().filter(|s| !s.is_final()).collect();
    for row in read(py, shared, store, |s| s.load(&unfinished))? {
        if shared.lookup(&row.task_id).is_some() {
            continue; // already running in this engine
        }
        match rebuild(py, rt, shared, &row) {
            Ok(p) => {
                let status = if p.delay.is_zero() {
                    Status::Pending
                } else {
                    Status::Scheduled
                };
                let job = shared.submit(p.task, p.delay, None)?;
                store.waiting(job.id(), status);
                done.resubmitted.push(row.task_id);
            }
            Err(reason) => {
                let exc = rt.make_error(
                    py,
                    &rt.not_restartable_error,
                    format!("cannot run again after a restart: {reason}"),
                );
                let error = rt.error_json(&exc);
                store.finished(
                    row.task_id.clone(),
                    Status::Failed,
                    None,
                    error,
                    epoch_now(),
                );
                done.failed.push(row.task_id);
            }
        }
    }
    Ok(done)
}

/// The stored task, built again through admission under its stored id; or
/// why it cannot be.
fn rebuild(
    py: Python<'_>,
    rt: &Runtime,
    shared: &Arc<Shared>,
    row: &Row,
) -> std::result::Result<Prepared, String> {
    if let Some(reason) = &row.not_restartable {
        return Err(reason.clone());
    }
    let (prefix, seq) =
        parse_id(&row.task_id).ok_or_else(|| format!("{:?} is not a task id", row.task_id))?;
    let text = |e: PyErr| e.value(py).to_string();
    let func = rt.resolve.bind(py).call1((&row.name,)).map_err(text)?;
    let loads =
        |json: &Option<String>, what: &str| -> std::result::Result<Bound<'_, PyAny>, String> {
            let json = json
                .as_deref()
                .ok_or_else(|| format!("its {what} were not stored"))?;
            rt.json_loads.bind(py).call1((json,)).map_err(text)
        };
    let args = loads(&row.args, "arguments")?;
    let args = PyTuple::new(
        py,
        args.try_iter()
            .map_err(text)?
            .collect::<PyResult<Vec<_>>>()
            .map_err(text)?,
    )
    .map_err(text)?;
    let kwargs = loads(&row.kwargs, "keyword arguments")?;
    let kwargs = kwargs
        .cast::<PyDict>()
        .map_err(|_| "its keyword arguments are not a JSON object".to_string())?;
    let priority = usize::try_from(row.priority)
        .ok()
        .and_then(|lane| rt.priorities.get(lane))
        .ok_or_else(|| format!("its priority {} is not a lane", row.priority))?
        .bind(py);
    let delay_ms = PyFloat::new(py, ((row.due_at - epoch_now()) * 1000.0).max(0.0));
    let max_retries = PyInt::new(py, row.max_retries);
    let timeout_ms = PyFloat::new(py, row.timeout_ms);
    let mut p = prepare(
        py,
        shared,
        &func,
        &args,
        Some(kwargs),
        CallOptions {
            priority: Some(priority),
            delay_ms: Some(delay_ms.as_any()),
            max_retries: Some(max_retries.as_any()),
            timeout_ms: Some(timeout_ms.as_any()),
        },
    )
    .map_err(text)?;
    p.task.prefix = prefix;
    p.task.seq = seq;
    Ok(p)
}

/// One stored row by id, or None (also without storage).
pub fn stored<'py>(
    py: Python<'py>,
    shared: &Shared,
    task_id: &str,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let Some(store) = &shared.store else {
        return Ok(None);
    };
    read(py, shared, store, |s| s.get(task_id))?
        .map(|r| row_dict(py, &r))
        .transpose()
}

/// The newest stored rows, optionally only those with `status` (its text).
pub fn stored_list<'py>(
    py: Python<'py>,
    shared: &Shared,
    status: Option<&str>,
    limit: usize,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let Some(store) = &shared.store else {
        return Ok(Vec::new());
    };
    let status = status.map(parse_status).transpose()?;
    read(py, shared, store, |s| s.list(status, limit))?
        .iter()
        .map(|r| row_dict(py, r))
        .collect()
}

/// Reads from the store without the GIL, once everything handed over so far
/// is committed.
fn read<R: Send>(
    py: Python<'_>,
    shared: &Shared,
    store: &Arc<dyn Records>,
    f: impl FnOnce(&dyn Records) -> std::result::Result<R, StoreError> + Send,
) -> Result<R> {
    py.detach(|| {
        store.flush(shared.flush_timeout);
        f(store.as_ref())
    })
    .map_err(|e| Error::Storage(e.0))
}

fn parse_status(text: &str) -> Result<Status> {
    Status::parse(text)
        .ok_or_else(|| Error::BadValue("status", format!("is not a task status: {text:?}")))
}

fn row_dict<'py>(py: Python<'py>, r: &Row) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("task_id", &r.task_id)?;
    d.set_item("name", &r.name)?;
    d.set_item("status", &r.status)?;
    d.set_item("priority", r.priority)?;
    d.set_item("attempts", r.attempts)?;
    d.set_item("max_retries", r.max_retries)?;
    d.set_item("timeout_ms", r.timeout_ms)?;
    d.set_item("due_at", r.due_at)?;
    d.set_item("progress", r.progress)?;
    d.set_item("current_step", &r.current_step)?;
    d.set_item("args", &r.args)?;
    d.set_item("kwargs", &r.kwargs)?;
    d.set_item("not_restartable", &r.not_restartable)?;
    d.set_item("result", &r.result)?;
    d.set_item("error", &r.error)?;
    d.set_item("created_at", r.created_at)?;
    d.set_item("started_at", r.started_at)?;
    d.set_item("finished_at", r.finished_at)?;
    Ok(d)
}

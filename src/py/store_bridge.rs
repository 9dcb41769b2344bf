//! The engine's side of its shared store, for Python: stored rows by id or
//! status, the live call of a task claimed from another process, and
//! recovery, which takes back the leases of processes that are gone.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::admission::TaskDefaults;
use super::runtime::Runtime;
use super::shared::Shared;
use super::task::{Call, Status};
use crate::errors::{Error, Result};
use crate::store::{Reaped, Row, SharedStore, StoreError};

/// Puts back in the queue the tasks whose lease expired, and those held by
/// processes of this host that have exited (a restart need not wait out
/// their lease); live leases are never touched. At-least-once: each runs
/// again with its attempt counted, or fails once its retries are spent.
pub fn recover(py: Python<'_>, shared: &Arc<Shared>) -> PyResult<Reaped> {
    let Some(store) = &shared.store else {
        return Ok(Reaped::default());
    };
    Ok(read(py, shared, store, |s| s.reap(true))?)
}

/// The live call of a task another process queued: its function found
/// again by import name, its arguments from JSON; or why it cannot run.
pub fn resolve_call(py: Python<'_>, rt: &Runtime, row: &Row) -> std::result::Result<Call, String> {
    if let Some(reason) = &row.not_restartable {
        return Err(reason.clone());
    }
    let text = |e: PyErr| e.value(py).to_string();
    let mut func = rt.resolve.bind(py).call1((&row.name,)).map_err(text)?;
    let mut no_retry = None;
    if func.get_type().is(rt.task_function_type.bind(py)) {
        let (inner, declared): (Bound<'_, PyAny>, Bound<'_, TaskDefaults>) = func
            .getattr("_catzilla_task")
            .and_then(|t| t.extract())
            .map_err(text)?;
        no_retry = declared.get().no_retry(py);
        func = inner;
    }
    if !func.is_callable() {
        return Err(format!("{} is not callable", row.name));
    }
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
    Ok(Call {
        func: func.unbind(),
        args: args.unbind(),
        kwargs: (!kwargs.is_empty()).then(|| kwargs.clone().unbind()),
        no_retry,
    })
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

/// How many tasks wait in each of `queues` in the store; None without one.
pub fn waiting(py: Python<'_>, shared: &Shared, queues: Vec<String>) -> PyResult<Option<Vec<u64>>> {
    let Some(store) = &shared.store else {
        return Ok(None);
    };
    Ok(Some(read(py, shared, store, |s| s.waiting(&queues))?))
}

/// Reads from the store without the GIL, once everything handed over so far
/// is committed.
fn read<R: Send>(
    py: Python<'_>,
    shared: &Shared,
    store: &Arc<dyn SharedStore>,
    f: impl FnOnce(&dyn SharedStore) -> std::result::Result<R, StoreError> + Send,
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
    d.set_item("queue", &r.queue)?;
    Ok(d)
}

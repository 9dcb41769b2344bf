//! Admission: the checks and defaults every new task goes through, and the
//! record a durable task leaves in the store. `add_task`, periodic runs and
//! recovery all build their tasks here.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::args;
use super::runtime::runtime;
use super::shared::Shared;
use super::task::{Call, Job, NewTask, Status};
use crate::errors::{describe, Error};
use crate::store::Row;

/// The defaults a `@task(...)` declaration gives its function, checked once,
/// when it is declared; `add_task` then uses them without checking again.
#[pyclass(frozen, module = "catzilla._catzilla")]
pub struct TaskDefaults {
    lane: Option<usize>,
    delay: Option<Duration>,
    max_retries: Option<u32>,
    /// `Some(None)`: no timeout.
    timeout: Option<Option<Duration>>,
    /// Exception classes that fail the task at once.
    no_retry: Option<Py<PyAny>>,
    /// The named queue its tasks go to.
    queue: Option<String>,
}

#[pymethods]
impl TaskDefaults {
    #[new]
    #[pyo3(signature = (*, priority=None, delay_ms=None, max_retries=None, timeout_ms=None, no_retry_for=None, queue=None))]
    fn new(
        py: Python<'_>,
        priority: Option<&Bound<'_, PyAny>>,
        delay_ms: Option<&Bound<'_, PyAny>>,
        max_retries: Option<&Bound<'_, PyAny>>,
        timeout_ms: Option<&Bound<'_, PyAny>>,
        no_retry_for: Option<Bound<'_, PyAny>>,
        queue: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let rt = runtime(py)?;
        Ok(Self {
            lane: priority.map(|p| rt.lane_of(p)).transpose()?,
            delay: delay_ms.map(|v| args::millis("delay_ms", v)).transpose()?,
            max_retries: max_retries
                .map(|v| args::count("max_retries", v))
                .transpose()?,
            timeout: timeout_ms
                .map(|v| args::millis("timeout_ms", v).map(timeout_of))
                .transpose()?,
            no_retry: no_retry_for.map(Bound::unbind),
            queue: queue.map(queue_name).transpose()?,
        })
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.no_retry)
    }
}

/// A queue name: 1 to 200 characters, no control characters or commas.
pub fn queue_name(value: &Bound<'_, PyAny>) -> PyResult<String> {
    let name: String = value
        .extract()
        .map_err(|_| Error::WrongType("queue", "a str", describe(value)))?;
    if name.is_empty()
        || name.chars().count() > 200
        || name.chars().any(|c| c.is_control() || c == ',')
    {
        return Err(Error::BadValue(
            "queue",
            format!(
                "must be 1 to 200 characters without commas or control characters, got {name:?}"
            ),
        )
        .into());
    }
    Ok(name)
}

impl TaskDefaults {
    /// The exception classes that fail the task at once, if declared.
    pub fn no_retry(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.no_retry.as_ref().map(|t| t.clone_ref(py))
    }
}

pub fn timeout_of(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Why `value` is not JSON, naming the argument `what`; None when it is.
fn not_json(
    py: Python<'_>,
    rt: &super::runtime::Runtime,
    what: String,
    value: &Bound<'_, PyAny>,
) -> Option<String> {
    let err = rt.json_dumps.bind(py).call1((value,)).err()?;
    Some(format!(
        "{what} ({}) is not JSON: {}",
        describe(value),
        err.value(py)
    ))
}

/// The store row of a new task: its import name and its arguments as JSON.
/// A shared store carries data, not live objects: a lambda, a local
/// function or arguments that are not JSON are refused with a `TypeError`
/// naming the argument.
fn durable_row(
    py: Python<'_>,
    rt: &super::runtime::Runtime,
    task: &NewTask,
    delay: Duration,
    queue: String,
) -> PyResult<Row> {
    let func = task.call.func.bind(py);
    let name = super::task::import_name(func);
    let refuse = |why: String| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "a task on a shared store must be importable by name with JSON arguments: {why}"
        ))
    };
    if name.contains("<lambda>") || name.contains("<locals>") || !name.contains('.') {
        return Err(refuse(format!(
            "func {name} is a lambda, a local function or has no module, which another process cannot import"
        )));
    }
    let dumps = rt.json_dumps.bind(py);
    let args = task.call.args.bind(py);
    let args_text = match dumps.call1((args,)) {
        Ok(text) => text.extract::<String>()?,
        Err(err) => {
            let why = args
                .iter()
                .enumerate()
                .find_map(|(i, a)| not_json(py, rt, format!("argument args[{i}]"), &a))
                .unwrap_or_else(|| format!("the arguments are not JSON: {}", err.value(py)));
            return Err(refuse(why));
        }
    };
    let kwargs_text = match &task.call.kwargs {
        None => "{}".to_string(),
        Some(k) => match dumps.call1((k.bind(py),)) {
            Ok(text) => text.extract::<String>()?,
            Err(err) => {
                let why = k
                    .bind(py)
                    .iter()
                    .find_map(|(key, v)| not_json(py, rt, format!("keyword argument {key}"), &v))
                    .unwrap_or_else(|| {
                        format!("the keyword arguments are not JSON: {}", err.value(py))
                    });
                return Err(refuse(why));
            }
        },
    };
    let now = super::task::epoch_now();
    Ok(Row {
        task_id: super::task::format_id(task.prefix, task.seq),
        name,
        status: if delay.is_zero() {
            Status::Pending
        } else {
            Status::Scheduled
        }
        .as_str()
        .into(),
        priority: task.lane as i64,
        attempts: 0,
        max_retries: i64::from(task.max_retries),
        timeout_ms: task.timeout.map_or(0.0, |t| t.as_secs_f64() * 1000.0),
        due_at: now + delay.as_secs_f64(),
        progress: 0.0,
        args: Some(args_text),
        kwargs: Some(kwargs_text),
        created_at: now,
        queue,
        ..Default::default()
    })
}

/// Per-call options of `add_task`; None takes the task's or engine's default.
pub struct CallOptions<'a, 'py> {
    pub priority: Option<&'a Bound<'py, PyAny>>,
    pub delay_ms: Option<&'a Bound<'py, PyAny>>,
    pub max_retries: Option<&'a Bound<'py, PyAny>>,
    pub timeout_ms: Option<&'a Bound<'py, PyAny>>,
    pub queue: Option<&'a Bound<'py, PyAny>>,
}

/// A task ready to submit: made under the GIL, submitted without it.
pub struct Prepared {
    pub task: NewTask,
    pub delay: Duration,
    pub row: Option<Row>,
}

/// Checks and builds a task with `add_task`'s rules (defaults, `@task`
/// options, the durable row); the engine's `add_task` and each periodic run
/// come through here.
pub fn prepare(
    py: Python<'_>,
    shared: &Arc<Shared>,
    func: &Bound<'_, PyAny>,
    args: &Bound<'_, PyTuple>,
    kwargs: Option<&Bound<'_, PyDict>>,
    options: CallOptions<'_, '_>,
) -> PyResult<Prepared> {
    let CallOptions {
        priority,
        delay_ms,
        max_retries,
        timeout_ms,
        queue,
    } = options;
    let rt = runtime(py)?;
    let d = &shared.defaults;
    let (mut lane, mut delay, mut retries, mut timeout) =
        (d.lane, d.delay, d.max_retries, d.timeout);
    let mut no_retry = None;
    let mut queue_name_declared = None;
    let mut func = func.clone();
    if func.get_type().is(rt.task_function_type.bind(py)) {
        let (inner, declared): (Bound<'_, PyAny>, Bound<'_, TaskDefaults>) =
            func.getattr("_catzilla_task")?.extract()?;
        let d = declared.get();
        lane = d.lane.unwrap_or(lane);
        delay = d.delay.unwrap_or(delay);
        retries = d.max_retries.unwrap_or(retries);
        timeout = d.timeout.unwrap_or(timeout);
        no_retry = d.no_retry.as_ref().map(|t| t.clone_ref(py));
        queue_name_declared = d.queue.clone();
        func = inner;
    }
    if !func.is_callable() {
        return Err(Error::WrongType("func", "callable", describe(&func)).into());
    }
    if let Some(p) = priority {
        lane = rt.lane_of(p)?;
    }
    if let Some(v) = delay_ms {
        delay = args::millis("delay_ms", v)?;
    }
    if let Some(v) = max_retries {
        retries = args::count("max_retries", v)?;
    }
    if let Some(v) = timeout_ms {
        timeout = timeout_of(args::millis("timeout_ms", v)?);
    }
    let queue = match queue {
        Some(q) => Some(queue_name(q)?),
        None => queue_name_declared,
    };
    let call = Call {
        func: func.unbind(),
        args: args.clone().unbind(),
        kwargs: kwargs.filter(|k| !k.is_empty()).map(|k| k.clone().unbind()),
        no_retry,
    };
    let options = (lane, retries, timeout);
    build(py, shared, call, options, delay, queue)
}

/// A failed task's call, queued again as a new task with the same
/// priority, retries, timeout and queue.
pub fn prepare_retry(py: Python<'_>, shared: &Arc<Shared>, job: &Job) -> PyResult<Prepared> {
    let Some((func, args, kwargs, no_retry)) = job.call_parts(py) else {
        return Err(Error::Usage(format!(
            "task {} cannot be retried here: its call is not kept in this process",
            job.id()
        ))
        .into());
    };
    let call = Call {
        func,
        args,
        kwargs,
        no_retry,
    };
    let queue = job.series.get().map(|s| s.queue.to_string());
    let options = (job.lane, job.max_retries, job.timeout);
    build(py, shared, call, options, Duration::ZERO, queue)
}

fn build(
    py: Python<'_>,
    shared: &Arc<Shared>,
    call: Call,
    (lane, max_retries, timeout): (usize, u32, Option<Duration>),
    delay: Duration,
    queue: Option<String>,
) -> PyResult<Prepared> {
    let rt = runtime(py)?;
    let kw_len = call.kwargs.as_ref().map_or(0, |k| k.bind(py).len()) as u64;
    let args_len = call.args.bind(py).len() as u64;
    let footprint = 200 + 8 * args_len + if kw_len > 0 { 100 + 48 * kw_len } else { 0 };
    // NOTE: the function is borrowed, not cloned: workers are calling it, and
    // a reference count bumped here too is a cache line passed between cores.
    let series = shared.observer.is_on().then(|| {
        let q = queue.as_deref().filter(|_| shared.store.is_some());
        shared.observer.series_of(call.func.bind(py), lane, q)
    });
    let task = NewTask {
        seq: shared.next_seq.fetch_add(1, SeqCst),
        prefix: shared.prefix,
        lane,
        max_retries,
        timeout,
        delayed: !delay.is_zero(),
        footprint,
        call,
        callbacks: Vec::new(),
        series,
    };
    let row = match &shared.store {
        Some(_) => Some(durable_row(
            py,
            rt,
            &task,
            delay,
            queue.unwrap_or_else(|| crate::store::DEFAULT_QUEUE.to_string()),
        )?),
        // In memory every queue is this process's own: the name is checked, then unused.
        None => None,
    };
    Ok(Prepared { task, delay, row })
}

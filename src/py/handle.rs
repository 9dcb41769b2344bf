//! `TaskResult`, the handle Python code holds on a task, and the task that
//! runs on the current thread.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyList;

use super::fork::Born;
use super::runtime::runtime;
use super::task::{anchor_ns, epoch_of_ns, Callback, Job, Outcome, Status};
use crate::errors::{describe, Error};
use crate::interpreter::ParkOnForcedUnwind;

/// What a handle asks of the engine that owns its task. Handles hold it
/// weakly: a handle never keeps an engine alive.
pub trait Owner: Send + Sync {
    fn born(&self) -> Born;
    /// Cancels the task if it has not started; returns whether it did.
    fn cancel(&self, py: Python<'_>, job: &Job) -> PyResult<bool>;
    /// Records reported progress (in the store, with storage).
    fn progress(&self, job: &Job, percent: f64, step: Option<String>);
}

thread_local! {
    static CURRENT: std::cell::RefCell<Option<(Job, Weak<dyn Owner>)>> = const { std::cell::RefCell::new(None) };
}

/// Marks `job` as the task running on this thread until the guard drops.
pub struct CurrentTask;

impl CurrentTask {
    pub fn enter(job: &Job, owner: Weak<dyn Owner>) -> Self {
        CURRENT.with(|c| *c.borrow_mut() = Some((job.clone(), owner)));
        CurrentTask
    }
}

impl Drop for CurrentTask {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

/// The handle of the sync task running on this thread, if any.
#[pyfunction]
pub fn _current_task() -> Option<TaskResult> {
    CURRENT.with(|c| {
        c.borrow()
            .as_ref()
            .map(|(job, owner)| TaskResult::new(job.clone(), owner.clone()))
    })
}

#[pyclass(frozen, weakref, module = "catzilla._catzilla")]
pub struct TaskResult {
    pub state: Job,
    owner: Weak<dyn Owner>,
    born: Born,
}

impl TaskResult {
    /// The handle of a task of a live engine.
    pub fn of<O: Owner + 'static>(state: Job, owner: &Arc<O>) -> Self {
        let weak: Weak<O> = Arc::downgrade(owner);
        Self {
            state,
            owner: weak,
            born: owner.born(),
        }
    }

    /// A handle whose engine may be gone (`Weak::<E>::new()` for none).
    pub fn new(state: Job, owner: Weak<dyn Owner>) -> Self {
        let born = owner.upgrade().map_or_else(Born::here, |o| o.born());
        Self { state, owner, born }
    }
}

/// Runs each callback: a done-callback with the task handle, a value
/// callback with the task's value when it succeeded (not at all otherwise).
/// One that raises is logged.
pub fn run_callbacks(py: Python<'_>, handle: &Bound<'_, TaskResult>, callbacks: Vec<Callback>) {
    let guard = ParkOnForcedUnwind;
    let state = &handle.get().state;
    let value = if state.status() == Status::Completed
        && callbacks.iter().any(|c| matches!(c, Callback::Value(_)))
    {
        state.outcome_object(py).map(|(_, v)| v)
    } else {
        None
    };
    for cb in callbacks {
        let (cb, called) = match cb {
            Callback::Done(cb) => {
                let called = cb.bind(py).call1((handle,));
                (cb, called)
            }
            Callback::Value(cb) => match &value {
                Some(v) => {
                    let called = cb.bind(py).call1((v,));
                    (cb, called)
                }
                None => continue,
            },
        };
        if let Err(err) = called {
            if let Ok(rt) = runtime(py) {
                let exc = err.into_value(py).into_bound(py).into_any();
                rt.log(
                    py,
                    "error",
                    format!(
                        "callback {} of task {} raised",
                        describe(cb.bind(py)),
                        state.id()
                    ),
                    Some(&exc),
                );
            }
        }
    }
    guard.disarm();
}

impl TaskResult {
    /// Adds a callback, or runs it now when the task is already final.
    fn attach(slf: &Bound<'_, Self>, func: &Bound<'_, PyAny>, done: bool) -> PyResult<()> {
        slf.get().born.check()?;
        if !func.is_callable() {
            return Err(Error::WrongType("callback", "callable", describe(func)).into());
        }
        let wrap = |f: Py<PyAny>| {
            if done {
                Callback::Done(f)
            } else {
                Callback::Value(f)
            }
        };
        let state = &slf.get().state;
        {
            let mut inner = state.inner.lock();
            if !state.status().is_final() {
                inner.callbacks.push(wrap(func.clone().unbind()));
                return Ok(());
            }
        }
        run_callbacks(slf.py(), slf, vec![wrap(func.clone().unbind())]);
        Ok(())
    }
}

#[pymethods]
impl TaskResult {
    /// `TaskResult(task_id, engine)`: the handle of a task `engine` knows
    /// (as `engine.get_result(task_id)`); `ValueError` for an unknown id.
    #[new]
    fn py_new(task_id: &Bound<'_, PyAny>, engine: &Bound<'_, PyAny>) -> PyResult<Self> {
        let found = engine.call_method1("get_result", (task_id,))?;
        match found.cast::<TaskResult>() {
            Ok(h) => {
                let h = h.get();
                Ok(Self {
                    state: h.state.clone(),
                    owner: h.owner.clone(),
                    born: h.born,
                })
            }
            Err(_) => Err(pyo3::exceptions::PyValueError::new_err(format!(
                "task_id: the engine has no task {}",
                describe(task_id)
            ))),
        }
    }

    /// `TaskResult[T]` in annotations (catzilla 0.2's was generic).
    #[classmethod]
    fn __class_getitem__<'py>(
        cls: &Bound<'py, pyo3::types::PyType>,
        item: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        cls.py()
            .import("types")?
            .getattr("GenericAlias")?
            .call1((cls, item))
    }

    /// The task's unique id.
    #[getter]
    fn task_id(&self) -> String {
        self.state.id()
    }

    /// The task's current `TaskStatus`.
    #[getter]
    fn status(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let rt = runtime(py)?;
        Ok(rt.statuses[self.state.status() as usize].clone_ref(py))
    }

    /// The task's `TaskPriority`.
    #[getter]
    fn priority(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let rt = runtime(py)?;
        Ok(rt.priorities[self.state.lane].clone_ref(py))
    }

    /// Attempts started so far.
    #[getter]
    fn attempts(&self) -> u32 {
        self.state.attempts()
    }

    /// The task function's import name, `module.qualname`.
    #[getter]
    fn name(&self, py: Python<'_>) -> PyResult<String> {
        self.born.check()?;
        let func = {
            let inner = self.state.inner.lock();
            inner
                .call
                .as_ref()
                .map(|c| c.func.clone_ref(py))
                .or_else(|| inner.func.as_ref().map(|f| f.clone_ref(py)))
        };
        Ok(func
            .map(|f| super::task::import_name(f.bind(py)))
            .unwrap_or_default())
    }

    /// Progress in percent (0-100), as the task last reported it; 100 once completed.
    #[getter]
    fn progress(&self) -> PyResult<f64> {
        self.born.check()?;
        Ok(self.state.inner.lock().progress)
    }

    /// The step the task last reported, if any.
    #[getter]
    fn current_step(&self) -> PyResult<Option<String>> {
        self.born.check()?;
        Ok(self.state.inner.lock().step.as_deref().map(str::to_string))
    }

    /// When the task was added, in seconds since the Unix epoch.
    #[getter]
    fn created_at(&self) -> f64 {
        epoch_of_ns(anchor_ns(self.state.created))
    }

    /// When its first attempt started, in seconds since the Unix epoch.
    #[getter]
    fn started_at(&self) -> Option<f64> {
        let ns = self.state.first_start_ns.load(SeqCst);
        (ns != 0).then(|| epoch_of_ns(ns))
    }

    /// When it reached a final state, in seconds since the Unix epoch.
    #[getter]
    fn finished_at(&self) -> Option<f64> {
        self.state.finished_ns().map(epoch_of_ns)
    }

    /// Reports progress: `percent` from 0 to 100 and an optional step name.
    #[pyo3(signature = (percent, step=None))]
    fn set_progress(
        &self,
        percent: &Bound<'_, PyAny>,
        step: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.born.check()?;
        let value = super::args::number("percent", percent, "a number from 0 to 100")?;
        let step = match step.filter(|s| !s.is_none()) {
            Some(s) => Some(super::args::text("step", s)?),
            None => None,
        };
        if self.state.status().is_final() {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
                "task {} has finished; its progress can no longer change",
                self.state.id()
            )));
        }
        if !(0.0..=100.0).contains(&value) {
            return Err(Error::BadValue(
                "percent",
                format!("must be between 0 and 100, got {value}"),
            )
            .into());
        }
        {
            let mut inner = self.state.inner.lock();
            inner.progress = value;
            if let Some(text) = &step {
                inner.step = Some(text.as_str().into());
            }
        }
        if let Some(owner) = self.owner.upgrade() {
            owner.progress(&self.state, value, step);
        }
        Ok(())
    }

    /// The exception of every failed attempt, oldest first.
    #[getter]
    fn errors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.born.check()?;
        let errors: Vec<Py<PyAny>> = {
            let inner = self.state.inner.lock();
            inner.errors.iter().map(|e| e.clone_ref(py)).collect()
        };
        PyList::new(py, errors)
    }

    /// True once the task completed, failed or was cancelled.
    fn is_ready(&self) -> bool {
        self.state.status().is_final()
    }

    /// Blocks until the task finishes and returns its value, or raises its
    /// final exception. Raises `TimeoutError` after `timeout` seconds.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        self.born.check()?;
        let limit = super::args::seconds_or_none("timeout", timeout)?;
        let deadline = limit.and_then(|d| Instant::now().checked_add(d));
        loop {
            if self.state.status().is_final() {
                return self.state.outcome(py);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::Timeout(format!(
                    "task {} did not finish within {} s",
                    self.state.id(),
                    limit.unwrap_or_default().as_secs_f64()
                ))
                .into());
            }
            // NOTE: waits in slices so Ctrl+C (a pending signal) is seen within 100 ms.
            let slice = now + Duration::from_millis(100);
            let until = deadline.map_or(slice, |d| d.min(slice));
            let state = &self.state;
            py.detach(|| {
                let mut inner = state.inner.lock();
                if !state.status().is_final() {
                    state.done.wait_until(&mut inner, until);
                }
            });
            py.check_signals()?;
        }
    }

    /// The value of a completed task; raises the final exception of a failed
    /// or cancelled one, and `TaskNotReadyError` while it has not finished.
    fn result(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.born.check()?;
        self.state.outcome(py)
    }

    /// The final exception of a failed or cancelled task, else None.
    fn exception(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.born.check()?;
        let inner = self.state.inner.lock();
        Ok(match &inner.outcome {
            Outcome::Error(e) | Outcome::Cancelled(e) => Some(e.clone_ref(py)),
            _ => None,
        })
    }

    /// Cancels the task if it has not started; returns whether it did.
    fn cancel(&self, py: Python<'_>) -> PyResult<bool> {
        self.born.check()?;
        match self.owner.upgrade() {
            Some(owner) => owner.cancel(py, &self.state),
            None => Ok(false),
        }
    }

    /// Calls `fn(value)` once the task succeeds (at once if it has); never
    /// for a task that fails or is cancelled.
    fn add_callback(slf: &Bound<'_, Self>, func: &Bound<'_, PyAny>) -> PyResult<()> {
        Self::attach(slf, func, false)
    }

    /// Calls `fn(task_result)` once the task is final, whatever the outcome
    /// (at once if it is).
    fn add_done_callback(slf: &Bound<'_, Self>, func: &Bound<'_, PyAny>) -> PyResult<()> {
        Self::attach(slf, func, true)
    }

    /// The task's timings and attempts as a `TaskStats` (catzilla 0.2's shape).
    fn get_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.born.check()?;
        let rt = runtime(py)?;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("task_id", self.task_id())?;
        kwargs.set_item("status", self.status(py)?)?;
        kwargs.set_item("created_at", self.created_at())?;
        let started = self.started_at();
        let finished = self.finished_at();
        kwargs.set_item("started_at", started)?;
        kwargs.set_item("completed_at", finished)?;
        let ms = match (started, finished) {
            (Some(s), Some(f)) => Some(((f - s) * 1000.0).max(0.0)),
            _ => None,
        };
        kwargs.set_item("execution_time_ms", ms)?;
        kwargs.set_item("memory_usage_mb", py.None())?;
        kwargs.set_item("retries", self.attempts().saturating_sub(1))?;
        kwargs.set_item("worker_id", py.None())?;
        rt.task_stats.bind(py).call((), Some(&kwargs))
    }

    fn __await__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.get().born.check()?;
        let rt = runtime(slf.py())?;
        rt.await_result
            .bind(slf.py())
            .call1((slf,))?
            .call_method0("__await__")
    }

    fn __repr__(&self) -> String {
        format!(
            "<TaskResult {} {:?} attempts={}>",
            self.state.id(),
            self.state.status(),
            self.state.attempts()
        )
    }
}

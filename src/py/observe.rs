//! Observation: per-series counts and timings (for metrics and the
//! dashboard) and task events handed to Python hooks. Both are off until
//! asked for, and then cost the workers a few atomic counts, a lock per
//! timing and, with hooks, one channel send per event; the hooks run on a
//! `Batcher` thread of their own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::task::{epoch_now, import_name, Job};
use crate::batch::Batcher;
use crate::tasks::series::{Event, Series, SeriesTable};

/// Events waiting for the hooks' thread; beyond this they are counted and
/// the count is reported with the next batch.
const EVENT_CAPACITY: usize = 64 * 1024;

/// One event, as the hooks' dispatcher receives it.
pub struct EventRecord {
    event: Event,
    task_id: String,
    series: Arc<Series>,
    attempt: u32,
    duration: Option<Duration>,
    error: Option<Py<PyAny>>,
    at: f64,
}

impl<'py> IntoPyObject<'py> for EventRecord {
    type Target = PyTuple;
    type Output = Bound<'py, PyTuple>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        (
            self.event.name(),
            self.task_id,
            &*self.series.name,
            self.series.lane,
            &*self.series.queue,
            self.attempt,
            self.duration.map(|d| d.as_secs_f64()),
            self.error,
            self.at,
        )
            .into_pyobject(py)
    }
}

/// A function's series, cached by the identity of its `__module__` and
/// `__qualname__` strings (kept alive here, so the identity stays theirs),
/// its lane and its queue (None: the default one).
/// NOTE: hashed with foldhash, not SipHash: the key holds no input an
/// attacker chooses, and this lookup runs for every task queued.
type SeriesCache = HashMap<
    (usize, usize, usize, Option<String>),
    (Py<PyAny>, Py<PyAny>, Arc<Series>),
    foldhash::fast::RandomState,
>;

pub struct Observer {
    /// Unique among observers, for the per-thread memo of `series_of`.
    id: u64,
    on: AtomicBool,
    table: SeriesTable,
    cache: Mutex<SeriesCache>,
    events: Mutex<Option<Arc<Batcher<EventRecord>>>>,
    /// The event kinds some hook wants, one bit per `Event`; 0: no hooks.
    wanted: AtomicU8,
}

/// A plain function's `__module__` and `__qualname__` objects, read from
/// the function object itself (no attribute lookup: this runs for every
/// task), as borrowed pointers; None for other callables.
fn function_names(
    func: &Bound<'_, PyAny>,
) -> Option<(*mut pyo3::ffi::PyObject, *mut pyo3::ffi::PyObject)> {
    let ptr = func.as_ptr();
    // SAFETY: `ptr` is a live object (borrowed by `func`, GIL held); it is
    // read as a function object only once `PyFunction_Check` says it is one.
    unsafe {
        if pyo3::ffi::PyFunction_Check(ptr) == 0 {
            return None;
        }
        let f = ptr.cast::<pyo3::ffi::PyFunctionObject>();
        let (module, qualname) = ((*f).func_module, (*f).func_qualname);
        (!module.is_null() && !qualname.is_null()).then_some((module, qualname))
    }
}

impl Default for Observer {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT.fetch_add(1, Relaxed),
            on: AtomicBool::new(false),
            table: SeriesTable::default(),
            cache: Mutex::default(),
            events: Mutex::new(None),
            wanted: AtomicU8::new(0),
        }
    }
}

/// The last series this thread looked up: (observer, module, qualname,
/// lane) of a plain function in the default queue. Its pointers stay valid:
/// the observer's cache keeps those objects alive as long as it lives.
type Memo = Option<(u64, usize, usize, usize, Arc<Series>)>;

thread_local! {
    static LAST: std::cell::RefCell<Memo> = const { std::cell::RefCell::new(None) };
}

fn default_queue() -> Arc<str> {
    static DEFAULT: OnceLock<Arc<str>> = OnceLock::new();
    DEFAULT
        .get_or_init(|| Arc::from(crate::store::DEFAULT_QUEUE))
        .clone()
}

impl Observer {
    pub fn enable(&self) {
        self.on.store(true, Relaxed);
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Relaxed)
    }

    pub fn table(&self) -> &SeriesTable {
        &self.table
    }

    /// Hands events of the `kinds` named to `sink(batch, dropped)` from now
    /// on (observation turns on); None stops, after the events already queued.
    pub fn set_sink(
        &self,
        py: Python<'_>,
        sink: Option<Py<PyAny>>,
        kinds: &[String],
    ) -> std::io::Result<()> {
        let mask = Event::ALL
            .iter()
            .filter(|e| kinds.iter().any(|k| k == e.name()))
            .fold(0u8, |m, e| m | 1 << (*e as u8));
        let started = match sink {
            Some(sink) => {
                self.enable();
                Some(Arc::new(Batcher::start(
                    "catzilla-events",
                    sink,
                    EVENT_CAPACITY,
                )?))
            }
            None => None,
        };
        self.wanted
            .store(if started.is_some() { mask } else { 0 }, Relaxed);
        let old = std::mem::replace(&mut *self.events.lock(), started);
        if let Some(old) = old {
            py.detach(|| old.close(Duration::from_secs(5)));
        }
        Ok(())
    }

    /// Stops the hooks' thread after it handed over what is queued. Call
    /// detached.
    pub fn close(&self) {
        self.wanted.store(0, Relaxed);
        let events = self.events.lock().take();
        if let Some(events) = events {
            events.close(Duration::from_secs(5));
        }
    }

    /// The series of a task of `func` in `lane` and `queue`.
    pub fn series_of(
        &self,
        func: &Bound<'_, PyAny>,
        lane: usize,
        queue: Option<&str>,
    ) -> Arc<Series> {
        let make = |name: String| {
            let queue = queue.map_or_else(default_queue, Arc::from);
            self.table.get(&Arc::from(name), lane, &queue)
        };
        let names = function_names(func);
        if let Some((module, qualname)) = names {
            // The common case: a plain function, found by its names' identity
            // without touching a reference count; the same one as last time
            // on this thread without a lookup at all.
            let (m, q) = (module as usize, qualname as usize);
            if queue.is_none() {
                let memo = LAST.with_borrow(|last| match last {
                    Some((id, lm, lq, ll, s)) if (*id, *lm, *lq, *ll) == (self.id, m, q, lane) => {
                        Some(s.clone())
                    }
                    _ => None,
                });
                if let Some(series) = memo {
                    return series;
                }
            }
        }
        let (module, qualname) = match names {
            // SAFETY: non-null borrowed references from a live function
            // object, GIL held; made owned here to be kept by the cache.
            Some((m, q)) => unsafe {
                let py = func.py();
                (
                    Bound::from_borrowed_ptr(py, m),
                    Bound::from_borrowed_ptr(py, q),
                )
            },
            None => {
                let module = func.getattr(pyo3::intern!(func.py(), "__module__"));
                let qualname = func.getattr(pyo3::intern!(func.py(), "__qualname__"));
                let (Ok(module), Ok(qualname)) = (module, qualname) else {
                    return make(import_name(func));
                };
                (module, qualname)
            }
        };
        let (m, q) = (module.as_ptr() as usize, qualname.as_ptr() as usize);
        let key = (m, q, lane, queue.map(str::to_string));
        let found = self.cache.lock().get(&key).map(|(_, _, s)| s.clone());
        let series = match found {
            Some(series) => series,
            None => {
                let series = make(import_name(func));
                self.cache
                    .lock()
                    .insert(key, (module.unbind(), qualname.unbind(), series.clone()));
                series
            }
        };
        if queue.is_none() && names.is_some() {
            LAST.set(Some((self.id, m, q, lane, series.clone())));
        }
        series
    }

    /// Gives a task claimed from the store its series, by its stored name.
    pub fn attach_stored(&self, job: &Job, name: &str, queue: &str) {
        if self.is_on() && job.series.get().is_none() {
            let _ = job.series.set(
                self.table
                    .get(&Arc::from(name), job.lane, &Arc::from(queue)),
            );
        }
    }

    /// Task events not yet handed to the hooks.
    pub fn pending_events(&self) -> u64 {
        self.events.lock().as_ref().map_or(0, |e| e.pending())
    }

    /// Whether some hook wants events of this kind.
    pub fn wants(&self, event: Event) -> bool {
        self.wanted.load(Relaxed) & (1 << (event as u8)) != 0
    }

    /// Counts `event` for `job` and hands it to the hooks, if any.
    pub fn record(
        &self,
        job: &Job,
        event: Event,
        duration: Option<Duration>,
        error: Option<&Bound<'_, PyAny>>,
    ) {
        if !self.is_on() {
            return;
        }
        let Some(series) = job.series.get() else {
            return;
        };
        // NOTE: starts are not counted: every start records its wait, and the
        // wait histogram's count is the number of starts.
        if event != Event::Started {
            series.count(event);
        }
        if !self.wants(event) {
            return;
        }
        let events = self.events.lock().clone();
        if let Some(events) = events {
            events.record(EventRecord {
                event,
                task_id: job.id(),
                series: series.clone(),
                attempt: job.attempts(),
                duration,
                error: error.map(|e| e.clone().unbind()),
                at: epoch_now(),
            });
        }
    }

    /// One attempt's run time.
    pub fn ran(&self, job: &Job, took: Duration) {
        if let (true, Some(series)) = (self.is_on(), job.series.get()) {
            series.ran(took);
        }
    }

    /// The wait from being queued to the first start.
    pub fn waited(&self, job: &Job, took: Duration) {
        if let (true, Some(series)) = (self.is_on(), job.series.get()) {
            series.waited(took);
        }
    }
}

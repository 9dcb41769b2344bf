//! `Routes`: an app's routes, compiled as they are declared, so that a bad
//! template, a conflict or a duplicate is an error at the decorator, and the
//! server starts from the compiled table.

use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::router::{template_params, Router};

#[pyclass(frozen, module = "catzilla._catzilla")]
pub struct Routes {
    table: Mutex<(Router, Vec<Py<PyAny>>)>,
}

#[pymethods]
impl Routes {
    #[new]
    fn new() -> Self {
        Self {
            table: Mutex::new((Router::default(), Vec::new())),
        }
    }

    /// The parameter names of a route template, in order; `ValueError` for a
    /// template the router refuses.
    #[staticmethod]
    fn params(path: &str) -> PyResult<Vec<String>> {
        template_params(path).map_err(PyValueError::new_err)
    }

    /// Adds `method path -> handler`; `ValueError` for a duplicate or a
    /// template that conflicts with an earlier one.
    fn add(&self, method: &str, path: &str, handler: Py<PyAny>) -> PyResult<()> {
        let mut table = self.table.lock();
        let index = table.1.len();
        table
            .0
            .insert(method, path, index)
            .map_err(PyValueError::new_err)?;
        table.1.push(handler);
        Ok(())
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        if let Some(table) = self.table.try_lock() {
            for h in &table.1 {
                visit.call(h)?;
            }
        }
        Ok(())
    }
}

impl Routes {
    /// The compiled table and its handlers, for a server to serve.
    pub fn compiled(&self, py: Python<'_>) -> (Router, Vec<Py<PyAny>>) {
        let table = self.table.lock();
        (
            table.0.clone(),
            table.1.iter().map(|h| h.clone_ref(py)).collect(),
        )
    }
}

//! catzilla's native core, built as the extension module `catzilla._catzilla`.

pub mod batch;
pub mod clock;
pub mod errors;
pub mod http;
pub mod interpreter;
pub mod py;
pub mod store;
pub mod tasks;

use pyo3::prelude::*;

#[pymodule]
fn _catzilla(m: &Bound<'_, PyModule>) -> PyResult<()> {
    interpreter::AsyncOutcome::register(m)?;
    py::init_pymodule(m)?;
    http::init_pymodule(m)
}

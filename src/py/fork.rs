//! `os.fork()`: an engine's threads do not follow the process into the child.
//!
//! Python calls `_after_fork_in_child` in every child (`os.register_at_fork`),
//! which moves the process to a new generation. An engine, and each handle of
//! its tasks, remembers the generation it was made in; used in a later one it
//! raises at once instead of waiting on threads (or locks) left in the parent.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use pyo3::prelude::*;

use crate::errors::{Error, Result};

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Called by Python in the child after `os.fork()`.
#[pyfunction]
pub fn _after_fork_in_child() {
    GENERATION.fetch_add(1, Relaxed);
}

/// The process an engine was made in.
#[derive(Clone, Copy, Debug)]
pub struct Born {
    generation: u64,
    pid: u32,
}

impl Born {
    pub fn here() -> Self {
        Self {
            generation: GENERATION.load(Relaxed),
            pid: std::process::id(),
        }
    }

    /// True in a child process forked after this engine was made.
    pub fn is_elsewhere(&self) -> bool {
        GENERATION.load(Relaxed) != self.generation
    }

    pub fn check(&self) -> Result<()> {
        if self.is_elsewhere() {
            return Err(Error::Forked(self.pid));
        }
        Ok(())
    }
}

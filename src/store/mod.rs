//! Durable storage for task records, behind one interface: SQLite
//! (embedded) today. The engine hands records over and never waits for the
//! store on the task path; see docs/design.md for the contract.

use std::time::Duration;

use crate::tasks::status::Status;

pub mod sqlite;

/// A full task row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub task_id: String,
    pub name: String,
    pub status: String,
    pub priority: i64,
    pub attempts: i64,
    pub max_retries: i64,
    pub timeout_ms: f64,
    pub due_at: f64,
    pub progress: f64,
    pub current_step: Option<String>,
    pub args: Option<String>,
    pub kwargs: Option<String>,
    /// Why the task cannot run again after a restart, if it cannot.
    pub not_restartable: Option<String>,
    pub result: Option<String>,
    pub error: Option<String>,
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
}

/// Why the store failed.
#[derive(Debug)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// Told once, from the writer thread, why the store stopped taking writes.
/// It must not wait for anything: closing a store waits for its writer, and
/// may do so while holding the GIL (a drop path), so it must never attach.
pub type OnDegraded = Box<dyn Fn(&str) + Send>;

/// What the store knows of a schedule when it is registered.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleRecord {
    /// The interval anchor every process on this store shares.
    pub anchor: f64,
    /// The due time of the newest run claimed, and when it was claimed.
    pub last_due: Option<f64>,
    pub last_run_at: Option<f64>,
    pub last_task_id: Option<String>,
    /// Runs claimed so far (those still recorded).
    pub runs: i64,
}

/// What an engine asks of its durable store. Writes are handed over and
/// applied in order by the store's own thread; reads answer from what is
/// committed (call `flush` first to include everything handed over).
pub trait Records: Send + Sync {
    /// Why the store stopped taking writes, once it has.
    fn failure(&self) -> Option<String>;
    fn is_degraded(&self) -> bool;

    fn insert(&self, row: Row);
    /// Forgets a row inserted by mistake (a task the queue then refused).
    fn delete(&self, id: String);
    fn started(&self, id: String, attempts: i64, at: f64);
    fn waiting(&self, id: String, status: Status);
    fn progress(&self, id: String, progress: f64, step: Option<String>);
    fn finished(
        &self,
        id: String,
        status: Status,
        result: Option<String>,
        error: Option<String>,
        at: f64,
    );
    /// Waits until everything handed over before the call is committed, at
    /// most `timeout`; returns whether it was.
    fn flush(&self, timeout: Duration) -> bool;
    /// Flushes, then stops the store's thread; later writes are dropped.
    fn close(&self, timeout: Duration);

    fn get(&self, id: &str) -> Result<Option<Row>, StoreError>;
    fn list(&self, status: Option<Status>, limit: usize) -> Result<Vec<Row>, StoreError>;
    /// Rows in one of `statuses`, oldest first.
    fn load(&self, statuses: &[Status]) -> Result<Vec<Row>, StoreError>;

    /// Registers a schedule, or finds it from an earlier run.
    fn open_schedule(
        &self,
        name: &str,
        spec: &str,
        anchor: f64,
    ) -> Result<ScheduleRecord, StoreError>;
    /// Claims the run of `name` due at `due`: true for exactly one claimer.
    fn claim_run(&self, name: &str, due: f64, task_id: &str, at: f64) -> Result<bool, StoreError>;
}

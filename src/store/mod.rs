//! The shared store: task records and the queue they wait in, behind two
//! interfaces ([`Records`], [`SharedStore`]), in SQLite (one host, any number
//! of processes) or Redis (many hosts). The engine hands writes over and never
//! waits for them on the task path; see docs/design.md for the contract.

use std::time::Duration;

use crate::tasks::status::Status;

pub mod redis;
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
    /// The named queue it waits in.
    pub queue: String,
    /// The owner id of the process that queued it (told when it finishes).
    pub origin: Option<String>,
}

/// The queue a task waits in when none is named.
pub const DEFAULT_QUEUE: &str = "default";

/// What every process on one store agrees on, and who this one is.
#[derive(Clone, Debug)]
pub struct SharedConfig {
    /// This process's id on the store (`host:pid:random`), the owner of its leases.
    pub owner: String,
    /// How long a claim holds a task without being renewed.
    pub lease: Duration,
    /// A waiting task gains one priority lane per this much waiting.
    pub starvation: Duration,
    /// Finished tasks are kept this long.
    pub retention: Duration,
}

impl SharedConfig {
    /// The claim order of a task: due time, pushed back one starvation
    /// interval per lane below the highest, so a task that waited that long
    /// per lane is served before newer work of higher lanes.
    pub fn rank(&self, lane: i64, due_at: f64) -> f64 {
        due_at + lane as f64 * self.starvation.as_secs_f64()
    }

    /// The pid in this process's owner id and in `owner`, when both were made
    /// on this host; used to take back the leases of processes known dead.
    pub fn local_pid(&self, owner: &str) -> Option<u32> {
        let mine = self.owner.rsplitn(3, ':').nth(2)?;
        let mut parts = owner.rsplitn(3, ':');
        let _random = parts.next()?;
        let pid = parts.next()?.parse().ok()?;
        (parts.next()? == mine).then_some(pid)
    }
}

/// Whether process `pid` of this host has exited.
pub fn pid_is_gone(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    // A zombie (exited, not yet reaped: common in containers) is gone too.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state == 'Z' || state == 'X')
        })
        .unwrap_or(false)
}

/// Tasks whose owner was lost: put back in their queue, or failed (their retries spent).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reaped {
    pub requeued: Vec<String>,
    pub failed: Vec<String>,
}

/// The store as a queue shared by processes: claims with leases, hand-backs,
/// retries, lease expiry, and news of tasks another process finished.
/// Implemented by [`sqlite::SqliteStore`] and [`redis::RedisStore`].
pub trait SharedStore: Records {
    fn config(&self) -> &SharedConfig;
    /// Claims up to `max` due tasks of `queues`, lowest rank first, leased
    /// to this process; their attempt is counted. Never waits for work.
    fn claim(&self, queues: &[String], max: usize) -> Result<Vec<Row>, StoreError>;
    /// Waits up to `timeout` for new or due work in `queues` (returns early
    /// when some may be there). Never a busy loop.
    fn wait_for_work(&self, queues: &[String], timeout: Duration);
    /// Renews the leases of `held`, the tasks this process holds (a claim
    /// whose reply was lost is not among them, and lapses).
    fn renew(&self, held: &[String]) -> Result<(), StoreError>;
    /// Hands claimed tasks back to their queue, ready now, their attempt not counted.
    fn release(&self, ids: Vec<String>);
    /// A failed attempt: the task waits in its queue until `due_at`.
    fn retry(&self, id: String, due_at: f64);
    /// Puts tasks whose lease expired back in their queue (or fails them
    /// when their retries are spent); with `dead_here`, also those held by
    /// processes of this host that have exited.
    fn reap(&self, dead_here: bool) -> Result<Reaped, StoreError>;
    /// Cancels a task still waiting in its queue; false if it was taken or finished.
    fn cancel_queued(&self, id: &str, error: &str) -> Result<bool, StoreError>;
    /// Tasks this process queued that another process finished since the
    /// last call, waiting up to `timeout` for some. Each is told once.
    fn finished_elsewhere(&self, timeout: Duration) -> Result<Vec<Row>, StoreError>;
    /// Why new tasks cannot be queued now (the store stopped, or its server
    /// is unreachable), if they cannot.
    fn unavailable(&self) -> Option<String> {
        self.failure()
    }
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
pub type OnDegraded = Box<dyn Fn(&str) + Send + Sync>;

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
    fn started(&self, id: String, at: f64);
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
    /// How many tasks wait (ready or delayed) in each of `queues`.
    fn waiting(&self, queues: &[String]) -> Result<Vec<u64>, StoreError>;

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

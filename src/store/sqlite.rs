//! The shared store in SQLite (WAL): one file, any number of processes on
//! one host. Writes are handed to one thread that commits them in batches;
//! claims, lease upkeep and schedules are short `BEGIN IMMEDIATE`
//! transactions on a second connection. Waiting for work or for news is a
//! timer that looks at `PRAGMA data_version` (a few microseconds), never a
//! query loop.
//!
//! Pure Rust: callers hand over rows and updates; nothing here touches Python.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::{
    pid_is_gone, OnDegraded, Reaped, Records, Row, ScheduleRecord, SharedConfig, SharedStore,
    StoreError, DEFAULT_QUEUE,
};
use crate::tasks::status::Status;

/// Most writes one transaction takes.
const BATCH: usize = 1024;

enum Op {
    Insert(Box<Row>),
    Started {
        id: String,
        at: f64,
    },
    Progress {
        id: String,
        progress: f64,
        step: Option<String>,
    },
    Finished {
        id: String,
        status: Status,
        result: Option<String>,
        error: Option<String>,
        at: f64,
    },
    Release(Vec<String>),
    Retry {
        id: String,
        due_at: f64,
    },
    /// News up to this sequence number was told to this process.
    Told(i64),
    Flush(Sender<()>),
    Stop,
}

/// Whether the store still takes writes, and why not once it does not; it
/// knows the file opened, so any connection that fails can tell a deleted,
/// replaced or read-only file from a passing error.
struct Health {
    degraded: AtomicBool,
    reason: Mutex<Option<String>>,
    path: String,
    id: FileId,
    on_degraded: OnDegraded,
}

impl Health {
    /// Records the first failure and tells `on_degraded` once.
    fn degrade(&self, problem: String) {
        let reason = format!(
            "the task store stopped: {problem}; no task can be queued or taken from it \
             until the process restarts on a good store"
        );
        {
            let mut r = self.reason.lock();
            if r.is_some() {
                return;
            }
            *r = Some(reason.clone());
            self.degraded.store(true, Ordering::SeqCst);
        }
        (self.on_degraded)(&reason);
    }

    /// Stops the store if its file was deleted, replaced or made read-only.
    fn check_file(&self) {
        if self.degraded.load(Ordering::Relaxed) {
            return;
        }
        let path = &self.path;
        let problem = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(format!("the database file {path} was deleted"))
            }
            Err(e) => Some(format!("cannot check the database file {path}: {e}")),
            Ok(m)
                if FileId {
                    dev: m.dev(),
                    ino: m.ino(),
                } != self.id =>
            {
                Some(format!(
                    "the database file {path} was replaced by another file"
                ))
            }
            Ok(m) if m.permissions().readonly() => Some(format!(
                "the database file {path} was made read-only (mode {:o})",
                m.mode() & 0o777
            )),
            Ok(_) => None,
        };
        if let Some(problem) = problem {
            self.degrade(problem);
        }
    }
}

/// The file the writer opened, to notice it being deleted, replaced or made read-only.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// How often an idle writer looks at its file.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// How often the writer deletes finished rows past the retention, and most
/// rows one pruning transaction deletes (a backlog is cleared over several,
/// so writes of live tasks never wait behind one long delete).
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);
const PRUNE_BATCH: i64 = 2000;

/// The statuses of final rows as an SQL list; only they are ever pruned.
fn final_statuses_sql() -> String {
    Status::ALL
        .iter()
        .filter(|s| s.is_final())
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub struct SqliteStore {
    path: String,
    cfg: SharedConfig,
    /// The process whose writer thread this is: a child made by `fork()`
    /// has no such thread, and must never wait for it.
    pid: u32,
    tx: Sender<Op>,
    writer: Mutex<Option<JoinHandle<()>>>,
    health: Arc<Health>,
    /// Claims, leases and schedules: answers that cannot wait for the
    /// writer's next batch.
    control: Mutex<Option<Connection>>,
    /// Lease upkeep's own connection: a claim waiting for the write lock never delays it.
    lease: Mutex<Option<Connection>>,
    /// Looks for news of tasks finished elsewhere, and for new work.
    news: Mutex<Watch>,
    work: Mutex<Watch>,
}

/// A connection that looks at `data_version`: the last one seen, and (for
/// news) the last sequence number told.
#[derive(Default)]
struct Watch {
    conn: Option<Connection>,
    version: Option<i64>,
    told: i64,
}

/// How often a waiting process looks at `PRAGMA data_version`.
const LOOK_INTERVAL: Duration = Duration::from_millis(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS catzilla_tasks (
    task_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    max_retries INTEGER NOT NULL,
    timeout_ms REAL NOT NULL,
    due_at REAL NOT NULL,
    progress REAL NOT NULL,
    current_step TEXT,
    args TEXT,
    kwargs TEXT,
    not_restartable TEXT,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS catzilla_done (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    origin TEXT NOT NULL,
    task_id TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS catzilla_done_origin ON catzilla_done (origin, seq);
CREATE INDEX IF NOT EXISTS catzilla_tasks_status ON catzilla_tasks (status);
CREATE INDEX IF NOT EXISTS catzilla_tasks_finished ON catzilla_tasks (finished_at)
    WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS catzilla_schedules (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    anchor REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS catzilla_schedule_runs (
    name TEXT NOT NULL,
    due_ms INTEGER NOT NULL,
    task_id TEXT NOT NULL,
    claimed_at REAL NOT NULL,
    pid INTEGER NOT NULL,
    PRIMARY KEY (name, due_ms)
);
";

/// Columns added to the task table since its first version, with their
/// type: the queue (`queue`, `rank`, `waiting`: 1 while it waits) and the
/// lease (`owner`, `lease_until`), and who queued it (`origin`).
const QUEUE_COLUMNS: [(&str, &str); 6] = [
    ("queue", "TEXT NOT NULL DEFAULT 'default'"),
    ("origin", "TEXT"),
    ("owner", "TEXT"),
    ("lease_until", "REAL"),
    ("rank", "REAL"),
    ("waiting", "INTEGER"),
];

const QUEUE_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS catzilla_tasks_ready ON catzilla_tasks (queue, rank) WHERE waiting = 1;
CREATE INDEX IF NOT EXISTS catzilla_tasks_due ON catzilla_tasks (due_at) WHERE waiting = 1;
CREATE INDEX IF NOT EXISTS catzilla_tasks_leases ON catzilla_tasks (lease_until)
    WHERE owner IS NOT NULL;
";

/// Adds the queue and lease columns to a file made by an earlier version;
/// its unfinished tasks (a `running` one's process is gone) wait again.
/// NOTE: read and altered under one write lock (`BEGIN IMMEDIATE`): two
/// processes opening a new file at once would otherwise both add them.
fn add_queue_columns(conn: &Connection, starvation: Duration) -> rusqlite::Result<()> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    let known = {
        let mut stmt = tx.prepare("SELECT name FROM pragma_table_info('catzilla_tasks')")?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        names
    };
    let missing: Vec<_> = QUEUE_COLUMNS
        .iter()
        .filter(|(name, _)| !known.iter().any(|k| k == name))
        .collect();
    if !missing.is_empty() {
        for (name, kind) in &missing {
            tx.execute_batch(&format!(
                "ALTER TABLE catzilla_tasks ADD COLUMN {name} {kind}"
            ))?;
        }
        tx.execute(
            "UPDATE catzilla_tasks SET waiting = 1, status = CASE status WHEN 'running' \
             THEN 'pending' ELSE status END, rank = due_at + priority * ?1 \
             WHERE status IN ('pending', 'scheduled', 'retrying', 'running')",
            [starvation.as_secs_f64()],
        )?;
    }
    tx.commit()?;
    conn.execute_batch(QUEUE_INDEXES)
}

/// Runs kept per schedule in `catzilla_schedule_runs`; older ones are pruned.
const RUNS_KEPT: i64 = 200;

fn open_connection(path: &str, starvation: Duration) -> Result<Connection, StoreError> {
    let conn =
        Connection::open(path).map_err(|e| StoreError(format!("cannot open {path}: {e}")))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // NOTE: switching a new file to WAL takes a lock that SQLite does not wait
    // for with the busy handler: two processes opening one new file at once
    // saw "database is locked" here. Retried until the busy timeout.
    let deadline = Instant::now() + BUSY_TIMEOUT;
    let mode: String = loop {
        match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => {
                break other.map_err(|e| {
                    StoreError(format!("{path} is not a usable SQLite database: {e}"))
                })?
            }
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError(format!(
            "{path}: cannot switch to WAL mode (got {mode})"
        )));
    }
    conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA journal_size_limit=16777216;")?;
    use_incremental_vacuum(&conn);
    conn.execute_batch(SCHEMA)
        .and_then(|_| add_queue_columns(&conn, starvation))
        .map_err(|e| StoreError(format!("cannot write to {path}: {e}")))?;
    // Prove the file takes writes now (read-only or locked files fail here).
    conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")
        .map_err(|e| StoreError(format!("cannot write to {path}: {e}")))?;
    Ok(conn)
}

/// Lets the file give freed pages back (`PRAGMA incremental_vacuum`). A new
/// file takes the setting at once; a file made by an older version needs one
/// `VACUUM` to switch, tried once here. If that cannot run now (another
/// process is writing), freed pages are still reused for new rows, so the
/// file stays bounded; it only does not shrink.
fn use_incremental_vacuum(conn: &Connection) {
    const INCREMENTAL: i64 = 2;
    let mode = |c: &Connection| -> Option<i64> {
        c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).ok()
    };
    if mode(conn) == Some(INCREMENTAL) {
        return;
    }
    let _ = conn.execute_batch("PRAGMA auto_vacuum=INCREMENTAL;");
    if mode(conn) != Some(INCREMENTAL) {
        let _ = conn.execute_batch("VACUUM;");
    }
}

/// How long a statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl SqliteStore {
    /// Opens (or creates) the database and starts the writer thread.
    /// Finished rows older than the retention are deleted by that thread.
    /// `on_degraded` is told once if the store later stops taking writes.
    pub fn open(
        path: &str,
        cfg: SharedConfig,
        on_degraded: OnDegraded,
    ) -> Result<Self, StoreError> {
        let conn = open_connection(path, cfg.starvation)?;
        let id = std::fs::metadata(path)
            .map(|m| FileId {
                dev: m.dev(),
                ino: m.ino(),
            })
            .map_err(|e| StoreError(format!("cannot read {path}: {e}")))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let health = Arc::new(Health {
            degraded: AtomicBool::new(false),
            reason: Mutex::new(None),
            path: path.to_string(),
            id,
            on_degraded,
        });
        let writer = Writer {
            conn,
            health: health.clone(),
            cfg: cfg.clone(),
            next_prune: Instant::now(),
        };
        let writer = std::thread::Builder::new()
            .name("catzilla-store".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| StoreError(format!("cannot start the store thread: {e}")))?;
        Ok(Self {
            path: path.to_string(),
            cfg,
            pid: std::process::id(),
            tx,
            writer: Mutex::new(Some(writer)),
            health,
            control: Mutex::new(None),
            lease: Mutex::new(None),
            news: Mutex::new(Watch::default()),
            work: Mutex::new(Watch::default()),
        })
    }

    /// A reading connection; never creates the file, so a deleted store is an error.
    fn reader(&self) -> Result<Connection, StoreError> {
        if let Some(reason) = self.failure() {
            return Err(StoreError(reason));
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError(format!("cannot open {}: {e}", self.path)))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(conn)
    }

    fn is_forked(&self) -> bool {
        std::process::id() != self.pid
    }

    fn with_control<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R>,
    ) -> Result<R, StoreError> {
        self.with_conn(&self.control, f)
    }

    fn with_conn<R>(
        &self,
        slot: &Mutex<Option<Connection>>,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R>,
    ) -> Result<R, StoreError> {
        let mut slot = slot.lock();
        let done = match slot.as_mut() {
            Some(conn) => f(conn).map_err(StoreError::from),
            None => self.reader().and_then(|conn| Ok(f(slot.insert(conn))?)),
        };
        if done.is_err() {
            // A deleted or replaced file stops the store with that reason,
            // told once, not as one error per connection that met it.
            self.health.check_file();
        }
        done
    }
}

impl Records for SqliteStore {
    /// Why the store stopped taking writes, once it has; the engine then
    /// keeps running in memory and the store is neither written nor read.
    fn failure(&self) -> Option<String> {
        self.health.reason.lock().clone()
    }

    fn is_degraded(&self) -> bool {
        self.health.degraded.load(Ordering::Relaxed)
    }

    fn insert(&self, row: Row) {
        let _ = self.tx.send(Op::Insert(Box::new(row)));
    }

    fn started(&self, id: String, at: f64) {
        let _ = self.tx.send(Op::Started { id, at });
    }

    fn progress(&self, id: String, progress: f64, step: Option<String>) {
        let _ = self.tx.send(Op::Progress { id, progress, step });
    }

    fn finished(
        &self,
        id: String,
        status: Status,
        result: Option<String>,
        error: Option<String>,
        at: f64,
    ) {
        let _ = self.tx.send(Op::Finished {
            id,
            status,
            result,
            error,
            at,
        });
    }

    /// Blocks until everything handed over before this call is committed
    /// (or `timeout` passes). Returns whether it was.
    fn flush(&self, timeout: Duration) -> bool {
        if self.is_forked() {
            return false;
        }
        let (done, wait) = crossbeam_channel::bounded(1);
        self.tx.send(Op::Flush(done)).is_ok() && wait.recv_timeout(timeout).is_ok()
    }

    /// Flushes and stops the writer thread. In a forked child it only lets
    /// go of the handle: joining a thread of the parent could wait forever.
    fn close(&self, timeout: Duration) {
        if self.is_forked() {
            std::mem::forget(self.writer.lock().take());
            return;
        }
        self.flush(timeout);
        let _ = self.tx.send(Op::Stop);
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
    }

    /// Registers a schedule (or finds it from an earlier run). A schedule
    /// whose spec changed starts over from `anchor`.
    fn open_schedule(
        &self,
        name: &str,
        spec: &str,
        anchor: f64,
    ) -> Result<ScheduleRecord, StoreError> {
        self.with_control(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let known: Option<(String, f64)> = tx
                .query_row(
                    "SELECT spec, anchor FROM catzilla_schedules WHERE name = ?1",
                    [name],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let anchor = match known {
                Some((s, a)) if s == spec => a,
                Some(_) => {
                    tx.execute(
                        "UPDATE catzilla_schedules SET spec = ?2, anchor = ?3 WHERE name = ?1",
                        params![name, spec, anchor],
                    )?;
                    tx.execute("DELETE FROM catzilla_schedule_runs WHERE name = ?1", [name])?;
                    anchor
                }
                None => {
                    tx.execute(
                        "INSERT INTO catzilla_schedules (name, spec, anchor) VALUES (?1, ?2, ?3)",
                        params![name, spec, anchor],
                    )?;
                    anchor
                }
            };
            let last: Option<(i64, f64, String)> = tx
                .query_row(
                    "SELECT due_ms, claimed_at, task_id FROM catzilla_schedule_runs \
                     WHERE name = ?1 ORDER BY due_ms DESC LIMIT 1",
                    [name],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let runs: i64 = tx.query_row(
                "SELECT COUNT(*) FROM catzilla_schedule_runs WHERE name = ?1",
                [name],
                |r| r.get(0),
            )?;
            tx.commit()?;
            Ok(ScheduleRecord {
                anchor,
                last_due: last.as_ref().map(|l| l.0 as f64 / 1000.0),
                last_run_at: last.as_ref().map(|l| l.1),
                last_task_id: last.map(|l| l.2),
                runs,
            })
        })
    }

    /// Claims the run of schedule `name` due at `due` for this process:
    /// true for exactly one of all the processes that try.
    fn claim_run(&self, name: &str, due: f64, task_id: &str, at: f64) -> Result<bool, StoreError> {
        let due_ms = (due * 1000.0).round() as i64;
        self.with_control(|conn| {
            let claimed = conn.execute(
                "INSERT OR IGNORE INTO catzilla_schedule_runs (name, due_ms, task_id, claimed_at, pid) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, due_ms, task_id, at, std::process::id()],
            )? == 1;
            if claimed {
                conn.execute(
                    "DELETE FROM catzilla_schedule_runs WHERE name = ?1 AND due_ms < \
                     (SELECT due_ms FROM catzilla_schedule_runs WHERE name = ?1 \
                      ORDER BY due_ms DESC LIMIT 1 OFFSET ?2)",
                    params![name, RUNS_KEPT],
                )?;
            }
            Ok(claimed)
        })
    }

    /// One row by id.
    fn get(&self, id: &str) -> Result<Option<Row>, StoreError> {
        let conn = self.reader()?;
        let sql = format!("SELECT {COLUMNS} FROM catzilla_tasks WHERE task_id = ?1");
        Ok(conn.query_row(&sql, [id], read_row).optional()?)
    }

    /// The newest rows, optionally with one status.
    fn list(&self, status: Option<Status>, limit: usize) -> Result<Vec<Row>, StoreError> {
        let conn = self.reader()?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match status {
            Some(s) => {
                let sql = format!("SELECT {COLUMNS} FROM catzilla_tasks WHERE status = ?1 ORDER BY created_at DESC, task_id DESC LIMIT ?2");
                let mut stmt = conn.prepare(&sql)?;
                let found = stmt
                    .query_map(params![s.as_str(), limit], read_row)?
                    .collect::<Result<Vec<_>, _>>()?;
                found
            }
            None => {
                let sql = format!("SELECT {COLUMNS} FROM catzilla_tasks ORDER BY created_at DESC, task_id DESC LIMIT ?1");
                let mut stmt = conn.prepare(&sql)?;
                let found = stmt
                    .query_map(params![limit], read_row)?
                    .collect::<Result<Vec<_>, _>>()?;
                found
            }
        };
        Ok(rows)
    }

    fn waiting(&self, queues: &[String]) -> Result<Vec<u64>, StoreError> {
        let conn = self.reader()?;
        let mut stmt =
            conn.prepare("SELECT COUNT(*) FROM catzilla_tasks WHERE waiting = 1 AND queue = ?1")?;
        let mut out = Vec::with_capacity(queues.len());
        for q in queues {
            let n: i64 = stmt.query_row(params![q], |r| r.get(0))?;
            out.push(u64::try_from(n).unwrap_or(0));
        }
        Ok(out)
    }
}

/// `?, ?, ...` for `n` parameters.
fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

impl SqliteStore {
    /// Reads `PRAGMA data_version` on the watching connection: it changes
    /// when another connection commits. Returns whether it changed since the
    /// last look (true on the first).
    fn changed(&self, watch: &mut Watch) -> Result<bool, StoreError> {
        if watch.conn.is_none() {
            watch.conn = Some(self.reader()?);
        }
        let Some(conn) = watch.conn.as_ref() else {
            return Ok(false);
        };
        let version: i64 = conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        let changed = watch.version != Some(version);
        watch.version = Some(version);
        Ok(changed)
    }

    /// When the next task of `queues` falls due, if one waits.
    fn next_due(&self, queues: &[String]) -> Result<Option<f64>, StoreError> {
        self.with_control(|conn| {
            let sql = format!(
                "SELECT MIN(due_at) FROM catzilla_tasks WHERE waiting = 1 AND queue IN ({})",
                marks(queues.len())
            );
            conn.query_row(&sql, rusqlite::params_from_iter(queues), |r| r.get(0))
        })
    }

    /// Puts expired (or dead-owned) claims back in their queue, or fails
    /// them once their retries are spent; tells their origin of failures.
    fn reap_in(&self, conn: &mut Connection, dead_here: bool) -> rusqlite::Result<Reaped> {
        let now = crate::clock::epoch_now();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut owners: Vec<String> = Vec::new();
        if dead_here {
            let mut stmt = tx.prepare(
                "SELECT DISTINCT owner FROM catzilla_tasks WHERE owner IS NOT NULL AND owner != ?1",
            )?;
            let all = stmt
                .query_map([&self.cfg.owner], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            owners = all
                .into_iter()
                .filter(|o| self.cfg.local_pid(o).is_some_and(pid_is_gone))
                .collect();
        }
        let lost: Vec<(String, i64, i64, String, String)> = {
            let sql = format!(
                "SELECT task_id, attempts, max_retries, owner, status FROM catzilla_tasks \
                 WHERE owner IS NOT NULL AND (lease_until < ?1 OR owner IN ({}))",
                if owners.is_empty() {
                    "NULL".to_string()
                } else {
                    marks(owners.len())
                }
            );
            let mut stmt = tx.prepare(&sql)?;
            let mut values: Vec<rusqlite::types::Value> = vec![now.into()];
            values.extend(owners.iter().map(|o| o.clone().into()));
            let found = stmt
                .query_map(rusqlite::params_from_iter(values), |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            found
        };
        let mut reaped = Reaped::default();
        for (id, attempts, max_retries, owner, status) in &lost {
            // Claimed but never started (prefetched by a process that died):
            // its claim took no attempt.
            let started = status == Status::Running.as_str();
            if attempts <= max_retries || !started {
                reaped.requeued.push(id.clone());
                tx.execute(
                    "UPDATE catzilla_tasks SET status = 'pending', waiting = 1, owner = NULL, \
                     lease_until = NULL, due_at = ?2, rank = ?2 + priority * ?3, \
                     attempts = MAX(attempts - ?4, 0) WHERE task_id = ?1",
                    params![
                        id,
                        now,
                        self.cfg.starvation.as_secs_f64(),
                        i64::from(!started)
                    ],
                )?;
            } else {
                let error = serde_json::json!({
                    "type": "WorkerLostError",
                    "message": format!(
                        "task {id} was lost with its worker ({owner}) on each of its {attempts} attempt(s)"
                    ),
                    "traceback": null,
                })
                .to_string();
                tx.execute(
                    "UPDATE catzilla_tasks SET status = 'failed', waiting = NULL, owner = NULL, \
                     lease_until = NULL, error = ?2, finished_at = ?3, args = NULL, kwargs = NULL \
                     WHERE task_id = ?1",
                    params![id, error, now],
                )?;
                tell_origin(&tx, id, "")?;
                reaped.failed.push(id.clone());
            }
        }
        tx.commit()?;
        Ok(reaped)
    }
}

impl SharedStore for SqliteStore {
    fn config(&self) -> &SharedConfig {
        &self.cfg
    }

    fn claim(&self, queues: &[String], max: usize) -> Result<Vec<Row>, StoreError> {
        if max == 0 || queues.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(reason) = self.failure() {
            return Err(StoreError(reason));
        }
        let now = crate::clock::epoch_now();
        let until = now + self.cfg.lease.as_secs_f64();
        self.with_control(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let sql = format!(
                "UPDATE catzilla_tasks SET waiting = NULL, owner = ?1, \
                 lease_until = ?2, attempts = attempts + 1 \
                 WHERE task_id IN (SELECT task_id FROM catzilla_tasks WHERE waiting = 1 \
                   AND queue IN ({}) AND due_at <= ?3 ORDER BY rank LIMIT {max}) \
                 RETURNING {COLUMNS}",
                (0..queues.len())
                    .map(|i| format!("?{}", i + 4))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let mut values: Vec<rusqlite::types::Value> =
                vec![self.cfg.owner.clone().into(), until.into(), now.into()];
            values.extend(queues.iter().map(|q| q.clone().into()));
            let mut rows = {
                let mut stmt = tx.prepare_cached(&sql)?;
                let found = stmt
                    .query_map(rusqlite::params_from_iter(values), read_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                found
            };
            tx.commit()?;
            // RETURNING gives no order: claim order is rank order.
            rows.sort_by(|a, b| {
                let rank = |r: &Row| self.cfg.rank(r.priority, r.due_at);
                rank(a).total_cmp(&rank(b))
            });
            Ok(rows)
        })
    }

    /// NOTE: the version seen is kept from one wait to the next, so a commit
    /// made between an empty claim and this wait still ends it (the claim's
    /// own commit does too, which costs one more empty claim, not a miss).
    fn wait_for_work(&self, queues: &[String], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let due = self.next_due(queues).ok().flatten();
        loop {
            if !matches!(self.changed(&mut self.work.lock()), Ok(false)) {
                return;
            }
            if due.is_some_and(|due| crate::clock::epoch_now() >= due) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            std::thread::sleep(LOOK_INTERVAL.min(deadline - now));
        }
    }

    /// (Every lease of this owner: a claim here is one local transaction,
    /// so none can be held without the process knowing.)
    fn renew(&self, _held: &[String]) -> Result<(), StoreError> {
        if self.failure().is_some() || self.is_forked() {
            return Ok(());
        }
        let until = crate::clock::epoch_now() + self.cfg.lease.as_secs_f64();
        self.with_conn(&self.lease, |conn| {
            conn.execute(
                "UPDATE catzilla_tasks SET lease_until = ?2 WHERE owner = ?1",
                params![self.cfg.owner, until],
            )
            .map(|_| ())
        })
    }

    fn release(&self, ids: Vec<String>) {
        if !ids.is_empty() {
            let _ = self.tx.send(Op::Release(ids));
        }
    }

    fn retry(&self, id: String, due_at: f64) {
        let _ = self.tx.send(Op::Retry { id, due_at });
    }

    fn reap(&self, dead_here: bool) -> Result<Reaped, StoreError> {
        if self.failure().is_some() || self.is_forked() {
            return Ok(Reaped::default());
        }
        self.with_conn(&self.lease, |conn| self.reap_in(conn, dead_here))
    }

    fn cancel_queued(&self, id: &str, error: &str) -> Result<bool, StoreError> {
        self.flush(Duration::from_secs(10));
        let now = crate::clock::epoch_now();
        self.with_control(|conn| {
            conn.execute(
                "UPDATE catzilla_tasks SET status = 'cancelled', waiting = NULL, error = ?2, \
                 finished_at = ?3, args = NULL, kwargs = NULL WHERE task_id = ?1 AND waiting = 1",
                params![id, error, now],
            )
            .map(|n| n == 1)
        })
    }

    fn finished_elsewhere(&self, timeout: Duration) -> Result<Vec<Row>, StoreError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut watch = self.news.lock();
            if self.changed(&mut watch)? {
                let Some(conn) = watch.conn.as_ref() else {
                    return Ok(Vec::new());
                };
                let sql = format!(
                    "SELECT d.seq, {} FROM catzilla_done AS d JOIN catzilla_tasks AS t \
                     ON t.task_id = d.task_id WHERE d.origin = ?1 AND d.seq > ?2 \
                     ORDER BY d.seq LIMIT 5000",
                    COLUMNS
                        .split(',')
                        .map(|c| format!("t.{}", c.trim()))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let mut stmt = conn.prepare_cached(&sql)?;
                let mut last = watch.told;
                let rows = stmt
                    .query_map(params![self.cfg.owner, watch.told], |r| {
                        let seq: i64 = r.get(0)?;
                        let row = Row {
                            task_id: r.get(1)?,
                            name: r.get(2)?,
                            status: r.get(3)?,
                            priority: r.get(4)?,
                            attempts: r.get(5)?,
                            max_retries: r.get(6)?,
                            timeout_ms: r.get(7)?,
                            due_at: r.get(8)?,
                            progress: r.get(9)?,
                            current_step: r.get(10)?,
                            args: r.get(11)?,
                            kwargs: r.get(12)?,
                            not_restartable: r.get(13)?,
                            result: r.get(14)?,
                            error: r.get(15)?,
                            created_at: r.get(16)?,
                            started_at: r.get(17)?,
                            finished_at: r.get(18)?,
                            queue: r.get(19)?,
                            origin: r.get(20)?,
                        };
                        Ok((seq, row))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                drop(stmt);
                let mut out = Vec::with_capacity(rows.len());
                for (seq, row) in rows {
                    last = last.max(seq);
                    out.push(row);
                }
                if last > watch.told {
                    watch.told = last;
                    let _ = self.tx.send(Op::Told(last));
                    // More may wait beyond this batch: look again next call.
                    watch.version = None;
                }
                if !out.is_empty() {
                    return Ok(out);
                }
            }
            drop(watch);
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            std::thread::sleep(LOOK_INTERVAL.min(deadline - now));
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close(Duration::from_secs(5));
    }
}

const COLUMNS: &str =
    "task_id, name, status, priority, attempts, max_retries, timeout_ms, due_at, \
    progress, current_step, args, kwargs, not_restartable, result, error, created_at, started_at, \
    finished_at, queue, origin";

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        task_id: r.get(0)?,
        name: r.get(1)?,
        status: r.get(2)?,
        priority: r.get(3)?,
        attempts: r.get(4)?,
        max_retries: r.get(5)?,
        timeout_ms: r.get(6)?,
        due_at: r.get(7)?,
        progress: r.get(8)?,
        current_step: r.get(9)?,
        args: r.get(10)?,
        kwargs: r.get(11)?,
        not_restartable: r.get(12)?,
        result: r.get(13)?,
        error: r.get(14)?,
        created_at: r.get(15)?,
        started_at: r.get(16)?,
        finished_at: r.get(17)?,
        queue: r.get(18)?,
        origin: r.get(19)?,
    })
}

fn apply(tx: &rusqlite::Transaction<'_>, cfg: &SharedConfig, op: &Op) -> rusqlite::Result<()> {
    match op {
        Op::Insert(row) => {
            let queue = if row.queue.is_empty() {
                DEFAULT_QUEUE
            } else {
                &row.queue
            };
            let waiting = Status::parse(&row.status).is_some_and(|s| s.is_waiting());
            tx.execute(
                &format!("INSERT OR REPLACE INTO catzilla_tasks ({COLUMNS}, rank, waiting) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)"),
                params![
                    row.task_id, row.name, row.status, row.priority, row.attempts, row.max_retries,
                    row.timeout_ms, row.due_at, row.progress, row.current_step, row.args, row.kwargs,
                    row.not_restartable, row.result, row.error, row.created_at, row.started_at, row.finished_at,
                    queue, row.origin, cfg.rank(row.priority, row.due_at), waiting.then_some(1)
                ],
            )?;
        }
        Op::Started { id, at } => {
            tx.execute(
                "UPDATE catzilla_tasks SET status = 'running', started_at = COALESCE(started_at, ?2) \
                 WHERE task_id = ?1 AND owner = ?3",
                params![id, at, cfg.owner],
            )?;
        }
        Op::Release(ids) => {
            for id in ids {
                tx.execute(
                    "UPDATE catzilla_tasks SET status = 'pending', waiting = 1, owner = NULL, \
                     lease_until = NULL, attempts = MAX(attempts - 1, 0) \
                     WHERE task_id = ?1 AND owner = ?2",
                    params![id, cfg.owner],
                )?;
            }
        }
        Op::Retry { id, due_at } => {
            tx.execute(
                "UPDATE catzilla_tasks SET status = 'retrying', waiting = 1, owner = NULL, \
                 lease_until = NULL, due_at = ?2, rank = ?2 + priority * ?4 \
                 WHERE task_id = ?1 AND owner = ?3",
                params![id, due_at, cfg.owner, cfg.starvation.as_secs_f64()],
            )?;
        }
        Op::Told(seq) => {
            tx.execute(
                "DELETE FROM catzilla_done WHERE origin = ?1 AND seq <= ?2",
                params![cfg.owner, seq],
            )?;
        }
        Op::Progress { id, progress, step } => {
            tx.execute(
                "UPDATE catzilla_tasks SET progress = ?2, current_step = COALESCE(?3, current_step) WHERE task_id = ?1",
                params![id, progress, step],
            )?;
        }
        Op::Finished {
            id,
            status,
            result,
            error,
            at,
        } => {
            let changed = tx.execute(
                "UPDATE catzilla_tasks SET status = ?2, result = ?3, error = ?4, finished_at = ?5, \
                 progress = CASE WHEN ?6 THEN 100.0 ELSE progress END, args = NULL, kwargs = NULL, \
                 owner = NULL, lease_until = NULL, waiting = NULL \
                 WHERE task_id = ?1 AND owner = ?7",
                params![id, status.as_str(), result, error, at, *status == Status::Completed, cfg.owner],
            )?;
            if changed == 1 {
                tell_origin(tx, id, &cfg.owner)?;
            }
        }
        Op::Flush(_) | Op::Stop => {}
    }
    Ok(())
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Tells the process that queued task `id`, if another one did, that it finished.
fn tell_origin(tx: &rusqlite::Transaction<'_>, id: &str, me: &str) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO catzilla_done (origin, task_id, at) SELECT origin, task_id, ?3 \
         FROM catzilla_tasks WHERE task_id = ?1 AND origin IS NOT NULL AND origin != ?2",
        params![id, me, crate::clock::epoch_now()],
    )?;
    Ok(())
}

/// Deletes at most `limit` final rows that finished before `cutoff`, oldest
/// first, sparing each schedule's newest run. Returns how many went.
fn prune(conn: &Connection, cutoff: f64, limit: i64) -> rusqlite::Result<usize> {
    let finals = final_statuses_sql();
    conn.execute(
        &format!(
            "DELETE FROM catzilla_tasks WHERE rowid IN ( \
               SELECT rowid FROM catzilla_tasks \
               WHERE finished_at < ?1 AND status IN ({finals}) \
                 AND task_id NOT IN ( \
                   SELECT task_id FROM catzilla_schedule_runs AS r \
                   WHERE due_ms = (SELECT MAX(due_ms) FROM catzilla_schedule_runs \
                                   WHERE name = r.name)) \
               ORDER BY finished_at LIMIT ?2)"
        ),
        params![cutoff, limit],
    )
}

struct Writer {
    conn: Connection,
    health: Arc<Health>,
    cfg: SharedConfig,
    next_prune: Instant,
}

impl Writer {
    fn run(mut self, rx: &Receiver<Op>) {
        loop {
            let idle_for =
                HEALTH_INTERVAL.min(self.next_prune.saturating_duration_since(Instant::now()));
            let first = match rx.recv_timeout(idle_for) {
                Ok(op) => op,
                Err(RecvTimeoutError::Timeout) => {
                    self.health.check_file();
                    self.prune_if_due();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut ops = vec![first];
            while ops.len() < BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            // NOTE: one stat() per batch (about a microsecond, against tens for
            // a commit) notices a deleted or read-only file before rows go into
            // a file nobody will read again.
            self.health.check_file();
            if !self.health.degraded.load(Ordering::Relaxed) {
                // NOTE: other processes hold the write lock at times; a batch
                // that found it busy past the busy timeout is tried again
                // (for about 30 s) before the store is given up.
                let mut tries = 0;
                loop {
                    match self.write(&ops) {
                        Ok(()) => break,
                        Err(e) if is_busy(&e) && tries < 5 => {
                            tries += 1;
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        Err(e) => {
                            self.health
                                .degrade(format!("writing to {} failed: {e}", self.health.path));
                            break;
                        }
                    }
                }
            }
            let mut stop = false;
            for op in ops {
                match op {
                    Op::Flush(done) => {
                        let _ = done.send(());
                    }
                    Op::Stop => stop = true,
                    _ => {}
                }
            }
            if stop {
                return;
            }
            self.prune_if_due();
        }
    }

    /// Deletes up to `PRUNE_BATCH` finished rows older than the retention,
    /// once per `PRUNE_INTERVAL`, or again at once while a backlog is left.
    /// Never touched: rows not final, and the task of each schedule's newest
    /// run (its `last_result_id`). Freed pages go back to the file system.
    fn prune_if_due(&mut self) {
        let now = Instant::now();
        if now < self.next_prune || self.health.degraded.load(Ordering::Relaxed) {
            return;
        }
        let cutoff = crate::clock::epoch_now() - self.cfg.retention.as_secs_f64();
        let pruned = prune(&self.conn, cutoff, PRUNE_BATCH);
        // News no process read within the retention (its origin is gone).
        let _ = self.conn.execute(
            "DELETE FROM catzilla_done WHERE at < ?1",
            params![cutoff.min(crate::clock::epoch_now() - 86_400.0)],
        );
        self.next_prune = match pruned {
            Ok(n) if n as i64 >= PRUNE_BATCH => now,
            _ => now + PRUNE_INTERVAL,
        };
        // NOTE: a failed prune (the file busy past the timeout, say) is tried
        // again next interval; live rows are written as usual meanwhile.
        if matches!(pruned, Ok(n) if n > 0) {
            let _ = self.conn.execute_batch("PRAGMA incremental_vacuum;");
        }
    }

    fn write(&mut self, ops: &[Op]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        for op in ops {
            apply(&tx, &self.cfg, op)?;
        }
        tx.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, status: &str, created: f64) -> Row {
        Row {
            task_id: id.into(),
            name: "m.f".into(),
            status: status.into(),
            priority: 2,
            max_retries: 3,
            timeout_ms: 30000.0,
            args: Some("[1]".into()),
            kwargs: Some("{}".into()),
            created_at: created,
            ..Default::default()
        }
    }

    /// The rows of these tests carry made-up timestamps near the epoch: keep them.
    const KEEP: Duration = Duration::from_secs(u32::MAX as u64);

    fn quiet() -> OnDegraded {
        Box::new(|_| {})
    }

    fn temp_db(name: &str) -> String {
        let dir =
            std::env::temp_dir().join(format!("catzilla-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("tasks.db").to_string_lossy().into_owned()
    }

    /// A store as process `owner` of host `h` sees it.
    fn cfg(owner: &str, retention: Duration) -> SharedConfig {
        SharedConfig {
            owner: format!("h:{owner}:0"),
            lease: Duration::from_secs(30),
            starvation: Duration::from_secs(5),
            retention,
        }
    }

    fn queues(names: &[&str]) -> Vec<String> {
        names.iter().map(|q| q.to_string()).collect()
    }

    fn ids(rows: &[Row]) -> Vec<&str> {
        rows.iter().map(|r| r.task_id.as_str()).collect()
    }

    #[test]
    fn records_updates_and_reads_back() {
        let path = temp_db("basic");
        let store = SqliteStore::open(&path, cfg("me", KEEP), quiet()).unwrap();
        store.insert(row("a", "pending", 1.0));
        store.insert(row("b", "pending", 2.0));
        assert!(store.flush(Duration::from_secs(5)));
        assert_eq!(
            ids(&store.claim(&queues(&["default"]), 5).unwrap()),
            ["a", "b"]
        );
        store.started("a".into(), 5.0);
        store.progress("a".into(), 40.0, Some("parsing".into()));
        store.finished(
            "b".into(),
            Status::Failed,
            None,
            Some("{\"type\":\"E\"}".into()),
            6.0,
        );
        assert!(store.flush(Duration::from_secs(5)));
        let a = store.get("a").unwrap().unwrap();
        assert_eq!(
            (a.status.as_str(), a.attempts, a.progress),
            ("running", 1, 40.0)
        );
        assert_eq!(a.current_step.as_deref(), Some("parsing"));
        let b = store.get("b").unwrap().unwrap();
        assert_eq!(b.status, "failed");
        assert_eq!(b.args, None);
        let newest = store.list(None, 10).unwrap();
        assert_eq!(ids(&newest), vec!["b", "a"]);
        assert_eq!(store.list(Some(Status::Failed), 10).unwrap().len(), 1);
        store.close(Duration::from_secs(5));
        // A second store on the same file sees everything.
        let again = SqliteStore::open(&path, cfg("other", KEEP), quiet()).unwrap();
        assert_eq!(again.get("a").unwrap().unwrap().progress, 40.0);
        assert!(again.failure().is_none());
    }

    #[test]
    fn waiting_counts_queued_tasks_per_queue() {
        let path = temp_db("waiting");
        let store = SqliteStore::open(&path, cfg("me", KEEP), quiet()).unwrap();
        let mut emails = row("e", "pending", 3.0);
        emails.queue = "emails".into();
        let mut later = row("l", "scheduled", 4.0);
        later.queue = "emails".into();
        later.due_at = crate::clock::epoch_now() + 3600.0;
        for r in [
            row("a", "pending", 1.0),
            row("b", "pending", 2.0),
            emails,
            later,
        ] {
            store.insert(r);
        }
        assert!(store.flush(Duration::from_secs(5)));
        let all = queues(&["default", "emails", "none"]);
        assert_eq!(store.waiting(&all).unwrap(), [2, 2, 0]);
        assert_eq!(ids(&store.claim(&queues(&["default"]), 1).unwrap()), ["a"]);
        assert_eq!(store.waiting(&all).unwrap(), [1, 2, 0]);
        store.close(Duration::from_secs(5));
    }

    #[test]
    fn each_task_is_claimed_once_across_processes_in_rank_order() {
        let path = temp_db("claims");
        let a = SqliteStore::open(&path, cfg("1", KEEP), quiet()).unwrap();
        let b = SqliteStore::open(&path, cfg("2", KEEP), quiet()).unwrap();
        let now = crate::clock::epoch_now();
        for (id, lane, queue) in [
            ("low", 3, "default"),
            ("crit", 0, "default"),
            ("norm", 2, "default"),
            ("mail", 0, "emails"),
        ] {
            let mut r = row(id, "pending", now);
            r.priority = lane;
            r.due_at = now - 1.0;
            r.queue = queue.into();
            a.insert(r);
        }
        let mut later = row("later", "scheduled", now);
        later.due_at = now + 3600.0;
        a.insert(later);
        // Waited one starvation interval per lane of difference: served first.
        let mut starved = row("starved", "pending", now - 20.0);
        starved.priority = 3;
        starved.due_at = now - 20.0;
        a.insert(starved);
        assert!(a.flush(Duration::from_secs(5)));
        let first = b.claim(&queues(&["default"]), 2).unwrap();
        assert_eq!(ids(&first), ["starved", "crit"]);
        let rest = a.claim(&queues(&["default"]), 10).unwrap();
        assert_eq!(
            ids(&rest),
            ["norm", "low"],
            "nothing twice, nothing not due"
        );
        assert!(b.claim(&queues(&["default"]), 10).unwrap().is_empty());
        assert_eq!(ids(&a.claim(&queues(&["emails"]), 10).unwrap()), ["mail"]);
        assert_eq!(first[0].attempts, 1);
    }

    #[test]
    fn leases_expire_back_to_the_queue_and_news_reaches_the_origin() {
        let path = temp_db("leases");
        let mut short = cfg("1", KEEP);
        short.lease = Duration::from_millis(50);
        let dead = SqliteStore::open(&path, short, quiet()).unwrap();
        let origin = SqliteStore::open(&path, cfg("2", KEEP), quiet()).unwrap();
        let mut r = row("t", "pending", 1.0);
        r.due_at = 0.0;
        r.origin = Some("h:2:0".into());
        r.max_retries = 1;
        origin.insert(r);
        assert!(origin.flush(Duration::from_secs(5)));
        assert_eq!(dead.claim(&queues(&["default"]), 1).unwrap().len(), 1);
        dead.started("t".into(), 1.0);
        assert!(dead.flush(Duration::from_secs(5)));
        // A live lease is never taken.
        assert_eq!(origin.reap(false).unwrap(), Reaped::default());
        std::thread::sleep(Duration::from_millis(120));
        let reaped = origin.reap(false).unwrap();
        assert_eq!(reaped.requeued, ["t"]);
        // The second owner runs it and finishes it; the first one's late
        // acknowledgement changes nothing.
        let runner = SqliteStore::open(&path, cfg("3", KEEP), quiet()).unwrap();
        let again = runner.claim(&queues(&["default"]), 1).unwrap();
        assert_eq!(again[0].attempts, 2);
        dead.finished("t".into(), Status::Failed, None, None, 2.0);
        runner.finished("t".into(), Status::Completed, Some("7".into()), None, 3.0);
        assert!(dead.flush(Duration::from_secs(5)) && runner.flush(Duration::from_secs(5)));
        let news = origin.finished_elsewhere(Duration::from_secs(2)).unwrap();
        assert_eq!(ids(&news), ["t"]);
        assert_eq!(news[0].result.as_deref(), Some("7"));
        assert!(
            origin
                .finished_elsewhere(Duration::from_millis(30))
                .unwrap()
                .is_empty(),
            "told once"
        );
    }

    #[test]
    fn retries_wait_their_due_time_and_spent_retries_fail_on_a_lost_lease() {
        let path = temp_db("retry");
        let mut short = cfg("1", KEEP);
        short.lease = Duration::from_millis(30);
        let s = SqliteStore::open(&path, short, quiet()).unwrap();
        let mut r = row("t", "pending", 1.0);
        r.due_at = 0.0;
        r.max_retries = 0;
        s.insert(r);
        assert!(s.flush(Duration::from_secs(5)));
        assert_eq!(s.claim(&queues(&["default"]), 1).unwrap().len(), 1);
        s.retry("t".into(), crate::clock::epoch_now() + 0.2);
        assert!(s.flush(Duration::from_secs(5)));
        assert!(
            s.claim(&queues(&["default"]), 1).unwrap().is_empty(),
            "not due yet"
        );
        let waited = Instant::now();
        s.wait_for_work(&queues(&["default"]), Duration::from_secs(5));
        assert!(
            waited.elapsed() < Duration::from_secs(4),
            "woke for the due time"
        );
        let mut got = Vec::new();
        while got.is_empty() {
            got = s.claim(&queues(&["default"]), 1).unwrap();
        }
        s.started("t".into(), 2.0);
        assert!(s.flush(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(80));
        let reaped = s.reap(false).unwrap();
        assert_eq!(reaped.failed, ["t"]);
        let t = s.get("t").unwrap().unwrap();
        assert_eq!(t.status, "failed");
        assert!(t.error.unwrap().contains("WorkerLostError"));
    }

    #[test]
    fn a_lost_claim_that_never_started_takes_no_attempt() {
        let path = temp_db("prefetched");
        let mut short = cfg("1", KEEP);
        short.lease = Duration::from_millis(30);
        let s = SqliteStore::open(&path, short, quiet()).unwrap();
        let mut r = row("t", "pending", 1.0);
        r.due_at = 0.0;
        r.max_retries = 0;
        s.insert(r);
        assert!(s.flush(Duration::from_secs(5)));
        for _ in 0..3 {
            assert_eq!(s.claim(&queues(&["default"]), 1).unwrap().len(), 1);
            std::thread::sleep(Duration::from_millis(60));
            assert_eq!(s.reap(false).unwrap().requeued, ["t"]);
        }
        let t = s.get("t").unwrap().unwrap();
        assert_eq!((t.status.as_str(), t.attempts), ("pending", 0));
    }

    #[test]
    fn handed_back_tasks_wait_again_and_cancel_takes_only_waiting_ones() {
        let path = temp_db("release");
        let s = SqliteStore::open(&path, cfg("1", KEEP), quiet()).unwrap();
        for id in ["a", "b"] {
            let mut r = row(id, "pending", 1.0);
            r.due_at = 0.0;
            s.insert(r);
        }
        assert!(s.flush(Duration::from_secs(5)));
        assert_eq!(s.claim(&queues(&["default"]), 1).unwrap().len(), 1);
        assert!(!s.cancel_queued("a", "{}").unwrap(), "a is claimed");
        assert!(s.cancel_queued("b", "{}").unwrap());
        s.release(vec!["a".into()]);
        assert!(s.flush(Duration::from_secs(5)));
        let back = s.claim(&queues(&["default"]), 5).unwrap();
        assert_eq!(ids(&back), ["a"]);
        assert_eq!(back[0].attempts, 1, "a hand-back does not count an attempt");
        assert_eq!(s.get("b").unwrap().unwrap().status, "cancelled");
    }

    #[test]
    fn refuses_files_that_are_not_databases() {
        let path = temp_db("corrupt");
        std::fs::write(
            &path,
            b"this is not a database at all, just text ....................",
        )
        .unwrap();
        let err = SqliteStore::open(&path, cfg("me", KEEP), quiet())
            .err()
            .unwrap();
        assert!(
            err.0.contains("not a usable SQLite database") || err.0.contains("cannot"),
            "{err}"
        );
    }

    #[test]
    fn refuses_unwritable_locations() {
        let err = SqliteStore::open("/nonexistent-dir/sub/tasks.db", cfg("me", KEEP), quiet())
            .err()
            .unwrap();
        assert!(err.0.contains("cannot open"), "{err}");
    }

    fn telling() -> (OnDegraded, crossbeam_channel::Receiver<String>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (
            Box::new(move |reason: &str| {
                let _ = tx.send(reason.to_string());
            }),
            rx,
        )
    }

    #[test]
    fn a_deleted_file_stops_the_store_once_and_says_why() {
        let path = temp_db("deleted");
        let (hook, told) = telling();
        let store = SqliteStore::open(&path, cfg("me", KEEP), hook).unwrap();
        store.insert(row("a", "pending", 1.0));
        assert!(store.flush(Duration::from_secs(5)));
        assert_eq!(store.get("a").unwrap().unwrap().status, "pending");
        std::fs::remove_file(&path).unwrap();
        store.insert(row("b", "pending", 2.0));
        assert!(store.flush(Duration::from_secs(5)));
        let reason = told.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(reason.contains("was deleted"), "{reason}");
        assert!(store.is_degraded());
        assert_eq!(store.failure().as_deref(), Some(reason.as_str()));
        // Reads fail with the reason instead of creating an empty file.
        let err = store.get("a").err().unwrap();
        assert!(err.0.contains("was deleted"), "{err}");
        assert!(!std::path::Path::new(&path).exists());
        store.insert(row("c", "pending", 3.0));
        assert!(store.flush(Duration::from_secs(5)));
        assert!(told.try_recv().is_err(), "told only once");
    }

    #[test]
    fn processes_opening_one_new_file_at_once_all_get_it() {
        for round in 0..20 {
            let path = temp_db(&format!("race-{round}"));
            let start = Arc::new(std::sync::Barrier::new(3));
            let openers: Vec<_> = (0..3)
                .map(|i| {
                    let (path, start) = (path.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        SqliteStore::open(&path, cfg(&format!("p{i}"), KEEP), quiet())
                            .map(|_| ())
                            .map_err(|e| e.0)
                    })
                })
                .collect();
            for opener in openers {
                assert_eq!(opener.join().unwrap(), Ok(()), "round {round}");
            }
        }
    }

    #[test]
    fn a_connection_that_meets_a_deleted_file_stops_the_store_with_that_reason() {
        let path = temp_db("deleted-lease");
        let (hook, told) = telling();
        let store = SqliteStore::open(&path, cfg("me", KEEP), hook).unwrap();
        std::fs::remove_file(&path).unwrap();
        // Lease upkeep opens its connection first, before the writer's
        // next look at the file: one reason is told, not two.
        assert!(store.renew(&[]).is_err());
        assert!(store.is_degraded(), "stopped by the failing call itself");
        let reason = told.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(reason.contains("was deleted"), "{reason}");
        assert_eq!(store.reap(false).unwrap(), Reaped::default());
        assert!(told.try_recv().is_err(), "told only once");
    }

    #[test]
    fn a_file_made_read_only_stops_the_store_while_idle() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp_db("readonly");
        let (hook, told) = telling();
        let store = SqliteStore::open(&path, cfg("me", KEEP), hook).unwrap();
        store.insert(row("a", "pending", 1.0));
        assert!(store.flush(Duration::from_secs(5)));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        // No writes: the idle check notices within its interval.
        let reason = told.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(reason.contains("read-only (mode 444)"), "{reason}");
        assert!(store.is_degraded());
    }

    #[test]
    fn a_run_is_claimed_once_across_stores_and_schedules_survive_reopening() {
        let path = temp_db("schedules");
        let a = SqliteStore::open(&path, cfg("me", KEEP), quiet()).unwrap();
        let b = SqliteStore::open(&path, cfg("me", KEEP), quiet()).unwrap();
        let first = a.open_schedule("beat", "every 5 s", 100.0).unwrap();
        assert_eq!(
            first,
            ScheduleRecord {
                anchor: 100.0,
                last_due: None,
                last_run_at: None,
                last_task_id: None,
                runs: 0
            }
        );
        // A second process on the store shares the first one's anchor.
        assert_eq!(
            b.open_schedule("beat", "every 5 s", 777.0).unwrap().anchor,
            100.0
        );
        assert!(a.claim_run("beat", 105.0, "t1", 105.2).unwrap());
        assert!(!b.claim_run("beat", 105.0, "t2", 105.3).unwrap());
        assert!(b.claim_run("beat", 110.0, "t3", 110.1).unwrap());
        let again = a.open_schedule("beat", "every 5 s", 999.0).unwrap();
        assert_eq!(again.last_due, Some(110.0));
        assert_eq!(again.last_run_at, Some(110.1));
        assert_eq!(again.last_task_id.as_deref(), Some("t3"));
        assert_eq!(again.runs, 2);
        // A changed schedule starts over.
        let changed = a.open_schedule("beat", "every 7 s", 500.0).unwrap();
        assert_eq!((changed.anchor, changed.runs), (500.0, 0));
        for k in 0..(RUNS_KEPT + 50) {
            assert!(a
                .claim_run("beat", 500.0 + 7.0 * k as f64, "t", 0.0)
                .unwrap());
        }
        assert_eq!(
            a.open_schedule("beat", "every 7 s", 0.0).unwrap().runs,
            RUNS_KEPT + 1
        );
    }

    #[test]
    fn pruning_deletes_only_old_finished_rows_and_spares_last_runs() {
        let path = temp_db("prune");
        let store = SqliteStore::open(&path, cfg("me", KEEP), quiet()).unwrap();
        for (id, status) in [
            ("old-done", "completed"),
            ("old-failed", "failed"),
            ("old-cancelled", "cancelled"),
            ("old-pending", "pending"),
            ("old-running", "running"),
            ("old-scheduled", "scheduled"),
            ("old-retrying", "retrying"),
            ("last-run", "completed"),
            ("earlier-run", "completed"),
            ("new-done", "completed"),
        ] {
            let mut r = row(id, status, 1.0);
            r.finished_at = Some(if id.starts_with("new") { 500.0 } else { 10.0 });
            store.insert(r);
        }
        assert!(store.flush(Duration::from_secs(5)));
        store.open_schedule("beat", "every 5 s", 0.0).unwrap();
        assert!(store.claim_run("beat", 5.0, "earlier-run", 5.0).unwrap());
        assert!(store.claim_run("beat", 10.0, "last-run", 10.0).unwrap());
        let conn = open_connection(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(prune(&conn, 100.0, 2).unwrap(), 2, "one batch at a time");
        assert_eq!(prune(&conn, 100.0, 100).unwrap(), 2);
        assert_eq!(prune(&conn, 100.0, 100).unwrap(), 0);
        let mut left: Vec<String> = store
            .list(None, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.task_id)
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "last-run",
                "new-done",
                "old-pending",
                "old-retrying",
                "old-running",
                "old-scheduled"
            ]
        );
    }

    #[test]
    fn the_writer_prunes_past_the_retention_and_the_file_reuses_space() {
        let path = temp_db("prune-writer");
        let store = SqliteStore::open(&path, cfg("me", Duration::ZERO), quiet()).unwrap();
        let big = "x".repeat(4000);
        let pages = || -> i64 {
            let conn = open_connection(&path, Duration::from_secs(5)).unwrap();
            conn.query_row("PRAGMA page_count", [], |r| r.get(0))
                .unwrap()
        };
        let mut sizes = Vec::new();
        for round in 0..8 {
            for k in 0..300 {
                let mut r = row(&format!("{round}-{k}"), "completed", 1.0);
                r.result = Some(big.clone());
                r.finished_at = Some(crate::clock::epoch_now());
                store.insert(r);
            }
            assert!(store.flush(Duration::from_secs(5)));
            let deadline = Instant::now() + Duration::from_secs(10);
            while !store.list(None, 1).unwrap().is_empty() {
                assert!(Instant::now() < deadline, "rows were never pruned");
                std::thread::sleep(Duration::from_millis(20));
            }
            sizes.push(pages());
        }
        // 8 rounds of 1.2 MB each: without pruning and reuse of the freed
        // pages the file would hold all of them; with it, no more than about
        // one round's worth at any time.
        let round = (300 * 4000 / 4096) as i64;
        assert!(sizes.iter().all(|&p| p < 2 * round), "pages {sizes:?}");
        let conn = open_connection(&path, Duration::from_secs(5)).unwrap();
        let mode: i64 = conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, 2, "incremental vacuum");
    }
}

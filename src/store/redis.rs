//! The shared store in Redis: many hosts on one queue. Every step that must
//! be atomic (a claim, an acknowledgement, a retry, a hand-back, lease
//! expiry) is one Lua script. Keys, all under a configurable prefix `P`:
//!
//! - `P:t:{id}`: a task's hash (its row, plus `owner`, `lease_until`, `rank`);
//!   finished ones expire after the result TTL;
//! - `P:q:{queue}`: tasks ready to claim, scored by rank; `P:d:{queue}`:
//!   delayed tasks and retries, scored by due time (moved by claims);
//! - `P:leases`: claimed tasks, scored by lease expiry; `P:own:{owner}`: the
//!   tasks an owner holds (renewed together); `P:owners`: every owner;
//! - `P:wake:{queue}`: a short list idle workers block on (`BLPOP`), pushed
//!   by every enqueue, retry and hand-back: no step polls;
//! - `P:done:{origin}`: ids of tasks an origin queued that another process
//!   finished, which the origin blocks on;
//! - `P:all`: every task by creation time, for listing;
//! - `P:s:{name}`, `P:runs:{name}`, `P:runinfo:{name}`: periodic schedules.
//!
//! Writes that need no answer go through one thread in pipelines; while
//! Redis is unreachable they wait (in order) and are retried with backoff,
//! and new tasks are refused with a clear error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use redis::{Connection, Value};

use super::{
    pid_is_gone, OnDegraded, Reaped, Records, Row, ScheduleRecord, SharedConfig, SharedStore,
    StoreError, DEFAULT_QUEUE,
};
use crate::tasks::status::Status;

/// Most writes one pipeline carries, and most records one script call takes.
const BATCH: usize = 512;
const GROUP: usize = 128;
/// Runs kept per schedule.
const RUNS_KEPT: i64 = 200;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Shared by every script: is `k` a task's hash (and not someone else's
/// key)? And the owner of task hash `k`, or nil (one command each: a key of
/// another type answers an error, which `pcall` turns into "no").
const IS_TASK: &str =
    "local function is_task(k) return redis.pcall('HEXISTS', k, 'task_id') == 1 end
local function owner_of(k)
  local o = redis.pcall('HGET', k, 'owner')
  if type(o) == 'string' and o ~= '' then return o end
  return nil
end
";

/// Queues tasks: `ARGV[3..]` holds, per task, its id, queue, rank, due
/// time, creation time, the number of hash fields that follow, and them.
const ENQUEUE: &str = r#"
local p, now = ARGV[1], tonumber(ARGV[2])
local woken = {}
local i = 3
while i <= #ARGV do
  local id, q, rank, due, created, nf = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4], tonumber(ARGV[i + 5])
  local fields = {}
  for j = i + 6, i + 5 + nf do fields[#fields + 1] = ARGV[j] end
  i = i + 6 + nf
  local t = p .. ':t:' .. id
  -- A batch sent again after a lost reply must not queue a task twice.
  if redis.call('EXISTS', t) == 0 then
    redis.call('HSET', t, 'rank', rank, unpack(fields))
    redis.call('ZADD', p .. ':all', created, id)
    if due <= now then
      local qk = p .. ':q:' .. q
      redis.call('ZADD', qk, rank, id)
      -- Idle workers wait only while the queue is empty: wake them then.
      if redis.call('ZCARD', qk) == 1 then woken[q] = true end
    else
      redis.call('ZADD', p .. ':d:' .. q, due, id)
      woken[q] = true
    end
  end
end
for q in pairs(woken) do
  redis.call('LPUSH', p .. ':wake:' .. q, 1)
  redis.call('LTRIM', p .. ':wake:' .. q, 0, 63)
end
return 1
"#;

const CLAIM: &str = r#"
local p, owner, now, untl, max = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local cands = {}
for i = 6, #ARGV do
  local q = ARGV[i]
  local dk = p .. ':d:' .. q
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', dk, '-inf', now, 'LIMIT', 0, 1000)) do
    redis.call('ZREM', dk, id)
    local t = p .. ':t:' .. id
    if is_task(t) then
      local rank = redis.call('HGET', t, 'rank')
      if rank then redis.call('ZADD', p .. ':q:' .. q, rank, id) end
    end
  end
  local top = redis.call('ZRANGE', p .. ':q:' .. q, 0, max - 1, 'WITHSCORES')
  for j = 1, #top, 2 do cands[#cands + 1] = {top[j], tonumber(top[j + 1]), q} end
end
table.sort(cands, function(a, b) return a[2] < b[2] end)
local out, taken, leases, gone = {}, {}, {}, {}
for k = 1, #cands do
  if #out >= max then break end
  local id, q = cands[k][1], cands[k][3]
  gone[q] = gone[q] or {}
  table.insert(gone[q], id)
  local t = p .. ':t:' .. id
  if is_task(t) then
    redis.call('HSET', t, 'owner', owner, 'lease_until', untl)
    redis.call('HINCRBY', t, 'attempts', 1)
    out[#out + 1] = redis.call('HGETALL', t)
    taken[#taken + 1] = id
    leases[#leases + 1] = untl
    leases[#leases + 1] = id
  end
end
for q, ids in pairs(gone) do redis.call('ZREM', p .. ':q:' .. q, unpack(ids)) end
if #taken > 0 then
  redis.call('ZADD', p .. ':leases', unpack(leases))
  redis.call('SADD', p .. ':own:' .. owner, unpack(taken))
  redis.call('SADD', p .. ':owners', owner)
end
return out
"#;

const STARTED: &str = r#"
local t = ARGV[1] .. ':t:' .. ARGV[3]
if owner_of(t) ~= ARGV[2] then return 0 end
redis.call('HSET', t, 'status', 'running')
redis.call('HSETNX', t, 'started_at', ARGV[4])
return 1
"#;

const PROGRESS: &str = r#"
local t = ARGV[1] .. ':t:' .. ARGV[2]
if not is_task(t) then return 0 end
redis.call('HSET', t, 'progress', ARGV[3])
if ARGV[4] == '1' then redis.call('HSET', t, 'current_step', ARGV[5]) end
return 1
"#;

/// Tells the origin of task `id` (if another process) that it finished.
const TELL: &str = r#"
local function tell(p, origin, id, finisher)
  if origin and origin ~= finisher then
    local key = p .. ':done:' .. origin
    -- A list nobody reads (its process died) goes after a day.
    if redis.call('RPUSH', key, id) == 1 then redis.call('EXPIRE', key, 86400) end
  end
end
"#;

/// Acknowledges tasks this owner holds: `ARGV[4..]` holds, per task, its
/// id, status, finish time, whether it completed, whether a result and an
/// error follow, them, and its start time when the start was not sent.
const FINISH: &str = r#"
local p, owner, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local done = {}
for i = 4, #ARGV, 9 do
  local id = ARGV[i]
  local t = p .. ':t:' .. id
  local got = redis.pcall('HMGET', t, 'owner', 'origin')
  if type(got) == 'table' and not got.err and got[1] == owner then
    -- One HSET: no owner ('') and no lease from here on; the arguments go
    -- with the hash when it expires.
    local set = {'status', ARGV[i + 1], 'finished_at', ARGV[i + 2], 'owner', '', 'lease_until', ''}
    if ARGV[i + 3] == '1' then table.insert(set, 'progress'); table.insert(set, 100) end
    if ARGV[i + 4] == '1' then table.insert(set, 'result'); table.insert(set, ARGV[i + 5]) end
    if ARGV[i + 6] == '1' then table.insert(set, 'error'); table.insert(set, ARGV[i + 7]) end
    if ARGV[i + 8] ~= '' then table.insert(set, 'started_at'); table.insert(set, ARGV[i + 8]) end
    redis.call('HSET', t, unpack(set))
    redis.call('EXPIRE', t, ttl)
    tell(p, got[2], id, owner)
    done[#done + 1] = id
  end
end
if #done > 0 then
  redis.call('ZREM', p .. ':leases', unpack(done))
  redis.call('SREM', p .. ':own:' .. owner, unpack(done))
end
return #done
"#;

const RETRY: &str = r#"
local p, owner, id, due, w = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local t = p .. ':t:' .. id
if owner_of(t) ~= owner then return 0 end
local rank = due + (tonumber(redis.call('HGET', t, 'priority')) or 0) * w
local q = redis.call('HGET', t, 'queue') or 'default'
redis.call('HSET', t, 'status', 'retrying', 'due_at', due, 'rank', rank)
redis.call('HDEL', t, 'owner', 'lease_until')
redis.call('ZREM', p .. ':leases', id)
redis.call('SREM', p .. ':own:' .. owner, id)
redis.call('ZADD', p .. ':d:' .. q, due, id)
redis.call('LPUSH', p .. ':wake:' .. q, 1)
redis.call('LTRIM', p .. ':wake:' .. q, 0, 63)
return 1
"#;

const RELEASE: &str = r#"
local p, owner = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  local id = ARGV[i]
  local t = p .. ':t:' .. id
  if owner_of(t) == owner then
    local q = redis.call('HGET', t, 'queue') or 'default'
    redis.call('HSET', t, 'status', 'pending')
    redis.call('HINCRBY', t, 'attempts', -1)
    redis.call('HDEL', t, 'owner', 'lease_until')
    redis.call('ZREM', p .. ':leases', id)
    redis.call('SREM', p .. ':own:' .. owner, id)
    redis.call('ZADD', p .. ':q:' .. q, redis.call('HGET', t, 'rank') or 0, id)
    redis.call('LPUSH', p .. ':wake:' .. q, 1)
    redis.call('LTRIM', p .. ':wake:' .. q, 0, 63)
  end
end
return 1
"#;

const RENEW: &str = r#"
local p, owner, untl = ARGV[1], ARGV[2], ARGV[3]
for i = 4, #ARGV do
  local id = ARGV[i]
  local t = p .. ':t:' .. id
  if owner_of(t) == owner then
    redis.call('HSET', t, 'lease_until', untl)
    redis.call('ZADD', p .. ':leases', untl, id)
  end
end
return 1
"#;

/// News of finished tasks, delivered at least once: ids move from the done
/// list to a taking list (`ARGV[2]` -> `ARGV[3]`, up to `ARGV[4]` in all),
/// and the rows of everything in the taking list come back; the caller
/// trims what it was given on its next call.
const NEWS: &str = r#"
local p, done, taking, max = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
while redis.call('LLEN', taking) < max do
  if not redis.call('LMOVE', done, taking, 'LEFT', 'RIGHT') then break end
end
local ids = redis.call('LRANGE', taking, 0, -1)
local rows = {}
for _, id in ipairs(ids) do
  local got = redis.pcall('HGETALL', p .. ':t:' .. id)
  if type(got) == 'table' and not got.err then rows[#rows + 1] = got else rows[#rows + 1] = {} end
end
return {#ids, rows}
"#;

const REAP: &str = r#"
local p, now, w, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lost = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. ':leases', '-inf', now)) do lost[#lost + 1] = id end
for i = 5, #ARGV do
  local dead = ARGV[i]
  for _, id in ipairs(redis.call('SMEMBERS', p .. ':own:' .. dead)) do lost[#lost + 1] = id end
  redis.call('DEL', p .. ':own:' .. dead)
  redis.call('SREM', p .. ':owners', dead)
end
local requeued, failed = {}, {}
local seen = {}
for _, id in ipairs(lost) do
  if not seen[id] then
    seen[id] = true
    redis.call('ZREM', p .. ':leases', id)
    local t = p .. ':t:' .. id
    local owner = owner_of(t)
    if owner then
      redis.call('SREM', p .. ':own:' .. owner, id)
      redis.call('HDEL', t, 'owner', 'lease_until')
      local attempts = tonumber(redis.call('HGET', t, 'attempts')) or 0
      local retries = tonumber(redis.call('HGET', t, 'max_retries')) or 0
      local q = redis.call('HGET', t, 'queue') or 'default'
      -- Claimed but never started (prefetched by a process that died): its
      -- claim took no attempt.
      local started = redis.call('HGET', t, 'status') == 'running'
      if not started then redis.call('HINCRBY', t, 'attempts', -1) end
      if attempts <= retries or not started then
        local rank = now + (tonumber(redis.call('HGET', t, 'priority')) or 0) * w
        redis.call('HSET', t, 'status', 'pending', 'due_at', now, 'rank', rank)
        redis.call('ZADD', p .. ':q:' .. q, rank, id)
        redis.call('LPUSH', p .. ':wake:' .. q, 1)
        redis.call('LTRIM', p .. ':wake:' .. q, 0, 63)
        requeued[#requeued + 1] = id
      else
        local err = cjson.encode({type = 'WorkerLostError', traceback = cjson.null,
          message = 'task ' .. id .. ' was lost with its worker (' .. owner .. ') on each of its ' .. attempts .. ' attempt(s)'})
        redis.call('HSET', t, 'status', 'failed', 'error', err, 'finished_at', now)
        redis.call('HDEL', t, 'args', 'kwargs')
        redis.call('EXPIRE', t, ttl)
        tell(p, redis.call('HGET', t, 'origin'), id, '')
        failed[#failed + 1] = id
      end
    end
  end
end
return {requeued, failed}
"#;

const CANCEL: &str = r#"
local p, id, err, now, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local t = p .. ':t:' .. id
if not is_task(t) or owner_of(t) then return 0 end
local st = redis.call('HGET', t, 'status')
if st ~= 'pending' and st ~= 'scheduled' and st ~= 'retrying' then return 0 end
local q = redis.call('HGET', t, 'queue') or 'default'
redis.call('ZREM', p .. ':q:' .. q, id)
redis.call('ZREM', p .. ':d:' .. q, id)
redis.call('HSET', t, 'status', 'cancelled', 'error', err, 'finished_at', now)
redis.call('HDEL', t, 'args', 'kwargs')
redis.call('EXPIRE', t, ttl)
return 1
"#;

/// The hashes of tasks `ARGV[2..]`; an empty list for a key that is not a task's.
const READ: &str = r#"
local out = {}
for i = 2, #ARGV do
  local got = redis.pcall('HGETALL', ARGV[1] .. ':t:' .. ARGV[i])
  if type(got) == 'table' and not got.err then out[#out + 1] = got else out[#out + 1] = {} end
end
return out
"#;

const OPEN_SCHEDULE: &str = r#"
local p, name, spec, anchor = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local s, runs, info = p .. ':s:' .. name, p .. ':runs:' .. name, p .. ':runinfo:' .. name
if redis.call('TYPE', s).ok ~= 'hash' then redis.call('DEL', s) end
if redis.call('HGET', s, 'spec') == spec then
  anchor = redis.call('HGET', s, 'anchor') or anchor
else
  redis.call('HSET', s, 'spec', spec, 'anchor', anchor)
  redis.call('DEL', runs, info)
end
local last = redis.call('ZRANGE', runs, -1, -1)
local detail = false
if last[1] then detail = redis.call('HGET', info, last[1]) end
return {anchor, last[1] or false, detail, redis.call('ZCARD', runs)}
"#;

const CLAIM_RUN: &str = r#"
local p, name, due, detail, keep = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local runs, info = p .. ':runs:' .. name, p .. ':runinfo:' .. name
if redis.call('HSETNX', info, due, detail) == 0 then return 0 end
redis.call('ZADD', runs, due, due)
while redis.call('ZCARD', runs) > keep do
  local old = redis.call('ZPOPMIN', runs)
  redis.call('HDEL', info, old[1])
end
return 1
"#;

/// The scripts, each with its SHA once loaded.
struct Scripts {
    enqueue: redis::Script,
    claim: redis::Script,
    started: redis::Script,
    progress: redis::Script,
    finish: redis::Script,
    retry: redis::Script,
    release: redis::Script,
    renew: redis::Script,
    reap: redis::Script,
    cancel: redis::Script,
    read: redis::Script,
    news: redis::Script,
    open_schedule: redis::Script,
    claim_run: redis::Script,
}

impl Scripts {
    fn new() -> Self {
        let s = |body: &str| redis::Script::new(&format!("{IS_TASK}{TELL}{body}"));
        Self {
            enqueue: s(ENQUEUE),
            claim: s(CLAIM),
            started: s(STARTED),
            progress: s(PROGRESS),
            finish: s(FINISH),
            retry: s(RETRY),
            release: s(RELEASE),
            renew: s(RENEW),
            reap: s(REAP),
            cancel: s(CANCEL),
            read: s(READ),
            news: s(NEWS),
            open_schedule: s(OPEN_SCHEDULE),
            claim_run: s(CLAIM_RUN),
        }
    }
}

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
    Flush(Sender<()>),
    Stop,
}

/// The URL with any password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // NOTE: the last "@" before any query ends the credentials, so a
    // password holding a raw "/" or "@" is still hidden whole.
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => {
            let user = &rest[..at];
            let shown = match user.split_once(':') {
                Some((name, _)) => format!("{name}:***"),
                None => "***".to_string(),
            };
            format!("{scheme}://{shown}{}", &rest[at..])
        }
        None => url.to_string(),
    }
}

/// A connection opened on first use and again after it failed.
struct Link {
    client: redis::Client,
    conn: Mutex<Option<Connection>>,
}

impl Link {
    fn with<R>(
        &self,
        shown: &str,
        read_timeout: Duration,
        f: impl FnOnce(&mut Connection) -> redis::RedisResult<R>,
    ) -> Result<R, StoreError> {
        let mut slot = self.conn.lock();
        if slot.is_none() {
            let conn = self
                .client
                .get_connection_with_timeout(CONNECT_TIMEOUT)
                .map_err(|e| StoreError(format!("cannot reach Redis at {shown}: {e}")))?;
            *slot = Some(conn);
        }
        let Some(conn) = slot.as_mut() else {
            return Err(StoreError(format!("cannot reach Redis at {shown}")));
        };
        let _ = conn.set_read_timeout(Some(read_timeout));
        match f(conn) {
            Ok(r) => Ok(r),
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    *slot = None;
                }
                Err(StoreError(format!("Redis at {shown}: {e}")))
            }
        }
    }
}

/// Whether Redis is reachable, as the writer last found it.
#[derive(Default)]
struct Health {
    down: Mutex<Option<String>>,
    stopped: AtomicBool,
}

pub struct RedisStore {
    shown: String,
    prefix: String,
    cfg: SharedConfig,
    pid: u32,
    scripts: Arc<Scripts>,
    control: Link,
    /// Lease upkeep's own connection: a long listing on `control` never delays it.
    lease: Link,
    work: Link,
    news: Link,
    tx: Sender<Op>,
    writer: Mutex<Option<JoinHandle<()>>>,
    health: Arc<Health>,
    /// How many news ids the last `finished_elsewhere` returned (trimmed next call).
    delivered: Mutex<usize>,
}

impl RedisStore {
    /// Connects (failing with a clear error naming the URL, its password
    /// hidden) and starts the writer thread.
    pub fn open(
        url: &str,
        prefix: &str,
        cfg: SharedConfig,
        on_problem: OnDegraded,
    ) -> Result<Self, StoreError> {
        let shown = redact(url);
        let client = || {
            redis::Client::open(url)
                .map_err(|e| StoreError(format!("storage URL {} is not usable: {e}", redact(url))))
        };
        let control = Link {
            client: client()?,
            conn: Mutex::new(None),
        };
        control.with(&shown, READ_TIMEOUT, |c| {
            redis::cmd("PING").query::<String>(c).map(|_| ())
        })?;
        let scripts = Arc::new(Scripts::new());
        load_scripts(&control, &shown, &scripts)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let health = Arc::new(Health::default());
        let writer = Writer {
            link: Link {
                client: client()?,
                conn: Mutex::new(None),
            },
            shown: shown.clone(),
            prefix: prefix.to_string(),
            cfg: cfg.clone(),
            scripts: scripts.clone(),
            health: health.clone(),
            on_problem,
        };
        let writer = std::thread::Builder::new()
            .name("catzilla-store".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| StoreError(format!("cannot start the store thread: {e}")))?;
        Ok(Self {
            shown,
            prefix: prefix.to_string(),
            cfg,
            pid: std::process::id(),
            scripts,
            control,
            lease: Link {
                client: client()?,
                conn: Mutex::new(None),
            },
            work: Link {
                client: client()?,
                conn: Mutex::new(None),
            },
            news: Link {
                client: client()?,
                conn: Mutex::new(None),
            },
            tx,
            writer: Mutex::new(Some(writer)),
            health,
            delivered: Mutex::new(0),
        })
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    fn is_forked(&self) -> bool {
        std::process::id() != self.pid
    }

    fn control<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> redis::RedisResult<R>,
    ) -> Result<R, StoreError> {
        self.control.with(&self.shown, READ_TIMEOUT, f)
    }

    /// The rows of `ids` that are tasks' (foreign or expired keys are left out).
    fn rows_of(&self, conn: &mut Connection, ids: &[String]) -> redis::RedisResult<Vec<Row>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.scripts.read.prepare_invoke();
        call.arg(&self.prefix);
        for id in ids {
            call.arg(id);
        }
        Ok(claimed_rows(call.invoke(conn)?))
    }
}

/// A task row from its hash; None for a hash that is not a task's.
fn row_of(h: HashMap<String, String>) -> Option<Row> {
    let text = |k: &str| h.get(k).cloned();
    let num = |k: &str| h.get(k).and_then(|v| v.parse::<f64>().ok());
    let int = |k: &str| num(k).map_or(0, |v| v as i64);
    Some(Row {
        task_id: text("task_id")?,
        name: text("name")?,
        status: text("status")?,
        priority: int("priority"),
        attempts: int("attempts"),
        max_retries: int("max_retries"),
        timeout_ms: num("timeout_ms").unwrap_or(0.0),
        due_at: num("due_at").unwrap_or(0.0),
        progress: num("progress").unwrap_or(0.0),
        current_step: text("current_step"),
        args: text("args"),
        kwargs: text("kwargs"),
        not_restartable: text("not_restartable"),
        result: text("result"),
        error: text("error"),
        created_at: num("created_at").unwrap_or(0.0),
        started_at: num("started_at"),
        finished_at: num("finished_at"),
        queue: text("queue").unwrap_or_else(|| DEFAULT_QUEUE.to_string()),
        origin: text("origin"),
    })
}

/// The rows a claim script returned (each a flat field/value list).
fn claimed_rows(value: Value) -> Vec<Row> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| redis::from_redis_value::<HashMap<String, String>>(&item).ok())
        .filter_map(row_of)
        .collect()
}

impl Records for RedisStore {
    fn failure(&self) -> Option<String> {
        None
    }

    fn is_degraded(&self) -> bool {
        false
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

    fn flush(&self, timeout: Duration) -> bool {
        if self.is_forked() {
            return false;
        }
        let (done, wait) = crossbeam_channel::bounded(1);
        self.tx.send(Op::Flush(done)).is_ok() && wait.recv_timeout(timeout).is_ok()
    }

    fn close(&self, timeout: Duration) {
        if self.is_forked() {
            std::mem::forget(self.writer.lock().take());
            return;
        }
        self.flush(timeout);
        self.health.stopped.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Op::Stop);
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
    }

    fn get(&self, id: &str) -> Result<Option<Row>, StoreError> {
        let ids = [id.to_string()];
        self.control(|c| self.rows_of(c, &ids))
            .map(|rows| rows.into_iter().next())
    }

    fn list(&self, status: Option<Status>, limit: usize) -> Result<Vec<Row>, StoreError> {
        let all = self.key(&["all"]);
        let page = 500isize;
        self.control(|c| {
            let mut out = Vec::new();
            let mut start = 0isize;
            while out.len() < limit {
                let ids: Vec<String> = redis::cmd("ZREVRANGE")
                    .arg(&all)
                    .arg(start)
                    .arg(start + page - 1)
                    .query(c)?;
                if ids.is_empty() {
                    break;
                }
                start += page;
                let rows = self.rows_of(c, &ids)?;
                let alive: std::collections::HashSet<&str> =
                    rows.iter().map(|r| r.task_id.as_str()).collect();
                let gone: Vec<&String> =
                    ids.iter().filter(|i| !alive.contains(i.as_str())).collect();
                if !gone.is_empty() {
                    redis::cmd("ZREM").arg(&all).arg(gone).query::<()>(c)?;
                    start -= (ids.len() - alive.len()) as isize;
                }
                out.extend(
                    rows.into_iter()
                        .filter(|r| status.is_none_or(|s| r.status == s.as_str())),
                );
            }
            out.truncate(limit);
            Ok(out)
        })
    }

    fn waiting(&self, queues: &[String]) -> Result<Vec<u64>, StoreError> {
        let keys: Vec<(String, String)> = queues
            .iter()
            .map(|q| (self.key(&["q", q]), self.key(&["d", q])))
            .collect();
        self.control(|c| {
            let mut pipe = redis::pipe();
            for (ready, delayed) in &keys {
                pipe.cmd("ZCARD").arg(ready).cmd("ZCARD").arg(delayed);
            }
            let counts: Vec<u64> = pipe.query(c)?;
            Ok(counts.chunks(2).map(|p| p.iter().sum()).collect())
        })
    }

    fn open_schedule(
        &self,
        name: &str,
        spec: &str,
        anchor: f64,
    ) -> Result<ScheduleRecord, StoreError> {
        let got: (String, Option<String>, Option<String>, i64) = self.control(|c| {
            self.scripts
                .open_schedule
                .arg(&self.prefix)
                .arg(name)
                .arg(spec)
                .arg(anchor)
                .invoke(c)
        })?;
        let (anchor_text, last_due, detail, runs) = got;
        let mut parts = detail.as_deref().unwrap_or("").splitn(2, '|');
        let task_id = parts.next().filter(|s| !s.is_empty()).map(String::from);
        let claimed_at = parts.next().and_then(|v| v.parse::<f64>().ok());
        Ok(ScheduleRecord {
            anchor: anchor_text.parse().unwrap_or(anchor),
            last_due: last_due
                .and_then(|d| d.parse::<i64>().ok())
                .map(|ms| ms as f64 / 1000.0),
            last_run_at: claimed_at,
            last_task_id: task_id,
            runs,
        })
    }

    fn claim_run(&self, name: &str, due: f64, task_id: &str, at: f64) -> Result<bool, StoreError> {
        let due_ms = (due * 1000.0).round() as i64;
        let claimed: i64 = self.control(|c| {
            self.scripts
                .claim_run
                .arg(&self.prefix)
                .arg(name)
                .arg(due_ms)
                .arg(format!("{task_id}|{at}"))
                .arg(RUNS_KEPT)
                .invoke(c)
        })?;
        Ok(claimed == 1)
    }
}

impl SharedStore for RedisStore {
    fn config(&self) -> &SharedConfig {
        &self.cfg
    }

    fn claim(&self, queues: &[String], max: usize) -> Result<Vec<Row>, StoreError> {
        if max == 0 || queues.is_empty() {
            return Ok(Vec::new());
        }
        let now = crate::clock::epoch_now();
        let until = now + self.cfg.lease.as_secs_f64();
        let got: Value = self.control(|c| {
            let mut call = self.scripts.claim.prepare_invoke();
            call.arg(&self.prefix)
                .arg(&self.cfg.owner)
                .arg(now)
                .arg(until)
                .arg(max);
            for q in queues {
                call.arg(q);
            }
            call.invoke(c)
        })?;
        Ok(claimed_rows(got))
    }

    fn wait_for_work(&self, queues: &[String], timeout: Duration) {
        let now = crate::clock::epoch_now();
        let mut wait = timeout.as_secs_f64();
        let next: Result<Vec<Vec<String>>, StoreError> = self.control(|c| {
            let mut pipe = redis::pipe();
            for q in queues {
                pipe.cmd("ZRANGE")
                    .arg(self.key(&["d", q]))
                    .arg(0)
                    .arg(0)
                    .arg("WITHSCORES");
            }
            pipe.query(c)
        });
        if let Ok(next) = next {
            for due in next.iter().filter_map(|v| v.get(1)?.parse::<f64>().ok()) {
                wait = wait.min(due - now);
            }
        }
        if wait <= 0.001 {
            return;
        }
        let keys: Vec<String> = queues.iter().map(|q| self.key(&["wake", q])).collect();
        let read = Duration::from_secs_f64(wait) + READ_TIMEOUT;
        let woke = self.work.with(&self.shown, read, |c| {
            redis::cmd("BLPOP")
                .arg(&keys)
                .arg(wait)
                .query::<Option<(String, String)>>(c)
        });
        if woke.is_err() {
            // Unreachable: the claimer backs off on its next claim.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn renew(&self, held: &[String]) -> Result<(), StoreError> {
        if self.is_forked() || held.is_empty() {
            return Ok(());
        }
        let until = crate::clock::epoch_now() + self.cfg.lease.as_secs_f64();
        self.lease.with(&self.shown, READ_TIMEOUT, |c| {
            for ids in held.chunks(1000) {
                let mut call = self.scripts.renew.prepare_invoke();
                call.arg(&self.prefix).arg(&self.cfg.owner).arg(until);
                for id in ids {
                    call.arg(id);
                }
                call.invoke::<i64>(c)?;
            }
            Ok(())
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
        if self.is_forked() {
            return Ok(Reaped::default());
        }
        let dead: Vec<String> = if dead_here {
            let owners: Vec<String> =
                self.control(|c| redis::cmd("SMEMBERS").arg(self.key(&["owners"])).query(c))?;
            owners
                .into_iter()
                .filter(|o| o != &self.cfg.owner)
                .filter(|o| self.cfg.local_pid(o).is_some_and(pid_is_gone))
                .collect()
        } else {
            Vec::new()
        };
        let (requeued, failed): (Vec<String>, Vec<String>) =
            self.lease.with(&self.shown, READ_TIMEOUT, |c| {
                let mut call = self.scripts.reap.prepare_invoke();
                call.arg(&self.prefix)
                    .arg(crate::clock::epoch_now())
                    .arg(self.cfg.starvation.as_secs_f64())
                    .arg(ttl_secs(&self.cfg));
                for d in &dead {
                    call.arg(d);
                }
                call.invoke(c)
            })?;
        Ok(Reaped { requeued, failed })
    }

    fn cancel_queued(&self, id: &str, error: &str) -> Result<bool, StoreError> {
        self.flush(Duration::from_secs(10));
        let done: i64 = self.control(|c| {
            self.scripts
                .cancel
                .arg(&self.prefix)
                .arg(id)
                .arg(error)
                .arg(crate::clock::epoch_now())
                .arg(ttl_secs(&self.cfg))
                .invoke(c)
        })?;
        Ok(done == 1)
    }

    /// NOTE: news is delivered at least once (finishing a handle twice is
    /// harmless): what the last call returned is trimmed only now, so news
    /// taken by a call that failed midway comes again.
    fn finished_elsewhere(&self, timeout: Duration) -> Result<Vec<Row>, StoreError> {
        let done = self.key(&["done", &self.cfg.owner]);
        let taking = self.key(&["taking", &self.cfg.owner]);
        let wait = timeout.as_secs_f64().max(0.01);
        let mut delivered = self.delivered.lock();
        let (count, rows) = self.news.with(&self.shown, timeout + READ_TIMEOUT, |c| {
            if *delivered > 0 {
                redis::cmd("LTRIM")
                    .arg(&taking)
                    .arg(*delivered)
                    .arg(-1)
                    .query::<()>(c)?;
                *delivered = 0;
            }
            let left: usize = redis::cmd("LLEN").arg(&taking).query(c)?;
            if left == 0 {
                let moved: Option<String> = redis::cmd("BLMOVE")
                    .arg(&done)
                    .arg(&taking)
                    .arg("LEFT")
                    .arg("RIGHT")
                    .arg(wait)
                    .query(c)?;
                if moved.is_none() {
                    return Ok((0, Value::Nil));
                }
            }
            let mut call = self.scripts.news.prepare_invoke();
            call.arg(&self.prefix).arg(&done).arg(&taking).arg(2000);
            call.invoke::<(usize, Value)>(c)
        })?;
        *delivered = count;
        Ok(claimed_rows(rows))
    }

    fn unavailable(&self) -> Option<String> {
        self.health.down.lock().clone()
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.close(Duration::from_secs(5));
    }
}

/// The start times of the tasks that start and finish within one batch of
/// writes: their finish records the start too (one script instead of two).
fn coalesced_starts(ops: &[Op]) -> HashMap<&str, f64> {
    let finished: std::collections::HashSet<&str> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Finished { id, .. } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    ops.iter()
        .filter_map(|op| match op {
            Op::Started { id, at } if finished.contains(id.as_str()) => Some((id.as_str(), *at)),
            _ => None,
        })
        .collect()
}

/// The arguments of one acknowledgement for the finish script (nothing for
/// another op): see `FINISH`.
fn finish_args(call: &mut redis::ScriptInvocation<'_>, op: &Op, starts: &HashMap<&str, f64>) {
    let Op::Finished {
        id,
        status,
        result,
        error,
        at,
    } = op
    else {
        return;
    };
    let flag = |b: bool| if b { "1" } else { "0" };
    call.arg(id)
        .arg(status.as_str())
        .arg(*at)
        .arg(flag(*status == Status::Completed))
        .arg(flag(result.is_some()))
        .arg(result.as_deref().unwrap_or(""))
        .arg(flag(error.is_some()))
        .arg(error.as_deref().unwrap_or(""))
        .arg(
            starts
                .get(id.as_str())
                .map_or(String::new(), |t| t.to_string()),
        );
}

/// Loads the scripts the writer sends by SHA in pipelines.
fn load_scripts(link: &Link, shown: &str, s: &Scripts) -> Result<(), StoreError> {
    link.with(shown, READ_TIMEOUT, |c| {
        for script in [
            &s.enqueue,
            &s.started,
            &s.progress,
            &s.finish,
            &s.retry,
            &s.release,
        ] {
            script.prepare_invoke().load(c)?;
        }
        Ok(())
    })
}

fn ttl_secs(cfg: &SharedConfig) -> u64 {
    cfg.retention.as_secs().max(1)
}

struct Writer {
    link: Link,
    shown: String,
    prefix: String,
    cfg: SharedConfig,
    scripts: Arc<Scripts>,
    health: Arc<Health>,
    on_problem: OnDegraded,
}

impl Writer {
    fn run(self, rx: &Receiver<Op>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let first = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(op) => op,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut ops = vec![first];
            while ops.len() < BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            // Until Redis takes the batch: in order, with backoff; a stop
            // while it is unreachable gives up and says what was dropped.
            loop {
                match self.write(&ops) {
                    Ok(()) => {
                        if self.health.down.lock().take().is_some() {
                            (self.on_problem)(&format!(
                                "Redis at {} is reachable again; queued writes went through",
                                self.shown
                            ));
                        }
                        backoff = FIRST_BACKOFF;
                        break;
                    }
                    Err(e) => {
                        let first_time = {
                            let mut down = self.health.down.lock();
                            let was = down.is_none();
                            *down =
                                Some(format!("Redis at {} is unreachable: {}", self.shown, e.0));
                            was
                        };
                        if first_time {
                            (self.on_problem)(&format!(
                                "lost Redis at {}: {}; retrying with backoff, new tasks are refused meanwhile",
                                self.shown, e.0
                            ));
                        }
                        let stopping = ops.iter().any(|o| matches!(o, Op::Stop))
                            || self.health.stopped.load(Ordering::SeqCst);
                        if stopping {
                            let lost = ops
                                .iter()
                                .filter(|o| !matches!(o, Op::Flush(_) | Op::Stop))
                                .count();
                            (self.on_problem)(&format!(
                                "stopped with Redis at {} unreachable: {lost} write(s) not made",
                                self.shown
                            ));
                            break;
                        }
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
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
        }
    }

    /// One pipeline for the batch; a lost connection fails the batch, which
    /// is retried whole (every script is idempotent for its owner). Scripts
    /// go by SHA: after a Redis restart they are loaded again (EVALSHA
    /// answers NOSCRIPT) and the batch resent. A reply that is another error
    /// (a key under the prefix that is not ours, say) sends the batch again
    /// op by op, skipping the ones that fail.
    fn write(&self, ops: &[Op]) -> Result<(), StoreError> {
        let starts = coalesced_starts(ops);
        let mut pipe = redis::pipe();
        let mut n = 0;
        // NOTE: runs of inserts, and of finishes, go as one script call each
        // (up to GROUP records): a call costs Redis about 12 µs on its own,
        // more than the commands one record needs.
        let mut group: Option<(bool, redis::ScriptInvocation<'_>, usize)> = None;
        for op in ops {
            let kind = match op {
                Op::Insert(_) => Some(true),
                Op::Finished { .. } => Some(false),
                _ => None,
            };
            if let Some((open_kind, call, size)) = group.take() {
                if kind == Some(open_kind) && size < GROUP {
                    group = Some((open_kind, call, size));
                } else {
                    pipe.invoke_script(&call);
                    n += 1;
                }
            }
            match (op, kind) {
                (Op::Insert(row), Some(true)) => {
                    let (_, call, size) = group.get_or_insert_with(|| {
                        let mut c = self.scripts.enqueue.prepare_invoke();
                        c.arg(&self.prefix).arg(crate::clock::epoch_now());
                        (true, c, 0)
                    });
                    self.enqueue_args(call, row);
                    *size += 1;
                }
                (Op::Finished { .. }, Some(false)) => {
                    let (_, call, size) = group.get_or_insert_with(|| {
                        let mut c = self.scripts.finish.prepare_invoke();
                        c.arg(&self.prefix)
                            .arg(&self.cfg.owner)
                            .arg(ttl_secs(&self.cfg));
                        (false, c, 0)
                    });
                    finish_args(call, op, &starts);
                    *size += 1;
                }
                _ => {
                    if self.add(&mut pipe, op, &starts) {
                        n += 1;
                    }
                }
            }
        }
        if let Some((_, call, _)) = group.take() {
            pipe.invoke_script(&call);
            n += 1;
        }
        if n == 0 {
            return Ok(());
        }
        for _ in 0..2 {
            let mut refused = None;
            self.link.with(&self.shown, READ_TIMEOUT, |c| {
                match pipe.query::<Vec<Value>>(c) {
                    Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                        refused = Some(true);
                        Ok(())
                    }
                    Err(e)
                        if e.kind() == redis::ErrorKind::ResponseError
                            || e.kind() == redis::ErrorKind::ExtensionError =>
                    {
                        refused = Some(false);
                        Ok(())
                    }
                    other => other.map(|_| ()),
                }
            })?;
            match refused {
                None => return Ok(()),
                Some(true) => load_scripts(&self.link, &self.shown, &self.scripts)?,
                Some(false) => return self.write_one_by_one(ops),
            }
        }
        Err(StoreError(format!(
            "Redis at {} does not keep the scripts loaded",
            self.shown
        )))
    }

    fn write_one_by_one(&self, ops: &[Op]) -> Result<(), StoreError> {
        for op in ops {
            let mut pipe = redis::pipe();
            if !self.add(&mut pipe, op, &HashMap::new()) {
                continue;
            }
            self.link.with(&self.shown, READ_TIMEOUT, |c| {
                match pipe.query::<Vec<Value>>(c) {
                    Err(e) if !(e.is_io_error() || e.is_connection_dropped() || e.is_timeout()) => {
                        Ok(()) // this record is not ours to write: skipped
                    }
                    other => other.map(|_| ()),
                }
            })?;
        }
        Ok(())
    }

    /// The arguments of one task for the enqueue script.
    fn enqueue_args(&self, call: &mut redis::ScriptInvocation<'_>, row: &Row) {
        let queue = if row.queue.is_empty() {
            DEFAULT_QUEUE
        } else {
            &row.queue
        };
        let mut fields: Vec<(&str, String)> = vec![
            ("task_id", row.task_id.clone()),
            ("name", row.name.clone()),
            ("status", row.status.clone()),
            ("priority", row.priority.to_string()),
            ("attempts", row.attempts.to_string()),
            ("max_retries", row.max_retries.to_string()),
            ("timeout_ms", row.timeout_ms.to_string()),
            ("due_at", row.due_at.to_string()),
            ("progress", row.progress.to_string()),
            ("created_at", row.created_at.to_string()),
            ("queue", queue.to_string()),
        ];
        for (k, v) in [
            ("args", &row.args),
            ("kwargs", &row.kwargs),
            ("origin", &row.origin),
            ("current_step", &row.current_step),
        ] {
            if let Some(v) = v {
                fields.push((k, v.clone()));
            }
        }
        call.arg(&row.task_id)
            .arg(queue)
            .arg(self.cfg.rank(row.priority, row.due_at))
            .arg(row.due_at)
            .arg(row.created_at)
            .arg(fields.len() * 2);
        for (k, v) in fields {
            call.arg(k).arg(v);
        }
    }

    /// Adds `op` to the pipeline; false for an op that sends nothing (a
    /// start in `starts`, which its task's finish carries).
    fn add(&self, pipe: &mut redis::Pipeline, op: &Op, starts: &HashMap<&str, f64>) -> bool {
        let p = &self.prefix;
        let s = &self.scripts;
        match op {
            Op::Insert(row) => {
                let mut call = s.enqueue.prepare_invoke();
                call.arg(p).arg(crate::clock::epoch_now());
                self.enqueue_args(&mut call, row);
                pipe.invoke_script(&call);
            }
            Op::Started { id, .. } if starts.contains_key(id.as_str()) => return false,
            Op::Started { id, at } => {
                let mut call = s.started.prepare_invoke();
                call.arg(p).arg(&self.cfg.owner).arg(id).arg(*at);
                pipe.invoke_script(&call);
            }
            Op::Progress { id, progress, step } => {
                let mut call = s.progress.prepare_invoke();
                call.arg(p)
                    .arg(id)
                    .arg(*progress)
                    .arg(if step.is_some() { "1" } else { "0" })
                    .arg(step.as_deref().unwrap_or(""));
                pipe.invoke_script(&call);
            }
            Op::Finished { .. } => {
                let mut call = s.finish.prepare_invoke();
                call.arg(p).arg(&self.cfg.owner).arg(ttl_secs(&self.cfg));
                finish_args(&mut call, op, starts);
                pipe.invoke_script(&call);
            }
            Op::Release(ids) => {
                let mut call = s.release.prepare_invoke();
                call.arg(p).arg(&self.cfg.owner);
                for id in ids {
                    call.arg(id);
                }
                pipe.invoke_script(&call);
            }
            Op::Retry { id, due_at } => {
                let mut call = s.retry.prepare_invoke();
                call.arg(p)
                    .arg(&self.cfg.owner)
                    .arg(id)
                    .arg(*due_at)
                    .arg(self.cfg.starvation.as_secs_f64());
                pipe.invoke_script(&call);
            }
            Op::Flush(_) | Op::Stop => return false,
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_show_in_messages() {
        assert_eq!(redact("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(
            redact("rediss://user:p@ss@h:1/2"),
            "rediss://user:***@h:1/2"
        );
        assert_eq!(redact("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact("redis://h:6379/0?a=b@c"), "redis://h:6379/0?a=b@c");
        assert_eq!(redact("redis://:pa/ss@h:1/0"), "redis://:***@h:1/0");
    }
}

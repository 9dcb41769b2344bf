//! `StoreQueue`: the engine's queue when a store is configured. The store is
//! the queue every process on it shares; this side claims tasks for the
//! local workers (a few ahead, leased), renews the leases, puts expired ones
//! back, and hears of tasks this process queued that another one finished.
//!
//! Threads: the claimer and the lease keeper never attach to Python (a busy
//! interpreter cannot starve a lease); the news thread attaches only to
//! finish the local handles of tasks finished elsewhere.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;

use super::runtime::log_in_background;
use super::shared::Shared;
use super::task::{Job, Status, TaskState};
use crate::store::SharedStore;
use crate::tasks::queue::Queue;
use crate::tasks::scheduler::{Depths, Pop, Rejected};

/// The longest an idle claimer waits before looking again (it wakes early
/// for new work, or when the next delayed task falls due); also how long a
/// stop may wait for it.
const IDLE_LOOK: Duration = Duration::from_millis(250);
/// After a store error, the claimer waits this long, doubling up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Default)]
struct State {
    /// Claimed, not started: run next, in claim order.
    buffer: VecDeque<Job>,
    /// Taken by a worker, not yet acknowledged.
    in_flight: usize,
    /// Workers waiting in `take`.
    waiting_workers: usize,
}

pub struct StoreQueue {
    pub(crate) store: Arc<dyn SharedStore>,
    queues: Vec<String>,
    /// How many claimed tasks may wait here for a worker.
    prefetch: usize,
    /// Whether this process runs tasks (`workers > 0`).
    serves: bool,
    /// Tasks this process queued that are not final yet.
    awaiting: AtomicUsize,
    capacity: usize,
    shared: OnceLock<Weak<Shared>>,
    state: Mutex<State>,
    /// Ids of the tasks this process claimed and has not let go: the leases
    /// to renew.
    held: Mutex<std::collections::HashSet<String>>,
    ready: Condvar,
    space: Condvar,
    closed: AtomicBool,
    stopped: AtomicBool,
    /// True while the claimer has taken rows from the store that are not in
    /// the buffer yet: they are in neither place, and `wait_settled` must
    /// not call that settled.
    in_claim: AtomicBool,
    /// Wakes the lease keeper and the news thread (for a stop, or news to wait for).
    tick: Mutex<()>,
    ticked: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl StoreQueue {
    pub fn new(
        store: Arc<dyn SharedStore>,
        queues: Vec<String>,
        workers: usize,
        capacity: usize,
    ) -> Self {
        Self {
            store,
            queues,
            prefetch: (workers * 2).max(4),
            serves: workers > 0,
            awaiting: AtomicUsize::new(0),
            capacity,
            shared: OnceLock::new(),
            state: Mutex::new(State::default()),
            held: Mutex::new(std::collections::HashSet::new()),
            ready: Condvar::new(),
            space: Condvar::new(),
            closed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            in_claim: AtomicBool::new(false),
            tick: Mutex::new(()),
            ticked: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        }
    }

    pub fn queues(&self) -> &[String] {
        &self.queues
    }

    /// Starts the claimer (with workers) and the news thread.
    pub fn start(self: &Arc<Self>, shared: &Arc<Shared>) -> std::io::Result<()> {
        let _ = self.shared.set(Arc::downgrade(shared));
        let mut threads = self.threads.lock();
        if self.serves {
            let me = self.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("catzilla-claimer".into())
                    .spawn(move || me.claim_loop())?,
            );
        }
        let me = self.clone();
        threads.push(
            std::thread::Builder::new()
                .name("catzilla-news".into())
                .spawn(move || me.news_loop())?,
        );
        Ok(())
    }

    /// Joins the claimer and the news thread, waiting at most until
    /// `deadline` (a thread still in a store call then ends on its own);
    /// never the calling thread (a callback on the news thread may be the
    /// one stopping the engine). Call it detached from Python: the news
    /// thread attaches. Tasks a claim brought in meanwhile go back.
    pub fn join(&self, deadline: Instant) {
        let threads = std::mem::take(&mut *self.threads.lock());
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() == me {
                continue;
            }
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        self.hand_back_buffer();
    }

    fn shared(&self) -> Option<Arc<Shared>> {
        self.shared.get().and_then(Weak::upgrade)
    }

    /// Whether the claimer should take more work: not stopped, and either
    /// intake is open or this process still waits for tasks it queued.
    fn claiming(&self) -> bool {
        !self.stopped.load(SeqCst) && (!self.closed.load(SeqCst) || self.awaiting.load(SeqCst) > 0)
    }

    /// The claimed rows are in the buffer (or there were none): wakes the
    /// takers and `wait_settled`.
    fn end_claim(&self) {
        // NOTE: cleared under the state lock, so a `wait_settled` that saw the
        // flag set is already waiting on `ready` when it is notified.
        let st = self.state.lock();
        self.in_claim.store(false, SeqCst);
        drop(st);
        self.ready.notify_all();
    }

    fn claim_loop(&self) {
        let mut backoff = FIRST_BACKOFF;
        let mut told = false;
        loop {
            {
                // NOTE: refills once the buffer is half empty, not after each
                // take: one claim per task cost Redis a script call per task.
                let mut st = self.state.lock();
                while !self.stopped.load(SeqCst) && st.buffer.len() > self.prefetch / 2 {
                    self.space.wait_for(&mut st, IDLE_LOOK);
                }
            }
            if self.stopped.load(SeqCst) {
                self.hand_back_buffer();
                return;
            }
            if !self.claiming() {
                self.hand_back_buffer();
                let mut t = self.tick.lock();
                if !self.stopped.load(SeqCst) {
                    self.ticked.wait_for(&mut t, IDLE_LOOK);
                }
                continue;
            }
            let room = self.prefetch.saturating_sub(self.state.lock().buffer.len());
            self.in_claim.store(true, SeqCst);
            let claimed = self.store.claim(&self.queues, room);
            if !matches!(&claimed, Ok(rows) if !rows.is_empty()) {
                self.end_claim();
            }
            match claimed {
                Ok(rows) if rows.is_empty() => {
                    backoff = FIRST_BACKOFF;
                    self.store.wait_for_work(&self.queues, IDLE_LOOK);
                }
                Ok(rows) => {
                    backoff = FIRST_BACKOFF;
                    if told {
                        told = false;
                        log_in_background("warning", "the task store is reachable again".into());
                    }
                    self.held
                        .lock()
                        .extend(rows.iter().map(|r| r.task_id.clone()));
                    let jobs: Vec<Job> = rows.into_iter().filter_map(|r| self.job_of(r)).collect();
                    let mut st = self.state.lock();
                    st.buffer.extend(jobs);
                    drop(st);
                    self.end_claim();
                }
                Err(e) => {
                    // A store that stopped for good said so itself, once.
                    if !told && !self.store.is_degraded() {
                        told = true;
                        log_in_background(
                            "error",
                            format!("cannot take tasks from the store, retrying: {e}"),
                        );
                    }
                    let mut t = self.tick.lock();
                    if !self.stopped.load(SeqCst) {
                        self.ticked.wait_for(&mut t, backoff);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// The local task for a claimed row: the one this process queued, or a
    /// new one that resolves its function when it runs.
    fn job_of(&self, row: crate::store::Row) -> Option<Job> {
        let shared = self.shared()?;
        let attempts = u32::try_from(row.attempts.saturating_sub(1)).unwrap_or(0);
        if let Some(job) = shared.lookup(&row.task_id) {
            // Claimed again after this process's own lease lapsed:
            match job.status() {
                // running here, or waiting in the buffer: the claim is ours
                // again, so that attempt's end is accepted; nothing to add.
                Status::Running => return None,
                _ if self
                    .state
                    .lock()
                    .buffer
                    .iter()
                    .any(|b| Arc::ptr_eq(b, &job)) =>
                {
                    return None
                }
                // waiting (queued or retried here): run it as usual.
                s if !s.is_final() => {
                    job.set_attempts(attempts);
                    job.set_status(Status::Pending);
                    return Some(job);
                }
                // finished here, but its end was refused (the lease had
                // lapsed): it runs again (at-least-once), as a fresh task.
                _ => {}
            }
        }
        let Some(job) = TaskState::from_row(row.clone(), attempts) else {
            // Not a record of ours (a foreign id): failed once, never claimed again.
            let error = serde_json::json!({
                "type": "StorageError",
                "message": format!("{:?} is not a catzilla task id; the record was skipped", row.task_id),
                "traceback": null,
            });
            self.held.lock().remove(&row.task_id);
            self.store.finished(
                row.task_id,
                Status::Failed,
                None,
                Some(error.to_string()),
                crate::clock::epoch_now(),
            );
            return None;
        };
        let job = Arc::new(job);
        let key = job.key();
        // (A final record of the same id, if any, is replaced; its handles keep it.)
        let replaced = shared.shard(key).lock().insert(key, job.clone());
        drop(replaced);
        Some(job)
    }

    /// Hands the claimed, unstarted tasks back to the store.
    fn hand_back_buffer(&self) {
        let jobs: Vec<Job> = self.state.lock().buffer.drain(..).collect();
        if jobs.is_empty() {
            return;
        }
        self.store.release(jobs.iter().map(|j| j.id()).collect());
        self.forget(&jobs);
        self.space.notify_all();
    }

    /// Drops the local records of tasks queued by other processes that went
    /// back to the store (they may finish anywhere).
    fn forget(&self, jobs: &[Job]) {
        {
            let mut held = self.held.lock();
            for job in jobs {
                held.remove(&job.id());
            }
        }
        let Some(shared) = self.shared() else { return };
        for job in jobs.iter().filter(|j| !j.local) {
            let removed = shared.shard(job.key()).lock().remove(&job.key());
            drop(removed);
        }
    }

    /// A task reached its end here: its lease (if held) is let go, and one
    /// this process queued is no longer awaited.
    pub fn settled(&self, job: &Job) {
        {
            let mut held = self.held.lock();
            if !held.is_empty() {
                held.remove(&job.id());
            }
        }
        if job.local {
            let _ = self
                .awaiting
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
            let _st = self.state.lock();
            self.ready.notify_all();
        }
    }

    /// Gives running tasks back to the store (a stop that did not wait for them).
    pub fn hand_back(&self, jobs: &[Job]) {
        if !jobs.is_empty() {
            self.store.release(jobs.iter().map(|j| j.id()).collect());
            self.forget(jobs);
        }
    }

    fn news_loop(&self) {
        let mut told = false;
        loop {
            if self.stopped.load(SeqCst) {
                return;
            }
            if let (Some(reason), true) = (self.store.failure(), self.awaiting.load(SeqCst) > 0) {
                // The store stopped for good: what this process queued cannot
                // run or be heard of again; each of its handles says why.
                let Some(shared) = self.shared() else { return };
                Python::try_attach(|py| shared.fail_awaited(py, &reason));
            }
            if self.awaiting.load(SeqCst) == 0 || self.store.is_degraded() {
                let mut t = self.tick.lock();
                if !self.stopped.load(SeqCst) && self.awaiting.load(SeqCst) == 0 {
                    self.ticked.wait_for(&mut t, IDLE_LOOK);
                }
                continue;
            }
            match self.store.finished_elsewhere(Duration::from_millis(200)) {
                Ok(rows) if rows.is_empty() => {}
                Ok(rows) => {
                    told = false;
                    let Some(shared) = self.shared() else { return };
                    Python::try_attach(|py| {
                        for row in rows {
                            shared.finished_elsewhere(py, row);
                        }
                    });
                }
                Err(e) => {
                    if !told && !self.store.is_degraded() {
                        told = true;
                        log_in_background(
                            "error",
                            format!("cannot read finished tasks from the store, retrying: {e}"),
                        );
                    }
                    let mut t = self.tick.lock();
                    if !self.stopped.load(SeqCst) {
                        self.ticked.wait_for(&mut t, Duration::from_secs(1));
                    }
                }
            }
        }
    }

    fn wake_all(&self) {
        let _t = self.tick.lock();
        self.ticked.notify_all();
        self.ready.notify_all();
        self.space.notify_all();
    }
}

impl Queue<Job> for StoreQueue {
    /// The task's row, written by the caller, is what queues it; this only
    /// checks intake and counts it as awaited here.
    fn push(&self, _lane: usize, item: Job, _delay: Duration) -> Result<bool, Rejected<Job>> {
        if self.closed.load(SeqCst) {
            return Err(Rejected::Closed(item));
        }
        let before = self.awaiting.fetch_add(1, SeqCst);
        if before >= self.capacity {
            self.awaiting.fetch_sub(1, SeqCst);
            return Err(Rejected::Full(item, self.capacity));
        }
        if before == 0 {
            let _t = self.tick.lock();
            self.ticked.notify_all();
        }
        Ok(false)
    }

    fn requeue(&self, _lane: usize, item: Job, delay: Duration) -> Result<(), Job> {
        let due = crate::clock::epoch_now() + delay.as_secs_f64();
        self.store.retry(item.id(), due);
        {
            let mut st = self.state.lock();
            st.in_flight = st.in_flight.saturating_sub(1);
        }
        self.forget(std::slice::from_ref(&item));
        Ok(())
    }

    fn take(&self, idle: Duration) -> Pop<Job> {
        let deadline = crate::clock::due_after(Instant::now(), idle);
        let mut st = self.state.lock();
        loop {
            if self.stopped.load(SeqCst) {
                return Pop::Stopped;
            }
            if let Some(job) = st.buffer.pop_front() {
                st.in_flight += 1;
                drop(st);
                self.space.notify_one();
                return Pop::Job(job);
            }
            st.waiting_workers += 1;
            let timed_out = self.ready.wait_until(&mut st, deadline).timed_out();
            st.waiting_workers -= 1;
            if timed_out && st.buffer.is_empty() {
                return Pop::Idle;
            }
        }
    }

    fn try_take(&self) -> Option<Job> {
        let mut st = self.state.lock();
        if self.stopped.load(SeqCst) {
            return None;
        }
        let job = st.buffer.pop_front()?;
        st.in_flight += 1;
        drop(st);
        self.space.notify_one();
        Some(job)
    }

    fn ack(&self, count: usize) -> bool {
        let mut st = self.state.lock();
        st.in_flight = st.in_flight.saturating_sub(count);
        drop(st);
        self.ready.notify_all();
        false
    }

    /// Removes a claimed task that waits here for a worker; one still in
    /// the store is cancelled there by the engine.
    fn cancel(&self, _lane: usize, matches: &mut dyn FnMut(&Job) -> bool) -> Option<Job> {
        let mut st = self.state.lock();
        let at = st.buffer.iter().position(matches)?;
        let job = st.buffer.remove(at)?;
        drop(st);
        self.space.notify_one();
        Some(job)
    }

    /// Renews this process's leases, and puts back the expired leases of
    /// any process, every third of the lease.
    fn run_clock(&self) {
        let every = self.store.config().lease / 3;
        let mut told = false;
        loop {
            {
                let mut t = self.tick.lock();
                if self.stopped.load(SeqCst) {
                    return;
                }
                self.ticked.wait_for(&mut t, every);
                if self.stopped.load(SeqCst) {
                    return;
                }
            }
            let held: Vec<String> = self.held.lock().iter().cloned().collect();
            let kept = self.store.renew(&held).and_then(|_| self.store.reap(false));
            match kept {
                Ok(_) => told = false,
                // A store that stopped has said why, once.
                Err(_) if self.store.is_degraded() => {}
                Err(e) if !told => {
                    told = true;
                    log_in_background("error", format!("cannot renew task leases: {e}"));
                }
                Err(_) => {}
            }
        }
    }

    fn close_intake(&self) {
        self.closed.store(true, SeqCst);
        self.wake_all();
    }

    fn wait_settled(&self, _horizon: Instant, until: Instant) -> bool {
        let mut st = self.state.lock();
        loop {
            let awaited = self.serves && self.awaiting.load(SeqCst) > 0;
            let claimed = self.in_claim.load(SeqCst) || !st.buffer.is_empty();
            if st.in_flight == 0 && !awaited && (!claimed || !self.claiming()) {
                return true;
            }
            if self.ready.wait_until(&mut st, until).timed_out() {
                return false;
            }
        }
    }

    /// Stops the claimer and the workers; the claimed tasks not started go
    /// back to the store. Nothing is cancelled: the queue outlives this process.
    fn stop(&self) -> Vec<Job> {
        self.closed.store(true, SeqCst);
        self.stopped.store(true, SeqCst);
        self.hand_back_buffer();
        self.wake_all();
        Vec::new()
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(SeqCst)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(SeqCst)
    }

    fn depths(&self) -> Depths {
        let st = self.state.lock();
        let mut lanes = [0; crate::tasks::lanes::LANES];
        for job in &st.buffer {
            if let Some(n) = lanes.get_mut(job.lane) {
                *n += 1;
            }
        }
        Depths {
            lanes,
            scheduled: 0,
            in_flight: st.in_flight,
            waiting_workers: st.waiting_workers,
            promoted: 0,
        }
    }
}

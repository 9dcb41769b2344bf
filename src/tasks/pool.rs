//! The worker pool: OS threads that take work from the scheduler, with
//! auto-scaling between a minimum and a maximum.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::{Condvar, Mutex};

use super::queue::Queue;
use super::scheduler::Pop;
use super::stats::new_histogram;
use super::sysinfo::{read_clock, thread_clock, thread_cpu_ns};
use super::watchdog::Deadline;

const NO_CLOCK: i64 = i64::MIN;

/// How many workers run and when the pool grows or shrinks.
#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    pub initial: usize,
    pub min: usize,
    pub max: usize,
    pub autoscale: bool,
    /// A worker beyond `min` that waited this long for work exits.
    pub idle_timeout: Duration,
    /// At most one new worker per this interval while every worker is busy.
    pub grow_interval: Duration,
}

/// Per-worker state that outlives the thread using it: counters, the
/// run-time histogram and the task deadline.
pub struct WorkerSlot {
    in_use: AtomicBool,
    busy_since_ns: AtomicU64,
    busy_ns: AtomicU64,
    /// CPU time of the threads that used this slot and have exited.
    cpu_ns: AtomicU64,
    /// The CPU clock of the thread using the slot now, or `NO_CLOCK`.
    /// (Linux thread clock ids are negative numbers.)
    clock: AtomicI64,
    pub deadline: Deadline,
    /// An identifier the runner stores for its own use (the Python thread id).
    pub ident: AtomicU64,
    pub histogram: Mutex<Histogram<u64>>,
}

impl WorkerSlot {
    fn new() -> Result<Self, hdrhistogram::CreationError> {
        Ok(Self {
            in_use: AtomicBool::new(false),
            busy_since_ns: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
            clock: AtomicI64::new(NO_CLOCK),
            deadline: Deadline::default(),
            ident: AtomicU64::new(0),
            histogram: Mutex::new(new_histogram()?),
        })
    }
}

/// Runs the work a worker takes.
pub trait Runner<T>: Send + Sync + 'static {
    /// Runs `first`, and may pull further ready work from `more` to run it
    /// back to back. Must account for every item it takes.
    fn run(&self, slot: &WorkerSlot, first: T, more: &mut dyn FnMut() -> Option<T>);

    /// Runs a worker thread's whole life, `body`, inside whatever context
    /// the runner needs (for Python: attached to the interpreter).
    fn thread_main(&self, _slot: &WorkerSlot, body: &mut dyn FnMut()) {
        body()
    }

    /// Blocks in `pop` (for Python: detached from the interpreter).
    fn wait(&self, pop: &(dyn Fn() -> Pop<T> + Sync)) -> Pop<T> {
        pop()
    }

    /// Called when `run` panicked; the worker then carries on.
    fn panicked(&self, _message: String) {}
}

/// A point-in-time view of the pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolSnapshot {
    pub live: usize,
    pub busy: usize,
    pub busy_ns: u64,
    pub cpu_ns: u64,
    pub grown: u64,
    pub shrunk: u64,
}

pub struct Pool<T> {
    sched: Arc<dyn Queue<T>>,
    runner: Arc<dyn Runner<T>>,
    cfg: PoolConfig,
    origin: Instant,
    slots: Arc<[WorkerSlot]>,
    live: AtomicUsize,
    grown: AtomicU64,
    shrunk: AtomicU64,
    last_grow: Mutex<Instant>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    alive: Arc<ThreadCount>,
}

/// How many pool threads are running, with a signal when one exits.
#[derive(Default)]
struct ThreadCount {
    running: Mutex<usize>,
    exited: Condvar,
}

/// Counts a thread out when it ends, however it ends.
struct ThreadExit(Arc<ThreadCount>);

impl Drop for ThreadExit {
    fn drop(&mut self) {
        let mut n = self.0.running.lock();
        *n = n.saturating_sub(1);
        self.0.exited.notify_all();
    }
}

impl<T: Send + 'static> Pool<T> {
    pub fn new(
        sched: Arc<dyn Queue<T>>,
        runner: Arc<dyn Runner<T>>,
        cfg: PoolConfig,
        origin: Instant,
    ) -> Result<Arc<Self>, hdrhistogram::CreationError> {
        let slots = (0..cfg.max.max(1))
            .map(|_| WorkerSlot::new())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Self {
            sched,
            runner,
            cfg,
            origin,
            slots: slots.into(),
            live: AtomicUsize::new(0),
            grown: AtomicU64::new(0),
            shrunk: AtomicU64::new(0),
            last_grow: Mutex::new(origin.checked_sub(cfg.grow_interval).unwrap_or(origin)),
            threads: Mutex::new(Vec::new()),
            alive: Arc::default(),
        }))
    }

    /// Starts the initial workers and the timer thread.
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let sched = self.sched.clone();
        self.spawn_thread("catzilla-timer".into(), move || sched.run_clock())?;
        for _ in 0..self.cfg.initial {
            self.spawn_worker()?;
        }
        Ok(())
    }

    pub fn slots(&self) -> &Arc<[WorkerSlot]> {
        &self.slots
    }

    fn spawn_thread(
        &self,
        name: String,
        body: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        *self.alive.running.lock() += 1;
        let exit = ThreadExit(self.alive.clone());
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            let _exit = exit;
            body();
        });
        match handle {
            Ok(h) => {
                let mut threads = self.threads.lock();
                threads.retain(|t| !t.is_finished());
                threads.push(h);
                Ok(())
            }
            Err(e) => {
                *self.alive.running.lock() -= 1;
                Err(e)
            }
        }
    }

    fn spawn_worker(self: &Arc<Self>) -> std::io::Result<bool> {
        let Some(index) = self.slots.iter().position(|s| {
            s.in_use
                .compare_exchange(false, true, SeqCst, SeqCst)
                .is_ok()
        }) else {
            return Ok(false);
        };
        self.live.fetch_add(1, SeqCst);
        let pool = self.clone();
        let started = self.spawn_thread(format!("catzilla-worker-{index}"), move || {
            pool.worker_main(index)
        });
        if let Err(e) = started {
            self.slots[index].in_use.store(false, SeqCst);
            self.live.fetch_sub(1, SeqCst);
            return Err(e);
        }
        Ok(true)
    }

    /// Adds a worker if auto-scaling is on, all workers are busy, work is
    /// waiting and the last growth was at least `grow_interval` ago.
    pub fn maybe_grow(self: &Arc<Self>) {
        if !self.cfg.autoscale || self.live.load(SeqCst) >= self.cfg.max {
            return;
        }
        {
            let mut last = self.last_grow.lock();
            if last.elapsed() < self.cfg.grow_interval {
                return;
            }
            *last = Instant::now();
        }
        let depths = self.sched.depths();
        if depths.waiting_workers > 0 || depths.ready() == 0 || self.sched.is_stopped() {
            return;
        }
        if let Ok(true) = self.spawn_worker() {
            self.grown.fetch_add(1, SeqCst);
        }
    }

    fn try_retire(&self) -> bool {
        if !self.cfg.autoscale {
            return false;
        }
        self.live
            .fetch_update(SeqCst, SeqCst, |n| (n > self.cfg.min).then(|| n - 1))
            .is_ok()
    }

    fn now_ns(&self) -> u64 {
        (self.origin.elapsed().as_nanos() as u64).max(1)
    }

    fn worker_main(self: Arc<Self>, index: usize) {
        let slot = &self.slots[index];
        if let Some(clock) = thread_clock() {
            slot.clock.store(i64::from(clock), SeqCst);
        }
        self.runner.thread_main(slot, &mut || loop {
            let sched = &self.sched;
            let idle = self.cfg.idle_timeout;
            match self.runner.wait(&|| sched.take(idle)) {
                Pop::Job(job) => {
                    // A worker that takes work while more waits and nobody is
                    // idle is the signal of a backlog, even with no new submits.
                    self.maybe_grow();
                    let since = self.now_ns();
                    slot.busy_since_ns.store(since, SeqCst);
                    let result = catch_unwind(AssertUnwindSafe(|| {
                        self.runner.run(slot, job, &mut || sched.try_take())
                    }));
                    if let Err(panic) = result {
                        self.runner.panicked(panic_message(panic.as_ref()));
                    }
                    slot.busy_since_ns.store(0, SeqCst);
                    slot.busy_ns
                        .fetch_add(self.now_ns().saturating_sub(since), SeqCst);
                }
                Pop::Idle => {
                    if self.try_retire() {
                        self.shrunk.fetch_add(1, SeqCst);
                        return;
                    }
                }
                Pop::Stopped => {
                    self.live.fetch_sub(1, SeqCst);
                    return;
                }
            }
        });
        slot.clock.store(NO_CLOCK, SeqCst);
        slot.cpu_ns.fetch_add(thread_cpu_ns(), SeqCst);
        slot.in_use.store(false, SeqCst);
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        let now = self.now_ns();
        let mut snap = PoolSnapshot {
            live: self.live.load(SeqCst),
            grown: self.grown.load(SeqCst),
            shrunk: self.shrunk.load(SeqCst),
            ..Default::default()
        };
        for slot in self.slots.iter() {
            let since = slot.busy_since_ns.load(SeqCst);
            snap.busy_ns += slot.busy_ns.load(SeqCst);
            if since != 0 {
                snap.busy += 1;
                snap.busy_ns += now.saturating_sub(since);
            }
            snap.cpu_ns += slot.cpu_ns.load(SeqCst);
            let clock = slot.clock.load(SeqCst);
            if clock != NO_CLOCK {
                let live = libc::clockid_t::try_from(clock).ok().and_then(read_clock);
                snap.cpu_ns += live.unwrap_or(0);
            }
        }
        snap
    }

    /// Waits until every pool thread has exited or `deadline` passes, then
    /// joins those that exited. Returns how many are still running.
    pub fn join_until(&self, deadline: Instant) -> usize {
        let mut running = self.alive.running.lock();
        while *running > 0 {
            if self
                .alive
                .exited
                .wait_until(&mut running, deadline)
                .timed_out()
            {
                break;
            }
        }
        let left = *running;
        drop(running);
        let mut threads = self.threads.lock();
        let (done, alive): (Vec<_>, Vec<_>) = threads.drain(..).partition(|t| t.is_finished());
        *threads = alive;
        drop(threads);
        for t in done {
            let _ = t.join();
        }
        left
    }
}

pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a Rust panic with a non-text payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::scheduler::Scheduler;
    use std::sync::atomic::AtomicUsize;

    struct Counting {
        ran: AtomicUsize,
        sched: Arc<Scheduler<u32>>,
        panic_on: u32,
    }

    impl Runner<u32> for Counting {
        fn run(&self, _slot: &WorkerSlot, first: u32, more: &mut dyn FnMut() -> Option<u32>) {
            let mut job = Some(first);
            while let Some(j) = job {
                self.sched.finish(1);
                if j == self.panic_on {
                    panic!("task {j} exploded");
                }
                if j >= 1000 {
                    std::thread::sleep(Duration::from_millis(u64::from(j - 1000)));
                }
                self.ran.fetch_add(1, SeqCst);
                job = more();
            }
        }
    }

    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn pool(
        cfg: PoolConfig,
        panic_on: u32,
    ) -> (Arc<Pool<u32>>, Arc<Counting>, Arc<Scheduler<u32>>) {
        let sched = Arc::new(Scheduler::new(100_000, Duration::from_secs(60)));
        let runner = Arc::new(Counting {
            ran: AtomicUsize::new(0),
            sched: sched.clone(),
            panic_on,
        });
        let p = Pool::new(sched.clone(), runner.clone(), cfg, Instant::now()).unwrap();
        p.start().unwrap();
        (p, runner, sched)
    }

    fn cfg(initial: usize, min: usize, max: usize) -> PoolConfig {
        PoolConfig {
            initial,
            min,
            max,
            autoscale: true,
            idle_timeout: Duration::from_millis(100),
            grow_interval: Duration::ZERO,
        }
    }

    #[test]
    fn runs_everything_and_survives_panics() {
        let (p, runner, sched) = pool(cfg(2, 2, 2), 7);
        for i in 0..500 {
            sched.submit(2, i, Duration::ZERO).unwrap();
        }
        eventually("all tasks", || runner.ran.load(SeqCst) == 499);
        assert_eq!(p.snapshot().live, 2);
        sched.stop();
        assert_eq!(p.join_until(Instant::now() + Duration::from_secs(5)), 0);
        assert_eq!(p.snapshot().live, 0);
    }

    #[test]
    fn grows_under_pressure_and_shrinks_when_idle() {
        let (p, runner, sched) = pool(cfg(1, 1, 4), u32::MAX);
        for _ in 0..40 {
            sched.submit(2, 1030, Duration::ZERO).unwrap();
            p.maybe_grow();
        }
        eventually("growth", || p.snapshot().live == 4);
        eventually("all tasks", || runner.ran.load(SeqCst) == 40);
        eventually("shrink", || p.snapshot().live == 1);
        let snap = p.snapshot();
        assert_eq!((snap.grown, snap.shrunk), (3, 3));
        assert!(snap.busy_ns >= 40 * 30_000_000);
        sched.stop();
        assert_eq!(p.join_until(Instant::now() + Duration::from_secs(5)), 0);
    }

    #[test]
    fn fixed_pool_never_scales() {
        let mut c = cfg(2, 1, 4);
        c.autoscale = false;
        let (p, runner, sched) = pool(c, u32::MAX);
        for _ in 0..10 {
            sched.submit(2, 1020, Duration::ZERO).unwrap();
            p.maybe_grow();
        }
        eventually("all tasks", || runner.ran.load(SeqCst) == 10);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(p.snapshot().live, 2);
        sched.stop();
        p.join_until(Instant::now() + Duration::from_secs(5));
    }
}

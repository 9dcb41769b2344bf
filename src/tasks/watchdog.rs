//! Deadlines for running tasks: one thread sleeps until the earliest one.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

const IDLE: u64 = u64::MAX;
const SCANNING: u64 = 0;

/// A deadline a worker arms for the task it runs. `token` tells one run
/// from the next, so a late expiry never hits the following task.
#[derive(Default)]
pub struct Deadline {
    at_ns: AtomicU64,
    token: AtomicU64,
    fired: AtomicU64,
}

impl Deadline {
    /// The token of the run now armed, or 0.
    pub fn token(&self) -> u64 {
        self.token.load(SeqCst)
    }

    /// Records that the run with `token` was interrupted.
    pub fn mark_fired(&self, token: u64) {
        self.fired.store(token, SeqCst);
    }

    /// The token of the last interrupted run, cleared by reading.
    pub fn take_fired(&self) -> u64 {
        self.fired.swap(0, SeqCst)
    }
}

/// Wakes at the earliest armed deadline and reports expired ones.
pub struct Watchdog {
    origin: Instant,
    next_wake: AtomicU64,
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl Watchdog {
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            next_wake: AtomicU64::new(IDLE),
            stopped: Mutex::new(false),
            cv: Condvar::new(),
        }
    }

    fn ns(&self, at: Instant) -> u64 {
        let ns = at.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(ns).unwrap_or(IDLE - 1).clamp(1, IDLE - 1)
    }

    /// Arms `slot` for `after` from now with `token`.
    pub fn arm(&self, slot: &Deadline, after: Duration, token: u64) {
        let at = self.ns(crate::clock::due_after(Instant::now(), after));
        slot.token.store(token, SeqCst);
        slot.at_ns.store(at, SeqCst);
        let wake = self.next_wake.load(SeqCst);
        if wake == SCANNING || at < wake {
            let _guard = self.stopped.lock();
            self.cv.notify_one();
        }
    }

    pub fn disarm(&self, slot: &Deadline) {
        slot.at_ns.store(0, SeqCst);
        slot.token.store(0, SeqCst);
    }

    /// The watchdog thread's body: calls `expired(index, token)` for each
    /// slot whose deadline passed, once, until [`Watchdog::stop`].
    pub fn run<S>(
        &self,
        slots: &[S],
        deadline: impl Fn(&S) -> &Deadline,
        expired: impl Fn(usize, u64),
    ) {
        let mut stopped = self.stopped.lock();
        loop {
            if *stopped {
                return;
            }
            self.next_wake.store(SCANNING, SeqCst);
            let now = self.ns(Instant::now());
            let mut earliest = IDLE;
            let mut due = Vec::new();
            for (i, slot) in slots.iter().map(&deadline).enumerate() {
                let at = slot.at_ns.load(SeqCst);
                if at == 0 {
                    continue;
                }
                if at <= now {
                    let token = slot.token.load(SeqCst);
                    if slot.at_ns.compare_exchange(at, 0, SeqCst, SeqCst).is_ok() {
                        due.push((i, token));
                    }
                } else {
                    earliest = earliest.min(at);
                }
            }
            self.next_wake.store(earliest, SeqCst);
            if !due.is_empty() {
                parking_lot::MutexGuard::unlocked(&mut stopped, || {
                    for (i, token) in due {
                        expired(i, token);
                    }
                });
                continue;
            }
            if earliest == IDLE {
                self.cv.wait(&mut stopped);
            } else {
                let when = self.origin + Duration::from_nanos(earliest);
                self.cv.wait_until(&mut stopped, when);
            }
        }
    }

    pub fn stop(&self) {
        *self.stopped.lock() = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn fires_expired_deadlines_once_and_skips_disarmed() {
        let dog = Arc::new(Watchdog::new(Instant::now()));
        let slots: Arc<Vec<Deadline>> = Arc::new((0..3).map(|_| Deadline::default()).collect());
        let (tx, rx) = crossbeam_channel::unbounded();
        let runner = {
            let (dog, slots) = (dog.clone(), slots.clone());
            std::thread::spawn(move || {
                dog.run(
                    &slots,
                    |d| d,
                    |i, token| tx.send((i, token, Instant::now())).unwrap_or(()),
                )
            })
        };
        let start = Instant::now();
        dog.arm(&slots[0], Duration::from_millis(300), 7);
        dog.arm(&slots[1], Duration::from_millis(60), 8);
        dog.arm(&slots[2], Duration::from_millis(30), 9);
        dog.disarm(&slots[2]);
        let (i, token, at) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((i, token), (1, 8));
        assert!(at - start >= Duration::from_millis(60));
        let (i, token, at) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((i, token), (0, 7));
        assert!(at - start >= Duration::from_millis(300));
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        dog.stop();
        runner.join().unwrap();
    }
}

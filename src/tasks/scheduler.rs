//! The scheduler: priority lanes, a bounded intake, and a timer for due work.
//!
//! Workers block in [`Scheduler::pop`]; the timer thread runs
//! [`Scheduler::run_timer`], sleeping until the next due time, never polling.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::lanes::{Lanes, LANES};
use super::timer::TimerHeap;
use crate::clock::due_after;

/// Why the scheduler refused work; the item comes back to the caller.
#[derive(Debug)]
pub enum Rejected<T> {
    /// `capacity` tasks are already queued.
    Full(T, usize),
    /// Intake is closed by shutdown.
    Closed(T),
}

/// What a waiting worker gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Pop<T> {
    Job(T),
    /// Nothing came within the idle timeout.
    Idle,
    /// The scheduler stopped; the worker should exit.
    Stopped,
}

/// Queue sizes at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Depths {
    pub lanes: [usize; LANES],
    pub scheduled: usize,
    pub in_flight: usize,
    pub waiting_workers: usize,
    pub promoted: u64,
}

impl Depths {
    pub fn ready(&self) -> usize {
        self.lanes.iter().sum()
    }
}

/// A backlog at least this deep, once drained, hands its memory back.
pub const RELEASE_AFTER: usize = 4096;

struct State<T> {
    lanes: Lanes<T>,
    timer: TimerHeap<(usize, T)>,
    /// The deepest backlog since the queue was last empty.
    high_water: usize,
    capacity: usize,
    in_flight: usize,
    waiting_workers: usize,
    intake_closed: bool,
    stopped: bool,
}

/// Called for each delayed item as the timer makes it ready.
pub type DueHook<T> = Box<dyn Fn(&T) + Send + Sync>;

pub struct Scheduler<T> {
    state: Mutex<State<T>>,
    work: Condvar,
    timer: Condvar,
    settled: Condvar,
    on_due: Option<DueHook<T>>,
}

impl<T> Scheduler<T> {
    pub fn new(capacity: usize, starvation_after: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                lanes: Lanes::new(starvation_after),
                timer: TimerHeap::default(),
                high_water: 0,
                capacity,
                in_flight: 0,
                waiting_workers: 0,
                intake_closed: false,
                stopped: false,
            }),
            work: Condvar::new(),
            timer: Condvar::new(),
            settled: Condvar::new(),
            on_due: None,
        }
    }

    /// Sets a hook the timer calls for each delayed item as it becomes ready.
    pub fn with_due_hook(mut self, hook: DueHook<T>) -> Self {
        self.on_due = Some(hook);
        self
    }

    /// Queues new work, now or after `delay`. Fails when the queue holds
    /// `capacity` tasks (ready and scheduled together) or intake is closed.
    /// Returns whether every worker was busy, a hint to grow the pool.
    pub fn submit(&self, lane: usize, item: T, delay: Duration) -> Result<bool, Rejected<T>> {
        let mut st = self.state.lock();
        if st.intake_closed {
            return Err(Rejected::Closed(item));
        }
        let queued = st.lanes.total() + st.timer.len();
        if queued >= st.capacity {
            return Err(Rejected::Full(item, st.capacity));
        }
        Ok(self.enqueue(&mut st, lane, item, delay))
    }

    /// Queues a retry of work that was in flight. Retries are not bounded by
    /// capacity: they were admitted once already. Fails only once stopped.
    pub fn retry(&self, lane: usize, item: T, delay: Duration) -> Result<(), T> {
        let mut st = self.state.lock();
        if st.stopped {
            return Err(item);
        }
        st.in_flight = st.in_flight.saturating_sub(1);
        self.enqueue(&mut st, lane, item, delay);
        Ok(())
    }

    fn enqueue(&self, st: &mut State<T>, lane: usize, item: T, delay: Duration) -> bool {
        let now = Instant::now();
        st.high_water = st.high_water.max(st.lanes.total() + st.timer.len() + 1);
        if delay.is_zero() {
            st.lanes.push(lane, item, now);
            if st.waiting_workers > 0 {
                self.work.notify_one();
            }
        } else {
            let due = due_after(now, delay);
            let earlier = st.timer.next_due().is_none_or(|d| due < d);
            st.timer.push(due, (lane, item));
            if earlier {
                self.timer.notify_one();
            }
        }
        st.waiting_workers == 0
    }

    /// Blocks until work is ready, `idle` passes, or the scheduler stops.
    /// Call it without holding the Python interpreter.
    pub fn pop(&self, idle: Duration) -> Pop<T> {
        let mut st = self.state.lock();
        let deadline = due_after(Instant::now(), idle);
        loop {
            if st.stopped {
                return Pop::Stopped;
            }
            if let Some(item) = st.lanes.pop(Instant::now()) {
                st.in_flight += 1;
                return Pop::Job(item);
            }
            st.waiting_workers += 1;
            let timed_out = self.work.wait_until(&mut st, deadline).timed_out();
            st.waiting_workers -= 1;
            if timed_out && !st.stopped && st.lanes.is_empty() {
                return Pop::Idle;
            }
        }
    }

    /// Takes ready work without blocking, for running tasks back to back.
    pub fn try_pop(&self) -> Option<T> {
        let mut st = self.state.lock();
        if st.stopped {
            return None;
        }
        let item = st.lanes.pop(Instant::now())?;
        st.in_flight += 1;
        Some(item)
    }

    /// Marks in-flight work as finished. Returns true once a backlog of at
    /// least [`RELEASE_AFTER`] has fully drained (and the lanes gave back
    /// their room): the moment for the caller to release memory too.
    pub fn finish(&self, count: usize) -> bool {
        let mut st = self.state.lock();
        st.in_flight = st.in_flight.saturating_sub(count);
        if st.in_flight == 0 && st.lanes.is_empty() {
            self.settled.notify_all();
            if st.high_water >= RELEASE_AFTER && st.timer.len() < RELEASE_AFTER {
                st.high_water = st.timer.len();
                st.lanes.shrink();
                st.timer.shrink();
                return true;
            }
        }
        false
    }

    /// Removes queued work that matches, from its lane or from the timer.
    pub fn cancel(&self, lane: usize, mut matches: impl FnMut(&T) -> bool) -> Option<T> {
        let mut st = self.state.lock();
        if let Some(item) = st.lanes.remove(lane, &mut matches) {
            return Some(item);
        }
        st.timer
            .remove(|(_, item)| matches(item))
            .map(|(_, item)| item)
    }

    /// Moves due work into the lanes until [`Scheduler::stop`]; the timer thread's body.
    pub fn run_timer(&self) {
        let mut st = self.state.lock();
        loop {
            if st.stopped {
                return;
            }
            let now = Instant::now();
            let due = st.timer.pop_due(now);
            let moved = due.len();
            for (lane, item) in due {
                if let Some(hook) = &self.on_due {
                    hook(&item);
                }
                st.lanes.push(lane, item, now);
            }
            if moved == 1 {
                self.work.notify_one();
            } else if moved > 1 {
                self.work.notify_all();
            }
            match st.timer.next_due() {
                Some(when) => {
                    self.timer.wait_until(&mut st, when);
                }
                None => self.timer.wait(&mut st),
            }
        }
    }

    /// Stops intake: later [`Scheduler::submit`] calls fail with `Closed`.
    pub fn close_intake(&self) {
        self.state.lock().intake_closed = true;
    }

    /// Waits until no work is ready or in flight and nothing scheduled falls
    /// due before `horizon`, or until `until` passes, whichever comes first.
    /// Returns whether that state was reached.
    pub fn wait_settled(&self, horizon: Instant, until: Instant) -> bool {
        let mut st = self.state.lock();
        loop {
            let timer_clear = st.timer.next_due().is_none_or(|d| d > horizon);
            if st.in_flight == 0 && st.lanes.is_empty() && timer_clear {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            let wake = match st.timer.next_due() {
                Some(d) if d < until => d.max(Instant::now() + Duration::from_millis(1)),
                _ => until,
            };
            self.settled.wait_until(&mut st, wake);
        }
    }

    /// Stops workers and the timer, returning everything still queued,
    /// ready work first (highest lane first), then scheduled work by due time.
    pub fn stop(&self) -> Vec<T> {
        let mut st = self.state.lock();
        st.intake_closed = true;
        st.stopped = true;
        let mut left = st.lanes.drain();
        left.extend(st.timer.drain().into_iter().map(|(_, item)| item));
        self.work.notify_all();
        self.timer.notify_all();
        self.settled.notify_all();
        left
    }

    pub fn is_stopped(&self) -> bool {
        self.state.lock().stopped
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().intake_closed
    }

    pub fn depths(&self) -> Depths {
        let st = self.state.lock();
        let mut lanes = [0; LANES];
        for (i, slot) in lanes.iter_mut().enumerate() {
            *slot = st.lanes.len(i);
        }
        Depths {
            lanes,
            scheduled: st.timer.len(),
            in_flight: st.in_flight,
            waiting_workers: st.waiting_workers,
            promoted: st.lanes.promoted(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.state.lock().capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn a_drained_burst_hands_its_room_back_once() {
        let s: Scheduler<u32> = Scheduler::new(100_000, Duration::from_secs(5));
        for i in 0..(RELEASE_AFTER as u32 * 2) {
            s.submit(2, i, Duration::ZERO).unwrap();
        }
        assert!(s.state.lock().lanes.room() >= RELEASE_AFTER * 2);
        let mut released = 0;
        while let Some(_item) = s.try_pop() {
            if s.finish(1) {
                released += 1;
            }
        }
        assert_eq!(released, 1);
        assert!(s.state.lock().lanes.room() < 64);
        // A small backlog afterwards does not trigger it again.
        s.submit(2, 1, Duration::ZERO).unwrap();
        assert!(s.try_pop().is_some());
        assert!(!s.finish(1));
    }

    const IDLE: Duration = Duration::from_millis(20);

    fn eventually(cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "condition not reached in 10 s");
            thread::yield_now();
        }
    }

    fn sched(capacity: usize) -> Arc<Scheduler<u32>> {
        Arc::new(Scheduler::new(capacity, Duration::from_secs(60)))
    }

    #[test]
    fn submit_pop_in_priority_order() {
        let s = sched(10);
        s.submit(3, 3, Duration::ZERO).unwrap();
        s.submit(0, 0, Duration::ZERO).unwrap();
        s.submit(2, 2, Duration::ZERO).unwrap();
        assert_eq!(s.pop(IDLE), Pop::Job(0));
        assert_eq!(s.try_pop(), Some(2));
        assert_eq!(s.try_pop(), Some(3));
        assert_eq!(s.try_pop(), None);
        assert_eq!(s.pop(IDLE), Pop::Idle);
        assert_eq!(s.depths().in_flight, 3);
        s.finish(3);
        assert_eq!(s.depths().in_flight, 0);
    }

    #[test]
    fn capacity_counts_ready_and_scheduled() {
        let s = sched(2);
        s.submit(2, 1, Duration::ZERO).unwrap();
        s.submit(2, 2, Duration::from_secs(60)).unwrap();
        match s.submit(2, 3, Duration::ZERO) {
            Err(Rejected::Full(3, 2)) => {}
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(s.pop(IDLE), Pop::Job(1));
        s.submit(2, 4, Duration::ZERO).unwrap();
        // A retry is never refused for capacity.
        s.retry(2, 1, Duration::ZERO).unwrap();
        assert_eq!(s.depths().ready(), 2);
    }

    #[test]
    fn closed_intake_refuses_new_work_but_keeps_retries() {
        let s = sched(10);
        s.submit(2, 1, Duration::ZERO).unwrap();
        assert_eq!(s.pop(IDLE), Pop::Job(1));
        s.close_intake();
        assert!(matches!(
            s.submit(2, 2, Duration::ZERO),
            Err(Rejected::Closed(2))
        ));
        s.retry(2, 1, Duration::ZERO).unwrap();
        assert_eq!(s.pop(IDLE), Pop::Job(1));
    }

    #[test]
    fn timer_releases_delayed_work_at_its_time() {
        let s = sched(10);
        let timer = {
            let s = s.clone();
            thread::spawn(move || s.run_timer())
        };
        let start = Instant::now();
        s.submit(2, 7, Duration::from_millis(80)).unwrap();
        s.submit(2, 5, Duration::from_millis(40)).unwrap();
        assert_eq!(s.pop(Duration::from_secs(5)), Pop::Job(5));
        assert!(start.elapsed() >= Duration::from_millis(40));
        assert_eq!(s.pop(Duration::from_secs(5)), Pop::Job(7));
        assert!(start.elapsed() >= Duration::from_millis(80));
        s.stop();
        timer.join().unwrap();
    }

    #[test]
    fn due_hook_sees_each_delayed_item() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = {
            let seen = seen.clone();
            Arc::new(
                Scheduler::new(10, Duration::from_secs(60))
                    .with_due_hook(Box::new(move |x: &u32| seen.lock().push(*x))),
            )
        };
        let timer = {
            let s = s.clone();
            thread::spawn(move || s.run_timer())
        };
        s.submit(2, 1, Duration::ZERO).unwrap();
        s.submit(2, 2, Duration::from_millis(10)).unwrap();
        assert_eq!(s.pop(Duration::from_secs(5)), Pop::Job(1));
        assert_eq!(s.pop(Duration::from_secs(5)), Pop::Job(2));
        assert_eq!(*seen.lock(), vec![2]);
        s.stop();
        timer.join().unwrap();
    }

    #[test]
    fn waiting_worker_wakes_on_submit_and_stop() {
        let s = sched(10);
        let worker = {
            let s = s.clone();
            thread::spawn(move || {
                (
                    s.pop(Duration::from_secs(10)),
                    s.pop(Duration::from_secs(10)),
                )
            })
        };
        eventually(|| s.depths().waiting_workers > 0);
        s.submit(1, 9, Duration::ZERO).unwrap();
        eventually(|| s.depths().in_flight > 0);
        let left = s.stop();
        assert!(left.is_empty());
        assert_eq!(worker.join().unwrap(), (Pop::Job(9), Pop::Stopped));
    }

    #[test]
    fn cancel_removes_from_lane_or_timer() {
        let s = sched(10);
        s.submit(2, 1, Duration::ZERO).unwrap();
        s.submit(3, 2, Duration::from_secs(30)).unwrap();
        assert_eq!(s.cancel(3, |x| *x == 2), Some(2));
        assert_eq!(s.cancel(2, |x| *x == 1), Some(1));
        assert_eq!(s.cancel(2, |x| *x == 1), None);
        assert_eq!(s.depths(), Depths::default());
    }

    #[test]
    fn stop_returns_everything_left() {
        let s = sched(10);
        s.submit(3, 3, Duration::ZERO).unwrap();
        s.submit(0, 0, Duration::ZERO).unwrap();
        s.submit(2, 9, Duration::from_secs(30)).unwrap();
        assert_eq!(s.stop(), vec![0, 3, 9]);
        assert_eq!(s.pop(IDLE), Pop::Stopped);
        assert!(s.retry(2, 1, Duration::ZERO).is_err());
    }

    #[test]
    fn wait_settled_tracks_in_flight_and_horizon() {
        let s = sched(10);
        s.submit(2, 1, Duration::from_secs(3600)).unwrap();
        // Work due after the deadline does not hold shutdown.
        let soon = Instant::now() + Duration::from_millis(10);
        assert!(s.wait_settled(soon, soon));
        s.submit(2, 2, Duration::ZERO).unwrap();
        assert_eq!(s.pop(IDLE), Pop::Job(2));
        let soon = Instant::now() + Duration::from_millis(30);
        assert!(!s.wait_settled(soon, soon));
        let finisher = {
            let s = s.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                s.finish(1);
            })
        };
        let later = Instant::now() + Duration::from_secs(5);
        assert!(s.wait_settled(later, later));
        finisher.join().unwrap();
    }
}

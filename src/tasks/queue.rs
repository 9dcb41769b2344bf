//! The queue an engine's workers take their tasks from, as one narrow
//! interface. In one process it is the in-memory [`Scheduler`] (priority
//! lanes and a timer); a queue shared by processes and hosts (a store, with
//! leases) is a second implementation of the same interface, so nothing
//! above this line branches on which one it is. The contract is written out
//! in docs/design.md.

use std::time::{Duration, Instant};

use super::scheduler::{Depths, Pop, Rejected, Scheduler};

/// Where tasks wait until a worker takes them.
///
/// A worker that takes an item holds it (its lease) until it acknowledges it
/// with [`Queue::ack`] or hands it back with [`Queue::requeue`]. In memory the
/// lease is the process's own life; a shared queue bounds it in time, renews
/// it from its `run_clock` thread while the item runs, and gives an item
/// whose lease lapsed (its owner died or hung) to another worker.
pub trait Queue<T>: Send + Sync {
    /// Queues new work in `lane`, ready now or due after `delay`. Refused
    /// when the queue is full or its intake is closed; the item comes back.
    /// Returns whether every worker was busy (a hint to grow the pool).
    fn push(&self, lane: usize, item: T, delay: Duration) -> Result<bool, Rejected<T>>;

    /// Hands a taken item back, due after `delay` (a retry). Not refused for
    /// a full queue (the item held its place); fails only once stopped.
    fn requeue(&self, lane: usize, item: T, delay: Duration) -> Result<(), T>;

    /// Takes the next due item, highest lane first, waiting up to `idle` for
    /// one. Call it without holding the Python interpreter.
    fn take(&self, idle: Duration) -> Pop<T>;

    /// Takes a due item without waiting, if there is one.
    fn try_take(&self) -> Option<T>;

    /// `count` taken items are done. Returns true once a backlog deep enough
    /// to be worth it has fully drained: the moment to give memory back.
    fn ack(&self, count: usize) -> bool;

    /// Removes a queued (not taken) item that `matches`.
    fn cancel(&self, lane: usize, matches: &mut dyn FnMut(&T) -> bool) -> Option<T>;

    /// Moves due work where workers take it, until the queue stops; the body
    /// of the queue's own thread (the timer, or lease upkeep).
    fn run_clock(&self);

    /// Stops intake: later pushes are refused with `Closed`.
    fn close_intake(&self);

    /// Waits until nothing is ready or taken and nothing falls due before
    /// `horizon`, or until `until`; returns whether that state was reached.
    fn wait_settled(&self, horizon: Instant, until: Instant) -> bool;

    /// Stops takers and the clock; returns everything still queued.
    fn stop(&self) -> Vec<T>;

    fn is_stopped(&self) -> bool;
    fn is_closed(&self) -> bool;
    fn depths(&self) -> Depths;
}

impl<T: Send> Queue<T> for Scheduler<T> {
    fn push(&self, lane: usize, item: T, delay: Duration) -> Result<bool, Rejected<T>> {
        self.submit(lane, item, delay)
    }

    fn requeue(&self, lane: usize, item: T, delay: Duration) -> Result<(), T> {
        self.retry(lane, item, delay)
    }

    fn take(&self, idle: Duration) -> Pop<T> {
        self.pop(idle)
    }

    fn try_take(&self) -> Option<T> {
        self.try_pop()
    }

    fn ack(&self, count: usize) -> bool {
        self.finish(count)
    }

    fn cancel(&self, lane: usize, matches: &mut dyn FnMut(&T) -> bool) -> Option<T> {
        Scheduler::cancel(self, lane, matches)
    }

    fn run_clock(&self) {
        self.run_timer()
    }

    fn close_intake(&self) {
        Scheduler::close_intake(self)
    }

    fn wait_settled(&self, horizon: Instant, until: Instant) -> bool {
        Scheduler::wait_settled(self, horizon, until)
    }

    fn stop(&self) -> Vec<T> {
        Scheduler::stop(self)
    }

    fn is_stopped(&self) -> bool {
        Scheduler::is_stopped(self)
    }

    fn is_closed(&self) -> bool {
        Scheduler::is_closed(self)
    }

    fn depths(&self) -> Depths {
        Scheduler::depths(self)
    }
}

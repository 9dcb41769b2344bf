//! Four FIFO priority lanes with a bound on the total and an ageing guard.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Number of priority lanes: CRITICAL, HIGH, NORMAL, LOW.
pub const LANES: usize = 4;

/// A queued item with the instant it became ready.
struct Entry<T> {
    ready_at: Instant,
    item: T,
}

/// Priority lanes, served highest first and in arrival order within a lane.
///
/// Starvation guard: when the head of a lower lane has waited at least
/// `starvation_after`, it is served before newer work of higher lanes. Among
/// several such heads the one that has waited longest goes first.
pub struct Lanes<T> {
    lanes: [VecDeque<Entry<T>>; LANES],
    starvation_after: Duration,
    promoted: u64,
}

impl<T> Lanes<T> {
    pub fn new(starvation_after: Duration) -> Self {
        Self {
            lanes: Default::default(),
            starvation_after,
            promoted: 0,
        }
    }

    pub fn push(&mut self, lane: usize, item: T, now: Instant) {
        self.lanes[lane.min(LANES - 1)].push_back(Entry {
            ready_at: now,
            item,
        });
    }

    /// Takes the next item to run, or `None` when every lane is empty.
    ///
    /// Normally the head of the highest non-empty lane. A lower lane's head
    /// that has waited at least `starvation_after` competes with it: of those
    /// heads, the one that has waited longest wins, ties going to the higher
    /// lane, so older urgent work is never passed over.
    pub fn pop(&mut self, now: Instant) -> Option<T> {
        let first = self.lanes.iter().position(|l| !l.is_empty())?;
        let waited = |lane: &VecDeque<Entry<T>>| {
            lane.front()
                .map(|head| now.saturating_duration_since(head.ready_at))
        };
        let mut pick = first;
        let mut longest = waited(&self.lanes[first]).unwrap_or_default();
        for lane in first + 1..LANES {
            if let Some(w) = waited(&self.lanes[lane]) {
                if w >= self.starvation_after && w > longest {
                    longest = w;
                    pick = lane;
                }
            }
        }
        if pick != first {
            self.promoted += 1;
        }
        self.lanes[pick].pop_front().map(|e| e.item)
    }

    /// Removes the first item of `lane` that matches, wherever it stands.
    pub fn remove(&mut self, lane: usize, mut matches: impl FnMut(&T) -> bool) -> Option<T> {
        let lane = &mut self.lanes[lane.min(LANES - 1)];
        let at = lane.iter().position(|e| matches(&e.item))?;
        lane.remove(at).map(|e| e.item)
    }

    /// Empties every lane, highest first.
    pub fn drain(&mut self) -> Vec<T> {
        self.lanes
            .iter_mut()
            .flat_map(|l| l.drain(..).map(|e| e.item))
            .collect()
    }

    pub fn len(&self, lane: usize) -> usize {
        self.lanes[lane].len()
    }

    /// Gives back the room a burst left in the lanes.
    pub fn shrink(&mut self) {
        for lane in &mut self.lanes {
            lane.shrink_to_fit();
        }
    }

    /// Entries the lanes hold room for.
    pub fn room(&self) -> usize {
        self.lanes.iter().map(VecDeque::capacity).sum()
    }

    pub fn total(&self) -> usize {
        self.lanes.iter().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(VecDeque::is_empty)
    }

    /// How many times the starvation guard served a lower lane first.
    pub fn promoted(&self) -> u64 {
        self.promoted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes() -> Lanes<u32> {
        Lanes::new(Duration::from_secs(10))
    }

    #[test]
    fn highest_lane_first_fifo_within_lane() {
        let now = Instant::now();
        let mut l = lanes();
        l.push(3, 30, now);
        l.push(2, 20, now);
        l.push(2, 21, now);
        l.push(0, 1, now);
        l.push(1, 10, now);
        let order: Vec<u32> = std::iter::from_fn(|| l.pop(now)).collect();
        assert_eq!(order, vec![1, 10, 20, 21, 30]);
        assert!(l.is_empty());
    }

    #[test]
    fn starved_low_task_is_promoted() {
        let t0 = Instant::now();
        let mut l = lanes();
        l.push(3, 99, t0);
        let later = t0 + Duration::from_secs(11);
        l.push(0, 1, later);
        l.push(1, 2, later);
        assert_eq!(l.pop(later), Some(99));
        assert_eq!(l.promoted(), 1);
        assert_eq!(l.pop(later), Some(1));
        assert_eq!(l.pop(later), Some(2));
    }

    #[test]
    fn longest_waiting_starved_head_wins() {
        let t0 = Instant::now();
        let mut l = lanes();
        l.push(3, 3, t0);
        l.push(2, 2, t0 + Duration::from_secs(1));
        l.push(0, 0, t0 + Duration::from_secs(20));
        let now = t0 + Duration::from_secs(20);
        assert_eq!(l.pop(now), Some(3));
        assert_eq!(l.pop(now), Some(2));
        assert_eq!(l.pop(now), Some(0));
    }

    #[test]
    fn older_urgent_work_is_not_passed_over() {
        let t0 = Instant::now();
        let mut l = lanes();
        l.push(0, 1, t0);
        l.push(0, 2, t0);
        l.push(3, 9, t0 + Duration::from_secs(3));
        let now = t0 + Duration::from_secs(20);
        // The LOW head is starved, but the CRITICAL heads have waited longer.
        assert_eq!(l.pop(now), Some(1));
        assert_eq!(l.pop(now), Some(2));
        assert_eq!(l.pop(now), Some(9));
        assert_eq!(l.promoted(), 0);
    }

    #[test]
    fn not_promoted_before_bound() {
        let t0 = Instant::now();
        let mut l = lanes();
        l.push(3, 3, t0);
        l.push(0, 0, t0);
        assert_eq!(l.pop(t0 + Duration::from_secs(9)), Some(0));
        assert_eq!(l.promoted(), 0);
    }

    #[test]
    fn remove_and_counts() {
        let now = Instant::now();
        let mut l = lanes();
        for i in 0..5 {
            l.push(2, i, now);
        }
        l.push(1, 100, now);
        assert_eq!(l.len(2), 5);
        assert_eq!(l.total(), 6);
        assert_eq!(l.remove(2, |x| *x == 3), Some(3));
        assert_eq!(l.remove(2, |x| *x == 3), None);
        assert_eq!(l.drain(), vec![100, 0, 1, 2, 4]);
        assert_eq!(l.total(), 0);
    }
}

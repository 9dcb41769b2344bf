//! A heap of items ordered by due time: delayed tasks and retries wait here.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Instant;

struct Slot<T> {
    due: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Slot<T> {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due && self.seq == other.seq
    }
}
impl<T> Eq for Slot<T> {}
impl<T> PartialOrd for Slot<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Slot<T> {
    // Reversed, so the max-heap yields the earliest due item, then the earliest pushed.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .due
            .cmp(&self.due)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// Items waiting for a due time. Equal due times come out in push order.
pub struct TimerHeap<T> {
    heap: BinaryHeap<Slot<T>>,
    seq: u64,
}

impl<T> Default for TimerHeap<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<T> TimerHeap<T> {
    pub fn push(&mut self, due: Instant, item: T) {
        self.seq += 1;
        self.heap.push(Slot {
            due,
            seq: self.seq,
            item,
        });
    }

    /// The earliest due time, if anything waits.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|s| s.due)
    }

    /// Takes every item due at or before `now`, earliest first.
    pub fn pop_due(&mut self, now: Instant) -> Vec<T> {
        let mut out = Vec::new();
        while self.heap.peek().is_some_and(|s| s.due <= now) {
            if let Some(slot) = self.heap.pop() {
                out.push(slot.item);
            }
        }
        out
    }

    /// Removes the first item that matches.
    pub fn remove(&mut self, mut matches: impl FnMut(&T) -> bool) -> Option<T> {
        let mut found = None;
        let mut kept = Vec::with_capacity(self.heap.len());
        for slot in std::mem::take(&mut self.heap).into_vec() {
            if found.is_none() && matches(&slot.item) {
                found = Some(slot.item);
            } else {
                kept.push(slot);
            }
        }
        self.heap = BinaryHeap::from(kept);
        found
    }

    /// Empties the heap, earliest first.
    pub fn drain(&mut self) -> Vec<T> {
        let mut slots = std::mem::take(&mut self.heap).into_sorted_vec();
        slots.reverse();
        slots.into_iter().map(|s| s.item).collect()
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn shrink(&mut self) {
        self.heap.shrink_to_fit();
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_due_order_then_push_order() {
        let t0 = Instant::now();
        let mut h = TimerHeap::default();
        h.push(t0 + Duration::from_millis(30), "c");
        h.push(t0 + Duration::from_millis(10), "a");
        h.push(t0 + Duration::from_millis(10), "b");
        h.push(t0 + Duration::from_millis(50), "late");
        assert_eq!(h.next_due(), Some(t0 + Duration::from_millis(10)));
        assert!(h.pop_due(t0).is_empty());
        assert_eq!(
            h.pop_due(t0 + Duration::from_millis(30)),
            vec!["a", "b", "c"]
        );
        assert_eq!(h.len(), 1);
        assert_eq!(h.drain(), vec!["late"]);
        assert!(h.is_empty());
    }

    #[test]
    fn remove_keeps_order() {
        let t0 = Instant::now();
        let mut h = TimerHeap::default();
        for i in 0..5u32 {
            h.push(t0 + Duration::from_millis(u64::from(i)), i);
        }
        assert_eq!(h.remove(|x| *x == 2), Some(2));
        assert_eq!(h.remove(|x| *x == 2), None);
        assert_eq!(h.drain(), vec![0, 1, 3, 4]);
    }
}

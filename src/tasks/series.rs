//! Per-series task counts and timings, where a series is one task name,
//! priority lane and queue: what the metrics endpoint and the dashboard show
//! by label. Counting is atomic; each series' histograms have their own lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// Series beyond this many share the name `OVERFLOW`, so a program that
/// makes task functions on the fly cannot grow the table without bound.
pub const MAX_SERIES: usize = 2000;
pub const OVERFLOW: &str = "(other)";

/// What happened to a task, as counted and as reported to event hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Event {
    Submitted,
    Started,
    Succeeded,
    Failed,
    Retrying,
    TimedOut,
    Cancelled,
}

impl Event {
    pub const ALL: [Event; 7] = [
        Event::Submitted,
        Event::Started,
        Event::Succeeded,
        Event::Failed,
        Event::Retrying,
        Event::TimedOut,
        Event::Cancelled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Event::Submitted => "submitted",
            Event::Started => "started",
            Event::Succeeded => "succeeded",
            Event::Failed => "failed",
            Event::Retrying => "retrying",
            Event::TimedOut => "timed_out",
            Event::Cancelled => "cancelled",
        }
    }
}

/// Bucket bounds (seconds) of the task duration and wait histograms.
pub const TASK_BUCKETS: [f64; 15] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A Prometheus histogram with fixed bounds: a count per bucket and the
/// exact sum, all atomic, so recording takes no lock.
pub struct Timing {
    /// Bounds in nanoseconds, ascending.
    bounds: Vec<u64>,
    /// Per bucket (not cumulative); the last one is above every bound.
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl Timing {
    /// A histogram with `bounds` in seconds, ascending.
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.iter().map(|b| (b * 1e9) as u64).collect(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn record(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        // `le` is inclusive: a value on a bound counts in that bound's bucket.
        let i = self.bounds.partition_point(|b| *b < ns);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Cumulative counts at each bound, the total count and the sum in
    /// seconds: a Prometheus histogram.
    pub fn buckets(&self) -> (Vec<u64>, u64, f64) {
        let mut running = 0;
        let mut cumulative = Vec::with_capacity(self.bounds.len());
        for c in &self.counts[..self.bounds.len()] {
            running += c.load(Relaxed);
            cumulative.push(running);
        }
        let total = running + self.counts[self.bounds.len()].load(Relaxed);
        (cumulative, total, self.sum_ns.load(Relaxed) as f64 / 1e9)
    }
}

pub struct Series {
    pub name: Arc<str>,
    pub lane: usize,
    pub queue: Arc<str>,
    counts: [AtomicU64; Event::ALL.len()],
    /// How long each attempt ran.
    pub duration: Timing,
    /// How long each task waited from being queued to its first start.
    pub wait: Timing,
}

impl Series {
    fn new(name: Arc<str>, lane: usize, queue: Arc<str>) -> Self {
        Self {
            name,
            lane,
            queue,
            counts: Default::default(),
            duration: Timing::new(&TASK_BUCKETS),
            wait: Timing::new(&TASK_BUCKETS),
        }
    }

    pub fn count(&self, event: Event) {
        self.counts[event as usize].fetch_add(1, Relaxed);
    }

    pub fn counted(&self, event: Event) -> u64 {
        self.counts[event as usize].load(Relaxed)
    }

    pub fn ran(&self, took: Duration) {
        self.duration.record(took);
    }

    pub fn waited(&self, took: Duration) {
        self.wait.record(took);
    }
}

type Key = (Arc<str>, usize, Arc<str>);

/// Every series seen, by name, lane and queue.
#[derive(Default)]
pub struct SeriesTable {
    map: Mutex<HashMap<Key, Arc<Series>>>,
}

impl SeriesTable {
    /// The series of `name` in `lane` and `queue`, made on first use.
    pub fn get(&self, name: &Arc<str>, lane: usize, queue: &Arc<str>) -> Arc<Series> {
        let mut map = self.map.lock();
        let key = (name.clone(), lane, queue.clone());
        if let Some(s) = map.get(&key) {
            return s.clone();
        }
        let key = if map.len() >= MAX_SERIES {
            let key = (Arc::from(OVERFLOW), lane, queue.clone());
            if let Some(s) = map.get(&key) {
                return s.clone();
            }
            key
        } else {
            key
        };
        let series = Arc::new(Series::new(key.0.clone(), lane, key.2.clone()));
        map.insert(key, series.clone());
        series
    }

    /// Every series, sorted by name, lane and queue.
    pub fn all(&self) -> Vec<Arc<Series>> {
        let mut all: Vec<_> = self.map.lock().values().cloned().collect();
        all.sort_by(|a, b| (&a.name, a.lane, &a.queue).cmp(&(&b.name, b.lane, &b.queue)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_found_again_and_counted_apart() {
        let table = SeriesTable::default();
        let (a, b, q): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "default".into());
        let s1 = table.get(&a, 2, &q);
        let s2 = table.get(&a, 2, &q);
        assert!(Arc::ptr_eq(&s1, &s2));
        let s3 = table.get(&a, 1, &q);
        let s4 = table.get(&b, 2, &q);
        s1.count(Event::Succeeded);
        s2.count(Event::Succeeded);
        s3.count(Event::Failed);
        assert_eq!(s1.counted(Event::Succeeded), 2);
        assert_eq!(s3.counted(Event::Succeeded), 0);
        assert_eq!(s3.counted(Event::Failed), 1);
        assert_eq!(s4.counted(Event::Failed), 0);
        let names: Vec<_> = table
            .all()
            .iter()
            .map(|s| (s.name.to_string(), s.lane))
            .collect();
        assert_eq!(names, [("a".into(), 1), ("a".into(), 2), ("b".into(), 2)]);
    }

    #[test]
    fn the_table_is_bounded() {
        let table = SeriesTable::default();
        let q: Arc<str> = "default".into();
        for i in 0..MAX_SERIES + 50 {
            table
                .get(&Arc::from(format!("f{i}")), 0, &q)
                .count(Event::Submitted);
        }
        let all = table.all();
        assert_eq!(all.len(), MAX_SERIES + 1);
        let other = all.iter().find(|s| &*s.name == OVERFLOW).unwrap();
        assert_eq!(other.counted(Event::Submitted), 50);
    }

    #[test]
    fn timing_buckets_are_cumulative_with_an_exact_sum() {
        let t = Timing::new(&[0.001, 0.01, 0.1, 1.0]);
        for ms in [1u64, 2, 5, 20, 200, 3000] {
            t.record(Duration::from_millis(ms));
        }
        let (counts, n, sum) = t.buckets();
        // 1 ms sits on the first bound, which is inclusive; 3 s is above all.
        assert_eq!(counts, [1, 3, 4, 5]);
        assert_eq!(n, 6);
        let sum = sum - 3.0;
        assert!((sum - 0.228).abs() < 1e-9, "{sum}");
    }
}

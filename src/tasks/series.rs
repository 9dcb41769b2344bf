//! Per-series task counts and timings, where a series is one task name,
//! priority lane and queue: what the metrics endpoint and the dashboard show
//! by label. Counting is atomic; each series' histograms have their own lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use super::stats::{new_histogram, record_micros};

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

/// A histogram with the exact sum of what it recorded.
pub struct Timing {
    histogram: Histogram<u64>,
    sum: Duration,
}

impl Timing {
    pub fn new() -> Option<Self> {
        Some(Self {
            histogram: new_histogram().ok()?,
            sum: Duration::ZERO,
        })
    }

    pub fn record(&mut self, took: Duration) {
        record_micros(&mut self.histogram, took);
        self.sum += took;
    }

    /// Cumulative counts at each bound (seconds, ascending), the total count
    /// and the sum in seconds: a Prometheus histogram.
    pub fn buckets(&self, bounds: &[f64]) -> (Vec<u64>, u64, f64) {
        let counts = bounds
            .iter()
            .map(|b| {
                let us = (b * 1e6).clamp(0.0, self.histogram.high() as f64) as u64;
                if us == 0 {
                    0
                } else {
                    self.histogram.count_between(0, us)
                }
            })
            .collect();
        (counts, self.histogram.len(), self.sum.as_secs_f64())
    }

    pub fn histogram(&self) -> &Histogram<u64> {
        &self.histogram
    }
}

pub struct Series {
    pub name: Arc<str>,
    pub lane: usize,
    pub queue: Arc<str>,
    counts: [AtomicU64; Event::ALL.len()],
    /// How long each attempt ran.
    pub duration: Mutex<Option<Timing>>,
    /// How long each task waited from being queued to its first start.
    pub wait: Mutex<Option<Timing>>,
}

impl Series {
    fn new(name: Arc<str>, lane: usize, queue: Arc<str>) -> Self {
        Self {
            name,
            lane,
            queue,
            counts: Default::default(),
            duration: Mutex::new(Timing::new()),
            wait: Mutex::new(Timing::new()),
        }
    }

    pub fn count(&self, event: Event) {
        self.counts[event as usize].fetch_add(1, Relaxed);
    }

    pub fn counted(&self, event: Event) -> u64 {
        self.counts[event as usize].load(Relaxed)
    }

    pub fn ran(&self, took: Duration) {
        if let Some(t) = self.duration.lock().as_mut() {
            t.record(took);
        }
    }

    pub fn waited(&self, took: Duration) {
        if let Some(t) = self.wait.lock().as_mut() {
            t.record(took);
        }
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

    /// The run times of every series merged, for overall percentiles.
    pub fn merged_durations(&self) -> Option<Histogram<u64>> {
        let mut merged = new_histogram().ok()?;
        for s in self.all() {
            if let Some(t) = s.duration.lock().as_ref() {
                let _ = merged.add(t.histogram());
            }
        }
        Some(merged)
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
        let mut t = Timing::new().unwrap();
        for ms in [1u64, 2, 5, 20, 200] {
            t.record(Duration::from_millis(ms));
        }
        let (counts, n, sum) = t.buckets(&[0.001, 0.01, 0.1, 1.0]);
        assert_eq!(counts, [1, 3, 4, 5]);
        assert_eq!(n, 5);
        assert!((sum - 0.228).abs() < 1e-9, "{sum}");
    }
}

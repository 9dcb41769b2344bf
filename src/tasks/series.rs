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

/// Bounds in seconds as nanoseconds, for `Buckets`.
pub const fn nanos<const N: usize>(secs: [f64; N]) -> [u64; N] {
    let mut ns = [0u64; N];
    let mut i = 0;
    while i < N {
        ns[i] = (secs[i] * 1e9) as u64;
        i += 1;
    }
    ns
}

/// Most buckets a histogram has: its bounds and one above them all.
pub const MAX_SLOTS: usize = 16;

/// A Prometheus histogram's counts: one per bucket (not cumulative; the
/// last above every bound) and the exact sum, all atomic, so recording takes
/// no lock. Its bounds (ns, ascending, fewer than `MAX_SLOTS`) are passed in.
#[derive(Default)]
pub struct Buckets {
    counts: [AtomicU64; MAX_SLOTS],
    sum_ns: AtomicU64,
}

impl Buckets {
    pub fn record(&self, bounds: &[u64], took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        // `le` is inclusive: a value on a bound counts in that bound's bucket.
        let i = bounds.partition_point(|b| *b < ns);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Adds these counts and sum to `total`.
    pub fn add_to(&self, total: &mut Reading) {
        for (t, c) in total.counts.iter_mut().zip(&self.counts) {
            *t += c.load(Relaxed);
        }
        total.sum_ns = total.sum_ns.saturating_add(self.sum_ns.load(Relaxed));
    }
}

/// Counts and sum read from one or more `Buckets`.
#[derive(Default)]
pub struct Reading {
    counts: [u64; MAX_SLOTS],
    sum_ns: u64,
}

impl Reading {
    /// Cumulative counts at each of `bounds` bounds, the total count and
    /// the sum in seconds: a Prometheus histogram.
    pub fn histogram(&self, bounds: usize) -> (Vec<u64>, u64, f64) {
        let cumulative: Vec<u64> = self.counts[..=bounds]
            .iter()
            .scan(0u64, |run, n| {
                *run += n;
                Some(*run)
            })
            .collect();
        (
            cumulative[..bounds].to_vec(),
            cumulative[bounds],
            self.sum_ns as f64 / 1e9,
        )
    }
}

/// Counters are split in shards, one per thread (modulo): workers and the
/// threads that queue tasks each count in their own cache line instead of
/// passing the same lines between cores for every task.
const SHARDS: usize = 8;
const TASK_BUCKETS_NS: [u64; TASK_BUCKETS.len()] = nanos(TASK_BUCKETS);
const _: () = assert!(TASK_BUCKETS.len() < MAX_SLOTS);

#[derive(Default)]
#[repr(align(128))]
struct Shard {
    counts: [AtomicU64; Event::ALL.len()],
    duration: Buckets,
    wait: Buckets,
}

/// This thread's shard.
fn shard_index() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static INDEX: usize = (NEXT.fetch_add(1, Relaxed) % SHARDS as u64) as usize;
    }
    INDEX.with(|i| *i)
}

pub struct Series {
    pub name: Arc<str>,
    pub lane: usize,
    pub queue: Arc<str>,
    shards: Box<[Shard; SHARDS]>,
}

impl Series {
    fn new(name: Arc<str>, lane: usize, queue: Arc<str>) -> Self {
        Self {
            name,
            lane,
            queue,
            shards: Box::default(),
        }
    }

    fn mine(&self) -> &Shard {
        &self.shards[shard_index()]
    }

    pub fn count(&self, event: Event) {
        self.mine().counts[event as usize].fetch_add(1, Relaxed);
    }

    pub fn counted(&self, event: Event) -> u64 {
        if event == Event::Started {
            return self.waits().1;
        }
        self.shards
            .iter()
            .map(|s| s.counts[event as usize].load(Relaxed))
            .sum()
    }

    /// One attempt's run time.
    pub fn ran(&self, took: Duration) {
        self.mine().duration.record(&TASK_BUCKETS_NS, took);
    }

    /// The wait from being queued to the first start.
    pub fn waited(&self, took: Duration) {
        self.mine().wait.record(&TASK_BUCKETS_NS, took);
    }

    /// Run times as cumulative counts at `TASK_BUCKETS`, count and sum (s).
    pub fn durations(&self) -> (Vec<u64>, u64, f64) {
        self.read(|s| &s.duration)
    }

    /// Waits as cumulative counts at `TASK_BUCKETS`, count and sum (s).
    pub fn waits(&self) -> (Vec<u64>, u64, f64) {
        self.read(|s| &s.wait)
    }

    fn read(&self, pick: impl Fn(&Shard) -> &Buckets) -> (Vec<u64>, u64, f64) {
        let mut total = Reading::default();
        for shard in self.shards.iter() {
            pick(shard).add_to(&mut total);
        }
        total.histogram(TASK_BUCKETS.len())
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
    fn series_timings_sum_over_the_threads_that_recorded_them() {
        let table = SeriesTable::default();
        let s = table.get(&Arc::from("f"), 2, &Arc::from("default"));
        std::thread::scope(|scope| {
            for ms in [1u64, 2, 5, 20, 200, 3000] {
                let s = s.clone();
                scope.spawn(move || {
                    s.ran(Duration::from_millis(ms));
                    s.count(Event::Succeeded);
                });
            }
        });
        let (counts, n, sum) = s.durations();
        let at = |b: f64| counts[TASK_BUCKETS.iter().position(|x| *x == b).unwrap()];
        assert_eq!(
            (at(0.001), at(0.005), at(0.025), at(0.25), at(300.0)),
            (1, 3, 4, 5, 6)
        );
        assert_eq!(n, 6);
        assert!((sum - 3.228).abs() < 1e-9, "{sum}");
        assert_eq!(s.counted(Event::Succeeded), 6);
        assert_eq!(s.waits().1, 0);
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
        const BOUNDS: [u64; 4] = nanos([0.001, 0.01, 0.1, 1.0]);
        let t = Buckets::default();
        for ms in [1u64, 2, 5, 20, 200, 3000] {
            t.record(&BOUNDS, Duration::from_millis(ms));
        }
        let mut read = Reading::default();
        t.add_to(&mut read);
        let (counts, n, sum) = read.histogram(BOUNDS.len());
        // 1 ms sits on the first bound, which is inclusive; 3 s is above all.
        assert_eq!(counts, [1, 3, 4, 5]);
        assert_eq!(n, 6);
        let sum = sum - 3.0;
        assert!((sum - 0.228).abs() < 1e-9, "{sum}");
    }
}

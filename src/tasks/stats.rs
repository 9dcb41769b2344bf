//! Measurements behind `EngineStats`: a sliding-window rate, run-time
//! percentiles and usage rates between samples.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Counts events per 100 ms bucket over a sliding window.
pub struct RateWindow {
    window: Duration,
    bucket: Duration,
    start: Instant,
    buckets: VecDeque<(u64, u64)>,
}

impl RateWindow {
    pub fn new(window: Duration, start: Instant) -> Self {
        Self {
            window,
            bucket: Duration::from_millis(100),
            start,
            buckets: VecDeque::new(),
        }
    }

    fn index(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.start).as_nanos() / self.bucket.as_nanos()) as u64
    }

    fn span(&self) -> u64 {
        (self.window.as_nanos() / self.bucket.as_nanos()) as u64
    }

    pub fn record(&mut self, count: u64, at: Instant) {
        let idx = self.index(at);
        match self.buckets.back_mut() {
            Some((i, n)) if *i == idx => *n += count,
            _ => self.buckets.push_back((idx, count)),
        }
        let oldest = idx.saturating_sub(self.span());
        while self.buckets.front().is_some_and(|(i, _)| *i < oldest) {
            self.buckets.pop_front();
        }
    }

    /// Events per second over the window, or over the time since start
    /// while that is shorter than the window.
    pub fn per_second(&self, now: Instant) -> f64 {
        let idx = self.index(now);
        let oldest = idx.saturating_sub(self.span());
        let count: u64 = self
            .buckets
            .iter()
            .filter(|(i, _)| *i >= oldest && *i <= idx)
            .map(|(_, n)| n)
            .sum();
        let span = now
            .saturating_duration_since(self.start)
            .min(self.window)
            .max(Duration::from_millis(100));
        count as f64 / span.as_secs_f64()
    }
}

/// Run times in microseconds, 1 µs to 1 hour, two significant figures.
pub fn new_histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2)
}

pub fn record_micros(h: &mut Histogram<u64>, took: Duration) {
    let us = (took.as_micros() as u64).clamp(1, h.high());
    h.saturating_record(us);
}

/// Mean, p95 and p99 in milliseconds; zeros for an empty histogram.
pub fn summary_ms(h: &Histogram<u64>) -> (f64, f64, f64) {
    if h.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    (
        h.mean() / 1000.0,
        h.value_at_quantile(0.95) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
    )
}

/// Cumulative counters at one instant, from which rates are derived.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at: Instant,
    pub busy_ns: u64,
    pub worker_cpu_ns: u64,
    pub process_cpu_ns: u64,
}

/// Keeps the sample that rates are measured against: the newest one at least
/// `min_gap` old, so a rate always covers at least that long once available.
pub struct Sampler {
    min_gap: Duration,
    history: VecDeque<Sample>,
}

/// Usage over the interval between two samples, in percent.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub utilization: f64,
    pub worker_cpu: f64,
    pub process_cpu: f64,
}

impl Sampler {
    pub fn new(first: Sample, min_gap: Duration) -> Self {
        Self {
            min_gap,
            history: VecDeque::from([first]),
        }
    }

    /// Usage between the reference sample and `now`. `workers` is the
    /// number of workers, so utilization is busy time per worker.
    pub fn usage(&mut self, now: Sample, workers: usize) -> Usage {
        while self.history.len() > 1
            && self
                .history
                .get(1)
                .is_some_and(|s| now.at.saturating_duration_since(s.at) >= self.min_gap)
        {
            self.history.pop_front();
        }
        let base = self.history.front().copied().unwrap_or(now);
        if self
            .history
            .back()
            .is_none_or(|s| now.at.saturating_duration_since(s.at) >= self.min_gap / 4)
        {
            self.history.push_back(now);
        }
        let wall = now.at.saturating_duration_since(base.at).as_nanos() as f64;
        if wall <= 0.0 {
            return Usage::default();
        }
        let pct = |a: u64, b: u64| a.saturating_sub(b) as f64 / wall * 100.0;
        Usage {
            utilization: (pct(now.busy_ns, base.busy_ns) / workers.max(1) as f64).min(100.0),
            worker_cpu: pct(now.worker_cpu_ns, base.worker_cpu_ns),
            process_cpu: pct(now.process_cpu_ns, base.process_cpu_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_window_slides() {
        let t0 = Instant::now();
        let mut r = RateWindow::new(Duration::from_secs(10), t0);
        r.record(50, t0 + Duration::from_millis(500));
        r.record(50, t0 + Duration::from_millis(900));
        let rate = r.per_second(t0 + Duration::from_secs(1));
        assert!((rate - 100.0).abs() < 1e-9, "{rate}");
        // Ten seconds later, only what fell inside the window counts.
        r.record(20, t0 + Duration::from_secs(12));
        let rate = r.per_second(t0 + Duration::from_secs(12));
        assert!((rate - 2.0).abs() < 1e-9, "{rate}");
        assert_eq!(r.per_second(t0 + Duration::from_secs(40)), 0.0);
    }

    #[test]
    fn histogram_summary() {
        let mut h = new_histogram().unwrap();
        assert_eq!(summary_ms(&h), (0.0, 0.0, 0.0));
        for ms in 1..=100u64 {
            record_micros(&mut h, Duration::from_millis(ms));
        }
        let (mean, p95, p99) = summary_ms(&h);
        assert!((mean - 50.5).abs() < 1.0, "{mean}");
        assert!((p95 - 95.0).abs() < 1.5, "{p95}");
        assert!((p99 - 99.0).abs() < 1.5, "{p99}");
    }

    #[test]
    fn usage_between_samples() {
        let t0 = Instant::now();
        let s = |ms: u64, busy: u64, wcpu: u64, pcpu: u64| Sample {
            at: t0 + Duration::from_millis(ms),
            busy_ns: busy * 1_000_000,
            worker_cpu_ns: wcpu * 1_000_000,
            process_cpu_ns: pcpu * 1_000_000,
        };
        let mut sampler = Sampler::new(s(0, 0, 0, 0), Duration::from_secs(1));
        // Two workers, each busy half of the second.
        let u = sampler.usage(s(1000, 1000, 250, 600), 2);
        assert!((u.utilization - 50.0).abs() < 1e-9, "{u:?}");
        assert!((u.worker_cpu - 25.0).abs() < 1e-9, "{u:?}");
        assert!((u.process_cpu - 60.0).abs() < 1e-9, "{u:?}");
        // The next rate is measured from the newest sample at least 1 s old.
        let u = sampler.usage(s(2000, 1000, 250, 600), 2);
        assert_eq!(u.utilization, 0.0);
    }
}

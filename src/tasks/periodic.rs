//! Recurring schedules: when each run is due, and the ticker that wakes for it.
//!
//! Due times are wall-clock instants (seconds since the Unix epoch) taken from
//! the schedule alone: an interval counts from a fixed anchor, a cron pattern
//! names its instants, so a late or slow run never shifts the next one.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use parking_lot::{Condvar, Mutex};

use super::timer::TimerHeap;

/// When a recurring task runs.
#[derive(Clone, Debug)]
pub enum Spec {
    /// At `anchor + k * period` for every whole k >= 0.
    Every { period: f64, anchor: f64 },
    /// At each instant the pattern matches, read in time zone `tz`.
    Cron {
        cron: Box<Cron>,
        tz: Tz,
        text: String,
    },
}

impl Spec {
    /// An interval of `period` seconds from `anchor`.
    pub fn every(period: f64, anchor: f64) -> Result<Self, String> {
        if !(period.is_finite() && period > 0.0) {
            return Err(format!(
                "must be a positive number of seconds, got {period}"
            ));
        }
        if period < 0.001 {
            return Err(format!("must be at least 1 ms, got {period} s"));
        }
        if !anchor.is_finite() {
            return Err(format!("anchor must be finite, got {anchor}"));
        }
        Ok(Spec::Every { period, anchor })
    }

    /// A cron pattern of 5 fields (minute first), or 6 with seconds first,
    /// in the IANA time zone `tz`.
    pub fn cron(pattern: &str, tz: &str) -> Result<Self, String> {
        let zone = Tz::from_str(tz).map_err(|_| format!("unknown time zone {tz:?}"))?;
        let fields = pattern.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "{pattern:?} has {fields} fields; use 5 (minute hour day month weekday) \
                 or 6 (with seconds first)"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(pattern)
            .map_err(|e| format!("{pattern:?} is not a valid cron expression: {e}"))?;
        let spec = Spec::Cron {
            cron: Box::new(cron),
            tz: zone,
            text: pattern.to_string(),
        };
        // A pattern that never matches (say February 30th) is refused now.
        if spec.next_after(0.0).is_none() {
            return Err(format!("{pattern:?} never matches a date"));
        }
        Ok(spec)
    }

    /// The first due time strictly after `t`, if there is one.
    pub fn next_after(&self, t: f64) -> Option<f64> {
        match self {
            Spec::Every { period, anchor } => {
                if t < *anchor {
                    return Some(*anchor);
                }
                let mut k = ((t - anchor) / period).floor() + 1.0;
                let mut due = anchor + k * period;
                // Rounding may land on or before t; step until strictly after.
                while due <= t {
                    k += 1.0;
                    due = anchor + k * period;
                }
                Some(due)
            }
            Spec::Cron { cron, tz, .. } => {
                let at = to_datetime(t)?.with_timezone(tz);
                let next = cron.find_next_occurrence(&at, false).ok()?;
                Some(seconds(&next.with_timezone(&Utc)))
            }
        }
    }

    /// The latest due time in `(after, upto]`: the run a downtime missed.
    pub fn last_between(&self, after: f64, upto: f64) -> Option<f64> {
        let due = match self {
            Spec::Every { period, anchor } => {
                if upto < *anchor {
                    return None;
                }
                anchor + ((upto - anchor) / period).floor() * period
            }
            Spec::Cron { cron, tz, .. } => {
                let at = to_datetime(upto)?.with_timezone(tz);
                let prev = cron.find_previous_occurrence(&at, true).ok()?;
                seconds(&prev.with_timezone(&Utc))
            }
        };
        (due > after && due <= upto).then_some(due)
    }

    /// A short text naming the schedule, as it is stored and shown.
    pub fn describe(&self) -> String {
        match self {
            Spec::Every { period, .. } => format!("every {period} s"),
            Spec::Cron { text, tz, .. } => format!("cron {text:?} ({tz})"),
        }
    }
}

/// The whole second at or before `t`: cron instants are whole seconds.
fn to_datetime(t: f64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.floor() as i64, 0)
}

fn seconds(at: &DateTime<Utc>) -> f64 {
    at.timestamp() as f64
}

/// What to do with the runs a downtime missed (with durable storage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missed {
    /// Run once, at start, for all the runs missed together.
    RunOnce,
    /// Skip them; the next run is the next one due.
    Skip,
}

/// A thread-free timer for schedule ids: `run` sleeps until the earliest
/// armed id is due and hands due ids to a callback, never polling.
pub struct Ticker {
    state: Mutex<TickerState>,
    wake: Condvar,
}

#[derive(Default)]
struct TickerState {
    heap: TimerHeap<u64>,
    disarmed: HashSet<u64>,
    stopped: bool,
}

impl Default for Ticker {
    fn default() -> Self {
        Self {
            state: Mutex::new(TickerState::default()),
            wake: Condvar::new(),
        }
    }
}

impl Ticker {
    /// Fires `id` at `at` (replacing nothing: arm an id once per run).
    pub fn arm(&self, id: u64, at: Instant) {
        let mut st = self.state.lock();
        st.disarmed.remove(&id);
        let earliest = st.heap.next_due().is_none_or(|d| at < d);
        st.heap.push(at, id);
        if earliest {
            self.wake.notify_one();
        }
    }

    /// Forgets `id`'s pending firing, if any.
    pub fn disarm(&self, id: u64) {
        let mut st = self.state.lock();
        if st.heap.remove(|x| *x == id).is_some() {
            st.disarmed.insert(id);
        }
    }

    /// How many firings are armed.
    pub fn armed(&self) -> usize {
        self.state.lock().heap.len()
    }

    /// Runs until `stop`: calls `fire(id)` for each due id, outside the lock.
    pub fn run(&self, mut fire: impl FnMut(u64)) {
        let mut st = self.state.lock();
        loop {
            if st.stopped {
                return;
            }
            let now = Instant::now();
            let due = st.heap.pop_due(now);
            if !due.is_empty() {
                drop(st);
                for id in due {
                    fire(id);
                }
                st = self.state.lock();
                continue;
            }
            match st.heap.next_due() {
                Some(at) => {
                    self.wake.wait_until(&mut st, at);
                }
                None => self.wake.wait(&mut st),
            }
        }
    }

    pub fn stop(&self) {
        self.state.lock().stopped = true;
        self.wake.notify_all();
    }
}

/// `Instant` for a wall-clock due time, measured from one reading of both clocks.
pub fn instant_of(due: f64, now_epoch: f64, now: Instant) -> Instant {
    let ahead = due - now_epoch;
    if ahead <= 0.0 {
        return now;
    }
    let ahead =
        Duration::try_from_secs_f64(ahead).unwrap_or(Duration::from_secs(100 * 365 * 86400));
    crate::clock::due_after(now, ahead)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    // 2026-01-05 00:00:00 UTC, a Monday.
    const MONDAY: f64 = 1_767_571_200.0;

    #[test]
    fn intervals_count_from_the_anchor_not_from_now() {
        let s = Spec::every(10.0, 100.0).unwrap();
        assert_eq!(s.next_after(0.0), Some(100.0));
        assert_eq!(s.next_after(100.0), Some(110.0));
        assert_eq!(s.next_after(104.9), Some(110.0));
        // However late a run fired, the grid does not move.
        assert_eq!(s.next_after(137.5), Some(140.0));
        assert_eq!(s.next_after(140.0), Some(150.0));
        let fine = Spec::every(0.1, 0.0).unwrap();
        let mut t = 0.0;
        for _ in 0..10_000 {
            let n = fine.next_after(t).unwrap();
            assert!(n > t);
            t = n;
        }
        assert!((t - 1000.0).abs() < 1e-6, "{t}");
    }

    #[test]
    fn bad_intervals_are_refused() {
        for p in [0.0, -1.0, f64::NAN, f64::INFINITY, 0.0001] {
            assert!(Spec::every(p, 0.0).is_err(), "{p}");
        }
    }

    #[test]
    fn cron_patterns_with_and_without_seconds() {
        let five = Spec::cron("*/5 * * * *", "UTC").unwrap();
        assert_eq!(five.next_after(MONDAY), Some(MONDAY + 300.0));
        assert_eq!(five.next_after(MONDAY + 1.0), Some(MONDAY + 300.0));
        let daily = Spec::cron("0 3 * * *", "UTC").unwrap();
        assert_eq!(daily.next_after(MONDAY), Some(MONDAY + 3.0 * 3600.0));
        let secs = Spec::cron("*/2 * * * * *", "UTC").unwrap();
        assert_eq!(secs.next_after(MONDAY + 0.5), Some(MONDAY + 2.0));
        let weekday = Spec::cron("0 9 * * FRI", "UTC").unwrap();
        assert_eq!(
            weekday.next_after(MONDAY),
            Some(MONDAY + 4.0 * 86400.0 + 9.0 * 3600.0)
        );
    }

    #[test]
    fn cron_reads_the_time_zone() {
        // 03:00 in Tokyo (UTC+9, no daylight saving) is 18:00 UTC the day before.
        let tokyo = Spec::cron("0 3 * * *", "Asia/Tokyo").unwrap();
        assert_eq!(tokyo.next_after(MONDAY), Some(MONDAY + 18.0 * 3600.0));
        assert!(tokyo.describe().contains("Asia/Tokyo"));
    }

    #[test]
    fn bad_cron_patterns_are_refused_with_the_reason() {
        for (p, why) in [
            ("* * * *", "fields"),
            ("* * * * * * * *", "fields"),
            ("61 * * * *", "not a valid cron"),
            ("nonsense here and there now", "not a valid cron"),
            ("0 0 30 2 *", "never matches"),
        ] {
            let err = Spec::cron(p, "UTC").err().unwrap();
            assert!(err.contains(why), "{p}: {err}");
        }
        let err = Spec::cron("* * * * *", "Mars/Olympus").err().unwrap();
        assert!(err.contains("time zone"), "{err}");
    }

    #[test]
    fn the_run_a_downtime_missed() {
        let s = Spec::every(60.0, 0.0).unwrap();
        assert_eq!(s.last_between(120.0, 150.0), None);
        assert_eq!(s.last_between(120.0, 200.0), Some(180.0));
        assert_eq!(s.last_between(0.0, 1000.0), Some(960.0));
        let c = Spec::cron("0 * * * *", "UTC").unwrap();
        assert_eq!(
            c.last_between(MONDAY, MONDAY + 3.0 * 3600.0 + 5.0),
            Some(MONDAY + 3.0 * 3600.0)
        );
        assert_eq!(c.last_between(MONDAY, MONDAY + 59.0), None);
    }

    #[test]
    fn ticker_fires_in_due_order_and_honours_disarm() {
        let ticker = Arc::new(Ticker::default());
        let fired = Arc::new(Mutex::new(Vec::new()));
        let t = {
            let (ticker, fired) = (ticker.clone(), fired.clone());
            std::thread::spawn(move || ticker.run(|id| fired.lock().push((id, Instant::now()))))
        };
        let start = Instant::now();
        ticker.arm(3, start + Duration::from_millis(90));
        ticker.arm(1, start + Duration::from_millis(30));
        ticker.arm(2, start + Duration::from_millis(60));
        ticker.arm(4, start + Duration::from_millis(70));
        ticker.disarm(4);
        let deadline = Instant::now() + Duration::from_secs(10);
        while fired.lock().len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        ticker.stop();
        t.join().unwrap();
        let fired = fired.lock();
        assert_eq!(fired.iter().map(|f| f.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(fired[0].1 >= start + Duration::from_millis(30));
        assert!(fired[2].1 >= start + Duration::from_millis(90));
        assert_eq!(ticker.armed(), 0);
    }
}

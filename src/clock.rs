//! Clocks: wall-clock time as the store and the Python API show it, and
//! deadlines that never overflow.

use std::time::{Duration, Instant};

/// Seconds since the Unix epoch (0.0 if the clock is before it).
pub fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `now + delay`, or a century from now for delays beyond what `Instant` holds.
pub fn due_after(now: Instant, delay: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(delay.min(CENTURY)).unwrap_or(now)
}

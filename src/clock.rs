//! Wall-clock time as the store and the Python API show it.

/// Seconds since the Unix epoch (0.0 if the clock is before it).
pub fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

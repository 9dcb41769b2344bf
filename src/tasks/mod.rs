//! The pure scheduling core: no Python in here, all of it covered by `cargo test`.

pub mod backoff;
pub mod lanes;
pub mod periodic;
pub mod pool;
pub mod queue;
pub mod scheduler;
pub mod series;
pub mod stats;
pub mod status;
pub mod sysinfo;
pub mod timer;
pub mod watchdog;

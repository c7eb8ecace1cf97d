//! Wall-clock Unix time, as the KV records, tasks and events exchanged between components
//! store it (leases, heartbeats, schedules, timers).

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix milliseconds with their fraction (flow control spaces events finer than a millisecond).
pub fn now_ms_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

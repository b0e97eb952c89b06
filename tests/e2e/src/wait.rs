//! Polled waits: how long until something the test watches holds. A wait, not an assertion of
//! speed, unless a test asserts on the time it returns.

use std::thread;
use std::time::{Duration, Instant};

/// Polls `f` every 50 ms until it returns true or `limit` passes; returns the time it took.
pub fn within(limit: Duration, f: impl FnMut() -> bool) -> Option<Duration> {
    within_every(Duration::from_millis(50), limit, f)
}

/// [`within`], polling every `every`.
pub fn within_every(
    every: Duration,
    limit: Duration,
    mut f: impl FnMut() -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        thread::sleep(every);
    }
    None
}

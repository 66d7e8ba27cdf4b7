//! Waiting on a condition, bounded in time, instead of sleeping a fixed time: the
//! machines are shared and loaded, so a fixed sleep is either longer than it needs to be
//! or, one day, too short.

use std::time::{Duration, Instant};

/// How often the conditions are looked at.
const EVERY: Duration = Duration::from_millis(50);

/// Poll `check` until it gives `Some`, for at most `limit`; panics naming `what` when the
/// limit passes first (the test fails, it does not go on with a wrong premise).
pub fn until<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(EVERY);
    }
}

/// Poll `read` until its value has stayed the same for `quiet` and `done` holds for it,
/// for at most `limit`; the value. Panics naming `what` (and the last value) when the
/// limit passes first.
pub fn steady<T: PartialEq + std::fmt::Debug>(
    what: &str,
    limit: Duration,
    quiet: Duration,
    mut read: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let start = Instant::now();
    let mut last = read();
    let mut since = Instant::now();
    loop {
        std::thread::sleep(EVERY);
        let now = read();
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= quiet && done(&last) {
            return last;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what} (last: {last:?})"
        );
    }
}

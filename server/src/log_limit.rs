//! Log lines that a stranger can make the server repeat without end (a loop of malformed frames,
//! a flood of connections past the descriptor limit) are written at most once a second each,
//! with the number suppressed since the last one, so they cannot fill the disk.
use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use parking_lot::Mutex;

const EVERY: Duration = Duration::from_secs(1);

/// One rate-limited log line.
pub struct LogLimit {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogLimit {
    pub const fn new() -> Self {
        LogLimit {
            last: parking_lot::const_mutex(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Runs `log` with the number of lines suppressed since the last one, unless one was
    /// written less than a second ago (then this one is counted as suppressed).
    pub fn log(&self, log: impl FnOnce(u64)) {
        let now = Instant::now();
        {
            let mut last = self.last.lock();
            if last.is_some_and(|t| now.duration_since(t) < EVERY) {
                self.suppressed.fetch_add(1, Relaxed);
                return;
            }
            *last = Some(now);
        }
        log(self.suppressed.swap(0, Relaxed));
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_with_the_count_of_the_others() {
        let limit = LogLimit::new();
        let mut written = Vec::new();
        for _ in 0..100 {
            limit.log(|suppressed| written.push(suppressed));
        }
        assert_eq!(written, [0]);
        *limit.last.lock() = Some(Instant::now() - EVERY);
        limit.log(|suppressed| written.push(suppressed));
        assert_eq!(written, [0, 99]);
    }
}

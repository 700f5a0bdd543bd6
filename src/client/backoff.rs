//! Exponential backoff with full jitter: attempt n waits a uniformly random time in
//! `[0, min(max, initial * 2^n)]`, so many clients reconnecting at once spread out.
use std::time::Duration;

/// Backoff parameters (defaults: 100 ms initial, 10 s cap).
#[derive(Debug, Clone, Copy)]
pub struct BackoffConfig {
    /// Upper bound of the first delay.
    pub initial: Duration,
    /// Upper bound of every delay.
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// The retry state of one connection or call.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(config: BackoffConfig) -> Self {
        Backoff { config, attempt: 0 }
    }

    /// The delay before the next attempt; each call doubles the bound up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let bound = self
            .config
            .initial
            .saturating_mul(1u32.checked_shl(self.attempt).unwrap_or(u32::MAX))
            .min(self.config.max);
        self.attempt = self.attempt.saturating_add(1);
        bound.mul_f64(rand::random::<f64>())
    }

    /// Back to the initial delay, after a healthy connection.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts made since the last reset.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let cfg = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let mut b = Backoff::new(cfg);
        for n in 0..40 {
            let bound = Duration::from_millis(100 * (1u64 << n.min(10))).min(cfg.max);
            assert!(b.next_delay() <= bound);
        }
        assert_eq!(b.attempts(), 40);
        b.reset();
        assert!(b.next_delay() <= cfg.initial);
    }
}

//! How long a subscriber waits before trying again: pure delay sequences, no clock, and
//! the one source of jitter.
//!
//! A leaf module (it imports nothing of sqlferry) because both sides use it: the push
//! subscriber's schedule (`subscribe`) and the reconnecting subscription (`remote`),
//! and `remote` sits below `subscribe`.
//!
//! A push subscriber retries a failed push a bounded number of times
//! ([`retry_delay`]: 5, 10, 20, 40, 80 s, then gives up until the next trigger), since
//! its changes stay pending and the next change pushes anyway. A pull subscriber has
//! nothing else to wake it, so it reconnects forever ([`reconnect_delay`]), doubling from
//! 1 s up to a minute, with jitter so that many subscribers cut off by one server
//! restart do not all come back in the same instant.

use std::time::Duration;

/// How many times a failed push is retried before the subscriber waits for the next
/// trigger instead.
pub const PUSH_RETRIES: u32 = 5;

/// The delay before the first retry of a failed push; each further retry doubles it.
pub const FIRST_RETRY_DELAY: Duration = Duration::from_secs(5);

/// The delay before the first reconnect of a pull subscriber; each further attempt
/// doubles it up to [`MAX_RECONNECT_DELAY`].
pub const FIRST_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// The longest a pull subscriber waits between two reconnects, before jitter.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(60);

/// The smallest jitter factor [`reconnect_delay`] applies; the largest is 1.
pub const MIN_JITTER: f64 = 0.5;

/// The wait before retry number `attempt` (1 for the first retry) of a failed push:
/// 5, 10, 20, 40 and 80 s for attempts 1 to 5, `None` (no more retries) otherwise.
pub fn retry_delay(attempt: u32) -> Option<Duration> {
    if (1..=PUSH_RETRIES).contains(&attempt) {
        Some(FIRST_RETRY_DELAY * (1 << (attempt - 1)))
    } else {
        None
    }
}

/// The wait before reconnect number `attempt` (1 for the first; 0 counts as 1) of a pull
/// subscriber: 1 s doubling per attempt, capped at 60 s, then multiplied by `jitter`.
///
/// The caller draws `jitter` at random; it is clamped into [[`MIN_JITTER`], 1.0] (a NaN
/// counts as 1.0), so the delay is never shorter than half the un-jittered one.
pub fn reconnect_delay(attempt: u32, jitter: f64) -> Duration {
    // 2^6 s already exceeds the cap; larger shifts would only overflow.
    let doublings = attempt.saturating_sub(1).min(6);
    let delay = (FIRST_RECONNECT_DELAY * (1 << doublings)).min(MAX_RECONNECT_DELAY);
    let jitter = if jitter.is_nan() {
        1.0
    } else {
        jitter.clamp(MIN_JITTER, 1.0)
    };
    delay.mul_f64(jitter)
}

/// A pull subscriber's reconnect attempts: [`Reconnect::next_delay`] after each failed
/// connection, [`Reconnect::reset`] once a connection works.
#[derive(Debug, Default, Clone)]
pub struct Reconnect {
    attempt: u32,
}

impl Reconnect {
    /// A backoff that has not failed yet.
    pub fn new() -> Reconnect {
        Reconnect::default()
    }

    /// Counts one more failed attempt and returns the wait before the next one (see
    /// [`reconnect_delay`]; `jitter` is drawn by the caller).
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        reconnect_delay(self.attempt, jitter)
    }

    /// Forgets past failures: the next failure waits the shortest delay again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many attempts have failed since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// A jitter factor in [0.5, 1.0] for [`reconnect_delay`], so that many subscribers cut
/// off at once do not all come back in the same instant.
pub fn jitter() -> f64 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    MIN_JITTER + f64::from(u16::from_be_bytes(b)) / f64::from(u16::MAX) * (1.0 - MIN_JITTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn push_retries_are_5_10_20_40_80_seconds_then_none() {
        let delays: Vec<_> = (0..=7).map(retry_delay).collect();
        assert_eq!(
            delays,
            [
                None,
                Some(secs(5)),
                Some(secs(10)),
                Some(secs(20)),
                Some(secs(40)),
                Some(secs(80)),
                None,
                None
            ]
        );
        assert_eq!(retry_delay(u32::MAX), None);
    }

    #[test]
    fn reconnects_double_from_one_second_up_to_a_minute() {
        let delays: Vec<_> = (1..=9).map(|a| reconnect_delay(a, 1.0)).collect();
        assert_eq!(
            delays,
            [1, 2, 4, 8, 16, 32, 60, 60, 60].map(secs),
            "no jitter"
        );
        assert_eq!(reconnect_delay(0, 1.0), secs(1));
        assert_eq!(reconnect_delay(u32::MAX, 1.0), secs(60));
    }

    #[test]
    fn jitter_scales_within_half_to_whole() {
        assert_eq!(reconnect_delay(3, 0.5), secs(2));
        assert_eq!(reconnect_delay(3, 0.75), secs(3));
        assert_eq!(reconnect_delay(10, 0.5), secs(30));
        // Out-of-range factors are clamped, never shorten the wait below half.
        assert_eq!(reconnect_delay(3, 0.0), secs(2));
        assert_eq!(reconnect_delay(3, -4.0), secs(2));
        assert_eq!(reconnect_delay(3, 7.0), secs(4));
        assert_eq!(reconnect_delay(3, f64::NAN), secs(4));
        assert_eq!(reconnect_delay(3, f64::INFINITY), secs(4));
    }

    #[test]
    fn reconnect_counts_attempts_and_resets() {
        let mut backoff = Reconnect::new();
        assert_eq!(backoff.next_delay(1.0), secs(1));
        assert_eq!(backoff.next_delay(1.0), secs(2));
        assert_eq!(backoff.next_delay(0.5), secs(2));
        assert_eq!(backoff.attempts(), 3);
        backoff.reset();
        assert_eq!(backoff.attempts(), 0);
        assert_eq!(backoff.next_delay(1.0), secs(1));
    }

    #[test]
    fn jitter_stays_within_half_to_whole() {
        for _ in 0..100 {
            let j = jitter();
            assert!((MIN_JITTER..=1.0).contains(&j), "{j}");
        }
    }
}

//! The retry policy: how long a job that failed waits before its next attempt.
//!
//! Must not do I/O and must not read a clock: the caller supplies the randomness and applies
//! the delay.

use std::time::Duration;

use rand::Rng;

/// Longest delay before a retry, whatever the attempt number.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(3600);

/// How long a job waits before its next attempt, once `failed_attempts` attempts have failed
/// (counting the one that just did): `base * 2^(failed_attempts-1)`, capped at
/// [`MAX_RETRY_BACKOFF`], then drawn uniformly from its upper half so that jobs that failed
/// together do not come back together. Hand-backs do not count, so they do not lengthen it.
pub fn retry_backoff(base: Duration, failed_attempts: i32, rng: &mut impl Rng) -> Duration {
    let doublings = failed_attempts.saturating_sub(1).clamp(0, 30) as u32;
    let full = base
        .saturating_mul(1u32 << doublings)
        .min(MAX_RETRY_BACKOFF);
    let half = full / 2;
    half + full.saturating_sub(half).mul_f64(rng.random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_failed_attempt_within_its_jitter_band_and_is_capped() {
        let mut rng = rand::rng();
        let base = Duration::from_millis(100);
        for failed in 1..=5 {
            let full = base * (1 << (failed - 1));
            let draws: Vec<Duration> = (0..50)
                .map(|_| retry_backoff(base, failed, &mut rng))
                .collect();
            for d in &draws {
                assert!(
                    *d >= full / 2 && *d <= full,
                    "{failed} failed: {d:?} outside [{:?}, {full:?}]",
                    full / 2
                );
            }
            assert!(
                draws.iter().any(|d| *d != draws[0]),
                "jittered, not one fixed delay"
            );
        }
        for failed in [40, 1000, i32::MAX] {
            let d = retry_backoff(base, failed, &mut rng);
            assert!(
                d >= MAX_RETRY_BACKOFF / 2 && d <= MAX_RETRY_BACKOFF,
                "capped: {d:?}"
            );
        }
    }
}

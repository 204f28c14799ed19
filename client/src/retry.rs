//! The retry policy of calls to the coordinator (and of Redis pops): exponential from 50 ms,
//! doubling, capped at 2.5 s, each delay jittered up to twice its value (so 50..100 ms first and
//! 2.5..5 s once capped), as `backon` builders.
//!
//! Must not decide what is worth retrying or for how long in wall time: callers do (their
//! `when` and deadlines); this module only says how long to wait between tries.

use std::time::Duration;

pub use backon::{BackoffBuilder, ExponentialBuilder, Retryable};

/// First delay before jitter.
pub const MIN_DELAY: Duration = Duration::from_millis(50);
/// Largest delay before jitter; with jitter a delay is at most twice this.
pub const MAX_DELAY: Duration = Duration::from_millis(2_500);

/// The policy with no limit on the number of tries.
pub fn forever() -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(MIN_DELAY)
        .with_factor(2.0)
        .with_max_delay(MAX_DELAY)
        .with_jitter()
        .without_max_times()
}

/// The policy for at most `tries` calls in all (so `tries - 1` delays).
pub fn tries(tries: usize) -> ExponentialBuilder {
    forever().with_max_times(tries.saturating_sub(1))
}

/// The delays of [`forever`], for loops that wait themselves (a shutdown or a heartbeat between
/// tries); build a new one to start over after a success.
pub fn delays() -> impl Iterator<Item = Duration> + Send {
    forever().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_with_jitter_up_to_a_cap() {
        for _ in 0..20 {
            let got: Vec<Duration> = delays().take(10).collect();
            for (i, d) in got.iter().enumerate() {
                let base = (MIN_DELAY * 2u32.pow(i as u32)).min(MAX_DELAY);
                assert!(
                    *d >= base && *d <= base * 2,
                    "delay {i}: {d:?} for base {base:?}"
                );
            }
            assert!(got.iter().all(|d| *d <= MAX_DELAY * 2));
        }
    }

    #[test]
    fn a_limited_policy_allows_that_many_calls() {
        assert_eq!(tries(5).build().count(), 4);
        assert_eq!(tries(1).build().count(), 0);
        assert_eq!(forever().build().take(1000).count(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_calls_stop_at_the_first_success_or_a_refused_error() {
        let mut calls = 0;
        let answer = (|| {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err("down")
                } else {
                    Ok(n)
                }
            }
        })
        .retry(tries(5))
        .await;
        assert_eq!(answer, Ok(3));

        let mut calls = 0;
        let answer: Result<u32, &str> = (|| {
            calls += 1;
            async { Err("permanent") }
        })
        .retry(tries(5))
        .when(|e| *e != "permanent")
        .await;
        assert_eq!((answer, calls), (Err("permanent"), 1));
    }
}

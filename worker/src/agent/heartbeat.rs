//! The heartbeat of one attempt: its own task, renewing the lease every period from the claim
//! to the attempt's last call (CompleteJob, FailJob or ReleaseJob), whatever else the agent is
//! doing meanwhile (downloading inputs, uploading a large artifact, retrying the final report).
//!
//! A heartbeat that fails (the coordinator is unreachable) is logged and the next one is sent on
//! time; the coordinator saying `keep_running: false` (cancelled, or the lease is gone) marks
//! the lease lost, calls `on_lost` once (which stops training) and ends the task. Must not call
//! anything but the beat it is given, and must not stop by itself otherwise: its owner stops it.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

/// The running heartbeat of one attempt.
#[derive(Debug)]
pub struct Heartbeat {
    stop: CancellationToken,
    lost: CancellationToken,
    task: JoinHandle<()>,
}

impl Heartbeat {
    /// Starts beating at once and then every `period`. `beat` makes one call and says whether
    /// the coordinator wants the attempt to go on (`Ok(false)`: the lease is lost); `on_failure`
    /// is told about a call that failed. A beat slower than `period` delays the next one, never
    /// piles them up. Runs in the caller's span.
    pub fn spawn<B, Fut>(
        period: Duration,
        mut beat: B,
        on_failure: impl Fn(&tonic::Status) + Send + 'static,
        on_lost: impl FnOnce() + Send + 'static,
    ) -> Self
    where
        B: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<bool, tonic::Status>> + Send,
    {
        let stop = CancellationToken::new();
        let lost = CancellationToken::new();
        let (stopped, lease_lost) = (stop.clone(), lost.clone());
        let task = tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stopped.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let answer = tokio::select! {
                        _ = stopped.cancelled() => return,
                        answer = beat() => answer,
                    };
                    match answer {
                        Ok(true) => {}
                        Ok(false) => {
                            info!("coordinator says stop (cancelled or lease lost)");
                            lease_lost.cancel();
                            on_lost();
                            return;
                        }
                        Err(status) => {
                            on_failure(&status);
                            warn!(error = %status, "heartbeat failed; training goes on");
                        }
                    }
                }
            }
            .in_current_span(),
        );
        Self { stop, lost, task }
    }

    /// True once the coordinator said the lease is gone.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Resolves once the coordinator said the lease is gone (never otherwise).
    pub async fn lost(&self) {
        self.lost.cancelled().await
    }

    /// Stops beating (an in-flight call is abandoned) and waits for the task to end.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;

    fn counting(
        count: &Arc<AtomicU32>,
        call_takes: Duration,
        keep_running_until: u32,
    ) -> impl FnMut() -> std::pin::Pin<Box<dyn Future<Output = Result<bool, tonic::Status>> + Send>>
           + Send
           + 'static {
        let count = count.clone();
        move || {
            let count = count.clone();
            Box::pin(async move {
                tokio::time::sleep(call_takes).await;
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                Ok(n < keep_running_until)
            })
        }
    }

    /// The bug it guards against: the agent awaited an artifact upload (or the final flush)
    /// where it would otherwise heartbeat, so no lease renewal went out for the upload's whole
    /// duration. The heartbeat task beats on time while the agent is busy elsewhere.
    #[tokio::test(start_paused = true)]
    async fn heartbeats_go_on_every_period_while_a_long_upload_runs() {
        let beats = Arc::new(AtomicU32::new(0));
        let heartbeat = Heartbeat::spawn(
            Duration::from_secs(1),
            counting(&beats, Duration::from_millis(10), u32::MAX),
            |_| {},
            || {},
        );
        // The agent's side: an upload that takes 30 periods (paused time advances by itself).
        tokio::time::sleep(Duration::from_secs(30)).await;
        let during = beats.load(Ordering::SeqCst);
        assert!(
            (30..=31).contains(&during),
            "{during} heartbeats during a 30 s upload with a 1 s period"
        );
        assert!(!heartbeat.is_lost());
        heartbeat.stop().await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(beats.load(Ordering::SeqCst), during, "none after stop");
    }

    #[tokio::test(start_paused = true)]
    async fn failed_beats_are_retried_on_time_and_a_slow_one_delays_without_piling_up() {
        let failures = Arc::new(AtomicU32::new(0));
        let counted = failures.clone();
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let heartbeat = Heartbeat::spawn(
            Duration::from_secs(1),
            move || {
                let n = c.fetch_add(1, Ordering::SeqCst);
                async move {
                    // The third call hangs for 5 s (a coordinator that does not answer).
                    if n == 2 {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    Err::<bool, _>(tonic::Status::unavailable("down"))
                }
            },
            move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
            },
            || {},
        );
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        // Beats at 0, 1, 2 (ends at 7), then 7, 8, 9, 10: seven calls, no burst after the slow one.
        assert_eq!(calls.load(Ordering::SeqCst), 7);
        assert_eq!(failures.load(Ordering::SeqCst), 7);
        assert!(!heartbeat.is_lost());
        heartbeat.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn keep_running_false_marks_the_lease_lost_stops_training_and_ends_the_task() {
        let beats = Arc::new(AtomicU32::new(0));
        let stop_training = Arc::new(AtomicBool::new(false));
        let flag = stop_training.clone();
        let heartbeat = Heartbeat::spawn(
            Duration::from_secs(1),
            counting(&beats, Duration::ZERO, 3),
            |_| {},
            move || flag.store(true, Ordering::SeqCst),
        );
        tokio::time::timeout(Duration::from_secs(10), heartbeat.lost())
            .await
            .expect("lost after the third beat");
        assert!(heartbeat.is_lost());
        assert!(stop_training.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            beats.load(Ordering::SeqCst),
            3,
            "no beat after the lease is lost"
        );
        heartbeat.stop().await;
    }
}

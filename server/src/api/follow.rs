//! The one follow loop behind WatchJob and WatchSweep: wait for a notification of any watched
//! job (or the slow safety poll), let the watcher send what changed, and stop when it says so,
//! when the client goes away, or (with UNAVAILABLE) when the coordinator shuts down.
//!
//! Notifications come from Postgres's change notifications ([`crate::changes`]), for writes made
//! through any coordinator replica, so an idle watcher costs Postgres nothing. Each look holds one of the limited
//! read slots ([`super::limits`]) while it reads, so however many watchers wake at once, the
//! rest of the database pool stays free for the other RPCs.
//!
//! Must not read Postgres or know what a job or a sweep is: a [`Watcher`] does the reading and
//! decides what to send. The poll interval lives here and only here.

use std::future::Future;
use std::time::Duration;

use futures::future::select_all;
use futures::FutureExt as _;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tonic::Status;

use super::limits::WatchLimits;
use crate::error::Result;
use crate::events::Subscription;
use crate::shutdown::Shutdown;

/// What every follow loop shares: the shutdown signal and the read slots.
#[derive(Debug, Clone)]
pub(super) struct Context {
    pub shutdown: Shutdown,
    pub limits: WatchLimits,
}

/// How often a watcher re-reads Postgres without being poked: a safety net only (every change
/// notification wakes it, and every watcher is woken once after the listener reconnects), kept
/// long so that thousands of idle watchers cost little.
pub(super) const FALLBACK_POLL: Duration = Duration::from_secs(30);

/// Room for events the client has not read yet, per stream.
pub(super) const STREAM_BUFFER: usize = 16;

/// Where a stream's messages go.
pub(super) type Sender<T> = mpsc::Sender<Result<T, Status>>;

/// Whether a watcher goes on after a look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    Continue,
    /// The watched thing ended (its last message is sent) or the client left.
    Done,
}

/// One stream's reading side: what to send when it is time to look again.
pub(super) trait Watcher: Send + 'static {
    type Event: Send + 'static;

    /// Reads what changed since the last look and sends it.
    fn look(&mut self, tx: &Sender<Self::Event>) -> impl Future<Output = Result<Step>> + Send;
}

/// Follows on a task of its own until the watcher is done, the client goes away, or the
/// coordinator shuts down. `subscriptions` are taken before the first read by the caller, so
/// that a change between that read and this loop is not lost.
pub(super) fn spawn<W: Watcher>(
    watcher: W,
    subscriptions: Vec<Subscription>,
    context: Context,
    tx: Sender<W::Event>,
) {
    tokio::spawn(follow(watcher, subscriptions, context, tx));
}

async fn follow<W: Watcher>(
    mut watcher: W,
    mut subscriptions: Vec<Subscription>,
    Context {
        mut shutdown,
        limits,
    }: Context,
    tx: Sender<W::Event>,
) {
    // No look at once: the caller sent the current picture after subscribing, so anything
    // newer comes with a notification.
    let mut poll =
        tokio::time::interval_at(tokio::time::Instant::now() + FALLBACK_POLL, FALLBACK_POLL);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let changed = async {
            if subscriptions.is_empty() {
                std::future::pending::<()>().await;
            } else {
                select_all(subscriptions.iter_mut().map(|s| s.changed().boxed())).await;
            }
        };
        tokio::select! {
            _ = tx.closed() => return,
            _ = shutdown.wait() => return shutting_down(&tx).await,
            _ = changed => {}
            _ = poll.tick() => {}
        }
        let slot = tokio::select! {
            _ = tx.closed() => return,
            slot = limits.read_slot() => slot,
        };
        let looked = watcher.look(&tx).await;
        drop(slot);
        match looked {
            Ok(Step::Continue) => {}
            Ok(Step::Done) => return,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
    }
}

async fn shutting_down<T>(tx: &Sender<T>) {
    let _ = tx
        .send(Err(Status::unavailable(
            "coordinator is shutting down, watch again",
        )))
        .await;
}

#[cfg(test)]
mod tests {
    use super::super::limits::WatchLimitsConfig;
    use super::*;
    use crate::events::Notifier;
    use crate::shutdown;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use uuid::Uuid;

    fn context(shutdown: Shutdown, concurrent_reads: u32) -> Context {
        Context {
            shutdown,
            limits: WatchLimits::new(WatchLimitsConfig {
                max_watchers: 100,
                max_watchers_per_connection: 100,
                concurrent_reads,
            }),
        }
    }

    /// Counts its looks and stops after `stop_after`.
    struct Counter {
        looks: u32,
        stop_after: u32,
    }

    impl Watcher for Counter {
        type Event = u32;

        async fn look(&mut self, tx: &Sender<u32>) -> Result<Step> {
            self.looks += 1;
            let _ = tx.send(Ok(self.looks)).await;
            Ok(if self.looks >= self.stop_after {
                Step::Done
            } else {
                Step::Continue
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_notification_wakes_the_watcher_the_poll_covers_the_rest_and_done_ends_the_stream() {
        let notifier = Notifier::new();
        let id = Uuid::now_v7();
        let (_trigger, signal) = shutdown::channel();
        let (tx, mut rx) = mpsc::channel(STREAM_BUFFER);
        let watcher = Counter {
            looks: 0,
            stop_after: 3,
        };
        spawn(
            watcher,
            vec![notifier.subscribe(id)],
            context(signal, 1),
            tx,
        );
        let look = |m: Option<Result<u32, Status>>| m.and_then(|r| r.ok());
        // Nothing happens until something changes.
        let quiet = tokio::time::timeout(FALLBACK_POLL / 2, rx.recv()).await;
        assert!(quiet.is_err(), "no look without a change");
        // A notification wakes it at once.
        let woken = tokio::time::Instant::now();
        notifier.notify(id);
        let first = tokio::time::timeout(FALLBACK_POLL / 10, rx.recv()).await;
        assert_eq!(look(first.expect("woken at once")), Some(1));
        // Another one wakes it again, long before the next poll.
        notifier.notify(id);
        let second = tokio::time::timeout(FALLBACK_POLL / 2, rx.recv()).await;
        assert_eq!(look(second.expect("woken by the notifier")), Some(2));
        assert!(woken.elapsed() < FALLBACK_POLL / 2);
        // Without one, the poll does; that look is the last.
        let third = tokio::time::timeout(FALLBACK_POLL * 2, rx.recv()).await;
        assert_eq!(look(third.expect("woken by the poll")), Some(3));
        assert!(rx.recv().await.is_none(), "done ends the stream");
    }

    /// Counts how many of its kind look at once.
    struct Overlap {
        now: Arc<AtomicU32>,
        most: Arc<AtomicU32>,
    }

    impl Watcher for Overlap {
        type Event = ();

        async fn look(&mut self, tx: &Sender<()>) -> Result<Step> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(Ok(())).await;
            Ok(Step::Done)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn watchers_read_at_most_as_many_at_once_as_there_are_read_slots() {
        let (_trigger, signal) = shutdown::channel();
        for slots in [1u32, 3] {
            let shared = context(signal.clone(), slots);
            let (now, most) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
            let mut streams = Vec::new();
            for _ in 0..8 {
                let (tx, rx) = mpsc::channel(STREAM_BUFFER);
                let watcher = Overlap {
                    now: now.clone(),
                    most: most.clone(),
                };
                spawn(watcher, Vec::new(), shared.clone(), tx);
                streams.push(rx);
            }
            for rx in &mut streams {
                assert!(rx.recv().await.is_some(), "every watcher gets its look");
            }
            assert_eq!(most.load(Ordering::SeqCst), slots);
        }
    }

    #[tokio::test]
    async fn shutdown_ends_the_stream_with_unavailable() {
        let (trigger, signal) = shutdown::channel();
        let (tx, mut rx) = mpsc::channel(STREAM_BUFFER);
        let watcher = Counter {
            looks: 0,
            stop_after: u32::MAX,
        };
        trigger.fire();
        spawn(watcher, Vec::new(), context(signal, 1), tx);
        let mut last = None;
        while let Some(m) = rx.recv().await {
            last = Some(m);
        }
        let status = last.expect("a message").expect_err("an error");
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
}

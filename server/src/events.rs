//! In-process change notifications, keyed by job id, that make WatchJob live.
//!
//! Whoever changes a job in this process (the api after a write, the lease reaper) calls
//! [`Notifier::notify`]; every WatchJob stream of that job wakes up and re-reads Postgres. A
//! notification carries no data, only "look again", so a missed or merged one costs at most one
//! round of the change poller ([`crate::changes`]), which also notifies for changes another
//! coordinator made.
//!
//! Must not hold job state (Postgres is the truth) and must not block: notify never waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use uuid::Uuid;

/// Wakes the watchers of a job. Cheap to clone; clones share subscribers.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    channels: Arc<Mutex<HashMap<Uuid, watch::Sender<u64>>>>,
}

impl Notifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tells the job's watchers (if any) that it changed.
    pub fn notify(&self, job_id: Uuid) {
        let channels = self.lock();
        if let Some(tx) = channels.get(&job_id) {
            tx.send_modify(|version| *version = version.wrapping_add(1));
        }
    }

    /// Subscribes to one job's changes until the subscription is dropped.
    pub fn subscribe(&self, job_id: Uuid) -> Subscription {
        let mut channels = self.lock();
        let rx = channels
            .entry(job_id)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Subscription {
            job_id,
            rx,
            notifier: self.clone(),
        }
    }

    /// How many jobs have watchers right now (entries are removed with their last watcher).
    pub fn watched_jobs(&self) -> usize {
        self.lock().len()
    }

    /// The jobs that have watchers right now.
    pub fn watched(&self) -> Vec<Uuid> {
        self.lock().keys().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Sender<u64>>> {
        // A panic while holding this lock cannot leave the map inconsistent, so poisoning is ignored.
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One watcher's view of one job's notifications.
#[derive(Debug)]
pub struct Subscription {
    job_id: Uuid,
    rx: watch::Receiver<u64>,
    notifier: Notifier,
}

impl Subscription {
    /// Resolves at the next notification after the last one seen (at once if one is pending).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The sender lives in the map as long as this subscription does; never reached.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut channels = self.notifier.lock();
        // This receiver still counts, so 1 means "we were the last watcher".
        if channels
            .get(&self.job_id)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            channels.remove(&self.job_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_watcher_wakes_on_its_own_job_only() {
        let n = Notifier::new();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut sub = n.subscribe(a);
        n.notify(b);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), sub.changed())
                .await
                .is_err()
        );
        n.notify(a);
        tokio::time::timeout(Duration::from_secs(1), sub.changed())
            .await
            .expect("woken");
    }

    #[tokio::test]
    async fn the_last_watcher_leaving_removes_the_entry() {
        let n = Notifier::new();
        let id = Uuid::now_v7();
        let first = n.subscribe(id);
        let second = n.subscribe(id);
        drop(first);
        assert_eq!(n.watched_jobs(), 1);
        drop(second);
        assert_eq!(n.watched_jobs(), 0);
        n.notify(id); // no watcher: a no-op
    }
}

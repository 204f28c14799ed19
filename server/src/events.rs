//! In-process change notifications, keyed by job id, that make WatchJob and WatchSweep live.
//!
//! The change listener ([`crate::changes`]) calls [`Notifier::notify`] when Postgres says a job's
//! state changed (through any coordinator replica) and [`Notifier::notify_points`] when points
//! were stored for it. A [`Notifier::subscribe`]r (WatchJob) wakes on both; a
//! [`Notifier::subscribe_states`]r (WatchSweep, which shows only states) on state changes
//! only, so a sweep's watchers are not woken by every metric batch of every one of its jobs. A
//! notification carries no data, only "look again": merged ones cost nothing (a look reads all
//! that is new), and those missed while the listener was disconnected are made up for by its
//! waking every watcher once it is back.
//!
//! Must not hold job state (Postgres is the truth) and must not block: notify never waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use uuid::Uuid;

/// What a subscription wakes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Topic {
    /// State changes and new metric points.
    Any,
    /// State changes only.
    States,
}

type Channels = HashMap<(Uuid, Topic), watch::Sender<u64>>;

/// Wakes the watchers of a job. Cheap to clone; clones share subscribers.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    channels: Arc<Mutex<Channels>>,
}

impl Notifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tells the job's watchers (if any) that its state (or anything but its metric points)
    /// changed: wakes both kinds of subscription.
    pub fn notify(&self, job_id: Uuid) {
        self.send(job_id, &[Topic::Any, Topic::States]);
    }

    /// Tells the job's [`Self::subscribe`]rs (if any) that it has new metric points; a
    /// [`Self::subscribe_states`]r is not woken.
    pub fn notify_points(&self, job_id: Uuid) {
        self.send(job_id, &[Topic::Any]);
    }

    fn send(&self, job_id: Uuid, topics: &[Topic]) {
        let channels = self.lock();
        for topic in topics {
            if let Some(tx) = channels.get(&(job_id, *topic)) {
                tx.send_modify(|version| *version = version.wrapping_add(1));
            }
        }
    }

    /// Subscribes to one job's changes, metric points included, until the subscription is
    /// dropped.
    pub fn subscribe(&self, job_id: Uuid) -> Subscription {
        self.subscribe_to(job_id, Topic::Any)
    }

    /// Subscribes to one job's state changes only, until the subscription is dropped.
    pub fn subscribe_states(&self, job_id: Uuid) -> Subscription {
        self.subscribe_to(job_id, Topic::States)
    }

    fn subscribe_to(&self, job_id: Uuid, topic: Topic) -> Subscription {
        let key = (job_id, topic);
        let mut channels = self.lock();
        let rx = channels
            .entry(key)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Subscription {
            key,
            rx,
            notifier: self.clone(),
        }
    }

    /// How many jobs have watchers right now (entries are removed with their last watcher).
    pub fn watched_jobs(&self) -> usize {
        let channels = self.lock();
        let jobs: std::collections::HashSet<&Uuid> = channels.keys().map(|(id, _)| id).collect();
        jobs.len()
    }

    /// The jobs that have watchers right now (of either kind).
    pub fn watched(&self) -> Vec<Uuid> {
        let channels = self.lock();
        let jobs: std::collections::HashSet<Uuid> = channels.keys().map(|(id, _)| *id).collect();
        jobs.into_iter().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Channels> {
        crate::lock(&self.channels)
    }
}

/// One watcher's view of one job's notifications.
#[derive(Debug)]
pub struct Subscription {
    key: (Uuid, Topic),
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
            .get(&self.key)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            channels.remove(&self.key);
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
    async fn metric_points_wake_job_watchers_but_not_state_watchers() {
        let n = Notifier::new();
        let id = Uuid::now_v7();
        let mut any = n.subscribe(id);
        let mut states = n.subscribe_states(id);
        n.notify_points(id);
        tokio::time::timeout(Duration::from_secs(1), any.changed())
            .await
            .expect("a job watcher is woken by points");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), states.changed())
                .await
                .is_err(),
            "a state watcher is not woken by points"
        );
        n.notify(id);
        tokio::time::timeout(Duration::from_secs(1), states.changed())
            .await
            .expect("a state watcher is woken by a state change");
        tokio::time::timeout(Duration::from_secs(1), any.changed())
            .await
            .expect("so is a job watcher");
        assert_eq!(n.watched_jobs(), 1);
        drop(any);
        assert_eq!(n.watched_jobs(), 1);
        drop(states);
        assert_eq!(n.watched_jobs(), 0);
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

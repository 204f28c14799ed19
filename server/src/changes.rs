//! The change poller: wakes the watchers of jobs that changed where this process's notifier
//! cannot see it (another coordinator's writes, or a notification lost in a race), with one
//! query per round for every watched job, however many watchers there are.
//!
//! Each round reads a version (update time, attempt, highest metric seq) of every job that has
//! a watcher here and notifies those whose version moved since the last round; a job seen for
//! the first time is notified once, so a change between a watcher's first read and the first
//! round is not lost. Versions of jobs nobody watches any more are forgotten.
//!
//! Must not write, and must not decide what a watcher sends (it only says "look again").

use std::collections::HashMap;
use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use uuid::Uuid;

use crate::error::Result;
use crate::events::Notifier;
use crate::shutdown::Shutdown;
use crate::store::{self, JobVersion};

/// How often the poller looks: the longest a change made by another coordinator takes to reach
/// a watcher here.
pub const CHANGE_POLL: Duration = Duration::from_millis(500);

/// Most jobs one query reads; more watched jobs take several queries per round.
const CHUNK: usize = 5000;

/// What the poller saw last round.
#[derive(Debug, Default)]
pub struct Versions {
    seen: HashMap<Uuid, JobVersion>,
}

impl Versions {
    /// One round: reads the versions of the watched jobs and notifies the changed ones.
    /// Returns how many were notified.
    pub async fn round(&mut self, pool: &PgPool, notifier: &Notifier) -> Result<usize> {
        let watched = notifier.watched();
        if watched.is_empty() {
            self.seen.clear();
            return Ok(0);
        }
        let mut now = HashMap::with_capacity(watched.len());
        for chunk in watched.chunks(CHUNK) {
            now.extend(store::job_versions(pool, chunk).await?);
        }
        let mut woken = 0;
        for (id, version @ (updated, attempt, _)) in &now {
            match self.seen.get(id) {
                Some(seen) if seen == version => continue,
                // Only new points: WatchSweep (states only) need not look.
                Some((u, a, _)) if (u, a) == (updated, attempt) => notifier.notify_points(*id),
                _ => notifier.notify(*id),
            }
            woken += 1;
        }
        self.seen = now;
        Ok(woken)
    }
}

/// Runs rounds every [`CHANGE_POLL`] until shutdown; a failed round is logged and retried at
/// the next tick.
pub fn spawn(pool: PgPool, notifier: Notifier, mut shutdown: Shutdown) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut versions = Versions::default();
        let mut ticker = tokio::time::interval(CHANGE_POLL);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = ticker.tick() => {}
            }
            if let Err(e) = versions.round(&pool, &notifier).await {
                tracing::warn!(error = %e, "change poller round failed; retrying");
            }
        }
    })
}

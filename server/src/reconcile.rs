//! Background loops that keep Postgres and Redis consistent, one task each:
//!
//! - the reconciler pushes queued jobs that are due (never pushed, pushed long ago, or past their
//!   retry backoff). This is what makes Redis disposable: after a FLUSHALL or a failed push,
//!   every queued job is dispatched again.
//! - the lease reaper takes jobs away from workers whose lease expired (crashed or cut off):
//!   back to queued while attempts remain, else failed (and then so are the jobs waiting for it).
//!
//! Both are safe to run in several coordinators at once (the store uses SKIP LOCKED and
//! conditional updates). Must not hold job state between rounds, and must stop on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::dispatch::Dispatcher;
use crate::error::Result;
use crate::events::Notifier;
use crate::shutdown::Shutdown;
use crate::store::{self, ReapedJob};

/// Most rows one statement of a round handles; a round repeats until nothing is left.
const BATCH: i64 = 500;

/// Pushes every queued job that is due for dispatch; returns how many were pushed. On a failed
/// push the batch is marked undispatched again, so the next round retries it.
pub async fn dispatch_due(
    pool: &PgPool,
    dispatcher: &Dispatcher,
    redispatch_after: Duration,
) -> Result<usize> {
    let mut pushed = 0;
    loop {
        let ids = store::take_due_for_dispatch(pool, redispatch_after, BATCH).await?;
        if ids.is_empty() {
            return Ok(pushed);
        }
        if let Err(e) = dispatcher.push(&ids).await {
            tracing::warn!(error = %e, jobs = ids.len(), "reconciler could not push queued jobs; will retry");
            store::clear_dispatched(pool, &ids).await?;
            return Ok(pushed);
        }
        pushed += ids.len();
        if (ids.len() as i64) < BATCH {
            return Ok(pushed);
        }
    }
}

/// Takes every job with an expired lease away from its worker and wakes its watchers (and those
/// of the dependents that failed with it).
pub async fn reap_expired(pool: &PgPool, notifier: &Notifier) -> Result<Vec<ReapedJob>> {
    let mut all = Vec::new();
    loop {
        let reaped = store::reap_expired_leases(pool, BATCH).await?;
        for job in &reaped {
            tracing::info!(job_id = %job.id, state = %job.state, "lease expired");
            notifier.notify(job.id);
            for dependent in &job.dependents_failed {
                tracing::info!(job_id = %dependent, dependency = %job.id, "dependency failed");
                notifier.notify(*dependent);
            }
        }
        let done = (reaped.len() as i64) < BATCH;
        all.extend(reaped);
        if done {
            return Ok(all);
        }
    }
}

/// What the loops need.
#[derive(Clone)]
pub struct Background {
    pub pool: PgPool,
    pub dispatcher: Arc<Dispatcher>,
    pub notifier: Notifier,
    pub interval: Duration,
    pub redispatch_after: Duration,
}

/// Starts the reconciler and the lease reaper; they end when `shutdown` fires.
pub fn spawn(bg: Background, shutdown: Shutdown) -> Vec<JoinHandle<()>> {
    let reconciler = {
        let bg = bg.clone();
        every("reconciler", bg.interval, shutdown.clone(), move || {
            let bg = bg.clone();
            async move {
                let n = dispatch_due(&bg.pool, &bg.dispatcher, bg.redispatch_after).await?;
                if n > 0 {
                    tracing::info!(jobs = n, "reconciler dispatched queued jobs");
                }
                Ok(())
            }
        })
    };
    let reaper = every("lease reaper", bg.interval, shutdown, move || {
        let bg = bg.clone();
        async move { reap_expired(&bg.pool, &bg.notifier).await.map(drop) }
    });
    vec![reconciler, reaper]
}

/// Runs `round` every `interval` until shutdown. A failed round is logged and the loop goes on:
/// the database may be back by the next one.
fn every<F, Fut>(
    name: &'static str,
    interval: Duration,
    mut shutdown: Shutdown,
    mut round: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    tokio::spawn(async move {
        // The first round comes one interval after start, not at once: a coordinator that has
        // just started has nothing urgent to do, and its first requests get the database.
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = ticker.tick() => {}
            }
            if let Err(e) = round().await {
                tracing::warn!(task = name, error = %e, "background round failed");
            }
        }
        tracing::debug!(task = name, "stopped");
    })
}

//! Background loops that keep Postgres and Redis consistent, one task each:
//!
//! - the reconciler pushes queued jobs that are due (never pushed, pushed long ago, or past their
//!   retry backoff). This is what makes Redis disposable: after a failed push the job is pushed
//!   at the next round, and when Redis lost its keys (its alive marker is gone: FLUSHALL, a
//!   restart without persistence, or simply a first start) every queued job is pushed at once.
//! - the lease reaper takes jobs away from workers whose lease expired (crashed or cut off):
//!   back to queued while failures are left, else failed (and then so are the jobs waiting for
//!   it). It holds back while the coordinator's database connection has worked for less than a
//!   lease timeout ([`LeaseGrace`]): after a coordinator or Postgres outage, leases look expired
//!   only because nobody could renew them, and the workers that kept training get a chance to
//!   heartbeat first. Before each round it reads the database's clock, which leases are measured
//!   against, and when that clock stepped forward (NTP on a freshly booted host, a VM resumed)
//!   it moves every running lease by the step ([`ClockWatch`]), so that a step does not expire
//!   the leases of workers that are heartbeating.
//!
//! With several coordinator replicas, only the leader runs them ([`crate::leader`]): a
//! follower's rounds do nothing. Both would still be safe to run in several coordinators at once
//! (the store uses SKIP LOCKED and conditional updates), which is what makes a round that is
//! under way when its leader steps down harmless. Watchers learn of what a round changed from
//! Postgres's change notifications, like of every other write ([`crate::changes`]). Must not
//! hold job state between rounds, and must stop on shutdown.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use proto::{AttemptOutcome, JobId};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::dispatch::Dispatcher;
use crate::error::{Error, Result};
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store::{self, ReapedJob};

/// Most rows one statement of a round handles; a round repeats until nothing is left.
const BATCH: i64 = 500;

/// One reconciler round: if Redis lost its keys (see [`ensure_redis_marked`]) every queued job
/// becomes due at once; then pushes every queued job that is due. Returns how many were pushed.
pub async fn reconcile_queue(
    pool: &PgPool,
    dispatcher: &Dispatcher,
    redispatch_after: Duration,
) -> Result<usize> {
    ensure_redis_marked(pool, dispatcher).await?;
    dispatch_due(pool, dispatcher, redispatch_after).await
}

/// Sets Redis's alive marker if it is missing, and then makes every queued job due for a push
/// (whatever was pushed before may be gone with the marker). An unreachable Redis is only
/// logged: the push that follows fails as well and is retried. If the database cannot be told,
/// the marker is removed again so that the next round retries the whole step.
pub async fn ensure_redis_marked(pool: &PgPool, dispatcher: &Dispatcher) -> Result<()> {
    match dispatcher.mark_alive().await {
        Ok(true) => match store::forget_all_dispatches(pool).await {
            Ok(n) => {
                tracing::info!(
                    jobs = n,
                    "redis has no alive marker (first start, or it lost its keys): every queued job is pushed again"
                );
                Ok(())
            }
            Err(e) => {
                if let Err(e) = dispatcher.forget_alive().await {
                    tracing::warn!(error = %e, "could not remove the redis alive marker");
                }
                Err(e)
            }
        },
        Ok(false) => Ok(()),
        Err(e) => {
            tracing::debug!(error = %e, "cannot check the redis alive marker");
            Ok(())
        }
    }
}

/// Pushes every queued job that is due for dispatch; returns how many were pushed. On a failed
/// push the batch is marked undispatched again, so the next round retries it.
pub async fn dispatch_due(
    pool: &PgPool,
    dispatcher: &Dispatcher,
    redispatch_after: Duration,
) -> Result<usize> {
    let mut pushed = 0;
    loop {
        let ready = store::take_due_for_dispatch(pool, redispatch_after, BATCH).await?;
        if ready.is_empty() {
            return Ok(pushed);
        }
        if let Err(e) = dispatcher.push(&ready).await {
            tracing::warn!(error = %e, jobs = ready.len(), "reconciler could not push queued jobs; will retry");
            let ids: Vec<JobId> = ready.iter().map(|r| JobId::from(r.id)).collect();
            store::clear_dispatched(pool, &ids).await?;
            return Ok(pushed);
        }
        pushed += ready.len();
        if (ready.len() as i64) < BATCH {
            return Ok(pushed);
        }
    }
}

/// Takes every job with an expired lease away from its worker (and fails the jobs waiting for
/// one that failed for good).
pub async fn reap_expired(pool: &PgPool) -> Result<Vec<ReapedJob>> {
    let mut all = Vec::new();
    loop {
        let reaped = store::reap_expired_leases(pool, BATCH).await?;
        for job in &reaped {
            tracing::info!(job_id = %job.id, attempt = job.attempt, state = %job.state, "lease expired");
            for dependent in &job.dependents_failed {
                tracing::info!(job_id = %dependent, attempt = 0, dependency = %job.id, "dependency failed");
            }
        }
        let done = (reaped.len() as i64) < BATCH;
        all.extend(reaped);
        if done {
            return Ok(all);
        }
    }
}

/// Whether the lease reaper may take jobs away: only once the database has worked, without an
/// error seen by the background loops, for at least one lease timeout. Right after start-up and
/// right after an error, a lease may look expired only because its worker could not reach the
/// coordinator or the coordinator could not reach Postgres; a worker that kept training renews
/// it within one lease timeout of the database working again.
#[derive(Debug)]
pub struct LeaseGrace {
    lease_timeout: Duration,
    /// Since when the database has worked; `None` after an error, until the next success.
    working_since: Mutex<Option<Instant>>,
}

impl LeaseGrace {
    /// Starts counting now: the coordinator has just connected.
    pub fn new(lease_timeout: Duration) -> Self {
        Self {
            lease_timeout,
            working_since: Mutex::new(Some(Instant::now())),
        }
    }

    /// A round reached the database: the clock starts now unless it is already running.
    pub fn database_worked(&self) {
        self.working_since().get_or_insert_with(Instant::now);
    }

    /// A round failed on the database: the clock stops until the next success.
    pub fn database_failed(&self) {
        *self.working_since() = None;
    }

    /// Records what a round that used the database says about it, and passes the result on.
    pub fn observe<T>(&self, result: Result<T>) -> Result<T> {
        match &result {
            Ok(_) => self.database_worked(),
            Err(Error::Unavailable(_) | Error::Database(_)) => self.database_failed(),
            Err(_) => {}
        }
        result
    }

    /// True once the database has worked for at least a lease timeout.
    pub fn allows_reaping(&self) -> bool {
        self.working_since()
            .is_some_and(|since| since.elapsed() >= self.lease_timeout)
    }

    fn working_since(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        crate::lock(&self.working_since)
    }
}

/// Smallest forward step of the database clock that [`ClockWatch`] corrects. Smaller steps
/// can only expire a lease that was within this much of expiring anyway.
const CLOCK_STEP_TOLERANCE: Duration = Duration::from_secs(1);

/// Notices forward steps of the database's clock by comparing its readings with the
/// coordinator's monotonic clock. A reading is bracketed by the monotonic time just before the
/// query and just after its answer, so the time that really passed between two readings is at
/// most `after(new) - before(old)`; the database clock advancing more than that (by more than
/// the tolerance) is a step, whatever the queries' latency. A backward step is not corrected:
/// leases then last longer by the step, and a dead worker is noticed that much later.
#[derive(Debug)]
pub struct ClockWatch {
    tolerance: Duration,
    last: Mutex<Option<Reading>>,
}

/// One reading of the database clock, with the monotonic time around it.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub before: Instant,
    pub database: DateTime<Utc>,
    pub after: Instant,
}

impl ClockWatch {
    pub fn new(tolerance: Duration) -> Self {
        Self {
            tolerance,
            last: Mutex::new(None),
        }
    }

    /// Takes a new reading; returns how far the database clock stepped forward since the last
    /// one (at least that far: the step is measured against the longest time that can have
    /// passed), when that is more than the tolerance.
    pub fn step(&self, new: Reading) -> Option<Duration> {
        let old = crate::lock(&self.last).replace(new)?;
        let advanced = (new.database - old.database).to_std().ok()?;
        let at_most = new.after.saturating_duration_since(old.before);
        let step = advanced.checked_sub(at_most)?;
        (step > self.tolerance).then_some(step)
    }
}

/// Reads the database clock and, when it stepped forward, moves every running lease by the
/// step (see [`ClockWatch`]).
pub async fn correct_clock_steps(pool: &PgPool, clock: &ClockWatch) -> Result<()> {
    let before = Instant::now();
    let database = store::database_now(pool).await?;
    let after = Instant::now();
    if let Some(step) = clock.step(Reading {
        before,
        database,
        after,
    }) {
        let moved = store::extend_running_leases(pool, step).await?;
        tracing::warn!(
            step_ms = step.as_millis() as u64,
            leases = moved,
            "the database clock stepped forward: running leases moved by the step"
        );
    }
    Ok(())
}

/// What the loops need.
#[derive(Clone)]
pub struct Background {
    pub pool: PgPool,
    pub dispatcher: Arc<Dispatcher>,
    /// Rounds run only while this replica leads.
    pub leadership: Leadership,
    pub interval: Duration,
    pub redispatch_after: Duration,
    /// Shared by both loops: both report database errors, the reaper obeys it.
    pub grace: Arc<LeaseGrace>,
    /// Counts rounds, lease expiries and the retries they cause.
    pub metrics: Arc<Metrics>,
}

/// Starts the reconciler and the lease reaper; they end when `shutdown` fires. Each round runs
/// only while this replica leads, and is counted (`trainq_background_rounds_total`).
pub fn spawn(bg: Background, shutdown: Shutdown) -> Vec<JoinHandle<()>> {
    let reconciler = {
        let bg = bg.clone();
        every("reconciler", bg.clone(), shutdown.clone(), move || {
            let bg = bg.clone();
            async move {
                let n = reconcile_queue(&bg.pool, &bg.dispatcher, bg.redispatch_after).await;
                let n = bg.grace.observe(n)?;
                if n > 0 {
                    tracing::info!(jobs = n, "reconciler dispatched queued jobs");
                }
                Ok(())
            }
        })
    };
    let clock = Arc::new(ClockWatch::new(CLOCK_STEP_TOLERANCE));
    let reaper = every("lease_reaper", bg.clone(), shutdown, move || {
        let (bg, clock) = (bg.clone(), clock.clone());
        async move {
            // Before the grace check, so that a step during the grace is corrected too.
            bg.grace
                .observe(correct_clock_steps(&bg.pool, &clock).await)?;
            if !bg.grace.allows_reaping() {
                tracing::debug!(
                    "lease reaper holds back: the database has not worked for a lease timeout yet"
                );
                return Ok(());
            }
            let reaped = bg.grace.observe(reap_expired(&bg.pool).await)?;
            for job in &reaped {
                bg.metrics.lease_expired();
                bg.metrics
                    .attempt_ended(job.state.as_str(), AttemptOutcome::LeaseExpired.as_str());
            }
            Ok(())
        }
    });
    vec![reconciler, reaper]
}

/// Runs `round` every `bg.interval` until shutdown, while this replica leads (a follower's tick
/// does nothing), counting each round under `name` (one of `metrics::BACKGROUND_LOOPS`). A
/// failed round is logged and the loop goes on: the database may be back by the next one.
fn every<F, Fut>(
    name: &'static str,
    bg: Background,
    mut shutdown: Shutdown,
    mut round: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let Background {
        interval,
        leadership,
        metrics,
        ..
    } = bg;
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
            if !leadership.leads() {
                continue;
            }
            metrics.background_round(name);
            if let Err(e) = round().await {
                tracing::warn!(task = name, error = %e, "background round failed");
            }
        }
        tracing::debug!(task = name, "stopped");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn the_reaper_waits_one_lease_timeout_after_start_up() {
        let grace = LeaseGrace::new(LEASE);
        assert!(!grace.allows_reaping(), "just started");
        tokio::time::advance(LEASE - Duration::from_millis(1)).await;
        grace.database_worked();
        assert!(
            !grace.allows_reaping(),
            "a success does not restart a running clock, and it has not run long enough"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(grace.allows_reaping(), "one lease timeout after start-up");
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_database_error_the_reaper_waits_one_lease_timeout_of_working_database() {
        let grace = LeaseGrace::new(LEASE);
        tokio::time::advance(LEASE * 2).await;
        assert!(grace.allows_reaping());
        grace.database_failed();
        assert!(!grace.allows_reaping(), "the database just failed");
        tokio::time::advance(LEASE * 3).await;
        assert!(
            !grace.allows_reaping(),
            "no success since the error: an outage of any length keeps it waiting"
        );
        grace.database_worked();
        tokio::time::advance(LEASE / 2).await;
        grace.database_worked();
        assert!(!grace.allows_reaping(), "back for half a lease timeout");
        tokio::time::advance(LEASE / 2).await;
        assert!(grace.allows_reaping(), "back for a whole lease timeout");
    }

    /// A reading whose query takes `latency`, the database reading its clock halfway through;
    /// that clock showed `origin` at `start` and has since stepped `offset_s` ahead.
    async fn reading(
        origin: DateTime<Utc>,
        start: Instant,
        offset_s: i64,
        latency: Duration,
    ) -> Reading {
        let before = Instant::now();
        tokio::time::advance(latency / 2).await;
        let database = origin
            + chrono::Duration::from_std(before.duration_since(start) + latency / 2)
                .expect("a short duration")
            + chrono::Duration::seconds(offset_s);
        tokio::time::advance(latency / 2).await;
        Reading {
            before,
            database,
            after: Instant::now(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_database_clock_that_keeps_time_is_no_step_however_slow_its_queries() {
        let clock = ClockWatch::new(CLOCK_STEP_TOLERANCE);
        let (origin, start) = (Utc::now(), Instant::now());
        assert_eq!(
            clock.step(reading(origin, start, 0, Duration::from_millis(5)).await),
            None
        );
        for latency_ms in [3000, 1, 5000, 2] {
            tokio::time::advance(Duration::from_millis(700)).await;
            let r = reading(origin, start, 0, Duration::from_millis(latency_ms)).await;
            assert_eq!(clock.step(r), None, "a query of {latency_ms} ms is no step");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_forward_step_is_measured_and_backward_or_small_steps_are_not() {
        let clock = ClockWatch::new(CLOCK_STEP_TOLERANCE);
        let (origin, start) = (Utc::now(), Instant::now());
        let slow = Duration::from_millis(400);
        clock.step(reading(origin, start, 0, slow).await);
        tokio::time::advance(Duration::from_secs(1)).await;
        let step = clock
            .step(reading(origin, start, 90, slow).await)
            .expect("a 90 s step");
        assert!(
            step <= Duration::from_secs(90) && step >= Duration::from_secs(90) - 2 * slow,
            "the step is measured low by at most the two queries: {step:?}"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            clock.step(reading(origin, start, 90, slow).await),
            None,
            "the clock keeps time after the step"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            clock.step(reading(origin, start, 30, slow).await),
            None,
            "a backward step"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            clock.step(reading(origin, start, 30, Duration::ZERO).await),
            None
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let small = Duration::from_millis(500);
        let r = reading(origin, start, 30, Duration::ZERO).await;
        let r = Reading {
            database: r.database + chrono::Duration::from_std(small).expect("half a second"),
            ..r
        };
        assert_eq!(clock.step(r), None, "half a second is within the tolerance");
    }
}

//! Leases: claiming a job, heartbeats, and every way an attempt ends under its lease
//! (completion, failure, hand-back) or without it (the lease reaper).
//!
//! Each is one conditional statement or one transaction that changes the job, closes its
//! attempt record and, when the job ended, promotes or fails its dependents. Must not decide
//! how long a lease lasts or a retry waits (the caller passes those in).

use std::time::Duration;

use chrono::{DateTime, Utc};
use proto::{AttemptOutcome, JobId, JobState};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::artifacts::{drop_resume_states, newest_resume_state, ArtifactRow};
use super::attempts::{end_attempt, job_holder, refuse_lease};
use super::jobs::{fail_dependents, lock_with_dependents, promote_dependents};
use super::state::{outcome, state};
use super::{millis, once_more_on_deadlock, JobRow};
use crate::domain::{Capacity, Lease};
use crate::error::{is_deadlock, Error, Result};

/// What a successful claim hands the worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// The job as it is now: running under the new attempt.
    pub job: JobRow,
    /// The newest training state (kind `resume`, highest step) an earlier attempt stored.
    pub resume_from: Option<ArtifactRow>,
    /// How long the job had been ready for a worker: since it was submitted, its dependencies
    /// succeeded or it was queued again, or (when later) its retry backoff ended.
    pub waited: Duration,
}

/// A claimed job and how long it had been ready, in seconds.
#[derive(sqlx::FromRow)]
struct ClaimedRow {
    #[sqlx(flatten)]
    job: JobRow,
    waited_s: f64,
}

/// Claims a queued job for `worker_id`: one conditional update, so of several claimers exactly
/// one gets the row and the others get `None` (as does a claim of a job that is not queued, or
/// is still in its retry backoff). In the same transaction it records the attempt (`running`)
/// and picks the training state to resume from: the job's `resume` artifact with the highest
/// step, stored by any earlier attempt.
pub async fn claim_job(
    pool: &PgPool,
    id: JobId,
    worker_id: &str,
    lease_for: Duration,
) -> Result<Option<Claim>> {
    claim_job_fitting(pool, id, worker_id, lease_for, &Capacity::ANY).await
}

/// [`claim_job`] for a worker slot with `capacity`: a job whose needs (`jobs.needs_device`,
/// `jobs.needs_gpu_mib`) do not fit is not claimed either (`None`), and stays queued for a
/// worker it fits (the reconciler pushes it again after its re-dispatch delay).
pub async fn claim_job_fitting(
    pool: &PgPool,
    id: JobId,
    worker_id: &str,
    lease_for: Duration,
    capacity: &Capacity,
) -> Result<Option<Claim>> {
    let mut tx = pool.begin().await?;
    // `updated_at` changes with every state change and nothing else of a queued job, so its
    // value before this update is when the job last became queued.
    let Some(ClaimedRow { job, waited_s }) = sqlx::query_as::<_, ClaimedRow>(concat!(
        "UPDATE jobs j
         SET state = ",
        state!(running),
        ", attempt = j.attempt + 1, worker_id = $2,
             lease_expires_at = now() + $3 * interval '1 millisecond',
             started_at = coalesce(j.started_at, now()), updated_at = now()
         FROM (SELECT id, greatest(updated_at, coalesce(not_before, updated_at)) AS ready_since
               FROM jobs WHERE id = $1) before
         WHERE j.id = $1 AND before.id = j.id AND j.state = ",
        state!(queued),
        "
           AND (j.not_before IS NULL OR j.not_before <= now())
           AND ($4::text IS NULL OR j.needs_device = 'any' OR j.needs_device = $4)
           AND ($4::text IS DISTINCT FROM 'cuda' OR $5::integer IS NULL
                OR j.needs_gpu_mib <= $5)
         RETURNING j.*, greatest(extract(epoch FROM now() - before.ready_since), 0)::float8
                   AS waited_s"
    ))
    .bind(id.as_uuid())
    .bind(worker_id)
    .bind(millis(lease_for))
    .bind(capacity.device.map(|d| d.as_str()))
    .bind(
        capacity
            .free_gpu_mib
            .map(|m| i32::try_from(m).unwrap_or(i32::MAX)),
    )
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(None);
    };
    let resume_from = newest_resume_state(&mut *tx, id).await?;
    sqlx::query(
        "INSERT INTO job_attempts (job_id, attempt, worker_id, resumed_from_step)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(id.as_uuid())
    .bind(job.attempt)
    .bind(worker_id)
    .bind(resume_from.as_ref().map_or(0, |a| a.step))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Claim {
        job,
        resume_from,
        waited: Duration::try_from_secs_f64(waited_s).unwrap_or_default(),
    }))
}

/// Extends a current lease; `None` when the lease is no longer current (cancelled, reaped,
/// finished, handed back), which tells the worker to stop. NOT_FOUND for an unknown job.
pub async fn heartbeat(
    pool: &PgPool,
    lease: &Lease,
    lease_for: Duration,
) -> Result<Option<DateTime<Utc>>> {
    let expires = sqlx::query_scalar(concat!(
        "UPDATE jobs SET lease_expires_at = now() + $4 * interval '1 millisecond'
         WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = ",
        state!(running),
        "
         RETURNING lease_expires_at"
    ))
    .bind(lease.job_id.as_uuid())
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .bind(millis(lease_for))
    .fetch_optional(pool)
    .await?;
    if expires.is_none() && job_holder(pool, lease.job_id.as_uuid()).await?.is_none() {
        return Err(Error::job_not_found(lease.job_id));
    }
    Ok(expires)
}

/// What completing a job did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Completed {
    /// Dependents that were waiting only for it, now `queued` and undispatched.
    pub queued: Vec<JobId>,
    /// Its training states, deleted (only a retry could use them); their objects are the
    /// caller's to delete.
    pub pruned: Vec<ArtifactRow>,
}

/// Marks the lease's attempt succeeded, with the steps it trained in all, and clears the job's
/// error (an earlier failed attempt's text stays on that attempt's record, not on a job that
/// succeeded). In the same transaction it promotes the dependents that were waiting only for
/// it and deletes the job's training states. Idempotent: completing an attempt that already
/// succeeded is OK (the worker may retry after a lost response) and changes nothing more;
/// anything else is refused. The job and its waiting dependents are locked first, in id order
/// ([`super::jobs::lock_with_dependents`]); retried once when Postgres breaks a deadlock.
pub async fn complete_job(pool: &PgPool, lease: &Lease, final_step: i64) -> Result<Completed> {
    once_more_on_deadlock(|| complete_once(pool, lease, final_step)).await
}

async fn complete_once(pool: &PgPool, lease: &Lease, final_step: i64) -> Result<Completed> {
    let id = lease.job_id.as_uuid();
    let mut tx = pool.begin().await?;
    lock_with_dependents(&mut tx, lease.job_id).await?;
    let done = sqlx::query(concat!(
        "UPDATE jobs SET state = ",
        state!(succeeded),
        ", finished_at = now(), updated_at = now(),
                         lease_expires_at = NULL, final_step = $4, error = NULL
         WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = ",
        state!(running)
    ))
    .bind(id)
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .bind(final_step)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 1 {
        end_attempt(&mut tx, id, lease.attempt, AttemptOutcome::Succeeded, None).await?;
        let queued = promote_dependents(&mut tx, lease.job_id).await?;
        let pruned = drop_resume_states(&mut *tx, lease.job_id).await?;
        tx.commit().await?;
        return Ok(Completed { queued, pruned });
    }
    drop(tx);
    match job_holder(pool, id).await? {
        Some(h) if h.state == JobState::Succeeded && h.is_lease(lease) => Ok(Completed::default()),
        _ => Err(refuse_lease(pool, lease).await),
    }
}

/// Ends the lease's attempt with a failure, which counts against `max_attempts`. When
/// `permanent` or no failures are left the job becomes `failed`; otherwise it goes back to
/// `queued` with `not_before = now() + retry_after(failed_attempts)` (the caller's policy, given
/// the failures so far including this one) and no dispatch record, so the reconciler pushes it as
/// soon as the backoff has passed. A job that fails for good fails its waiting dependents in the
/// same transaction. Returns the new state and the dependents that failed. Idempotent for a
/// repeated call by the same attempt. A permanent failure that arrives after the lease reaper
/// queued the job again (and before anyone claimed it) still fails the job for good. Locks as
/// [`complete_job`] does, and is retried once when Postgres breaks a deadlock.
pub async fn fail_job(
    pool: &PgPool,
    lease: &Lease,
    reason: &str,
    permanent: bool,
    mut retry_after: impl FnMut(i32) -> Duration,
) -> Result<(JobState, Vec<JobId>)> {
    // As once_more_on_deadlock, with the policy lent to each try in turn.
    match fail_once(pool, lease, reason, permanent, &mut retry_after).await {
        Err(e) if is_deadlock(&e) => {
            fail_once(pool, lease, reason, permanent, &mut retry_after).await
        }
        other => other,
    }
}

async fn fail_once(
    pool: &PgPool,
    lease: &Lease,
    reason: &str,
    permanent: bool,
    retry_after: &mut impl FnMut(i32) -> Duration,
) -> Result<(JobState, Vec<JobId>)> {
    let id = lease.job_id.as_uuid();
    let mut tx = pool.begin().await?;
    lock_with_dependents(&mut tx, lease.job_id).await?;
    let counts: Option<(i32, i32)> = sqlx::query_as(concat!(
        "SELECT failed_attempts, max_attempts FROM jobs
         WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = ",
        state!(running),
        "
         FOR NO KEY UPDATE"
    ))
    .bind(id)
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((failed_before, max_attempts)) = counts {
        let failed_attempts = failed_before.saturating_add(1);
        let for_good = permanent || failed_attempts >= max_attempts;
        let backoff = if for_good {
            Duration::ZERO
        } else {
            retry_after(failed_attempts)
        };
        let next = if for_good {
            JobState::Failed
        } else {
            JobState::Queued
        };
        sqlx::query(
            "UPDATE jobs SET
                 state = $2,
                 finished_at = CASE WHEN $3 THEN now() END,
                 not_before = CASE WHEN $3 THEN NULL
                                   ELSE now() + $4 * interval '1 millisecond' END,
                 failed_attempts = $5, error = $6,
                 lease_expires_at = NULL, dispatched_at = NULL, updated_at = now()
             WHERE id = $1",
        )
        .bind(id)
        .bind(next.as_str())
        .bind(for_good)
        .bind(millis(backoff))
        .bind(failed_attempts)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        end_attempt(
            &mut tx,
            id,
            lease.attempt,
            AttemptOutcome::Failed,
            Some(reason),
        )
        .await?;
        let failed = if next == JobState::Failed {
            fail_dependents(&mut tx, lease.job_id).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        return Ok((next, failed));
    }
    if permanent && reaped_unclaimed(&mut tx, lease).await? {
        // The lease reaper took the attempt away (its lease ran out while the worker was still
        // failing it) and queued the job for a retry. The worker's verdict is that a retry
        // cannot help: the job fails for good now instead of being retried silently. The
        // reaper already counted the attempt as a failure; the record now says why it failed.
        sqlx::query(concat!(
            "UPDATE jobs SET state = ",
            state!(failed),
            ", finished_at = now(), not_before = NULL, error = $2,
                 dispatched_at = NULL, updated_at = now()
             WHERE id = $1"
        ))
        .bind(id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        sqlx::query(concat!(
            "UPDATE job_attempts SET outcome = ",
            outcome!(failed),
            ", reason = $3 WHERE job_id = $1 AND attempt = $2"
        ))
        .bind(id)
        .bind(lease.attempt)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        let failed = fail_dependents(&mut tx, lease.job_id).await?;
        tx.commit().await?;
        return Ok((JobState::Failed, failed));
    }
    drop(tx);
    match job_holder(pool, id).await? {
        Some(h) if matches!(h.state, JobState::Queued | JobState::Failed) && h.is_lease(lease) => {
            Ok((h.state, Vec::new()))
        }
        _ => Err(refuse_lease(pool, lease).await),
    }
}

/// Locks the job row if the lease's attempt ended by the reaper (`lease_expired`) and the job is
/// queued again at that attempt, not yet claimed by anyone else.
async fn reaped_unclaimed(conn: &mut PgConnection, lease: &Lease) -> Result<bool> {
    let found: Option<Uuid> = sqlx::query_scalar(concat!(
        "SELECT j.id FROM jobs j
         JOIN job_attempts a ON a.job_id = j.id AND a.attempt = j.attempt
         WHERE j.id = $1 AND j.attempt = $2 AND j.worker_id = $3 AND j.state = ",
        state!(queued),
        " AND a.outcome = ",
        outcome!(lease_expired),
        "
         FOR NO KEY UPDATE OF j"
    ))
    .bind(lease.job_id.as_uuid())
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(found.is_some())
}

/// Hands the lease's job back (its worker is shutting down): `queued` again at once (no backoff,
/// undispatched so the caller or the reconciler pushes it), the lease cleared, `failed_attempts`
/// unchanged, and the attempt recorded as `handed_back` with `reason`. Idempotent for a repeated
/// call by the same attempt while the job is still queued at that attempt; any other stale lease
/// is refused like every worker write.
pub async fn release_job(pool: &PgPool, lease: &Lease, reason: &str) -> Result<()> {
    let id = lease.job_id.as_uuid();
    let mut tx = pool.begin().await?;
    let released = sqlx::query(concat!(
        "UPDATE jobs SET state = ",
        state!(queued),
        ", not_before = NULL, dispatched_at = NULL,
                         lease_expires_at = NULL, updated_at = now()
         WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = ",
        state!(running)
    ))
    .bind(id)
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .execute(&mut *tx)
    .await?;
    if released.rows_affected() == 1 {
        end_attempt(
            &mut tx,
            id,
            lease.attempt,
            AttemptOutcome::HandedBack,
            Some(reason),
        )
        .await?;
        tx.commit().await?;
        return Ok(());
    }
    drop(tx);
    match job_holder(pool, id).await? {
        Some(h) if h.state == JobState::Queued && h.is_lease(lease) => Ok(()),
        _ => Err(refuse_lease(pool, lease).await),
    }
}

/// A job the lease reaper took away from a silent worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReapedJob {
    pub id: JobId,
    /// The attempt whose lease expired.
    pub attempt: i32,
    /// [`JobState::Queued`] (failures left, to be dispatched again) or [`JobState::Failed`].
    pub state: JobState,
    /// Jobs that were waiting for it and failed with `dependency_failed` (when it failed).
    pub dependents_failed: Vec<JobId>,
}

/// One row the reaper's update returned.
#[derive(sqlx::FromRow)]
struct ExpiredRow {
    id: Uuid,
    attempt: i32,
    #[sqlx(try_from = "String")]
    state: JobState,
    error: String,
}

/// The database's clock (`now()`), which every lease expiry is measured against.
pub async fn database_now(pool: &PgPool) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(pool).await?)
}

/// Pushes the expiry of every running job's lease `by` later; returns how many leases moved.
/// For a forward step of the database's clock: the leases were granted on the old time, and
/// without this every one that the step passed would be reaped although its worker heartbeats.
pub async fn extend_running_leases(pool: &PgPool, by: Duration) -> Result<u64> {
    let moved = sqlx::query(concat!(
        "UPDATE jobs SET lease_expires_at = lease_expires_at + $1 * interval '1 millisecond'
         WHERE state = ",
        state!(running),
        " AND lease_expires_at IS NOT NULL"
    ))
    .bind(millis(by))
    .execute(pool)
    .await?;
    Ok(moved.rows_affected())
}

/// Takes up to `limit` running jobs whose lease has expired away from their workers. An expired
/// lease counts as a failed attempt: the job goes back to `queued` (undispatched, so the
/// reconciler pushes it) while failures are left, else it is `failed`, failing its waiting
/// dependents in the same transaction. The attempt is recorded as `lease_expired`. The worker's
/// later writes are refused as stale.
pub async fn reap_expired_leases(pool: &PgPool, limit: i64) -> Result<Vec<ReapedJob>> {
    let mut tx = pool.begin().await?;
    let rows: Vec<ExpiredRow> = sqlx::query_as(concat!(
        "WITH expired AS (
             SELECT id FROM jobs
             WHERE state = ",
        state!(running),
        " AND lease_expires_at < now()
             ORDER BY lease_expires_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         )
         UPDATE jobs j SET
             failed_attempts = j.failed_attempts + 1,
             state = CASE WHEN j.failed_attempts + 1 < j.max_attempts THEN ",
        state!(queued),
        " ELSE ",
        state!(failed),
        " END,
             finished_at = CASE WHEN j.failed_attempts + 1 < j.max_attempts THEN NULL ELSE now() END,
             error = 'lease expired on worker ' || j.worker_id,
             lease_expires_at = NULL, dispatched_at = NULL, updated_at = now()
         FROM expired
         WHERE j.id = expired.id
         RETURNING j.id, j.attempt, j.state, j.error"
    ))
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let mut reaped = Vec::with_capacity(rows.len());
    for ExpiredRow {
        id,
        attempt,
        state,
        error,
    } in rows
    {
        end_attempt(
            &mut tx,
            id,
            attempt,
            AttemptOutcome::LeaseExpired,
            Some(&error),
        )
        .await?;
        let dependents_failed = if state == JobState::Failed {
            fail_dependents(&mut tx, JobId::from(id)).await?
        } else {
            Vec::new()
        };
        reaped.push(ReapedJob {
            id: JobId::from(id),
            attempt,
            state,
            dependents_failed,
        });
    }
    tx.commit().await?;
    Ok(reaped)
}

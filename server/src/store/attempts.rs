//! What every worker write shares: closing an attempt's record, checking and locking a lease,
//! and the refusal of a stale one.
//!
//! A leaf of the store: the other parts use it, it uses none of them. Must not change a job's
//! state (the callers' transactions do).

use proto::{AttemptOutcome, JobState};
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use super::state::{outcome, state};
use crate::domain::Lease;
use crate::error::{Error, Result};

/// Ends the attempt's record with `outcome` (unless it already ended).
pub(super) async fn end_attempt(
    conn: &mut PgConnection,
    job_id: Uuid,
    attempt: i32,
    ended: AttemptOutcome,
    reason: Option<&str>,
) -> Result<()> {
    sqlx::query(concat!(
        "UPDATE job_attempts SET outcome = $3, ended_at = now(), reason = $4
         WHERE job_id = $1 AND attempt = $2 AND outcome = ",
        outcome!(running)
    ))
    .bind(job_id)
    .bind(attempt)
    .bind(ended.as_str())
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Who holds (or last held) a job, for deciding whether a refused write was a repeat.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct Holder {
    #[sqlx(try_from = "String")]
    pub state: JobState,
    pub attempt: i32,
    pub worker_id: Option<String>,
}

impl Holder {
    pub fn is_lease(&self, lease: &Lease) -> bool {
        self.attempt == lease.attempt && self.worker_id.as_deref() == Some(lease.worker_id.as_str())
    }
}

pub(super) async fn job_holder(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Holder>> {
    Ok(
        sqlx::query_as("SELECT state, attempt, worker_id FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(ex)
            .await?,
    )
}

/// The error for a worker write whose lease is not current: NOT_FOUND for an unknown job,
/// otherwise FAILED_PRECONDITION saying what the job is doing now.
pub(super) async fn refuse_lease(ex: impl PgExecutor<'_>, lease: &Lease) -> Error {
    match job_holder(ex, lease.job_id.as_uuid()).await {
        Ok(None) => Error::job_not_found(lease.job_id),
        Ok(Some(h)) => Error::FailedPrecondition(format!(
            "stale attempt {} by worker {:?}: job {} is {} at attempt {} (worker {:?})",
            lease.attempt,
            lease.worker_id,
            lease.job_id,
            h.state,
            h.attempt,
            h.worker_id.unwrap_or_default(),
        )),
        Err(e) => e,
    }
}

/// Locks the job row (FOR NO KEY UPDATE) if and only if `lease` is its current lease: running,
/// same attempt, same worker. Writes made under the lock cannot race a completion, a
/// cancellation or the reaper.
pub(super) async fn lock_if_current(conn: &mut PgConnection, lease: &Lease) -> Result<bool> {
    let current: Option<i32> = sqlx::query_scalar(concat!(
        "SELECT attempt FROM jobs WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = ",
        state!(running),
        " FOR NO KEY UPDATE"
    ))
    .bind(lease.job_id.as_uuid())
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(current.is_some())
}

/// Ok when the lease is the job's current one; otherwise the same refusal as any other worker
/// write (FAILED_PRECONDITION for a stale attempt, NOT_FOUND for an unknown job).
pub async fn check_lease(pool: &PgPool, lease: &Lease) -> Result<()> {
    let current: Option<i32> = sqlx::query_scalar(concat!(
        "SELECT attempt FROM jobs WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = ",
        state!(running)
    ))
    .bind(lease.job_id.as_uuid())
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .fetch_optional(pool)
    .await?;
    match current {
        Some(_) => Ok(()),
        None => Err(refuse_lease(pool, lease).await),
    }
}

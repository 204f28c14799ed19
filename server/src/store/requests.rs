//! Idempotency keys of SubmitJob and SubmitSweep (`submit_requests`): claiming a key for the
//! job or sweep a submit is about to store, or finding what an earlier submit with it stored.
//!
//! The key's row is written first in the submit's transaction, so two concurrent submits with one
//! key meet on its primary key: the second's insert waits until the first commits (then it finds
//! the first's row) or rolls back (then it goes on as the first). Must not decide what the
//! client is answered (the callers read the earlier job or sweep).

use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{RequestKey, RequestKind};
use crate::error::{Error, Result};

/// Whose a key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Claimed {
    /// This submit's: it goes on and stores `target` in the same transaction.
    New,
    /// An earlier submit's, with the same spec: the id of what that one stored.
    Earlier(Uuid),
}

/// Claims `key` for `target` (the id of the job or sweep the caller is about to insert in this
/// transaction; the reference is checked at commit). ALREADY_EXISTS naming `request_id` when an
/// earlier submit used the key with another spec.
pub(super) async fn claim_key(
    conn: &mut PgConnection,
    key: &RequestKey,
    target: Uuid,
) -> Result<Claimed> {
    let (job, sweep) = match key.kind {
        RequestKind::Job => (Some(target), None),
        RequestKind::Sweep => (None, Some(target)),
    };
    let inserted = sqlx::query(
        "INSERT INTO submit_requests (kind, request_id, spec_sha256, job_id, sweep_id)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (kind, request_id) DO NOTHING",
    )
    .bind(key.kind.as_str())
    .bind(&key.id)
    .bind(&key.spec_sha256)
    .bind(job)
    .bind(sweep)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Claimed::New);
    }
    // The conflicting row is committed (the insert waited for its transaction), so this
    // statement, with a snapshot of its own, sees it.
    let (sha, job, sweep): (String, Option<Uuid>, Option<Uuid>) = sqlx::query_as(
        "SELECT spec_sha256, job_id, sweep_id FROM submit_requests
         WHERE kind = $1 AND request_id = $2",
    )
    .bind(key.kind.as_str())
    .bind(&key.id)
    .fetch_one(&mut *conn)
    .await?;
    let earlier = job.or(sweep).ok_or_else(|| {
        Error::Internal(anyhow::anyhow!(
            "request {} names neither a job nor a sweep",
            key.id
        ))
    })?;
    if sha != key.spec_sha256 {
        let what = key.kind.as_str();
        return Err(Error::AlreadyExists {
            field: "request_id".into(),
            description: format!(
                "{:?} was already used for a different {what} spec ({what} {earlier})",
                key.id
            ),
        });
    }
    Ok(Claimed::Earlier(earlier))
}

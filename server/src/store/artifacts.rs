//! Artifact records: recording an upload under its lease (and pruning old training states and
//! checkpoints beyond the retention), and the reads that find an artifact.
//!
//! Must not touch the blob store: the records it deletes come back to the caller, whose blob
//! store deletes their objects.

use chrono::{DateTime, Utc};
use proto::{ArtifactId, JobId};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use super::attempts::{lock_if_current, refuse_lease};
use crate::domain::{ArtifactHeader, ArtifactKind, DEFAULT_KEPT_CHECKPOINTS, KEPT_RESUME_STATES};
use crate::error::{Error, Result};

/// One row of `artifacts`: a stored object and what it was checked against.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ArtifactRow {
    #[sqlx(try_from = "Uuid")]
    pub id: ArtifactId,
    #[sqlx(try_from = "Uuid")]
    pub job_id: JobId,
    pub attempt: i32,
    pub kind: String,
    pub name: String,
    pub epoch: i32,
    pub size_bytes: i64,
    /// Lowercase hex SHA-256 of the content.
    pub sha256: String,
    /// Where the artifact store keeps it.
    pub uri: String,
    pub created_at: DateTime<Utc>,
    /// Global optimiser step it belongs to (0: not tied to a step).
    pub step: i64,
}

/// What recording an artifact did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The new (or replaced) record.
    pub artifact: ArtifactRow,
    /// Older `resume` or `checkpoint` records deleted to keep only the newest few; their objects
    /// are now unreferenced and the caller deletes them.
    pub pruned: Vec<ArtifactRow>,
}

/// How many of a job's artifacts of a kind are kept when a new one is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Newest checkpoints (by step) a job keeps; 0 keeps every one. The newest is always among
    /// them, so a job that succeeded keeps its final checkpoint.
    pub checkpoints: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            checkpoints: DEFAULT_KEPT_CHECKPOINTS,
        }
    }
}

/// Records an artifact whose bytes are already stored at `uri`, if (and only if) the header's
/// lease is still current: one transaction that locks the job row first, like
/// [`super::record_metrics`]. The same attempt storing the same kind and name again replaces
/// the record (the object at that key was replaced too) and it counts as new. After a `resume`
/// artifact, only the job's newest [`KEPT_RESUME_STATES`] of that kind (by step) are kept; after
/// a `checkpoint`, the newest `retention.checkpoints`. The older records are deleted in the same
/// transaction and returned.
pub async fn record_artifact(
    pool: &PgPool,
    header: &ArtifactHeader,
    uri: &str,
    retention: Retention,
) -> Result<Recorded> {
    let lease = &header.lease;
    let mut tx = pool.begin().await?;
    if !lock_if_current(&mut tx, lease).await? {
        drop(tx);
        return Err(refuse_lease(pool, lease).await);
    }
    let size = i64::try_from(header.size_bytes)
        .map_err(|_| Error::invalid("header.size_bytes", "is too large"))?;
    let artifact = sqlx::query_as::<_, ArtifactRow>(
        "INSERT INTO artifacts (id, job_id, attempt, kind, name, epoch, size_bytes, sha256, uri, step)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (job_id, attempt, kind, name) DO UPDATE
             SET epoch = EXCLUDED.epoch, size_bytes = EXCLUDED.size_bytes,
                 sha256 = EXCLUDED.sha256, uri = EXCLUDED.uri, step = EXCLUDED.step,
                 created_at = now()
         RETURNING *",
    )
    .bind(Uuid::now_v7())
    .bind(lease.job_id.as_uuid())
    .bind(lease.attempt)
    .bind(header.kind.as_str())
    .bind(&header.name)
    .bind(header.epoch)
    .bind(size)
    .bind(&header.sha256)
    .bind(uri)
    .bind(header.step)
    .fetch_one(&mut *tx)
    .await?;
    let keep = if header.kind == ArtifactKind::RESUME {
        Some(KEPT_RESUME_STATES)
    } else if header.kind == ArtifactKind::CHECKPOINT && retention.checkpoints > 0 {
        Some(i64::from(retention.checkpoints))
    } else {
        None
    };
    let pruned = match keep {
        Some(keep) => prune(&mut *tx, lease.job_id, header.kind.as_str(), keep).await?,
        None => Vec::new(),
    };
    tx.commit().await?;
    Ok(Recorded { artifact, pruned })
}

/// Deletes the job's records of `kind` except the newest `keep` (by step, then time) and returns
/// them; their objects are the caller's to delete.
async fn prune(
    ex: impl PgExecutor<'_>,
    job_id: JobId,
    kind: &str,
    keep: i64,
) -> Result<Vec<ArtifactRow>> {
    Ok(sqlx::query_as::<_, ArtifactRow>(
        "DELETE FROM artifacts WHERE id IN (
             SELECT id FROM artifacts WHERE job_id = $1 AND kind = $2
             ORDER BY step DESC, created_at DESC, id DESC
             OFFSET $3)
         RETURNING *",
    )
    .bind(job_id.as_uuid())
    .bind(kind)
    .bind(keep)
    .fetch_all(ex)
    .await?)
}

/// Deletes every training state (`resume` record) of a job that succeeded: only a retry could
/// resume from one, and a succeeded job is never retried. Returns the records; their objects are
/// the caller's to delete.
pub(super) async fn drop_resume_states(
    ex: impl PgExecutor<'_>,
    job_id: JobId,
) -> Result<Vec<ArtifactRow>> {
    prune(ex, job_id, ArtifactKind::RESUME.as_str(), 0).await
}

/// True when some artifact record points at `uri` (so its object must not be deleted).
pub async fn artifact_uri_in_use(ex: impl PgExecutor<'_>, uri: &str) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM artifacts WHERE uri = $1)")
            .bind(uri)
            .fetch_one(ex)
            .await?,
    )
}

/// A job's artifacts, oldest first, optionally of one kind only.
pub async fn list_artifacts(
    ex: impl PgExecutor<'_>,
    job_id: JobId,
    kind: Option<&str>,
) -> Result<Vec<ArtifactRow>> {
    Ok(sqlx::query_as(
        "SELECT * FROM artifacts
         WHERE job_id = $1 AND ($2::text IS NULL OR kind = $2)
         ORDER BY created_at, id",
    )
    .bind(job_id.as_uuid())
    .bind(kind)
    .fetch_all(ex)
    .await?)
}

pub async fn get_artifact(ex: impl PgExecutor<'_>, id: ArtifactId) -> Result<Option<ArtifactRow>> {
    Ok(sqlx::query_as("SELECT * FROM artifacts WHERE id = $1")
        .bind(id.as_uuid())
        .fetch_optional(ex)
        .await?)
}

/// The job's artifact of `kind` with the highest step, the newest of equal steps (artifacts not
/// tied to a step have step 0, so for them it is simply the newest), if any.
pub async fn newest_artifact(
    ex: impl PgExecutor<'_>,
    job_id: JobId,
    kind: &str,
) -> Result<Option<ArtifactRow>> {
    Ok(sqlx::query_as(
        "SELECT * FROM artifacts WHERE job_id = $1 AND kind = $2
         ORDER BY step DESC, created_at DESC, id DESC LIMIT 1",
    )
    .bind(job_id.as_uuid())
    .bind(kind)
    .fetch_optional(ex)
    .await?)
}

/// The job's `resume` artifact with the highest step (the newest of equal steps), if any.
pub async fn newest_resume_state(
    ex: impl PgExecutor<'_>,
    job_id: JobId,
) -> Result<Option<ArtifactRow>> {
    newest_artifact(ex, job_id, ArtifactKind::RESUME.as_str()).await
}

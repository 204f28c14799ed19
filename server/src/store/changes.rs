//! What the change poller reads: a version of each watched job, one query for all of them.
//!
//! Must not write.

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::error::Result;

/// What changes when anything a watcher shows changes: the job row's `updated_at` (every state
/// change sets it), its attempt, and its highest metric `seq`.
pub type JobVersion = (i64, i32, i64);

/// The version of each of `ids` that exists, in one query (an index lookup per job).
pub async fn job_versions(
    ex: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, JobVersion)>> {
    let rows: Vec<(Uuid, i64, i32, i64)> = sqlx::query_as(
        "SELECT j.id, (extract(epoch FROM j.updated_at) * 1000000)::bigint, j.attempt,
                coalesce((SELECT max(m.seq) FROM metric_points m WHERE m.job_id = j.id), 0)
         FROM jobs j WHERE j.id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(ex)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, updated, attempt, seq)| (id, (updated, attempt, seq)))
        .collect())
}

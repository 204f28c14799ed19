//! Metric points: storing a worker's batch under its lease, the latest-value summary, series
//! and the WatchJob cursor.
//!
//! Must not store a point without holding the job row's lock under a current lease.

use std::collections::HashMap;

use proto::JobId;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use super::attempts::{lock_if_current, refuse_lease};
use super::{point, uuids};
use crate::domain::{Lease, MetricPoint};
use crate::error::Result;

/// What storing a batch of metric points did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredPoints {
    /// Points that were new.
    pub stored: u64,
    /// Points that repeat a stored (name, step), or an earlier point of the same batch, with a
    /// different value. They are not stored: a point's first value stays (a retried batch must
    /// not rewrite history), and the caller reports and logs how many were refused.
    pub conflicting: u64,
    /// The first conflicting point's (name, step), for the log.
    pub first_conflict: Option<(String, i64)>,
}

/// Stores a batch of metric points for the lease's attempt and says how many were new and how
/// many conflicted with a stored point.
///
/// One transaction: it locks the job row if (and only if) the lease is current, so the job
/// cannot be completed, cancelled or reaped half-way, and metric writes of one job are
/// serialised (which keeps `seq` in commit order per job, WatchJob's cursor relies on it).
/// Points already stored under the same (job, name, step) are skipped (counted as conflicting
/// when their value differs), and the latest-value summary moves only forward in step.
pub async fn record_metrics(
    pool: &PgPool,
    lease: &Lease,
    points: &[MetricPoint],
) -> Result<StoredPoints> {
    let mut tx = pool.begin().await?;
    if !lock_if_current(&mut tx, lease).await? {
        drop(tx);
        return Err(refuse_lease(pool, lease).await);
    }
    let stored = insert_points(&mut *tx, lease.job_id.as_uuid(), points).await?;
    tx.commit().await?;
    Ok(stored)
}

/// One multi-row insert (UNNEST over column arrays) of the points, then an upsert of the
/// latest-value summary from the points that were actually new, and a count of the points that
/// disagree with what is stored. The conflict check reads `metric_points` as it was before the
/// statement (a data-modifying CTE's rows are invisible to its siblings), plus the batch itself.
async fn insert_points(
    ex: impl PgExecutor<'_>,
    job_id: Uuid,
    points: &[MetricPoint],
) -> Result<StoredPoints> {
    if points.is_empty() {
        return Ok(StoredPoints::default());
    }
    let names: Vec<&str> = points.iter().map(|p| p.name.as_str()).collect();
    let steps: Vec<i64> = points.iter().map(|p| p.step).collect();
    let epochs: Vec<i32> = points.iter().map(|p| p.epoch).collect();
    let values: Vec<f64> = points.iter().map(|p| p.value).collect();
    let (stored, conflicting, conflict_name, conflict_step): (i64, i64, Option<String>, Option<i64>) =
        sqlx::query_as(
            "WITH input AS (
                 SELECT * FROM UNNEST($2::text[], $3::bigint[], $4::int[], $5::float8[])
                     WITH ORDINALITY AS p(name, step, epoch, value, ord)
             ), stored AS (
                 INSERT INTO metric_points (job_id, name, step, epoch, value)
                 SELECT $1, name, step, epoch, value FROM input ORDER BY ord
                 ON CONFLICT (job_id, name, step) DO NOTHING
                 RETURNING name, step, epoch, value
             ), newest AS (
                 SELECT DISTINCT ON (name) name, step, epoch, value FROM stored ORDER BY name, step DESC
             ), latest AS (
                 INSERT INTO job_metric_latest (job_id, name, step, epoch, value)
                 SELECT $1, name, step, epoch, value FROM newest
                 ON CONFLICT (job_id, name) DO UPDATE
                     SET step = EXCLUDED.step, epoch = EXCLUDED.epoch, value = EXCLUDED.value
                     WHERE job_metric_latest.step < EXCLUDED.step
             ), conflicting AS (
                 SELECT i.name, i.step, i.ord FROM input i
                 WHERE EXISTS (SELECT 1 FROM metric_points m
                               WHERE m.job_id = $1 AND m.name = i.name AND m.step = i.step
                                 AND m.value IS DISTINCT FROM i.value)
                    OR EXISTS (SELECT 1 FROM input e
                               WHERE e.name = i.name AND e.step = i.step AND e.ord < i.ord
                                 AND e.value IS DISTINCT FROM i.value)
             ), first_conflict AS (
                 SELECT name, step FROM conflicting ORDER BY ord LIMIT 1
             )
             SELECT (SELECT count(*) FROM stored), (SELECT count(*) FROM conflicting),
                    (SELECT name FROM first_conflict), (SELECT step FROM first_conflict)",
        )
        .bind(job_id)
        .bind(&names)
        .bind(&steps)
        .bind(&epochs)
        .bind(&values)
        .fetch_one(ex)
        .await?;
    Ok(StoredPoints {
        stored: stored.max(0) as u64,
        conflicting: conflicting.max(0) as u64,
        first_conflict: conflict_name.zip(conflict_step),
    })
}

/// The latest value of each of the job's metrics, by name. Reads the summary table only.
pub async fn latest_metrics(ex: impl PgExecutor<'_>, id: JobId) -> Result<Vec<MetricPoint>> {
    let rows: Vec<(String, i64, i32, f64)> = sqlx::query_as(
        "SELECT name, step, epoch, value FROM job_metric_latest WHERE job_id = $1 ORDER BY name",
    )
    .bind(id.as_uuid())
    .fetch_all(ex)
    .await?;
    Ok(rows.into_iter().map(point).collect())
}

/// [`latest_metrics`] for a page of jobs, in one query.
pub async fn latest_metrics_of(
    ex: impl PgExecutor<'_>,
    ids: &[JobId],
) -> Result<HashMap<JobId, Vec<MetricPoint>>> {
    let rows: Vec<(Uuid, String, i64, i32, f64)> = sqlx::query_as(
        "SELECT job_id, name, step, epoch, value FROM job_metric_latest WHERE job_id = ANY($1) ORDER BY job_id, name",
    )
    .bind(uuids(ids))
    .fetch_all(ex)
    .await?;
    let mut by_job = HashMap::<JobId, Vec<MetricPoint>>::new();
    for (id, n, s, e, v) in rows {
        by_job
            .entry(JobId::from(id))
            .or_default()
            .push(point((n, s, e, v)));
    }
    Ok(by_job)
}

/// The job's metric series in (name, step) order, optionally only the given names.
pub async fn metric_series(
    ex: impl PgExecutor<'_>,
    id: JobId,
    names: &[String],
) -> Result<Vec<MetricPoint>> {
    let rows: Vec<(String, i64, i32, f64)> = sqlx::query_as(
        "SELECT name, step, epoch, value FROM metric_points
         WHERE job_id = $1 AND (cardinality($2::text[]) = 0 OR name = ANY($2))
         ORDER BY name, step",
    )
    .bind(id.as_uuid())
    .bind(names)
    .fetch_all(ex)
    .await?;
    Ok(rows.into_iter().map(point).collect())
}

/// Up to `limit` of the job's points stored after cursor `after_seq`, in storage order, each with
/// its `seq` (the next cursor).
pub async fn metrics_after(
    ex: impl PgExecutor<'_>,
    id: JobId,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<(i64, MetricPoint)>> {
    let rows: Vec<(i64, String, i64, i32, f64)> = sqlx::query_as(
        "SELECT seq, name, step, epoch, value FROM metric_points
         WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(id.as_uuid())
    .bind(after_seq)
    .bind(limit)
    .fetch_all(ex)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(seq, n, s, e, v)| (seq, point((n, s, e, v))))
        .collect())
}

/// The job's highest metric `seq` so far (0 if none): where a new watcher's cursor starts.
pub async fn last_metric_seq(ex: impl PgExecutor<'_>, id: JobId) -> Result<i64> {
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT max(seq) FROM metric_points WHERE job_id = $1")
            .bind(id.as_uuid())
            .fetch_one(ex)
            .await?;
    Ok(seq.unwrap_or(0))
}

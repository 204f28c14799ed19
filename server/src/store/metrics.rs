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

/// Stores a batch of metric points for the lease's attempt and returns how many were new.
///
/// One transaction: it locks the job row if (and only if) the lease is current, so the job
/// cannot be completed, cancelled or reaped half-way, and metric writes of one job are
/// serialised (which keeps `seq` in commit order per job, WatchJob's cursor relies on it).
/// Points already stored under the same (job, name, step) are skipped, and the latest-value
/// summary moves only forward in step.
pub async fn record_metrics(pool: &PgPool, lease: &Lease, points: &[MetricPoint]) -> Result<u64> {
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
/// latest-value summary from the points that were actually new. Returns the number stored.
async fn insert_points(
    ex: impl PgExecutor<'_>,
    job_id: Uuid,
    points: &[MetricPoint],
) -> Result<u64> {
    if points.is_empty() {
        return Ok(0);
    }
    let names: Vec<&str> = points.iter().map(|p| p.name.as_str()).collect();
    let steps: Vec<i64> = points.iter().map(|p| p.step).collect();
    let epochs: Vec<i32> = points.iter().map(|p| p.epoch).collect();
    let values: Vec<f64> = points.iter().map(|p| p.value).collect();
    let stored: i64 = sqlx::query_scalar(
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
         )
         SELECT count(*) FROM stored",
    )
    .bind(job_id)
    .bind(&names)
    .bind(&steps)
    .bind(&epochs)
    .bind(&values)
    .fetch_one(ex)
    .await?;
    Ok(stored.max(0) as u64)
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

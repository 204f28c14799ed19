//! Postgres access: the only module that writes SQL.
//!
//! Every state transition is one conditional statement (`UPDATE ... WHERE state = ... RETURNING`)
//! or a short transaction that locks the job row first, so two coordinators, or a worker racing
//! the lease reaper, can never both win. Functions take `impl PgExecutor<'_>` (a pool or a
//! transaction) when they run one statement, and `&PgPool` when they need a transaction of their
//! own. Queries are checked at run time (`sqlx::query`), so building needs no database.
//!
//! Must not touch Redis, must not know about gRPC types, and must not decide policy (how long a
//! lease lasts, how long a retry waits): callers pass those in.

use std::time::Duration;

use chrono::{DateTime, Utc};
use proto::spec::JobSpec;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::domain::{is_terminal, JobQuery, Lease, MetricPoint, PageToken};
use crate::error::{Error, Result};

/// One row of `jobs`, as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub name: String,
    pub kind: String,
    /// The JobSpec in the proto3 JSON mapping.
    pub spec: serde_json::Value,
    pub labels: serde_json::Value,
    /// Lowercase state name (`queued`, `running`, ...).
    pub state: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub worker_id: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub not_before: Option<DateTime<Utc>>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// A duration as the float milliseconds that SQL multiplies with `interval '1 millisecond'`.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// Submitting and dispatching
// ---------------------------------------------------------------------------------------------

/// Stores a validated job as `queued`, not yet dispatched (`dispatched_at` NULL), so that if the
/// push to Redis never happens the reconciler pushes it.
pub async fn insert_job(ex: impl PgExecutor<'_>, id: Uuid, spec: &JobSpec) -> Result<JobRow> {
    let labels = serde_json::to_value(&spec.labels).map_err(|e| Error::Internal(e.into()))?;
    let row = sqlx::query_as::<_, JobRow>(
        "INSERT INTO jobs (id, name, kind, spec, labels, state, max_attempts)
         VALUES ($1, $2, $3, $4, $5, 'queued', $6)
         RETURNING *",
    )
    .bind(id)
    .bind(&spec.name)
    .bind(spec.experiment.kind())
    .bind(spec.to_json())
    .bind(labels)
    .bind(i32::try_from(spec.max_attempts).unwrap_or(i32::MAX))
    .fetch_one(ex)
    .await?;
    Ok(row)
}

/// Records that these jobs' ids were just pushed to Redis.
pub async fn mark_dispatched(ex: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<()> {
    sqlx::query("UPDATE jobs SET dispatched_at = now() WHERE id = ANY($1) AND state = 'queued'")
        .bind(ids)
        .execute(ex)
        .await?;
    Ok(())
}

/// Forgets that these jobs were dispatched (the push failed), so the next reconcile retries.
pub async fn clear_dispatched(ex: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<()> {
    sqlx::query("UPDATE jobs SET dispatched_at = NULL WHERE id = ANY($1) AND state = 'queued'")
        .bind(ids)
        .execute(ex)
        .await?;
    Ok(())
}

/// Picks up to `limit` queued jobs that are due for a push (never dispatched, or dispatched more
/// than `redispatch_after` ago, and past their retry backoff), marks them dispatched now and
/// returns their ids, oldest first. `SKIP LOCKED` keeps two coordinators from taking the same
/// rows in the same instant; a duplicate push would be harmless anyway.
pub async fn take_due_for_dispatch(
    ex: impl PgExecutor<'_>,
    redispatch_after: Duration,
    limit: i64,
) -> Result<Vec<Uuid>> {
    let rows: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
        "UPDATE jobs SET dispatched_at = now()
         WHERE id IN (
             SELECT id FROM jobs
             WHERE state = 'queued'
               AND (dispatched_at IS NULL OR dispatched_at < now() - $1 * interval '1 millisecond')
               AND (not_before IS NULL OR not_before <= now())
             ORDER BY created_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED)
         RETURNING id, created_at",
    )
    .bind(millis(redispatch_after))
    .bind(limit)
    .fetch_all(ex)
    .await?;
    let mut rows = rows;
    rows.sort_by_key(|(id, created)| (*created, *id));
    Ok(rows.into_iter().map(|(id, _)| id).collect())
}

// ---------------------------------------------------------------------------------------------
// Worker writes: claim, heartbeat, metrics, completion, failure
// ---------------------------------------------------------------------------------------------

/// Claims a queued job for `worker_id`: one conditional update, so of several claimers exactly
/// one gets the row and the others get `None` (as does a claim of a job that is not queued, or
/// is still in its retry backoff).
pub async fn claim_job(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    worker_id: &str,
    lease_for: Duration,
) -> Result<Option<JobRow>> {
    let row = sqlx::query_as::<_, JobRow>(
        "UPDATE jobs
         SET state = 'running', attempt = attempt + 1, worker_id = $2,
             lease_expires_at = now() + $3 * interval '1 millisecond',
             started_at = coalesce(started_at, now()), updated_at = now()
         WHERE id = $1 AND state = 'queued' AND (not_before IS NULL OR not_before <= now())
         RETURNING *",
    )
    .bind(id)
    .bind(worker_id)
    .bind(millis(lease_for))
    .fetch_optional(ex)
    .await?;
    Ok(row)
}

/// Extends a current lease; `None` when the lease is no longer current (cancelled, reaped,
/// finished), which tells the worker to stop.
pub async fn heartbeat(
    ex: impl PgExecutor<'_>,
    lease: &Lease,
    lease_for: Duration,
) -> Result<Option<DateTime<Utc>>> {
    let expires = sqlx::query_scalar(
        "UPDATE jobs SET lease_expires_at = now() + $4 * interval '1 millisecond'
         WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = 'running'
         RETURNING lease_expires_at",
    )
    .bind(lease.job_id)
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .bind(millis(lease_for))
    .fetch_optional(ex)
    .await?;
    Ok(expires)
}

/// Stores a batch of metric points for the lease's attempt and returns how many were new.
///
/// One transaction: it locks the job row if (and only if) the lease is current, so the job
/// cannot be completed, cancelled or reaped half-way, and metric writes of one job are
/// serialised (which keeps `seq` in commit order per job, WatchJob's cursor relies on it).
/// Points already stored under the same (job, name, step) are skipped, and the latest-value
/// summary moves only forward in step.
pub async fn record_metrics(pool: &PgPool, lease: &Lease, points: &[MetricPoint]) -> Result<u64> {
    let mut tx = pool.begin().await?;
    let current: Option<i32> = sqlx::query_scalar(
        "SELECT attempt FROM jobs WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = 'running'
         FOR NO KEY UPDATE",
    )
    .bind(lease.job_id)
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .fetch_optional(&mut *tx)
    .await?;
    if current.is_none() {
        drop(tx);
        return Err(refuse_lease(pool, lease).await);
    }
    let stored = insert_points(&mut *tx, lease.job_id, points).await?;
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

/// Marks the lease's attempt succeeded. Idempotent: completing an attempt that already
/// succeeded is OK (the worker may retry after a lost response); anything else is refused.
pub async fn complete_job(pool: &PgPool, lease: &Lease) -> Result<()> {
    let done = sqlx::query(
        "UPDATE jobs SET state = 'succeeded', finished_at = now(), updated_at = now(), lease_expires_at = NULL
         WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = 'running'",
    )
    .bind(lease.job_id)
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .execute(pool)
    .await?;
    if done.rows_affected() == 1 {
        return Ok(());
    }
    match job_holder(pool, lease.job_id).await? {
        Some(h) if h.state == "succeeded" && h.is_lease(lease) => Ok(()),
        _ => Err(refuse_lease(pool, lease).await),
    }
}

/// Ends the lease's attempt with a failure. When `permanent` or no attempts are left the job
/// becomes `failed`; otherwise it goes back to `queued` with `not_before = now() + retry_after`
/// and no dispatch record, so the reconciler pushes it as soon as the backoff has passed.
/// Returns the new state. Idempotent for a repeated call by the same attempt.
pub async fn fail_job(
    pool: &PgPool,
    lease: &Lease,
    reason: &str,
    permanent: bool,
    retry_after: Duration,
) -> Result<String> {
    let state: Option<String> = sqlx::query_scalar(
        "UPDATE jobs SET
             state = CASE WHEN $4 OR attempt >= max_attempts THEN 'failed' ELSE 'queued' END,
             finished_at = CASE WHEN $4 OR attempt >= max_attempts THEN now() END,
             not_before = CASE WHEN $4 OR attempt >= max_attempts THEN NULL
                               ELSE now() + $5 * interval '1 millisecond' END,
             error = $6, lease_expires_at = NULL, dispatched_at = NULL, updated_at = now()
         WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = 'running'
         RETURNING state",
    )
    .bind(lease.job_id)
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .bind(permanent)
    .bind(millis(retry_after))
    .bind(reason)
    .fetch_optional(pool)
    .await?;
    if let Some(state) = state {
        return Ok(state);
    }
    match job_holder(pool, lease.job_id).await? {
        Some(h) if matches!(h.state.as_str(), "queued" | "failed") && h.is_lease(lease) => {
            Ok(h.state)
        }
        _ => Err(refuse_lease(pool, lease).await),
    }
}

/// Who holds (or last held) a job, for deciding whether a refused write was a repeat.
#[derive(Debug, sqlx::FromRow)]
struct Holder {
    state: String,
    attempt: i32,
    worker_id: Option<String>,
}

impl Holder {
    fn is_lease(&self, lease: &Lease) -> bool {
        self.attempt == lease.attempt && self.worker_id.as_deref() == Some(lease.worker_id.as_str())
    }
}

async fn job_holder(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Holder>> {
    Ok(
        sqlx::query_as("SELECT state, attempt, worker_id FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(ex)
            .await?,
    )
}

/// The error for a worker write whose lease is not current: NOT_FOUND for an unknown job,
/// otherwise FAILED_PRECONDITION saying what the job is doing now.
async fn refuse_lease(ex: impl PgExecutor<'_>, lease: &Lease) -> Error {
    match job_holder(ex, lease.job_id).await {
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

// ---------------------------------------------------------------------------------------------
// User writes
// ---------------------------------------------------------------------------------------------

/// Cancels a waiting, queued or running job. A running job's worker finds out at its next
/// heartbeat (keep_running = false) and its later writes are refused as stale.
pub async fn cancel_job(pool: &PgPool, id: Uuid, reason: &str) -> Result<JobRow> {
    let mut tx = pool.begin().await?;
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    match state {
        None => return Err(Error::job_not_found(id)),
        Some(s) if is_terminal(&s) => {
            return Err(Error::FailedPrecondition(format!(
                "job {id} is already {s}"
            )));
        }
        Some(_) => {}
    }
    let row = sqlx::query_as::<_, JobRow>(
        "UPDATE jobs SET state = 'cancelled', finished_at = now(), updated_at = now(),
                         lease_expires_at = NULL, error = $2
         WHERE id = $1
         RETURNING *",
    )
    .bind(id)
    .bind(reason)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row)
}

// ---------------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------------

pub async fn get_job(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<JobRow>> {
    Ok(sqlx::query_as("SELECT * FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(ex)
        .await?)
}

/// The latest value of each of the job's metrics, by name. Reads the summary table only.
pub async fn latest_metrics(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Vec<MetricPoint>> {
    let rows: Vec<(String, i64, i32, f64)> = sqlx::query_as(
        "SELECT name, step, epoch, value FROM job_metric_latest WHERE job_id = $1 ORDER BY name",
    )
    .bind(id)
    .fetch_all(ex)
    .await?;
    Ok(rows.into_iter().map(point).collect())
}

/// [`latest_metrics`] for a page of jobs, in one query.
pub async fn latest_metrics_of(
    ex: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, Vec<MetricPoint>>> {
    let rows: Vec<(Uuid, String, i64, i32, f64)> = sqlx::query_as(
        "SELECT job_id, name, step, epoch, value FROM job_metric_latest WHERE job_id = ANY($1) ORDER BY job_id, name",
    )
    .bind(ids)
    .fetch_all(ex)
    .await?;
    let mut by_job = std::collections::HashMap::<Uuid, Vec<MetricPoint>>::new();
    for (id, n, s, e, v) in rows {
        by_job.entry(id).or_default().push(point((n, s, e, v)));
    }
    Ok(by_job)
}

fn point((name, step, epoch, value): (String, i64, i32, f64)) -> MetricPoint {
    MetricPoint {
        name,
        step,
        epoch,
        value,
    }
}

/// One page of jobs, newest first, and the token of the next page (`None` on the last page).
pub async fn list_jobs(
    ex: impl PgExecutor<'_>,
    q: &JobQuery,
) -> Result<(Vec<JobRow>, Option<PageToken>)> {
    let limit = i64::from(q.page_size);
    let mut rows = sqlx::query_as::<_, JobRow>(
        "SELECT * FROM jobs
         WHERE (cardinality($1::text[]) = 0 OR state = ANY($1))
           AND labels @> $2
           AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
         ORDER BY created_at DESC, id DESC
         LIMIT $5",
    )
    .bind(&q.states)
    .bind(&q.labels)
    .bind(q.after.map(|t| t.created_at))
    .bind(q.after.map(|t| t.id))
    .bind(limit + 1)
    .fetch_all(ex)
    .await?;
    let next = if rows.len() as i64 > limit {
        rows.truncate(q.page_size as usize);
        rows.last().map(|r| PageToken {
            created_at: r.created_at,
            id: r.id,
        })
    } else {
        None
    };
    Ok((rows, next))
}

/// The job's metric series in (name, step) order, optionally only the given names.
pub async fn metric_series(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    names: &[String],
) -> Result<Vec<MetricPoint>> {
    let rows: Vec<(String, i64, i32, f64)> = sqlx::query_as(
        "SELECT name, step, epoch, value FROM metric_points
         WHERE job_id = $1 AND (cardinality($2::text[]) = 0 OR name = ANY($2))
         ORDER BY name, step",
    )
    .bind(id)
    .bind(names)
    .fetch_all(ex)
    .await?;
    Ok(rows.into_iter().map(point).collect())
}

/// Up to `limit` of the job's points stored after cursor `after_seq`, in storage order, each with
/// its `seq` (the next cursor).
pub async fn metrics_after(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<(i64, MetricPoint)>> {
    let rows: Vec<(i64, String, i64, i32, f64)> = sqlx::query_as(
        "SELECT seq, name, step, epoch, value FROM metric_points
         WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(id)
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
pub async fn last_metric_seq(ex: impl PgExecutor<'_>, id: Uuid) -> Result<i64> {
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT max(seq) FROM metric_points WHERE job_id = $1")
            .bind(id)
            .fetch_one(ex)
            .await?;
    Ok(seq.unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// Lease reaper
// ---------------------------------------------------------------------------------------------

/// A job the lease reaper took away from a silent worker.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ReapedJob {
    pub id: Uuid,
    /// `queued` (attempts left, to be dispatched again) or `failed`.
    pub state: String,
}

/// Takes up to `limit` running jobs whose lease has expired away from their workers: back to
/// `queued` (undispatched, so the reconciler pushes them) while attempts remain, else `failed`.
/// The worker's later writes are refused as stale.
pub async fn reap_expired_leases(ex: impl PgExecutor<'_>, limit: i64) -> Result<Vec<ReapedJob>> {
    Ok(sqlx::query_as(
        "WITH expired AS (
             SELECT id FROM jobs
             WHERE state = 'running' AND lease_expires_at < now()
             ORDER BY lease_expires_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         )
         UPDATE jobs j SET
             state = CASE WHEN j.attempt < j.max_attempts THEN 'queued' ELSE 'failed' END,
             finished_at = CASE WHEN j.attempt < j.max_attempts THEN NULL ELSE now() END,
             error = 'lease expired on worker ' || j.worker_id,
             lease_expires_at = NULL, dispatched_at = NULL, updated_at = now()
         FROM expired
         WHERE j.id = expired.id
         RETURNING j.id, j.state",
    )
    .bind(limit)
    .fetch_all(ex)
    .await?)
}

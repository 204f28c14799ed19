//! Postgres access: the only module that writes SQL.
//!
//! Every state transition is one conditional statement (`UPDATE ... WHERE state = ... RETURNING`)
//! or a short transaction that locks the job row first, so two coordinators, or a worker racing
//! the lease reaper, can never both win. Functions take `impl PgExecutor<'_>` (a pool or a
//! transaction) when they run one statement, and `&PgPool` when they need a transaction of their
//! own. Queries are checked at run time (`sqlx::query`), so building needs no database.
//!
//! Dependencies: a job that ends changes the jobs waiting for it in the same transaction (a
//! success promotes those whose dependencies have all succeeded to `queued`; a failure or a
//! cancellation fails them, transitively, with `dependency_failed`), and returns their ids so
//! the caller can dispatch them and wake their watchers. Rows are locked in a fixed order
//! (the finished job, then its dependents by id), so that two dependencies ending at once see
//! each other's outcome.
//!
//! Attempts: every claim inserts a `job_attempts` row (`running`, with the step of the training
//! state it resumes from) and every way an attempt ends (completion, failure, lease expiry,
//! hand-back, cancellation) closes it in the transaction that changes the job. Only failures and
//! lease expiries count in `failed_attempts`, which is what `max_attempts` limits. After a
//! `resume` artifact is recorded only the newest few of the job are kept; the deleted records
//! come back to the caller, whose blob store deletes their objects.
//!
//! Must not touch Redis, must not know about gRPC types, and must not decide policy (how long a
//! lease lasts, how long a retry waits): callers pass those in.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use proto::spec::JobSpec;
use sqlx::{Acquire, PgConnection, PgExecutor, PgPool, Postgres};
use uuid::Uuid;

use crate::domain::{
    self, is_terminal, ArtifactHeader, JobQuery, Lease, MetricPoint, PageToken,
    TRANSFER_SOURCE_FIELD,
};
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
    /// Attempts that failed or whose lease expired (what `max_attempts` limits); hand-backs do
    /// not count.
    pub failed_attempts: i32,
    /// Optimiser steps the job trained in all; set when it succeeded.
    pub final_step: Option<i64>,
}

/// One row of `job_attempts`: one claim of a job and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AttemptRow {
    pub job_id: Uuid,
    pub attempt: i32,
    pub worker_id: String,
    pub claimed_at: DateTime<Utc>,
    /// `None` while the attempt runs.
    pub ended_at: Option<DateTime<Utc>>,
    /// `running`, `succeeded`, `failed`, `lease_expired`, `handed_back` or `cancelled`.
    pub outcome: String,
    /// The step of the training state the claim handed out (0: from scratch).
    pub resumed_from_step: i64,
    pub reason: Option<String>,
}

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

/// A duration as the float milliseconds that SQL multiplies with `interval '1 millisecond'`.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// Submitting and dispatching
// ---------------------------------------------------------------------------------------------

/// Stores a validated job with its dependency edges, in one transaction (a savepoint when `db`
/// is already a transaction):
///
/// - every dependency must exist, else INVALID_ARGUMENT naming the field that listed it
///   (`spec.depends_on[i]`, or the transfer's `source_job_id`); a transfer's source must be an
///   `mnist_classifier` job;
/// - the job starts `queued` (undispatched, so if the push to Redis never happens the
///   reconciler pushes it) when every dependency has succeeded, `failed` with
///   `dependency_failed` (it never runs) when one failed or was cancelled, else `waiting`.
///
/// The dependencies are read `FOR SHARE`, so one that is finishing right now either finished
/// before (and its state is seen here) or finishes after this commit (and then sees this job
/// among its dependents).
pub async fn insert_job<'c>(
    db: impl Acquire<'c, Database = Postgres>,
    id: Uuid,
    spec: &JobSpec,
) -> Result<JobRow> {
    let labels = serde_json::to_value(&spec.labels).map_err(|e| Error::Internal(e.into()))?;
    let deps: Vec<Uuid> = spec.dependencies.iter().map(|d| d.as_uuid()).collect();
    let mut tx = db.begin().await?;
    let found: Vec<(Uuid, String, String)> =
        sqlx::query_as("SELECT id, kind, state FROM jobs WHERE id = ANY($1) ORDER BY id FOR SHARE")
            .bind(&deps)
            .fetch_all(&mut *tx)
            .await?;
    let found: HashMap<Uuid, (String, String)> = found
        .into_iter()
        .map(|(id, kind, state)| (id, (kind, state)))
        .collect();
    for (id, dep) in spec.dependencies.iter().zip(&deps) {
        if !found.contains_key(dep) {
            return Err(Error::invalid(
                domain::dependency_field(spec, *id),
                format!("job {dep} does not exist"),
            ));
        }
    }
    if let Some(source) = domain::transfer_source(spec) {
        let (kind, _) = found.get(&source.as_uuid()).ok_or_else(|| {
            Error::Internal(anyhow::anyhow!(
                "transfer source not among the dependencies"
            ))
        })?;
        if kind != "mnist_classifier" {
            return Err(Error::invalid(
                TRANSFER_SOURCE_FIELD,
                format!("job {source} is a {kind} job; a transfer's source must be an mnist_classifier job"),
            ));
        }
    }
    let states: Vec<(Uuid, &str)> = deps.iter().map(|d| (*d, found[d].1.as_str())).collect();
    let broken = states
        .iter()
        .find(|(_, state)| matches!(*state, "failed" | "cancelled"));
    let (state, error) = match broken {
        Some((dep, dep_state)) => ("failed", Some(domain::dependency_failed(*dep, dep_state))),
        None if states.iter().all(|(_, s)| *s == "succeeded") => ("queued", None),
        None => ("waiting", None),
    };
    let row = sqlx::query_as::<_, JobRow>(
        "INSERT INTO jobs (id, name, kind, spec, labels, state, max_attempts, error, finished_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $6 = 'failed' THEN now() END)
         RETURNING *",
    )
    .bind(id)
    .bind(&spec.name)
    .bind(spec.experiment.kind())
    .bind(spec.to_json())
    .bind(labels)
    .bind(state)
    .bind(i32::try_from(spec.max_attempts).unwrap_or(i32::MAX))
    .bind(error)
    .fetch_one(&mut *tx)
    .await?;
    if !deps.is_empty() {
        sqlx::query(
            "INSERT INTO job_dependencies (job_id, depends_on) SELECT $1, unnest($2::uuid[])",
        )
        .bind(id)
        .bind(&deps)
        .execute(&mut *tx)
        .await?;
        // A cycle cannot arise: a new job can only depend on jobs that already exist, and edges
        // are never added later. Checked anyway, so the invariant is enforced here rather than
        // only argued: the new job must not be reachable from its own dependencies.
        if depends_on_itself(&mut tx, id).await? {
            return Err(Error::invalid(
                "spec.depends_on",
                format!("job {id} would depend on itself through its dependencies"),
            ));
        }
    }
    tx.commit().await?;
    Ok(row)
}

/// True when `id` can be reached by following `depends_on` edges from `id`'s own dependencies.
async fn depends_on_itself(conn: &mut PgConnection, id: Uuid) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "WITH RECURSIVE reachable(id) AS (
             SELECT depends_on FROM job_dependencies WHERE job_id = $1
             UNION
             SELECT d.depends_on FROM job_dependencies d JOIN reachable r ON d.job_id = r.id
         )
         SELECT EXISTS (SELECT 1 FROM reachable WHERE id = $1)",
    )
    .bind(id)
    .fetch_one(conn)
    .await?)
}

/// The ids of the jobs that `id` depends on, in id order.
pub async fn dependencies_of(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT depends_on FROM job_dependencies WHERE job_id = $1 ORDER BY depends_on",
    )
    .bind(id)
    .fetch_all(ex)
    .await?)
}

/// After `id` succeeded: every waiting dependent whose dependencies have now all succeeded
/// becomes `queued` and undispatched. Returns their ids.
async fn promote_dependents(conn: &mut PgConnection, id: Uuid) -> Result<Vec<Uuid>> {
    // Lock first, in id order: a second dependency finishing at the same time waits here until
    // this transaction commits, and then sees this one as succeeded.
    let waiting: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM jobs
         WHERE state = 'waiting'
           AND id IN (SELECT job_id FROM job_dependencies WHERE depends_on = $1)
         ORDER BY id
         FOR UPDATE",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    if waiting.is_empty() {
        return Ok(waiting);
    }
    let mut queued: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE jobs j SET state = 'queued', dispatched_at = NULL, not_before = NULL, updated_at = now()
         WHERE j.id = ANY($1) AND j.state = 'waiting'
           AND NOT EXISTS (
               SELECT 1 FROM job_dependencies d JOIN jobs p ON p.id = d.depends_on
               WHERE d.job_id = j.id AND p.state <> 'succeeded')
         RETURNING j.id",
    )
    .bind(&waiting)
    .fetch_all(&mut *conn)
    .await?;
    queued.sort();
    Ok(queued)
}

/// After `id` failed or was cancelled: every job waiting for it, and every job waiting for
/// those, fails with `dependency_failed: job <dependency> is <state>` naming its own
/// dependency that ended. Returns their ids.
async fn fail_dependents(conn: &mut PgConnection, id: Uuid) -> Result<Vec<Uuid>> {
    let mut failed = Vec::new();
    let mut frontier = vec![id];
    while !frontier.is_empty() {
        let waiting: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM jobs
             WHERE state = 'waiting'
               AND id IN (SELECT job_id FROM job_dependencies WHERE depends_on = ANY($1))
             ORDER BY id
             FOR UPDATE",
        )
        .bind(&frontier)
        .fetch_all(&mut *conn)
        .await?;
        if waiting.is_empty() {
            break;
        }
        let causes: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
            "SELECT DISTINCT ON (d.job_id) d.job_id, d.depends_on, p.state
             FROM job_dependencies d JOIN jobs p ON p.id = d.depends_on
             WHERE d.job_id = ANY($1) AND d.depends_on = ANY($2)
             ORDER BY d.job_id, d.depends_on",
        )
        .bind(&waiting)
        .bind(&frontier)
        .fetch_all(&mut *conn)
        .await?;
        let ids: Vec<Uuid> = causes.iter().map(|(job, _, _)| *job).collect();
        let errors: Vec<String> = causes
            .iter()
            .map(|(_, dep, state)| domain::dependency_failed(*dep, state))
            .collect();
        let mut level: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE jobs j SET state = 'failed', error = u.error, finished_at = now(),
                               updated_at = now(), dispatched_at = NULL
             FROM UNNEST($1::uuid[], $2::text[]) AS u(id, error)
             WHERE j.id = u.id AND j.state = 'waiting'
             RETURNING j.id",
        )
        .bind(&ids)
        .bind(&errors)
        .fetch_all(&mut *conn)
        .await?;
        level.sort();
        failed.extend_from_slice(&level);
        frontier = level;
    }
    Ok(failed)
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

/// Forgets every queued job's dispatch record, so the next [`take_due_for_dispatch`] pushes them
/// all: for when Redis lost its keys (a FLUSHALL, a restart without persistence). Returns how
/// many jobs that concerned.
pub async fn forget_all_dispatches(ex: impl PgExecutor<'_>) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE jobs SET dispatched_at = NULL WHERE state = 'queued' AND dispatched_at IS NOT NULL",
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected())
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
/// is still in its retry backoff). In the same transaction it records the attempt (`running`)
/// and picks the training state to resume from: the job's `resume` artifact with the highest
/// step, stored by any earlier attempt.
pub async fn claim_job(
    pool: &PgPool,
    id: Uuid,
    worker_id: &str,
    lease_for: Duration,
) -> Result<Option<Claim>> {
    let mut tx = pool.begin().await?;
    // `updated_at` changes with every state change and nothing else of a queued job, so its
    // value before this update is when the job last became queued.
    let Some(ClaimedRow { job, waited_s }) = sqlx::query_as::<_, ClaimedRow>(
        "UPDATE jobs j
         SET state = 'running', attempt = j.attempt + 1, worker_id = $2,
             lease_expires_at = now() + $3 * interval '1 millisecond',
             started_at = coalesce(j.started_at, now()), updated_at = now()
         FROM (SELECT id, greatest(updated_at, coalesce(not_before, updated_at)) AS ready_since
               FROM jobs WHERE id = $1) before
         WHERE j.id = $1 AND before.id = j.id AND j.state = 'queued'
           AND (j.not_before IS NULL OR j.not_before <= now())
         RETURNING j.*, greatest(extract(epoch FROM now() - before.ready_since), 0)::float8
                   AS waited_s",
    )
    .bind(id)
    .bind(worker_id)
    .bind(millis(lease_for))
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
    .bind(id)
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

/// A claimed job and how long it had been ready, in seconds.
#[derive(sqlx::FromRow)]
struct ClaimedRow {
    #[sqlx(flatten)]
    job: JobRow,
    waited_s: f64,
}

/// The job's `resume` artifact with the highest step (the newest of equal steps), if any.
pub async fn newest_resume_state(
    ex: impl PgExecutor<'_>,
    job_id: Uuid,
) -> Result<Option<ArtifactRow>> {
    newest_artifact(ex, job_id, domain::RESUME_KIND).await
}

/// Ends the attempt's record with `outcome` (unless it already ended).
async fn end_attempt(
    conn: &mut PgConnection,
    job_id: Uuid,
    attempt: i32,
    outcome: &str,
    reason: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "UPDATE job_attempts SET outcome = $3, ended_at = now(), reason = $4
         WHERE job_id = $1 AND attempt = $2 AND outcome = 'running'",
    )
    .bind(job_id)
    .bind(attempt)
    .bind(outcome)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Extends a current lease; `None` when the lease is no longer current (cancelled, reaped,
/// finished, handed back), which tells the worker to stop. NOT_FOUND for an unknown job.
pub async fn heartbeat(
    pool: &PgPool,
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
    .fetch_optional(pool)
    .await?;
    if expires.is_none() && job_holder(pool, lease.job_id).await?.is_none() {
        return Err(Error::job_not_found(lease.job_id));
    }
    Ok(expires)
}

/// Locks the job row (FOR NO KEY UPDATE) if and only if `lease` is its current lease: running,
/// same attempt, same worker. Writes made under the lock cannot race a completion, a
/// cancellation or the reaper.
async fn lock_if_current(conn: &mut PgConnection, lease: &Lease) -> Result<bool> {
    let current: Option<i32> = sqlx::query_scalar(
        "SELECT attempt FROM jobs WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = 'running'
         FOR NO KEY UPDATE",
    )
    .bind(lease.job_id)
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(current.is_some())
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
    if !lock_if_current(&mut tx, lease).await? {
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

/// Marks the lease's attempt succeeded, with the steps it trained in all, and, in the same
/// transaction, promotes the dependents that were waiting only for it; returns their ids (now
/// `queued`, undispatched). Idempotent: completing an attempt that already succeeded is OK (the
/// worker may retry after a lost response) and changes nothing more; anything else is refused.
pub async fn complete_job(pool: &PgPool, lease: &Lease, final_step: i64) -> Result<Vec<Uuid>> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "UPDATE jobs SET state = 'succeeded', finished_at = now(), updated_at = now(),
                         lease_expires_at = NULL, final_step = $4
         WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = 'running'",
    )
    .bind(lease.job_id)
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .bind(final_step)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 1 {
        end_attempt(&mut tx, lease.job_id, lease.attempt, "succeeded", None).await?;
        let queued = promote_dependents(&mut tx, lease.job_id).await?;
        tx.commit().await?;
        return Ok(queued);
    }
    drop(tx);
    match job_holder(pool, lease.job_id).await? {
        Some(h) if h.state == "succeeded" && h.is_lease(lease) => Ok(Vec::new()),
        _ => Err(refuse_lease(pool, lease).await),
    }
}

/// Ends the lease's attempt with a failure, which counts against `max_attempts`. When
/// `permanent` or no failures are left the job becomes `failed`; otherwise it goes back to
/// `queued` with `not_before = now() + retry_after(failed_attempts)` (the caller's policy, given
/// the failures so far including this one) and no dispatch record, so the reconciler pushes it as
/// soon as the backoff has passed. A job that fails for good fails its waiting dependents in the
/// same transaction. Returns the new state and the dependents that failed. Idempotent for a
/// repeated call by the same attempt.
pub async fn fail_job(
    pool: &PgPool,
    lease: &Lease,
    reason: &str,
    permanent: bool,
    retry_after: impl FnOnce(i32) -> Duration,
) -> Result<(String, Vec<Uuid>)> {
    let mut tx = pool.begin().await?;
    let counts: Option<(i32, i32)> = sqlx::query_as(
        "SELECT failed_attempts, max_attempts FROM jobs
         WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = 'running'
         FOR NO KEY UPDATE",
    )
    .bind(lease.job_id)
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
        let state: String = sqlx::query_scalar(
            "UPDATE jobs SET
                 state = CASE WHEN $2 THEN 'failed' ELSE 'queued' END,
                 finished_at = CASE WHEN $2 THEN now() END,
                 not_before = CASE WHEN $2 THEN NULL
                                   ELSE now() + $3 * interval '1 millisecond' END,
                 failed_attempts = $4, error = $5,
                 lease_expires_at = NULL, dispatched_at = NULL, updated_at = now()
             WHERE id = $1
             RETURNING state",
        )
        .bind(lease.job_id)
        .bind(for_good)
        .bind(millis(backoff))
        .bind(failed_attempts)
        .bind(reason)
        .fetch_one(&mut *tx)
        .await?;
        end_attempt(&mut tx, lease.job_id, lease.attempt, "failed", Some(reason)).await?;
        let failed = if state == "failed" {
            fail_dependents(&mut tx, lease.job_id).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        return Ok((state, failed));
    }
    drop(tx);
    match job_holder(pool, lease.job_id).await? {
        Some(h) if matches!(h.state.as_str(), "queued" | "failed") && h.is_lease(lease) => {
            Ok((h.state, Vec::new()))
        }
        _ => Err(refuse_lease(pool, lease).await),
    }
}

/// Hands the lease's job back (its worker is shutting down): `queued` again at once (no backoff,
/// undispatched so the caller or the reconciler pushes it), the lease cleared, `failed_attempts`
/// unchanged, and the attempt recorded as `handed_back` with `reason`. Idempotent for a repeated
/// call by the same attempt while the job is still queued at that attempt; any other stale lease
/// is refused like every worker write.
pub async fn release_job(pool: &PgPool, lease: &Lease, reason: &str) -> Result<()> {
    let mut tx = pool.begin().await?;
    let released = sqlx::query(
        "UPDATE jobs SET state = 'queued', not_before = NULL, dispatched_at = NULL,
                         lease_expires_at = NULL, updated_at = now()
         WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = 'running'",
    )
    .bind(lease.job_id)
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .execute(&mut *tx)
    .await?;
    if released.rows_affected() == 1 {
        end_attempt(
            &mut tx,
            lease.job_id,
            lease.attempt,
            "handed_back",
            Some(reason),
        )
        .await?;
        tx.commit().await?;
        return Ok(());
    }
    drop(tx);
    match job_holder(pool, lease.job_id).await? {
        Some(h) if h.state == "queued" && h.is_lease(lease) => Ok(()),
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
/// heartbeat (keep_running = false) and its later writes are refused as stale. The jobs waiting
/// for it fail with `dependency_failed` in the same transaction; their ids come back with the
/// cancelled row.
pub async fn cancel_job(pool: &PgPool, id: Uuid, reason: &str) -> Result<(JobRow, Vec<Uuid>)> {
    let mut tx = pool.begin().await?;
    let cancelled = cancel_in(&mut tx, id, reason).await?;
    tx.commit().await?;
    Ok(cancelled)
}

/// [`cancel_job`]'s work inside the caller's transaction: locks the job, refuses an unknown
/// (NOT_FOUND) or ended one (FAILED_PRECONDITION), cancels it, closes its attempt and fails its
/// waiting dependents.
async fn cancel_in(conn: &mut PgConnection, id: Uuid, reason: &str) -> Result<(JobRow, Vec<Uuid>)> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
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
    .fetch_one(&mut *conn)
    .await?;
    end_attempt(&mut *conn, id, row.attempt, "cancelled", Some(reason)).await?;
    let failed = fail_dependents(&mut *conn, id).await?;
    Ok((row, failed))
}

/// What cancelling a sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepCancelled {
    /// The jobs it cancelled, in the order it cancelled them.
    pub cancelled: Vec<Uuid>,
    /// Jobs outside the sweep that waited for one of them and failed with it.
    pub dependents_failed: Vec<Uuid>,
}

/// Cancels a sweep in one transaction: records `cancelled_at` (the first time) and cancels every
/// job of it that has not ended, the last planned first (arm runs before the sources they wait
/// for, so that they end `cancelled`, not `dependency_failed`). Jobs that ended keep their
/// results. `None` when there is no such sweep. Calling it again cancels nothing more.
pub async fn cancel_sweep(pool: &PgPool, id: Uuid, reason: &str) -> Result<Option<SweepCancelled>> {
    let mut tx = pool.begin().await?;
    if !mark_sweep_cancelled(&mut *tx, id).await? {
        return Ok(None);
    }
    let open: Vec<Uuid> = sqlx::query_scalar(
        "SELECT r.job_id FROM sweep_runs r JOIN jobs j ON j.id = r.job_id
         WHERE r.sweep_id = $1 AND j.state IN ('waiting', 'queued', 'running')
         ORDER BY r.position DESC",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    let mut done = SweepCancelled::default();
    for job in open {
        match cancel_in(&mut tx, job, reason).await {
            Ok((_, failed)) => {
                done.cancelled.push(job);
                done.dependents_failed.extend(failed);
            }
            // Ended since the read, or failed with a job cancelled just before: keep it.
            Err(Error::FailedPrecondition(_)) => {}
            Err(e) => return Err(e),
        }
    }
    tx.commit().await?;
    Ok(Some(done))
}

// ---------------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------------

/// How many jobs are in each state (states without jobs are absent).
pub async fn count_jobs_by_state(ex: impl PgExecutor<'_>) -> Result<Vec<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state")
            .fetch_all(ex)
            .await?,
    )
}

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
) -> Result<HashMap<Uuid, Vec<MetricPoint>>> {
    let rows: Vec<(Uuid, String, i64, i32, f64)> = sqlx::query_as(
        "SELECT job_id, name, step, epoch, value FROM job_metric_latest WHERE job_id = ANY($1) ORDER BY job_id, name",
    )
    .bind(ids)
    .fetch_all(ex)
    .await?;
    let mut by_job = HashMap::<Uuid, Vec<MetricPoint>>::new();
    for (id, n, s, e, v) in rows {
        by_job.entry(id).or_default().push(point((n, s, e, v)));
    }
    Ok(by_job)
}

/// Every attempt of the job, oldest first.
pub async fn attempts_of(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Vec<AttemptRow>> {
    Ok(
        sqlx::query_as("SELECT * FROM job_attempts WHERE job_id = $1 ORDER BY attempt")
            .bind(id)
            .fetch_all(ex)
            .await?,
    )
}

/// [`attempts_of`] for a page of jobs, in one query.
pub async fn attempts_of_jobs(
    ex: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<AttemptRow>>> {
    let rows: Vec<AttemptRow> = sqlx::query_as(
        "SELECT * FROM job_attempts WHERE job_id = ANY($1) ORDER BY job_id, attempt",
    )
    .bind(ids)
    .fetch_all(ex)
    .await?;
    let mut by_job = HashMap::<Uuid, Vec<AttemptRow>>::new();
    for row in rows {
        by_job.entry(row.job_id).or_default().push(row);
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReapedJob {
    pub id: Uuid,
    /// The attempt whose lease expired.
    pub attempt: i32,
    /// `queued` (failures left, to be dispatched again) or `failed`.
    pub state: String,
    /// Jobs that were waiting for it and failed with `dependency_failed` (when it failed).
    pub dependents_failed: Vec<Uuid>,
}

/// Takes up to `limit` running jobs whose lease has expired away from their workers. An expired
/// lease counts as a failed attempt: the job goes back to `queued` (undispatched, so the
/// reconciler pushes it) while failures are left, else it is `failed`, failing its waiting
/// dependents in the same transaction. The attempt is recorded as `lease_expired`. The worker's
/// later writes are refused as stale.
pub async fn reap_expired_leases(pool: &PgPool, limit: i64) -> Result<Vec<ReapedJob>> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(Uuid, i32, String, String)> = sqlx::query_as(
        "WITH expired AS (
             SELECT id FROM jobs
             WHERE state = 'running' AND lease_expires_at < now()
             ORDER BY lease_expires_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         )
         UPDATE jobs j SET
             failed_attempts = j.failed_attempts + 1,
             state = CASE WHEN j.failed_attempts + 1 < j.max_attempts THEN 'queued' ELSE 'failed' END,
             finished_at = CASE WHEN j.failed_attempts + 1 < j.max_attempts THEN NULL ELSE now() END,
             error = 'lease expired on worker ' || j.worker_id,
             lease_expires_at = NULL, dispatched_at = NULL, updated_at = now()
         FROM expired
         WHERE j.id = expired.id
         RETURNING j.id, j.attempt, j.state, j.error",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let mut reaped = Vec::with_capacity(rows.len());
    for (id, attempt, state, reason) in rows {
        end_attempt(&mut tx, id, attempt, "lease_expired", Some(&reason)).await?;
        let dependents_failed = if state == "failed" {
            fail_dependents(&mut tx, id).await?
        } else {
            Vec::new()
        };
        reaped.push(ReapedJob {
            id,
            attempt,
            state,
            dependents_failed,
        });
    }
    tx.commit().await?;
    Ok(reaped)
}

// ---------------------------------------------------------------------------------------------
// Artifacts
// ---------------------------------------------------------------------------------------------

/// One row of `artifacts`: a stored object and what it was checked against.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ArtifactRow {
    pub id: Uuid,
    pub job_id: Uuid,
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
    /// Older `resume` records deleted to keep only the newest few; their objects are now
    /// unreferenced and the caller deletes them.
    pub pruned: Vec<ArtifactRow>,
}

/// Ok when the lease is the job's current one; otherwise the same refusal as any other worker
/// write (FAILED_PRECONDITION for a stale attempt, NOT_FOUND for an unknown job).
pub async fn check_lease(pool: &PgPool, lease: &Lease) -> Result<()> {
    let current: Option<i32> = sqlx::query_scalar(
        "SELECT attempt FROM jobs WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = 'running'",
    )
    .bind(lease.job_id)
    .bind(lease.attempt)
    .bind(&lease.worker_id)
    .fetch_optional(pool)
    .await?;
    match current {
        Some(_) => Ok(()),
        None => Err(refuse_lease(pool, lease).await),
    }
}

/// Records an artifact whose bytes are already stored at `uri`, if (and only if) the header's
/// lease is still current: one transaction that locks the job row first, like
/// [`record_metrics`]. The same attempt storing the same kind and name again replaces the
/// record (the object at that key was replaced too) and it counts as new. After a `resume`
/// artifact, only the job's newest [`domain::KEPT_RESUME_STATES`] of that kind (by step) are
/// kept: the older records are deleted in the same transaction and returned.
pub async fn record_artifact(
    pool: &PgPool,
    header: &ArtifactHeader,
    uri: &str,
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
    .bind(lease.job_id)
    .bind(lease.attempt)
    .bind(&header.kind)
    .bind(&header.name)
    .bind(header.epoch)
    .bind(size)
    .bind(&header.sha256)
    .bind(uri)
    .bind(header.step)
    .fetch_one(&mut *tx)
    .await?;
    let pruned = if header.kind == domain::RESUME_KIND {
        sqlx::query_as::<_, ArtifactRow>(
            "DELETE FROM artifacts WHERE id IN (
                 SELECT id FROM artifacts WHERE job_id = $1 AND kind = $2
                 ORDER BY step DESC, created_at DESC, id DESC
                 OFFSET $3)
             RETURNING *",
        )
        .bind(lease.job_id)
        .bind(domain::RESUME_KIND)
        .bind(domain::KEPT_RESUME_STATES)
        .fetch_all(&mut *tx)
        .await?
    } else {
        Vec::new()
    };
    tx.commit().await?;
    Ok(Recorded { artifact, pruned })
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
    job_id: Uuid,
    kind: Option<&str>,
) -> Result<Vec<ArtifactRow>> {
    Ok(sqlx::query_as(
        "SELECT * FROM artifacts
         WHERE job_id = $1 AND ($2::text IS NULL OR kind = $2)
         ORDER BY created_at, id",
    )
    .bind(job_id)
    .bind(kind)
    .fetch_all(ex)
    .await?)
}

pub async fn get_artifact(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<ArtifactRow>> {
    Ok(sqlx::query_as("SELECT * FROM artifacts WHERE id = $1")
        .bind(id)
        .fetch_optional(ex)
        .await?)
}

/// The job's artifact of `kind` with the highest step, the newest of equal steps (artifacts not
/// tied to a step have step 0, so for them it is simply the newest), if any.
pub async fn newest_artifact(
    ex: impl PgExecutor<'_>,
    job_id: Uuid,
    kind: &str,
) -> Result<Option<ArtifactRow>> {
    Ok(sqlx::query_as(
        "SELECT * FROM artifacts WHERE job_id = $1 AND kind = $2
         ORDER BY step DESC, created_at DESC, id DESC LIMIT 1",
    )
    .bind(job_id)
    .bind(kind)
    .fetch_optional(ex)
    .await?)
}

// ---------------------------------------------------------------------------------------------
// Sweeps
// ---------------------------------------------------------------------------------------------

/// One row of `sweeps`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SweepRow {
    pub id: Uuid,
    pub name: String,
    /// The arms' experiment kind (`cifar_cvae`, `mnist_classifier`).
    pub kind: String,
    pub labels: serde_json::Value,
    /// The SweepSpec in the proto3 JSON mapping.
    pub spec: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub cancelled_at: Option<DateTime<Utc>>,
}

/// One row of `sweep_arms`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SweepArmRow {
    pub position: i32,
    pub name: String,
    /// Its runs use random initialisation.
    pub baseline: bool,
}

/// One job of a sweep with its current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepRunRow {
    pub job_id: Uuid,
    /// The arm's name, `source` for a source-stage job.
    pub arm: String,
    pub seed: u64,
    pub is_source: bool,
    /// The job's state now (lowercase name).
    pub state: String,
    pub error: Option<String>,
}

/// What [`insert_sweep`] stored.
#[derive(Debug, Clone, PartialEq)]
pub struct InsertedSweep {
    /// Jobs that start queued: the caller dispatches them.
    pub queued: Vec<Uuid>,
    pub jobs: usize,
}

/// Stores a validated sweep, its arms and every one of its jobs (sources first, so the arms
/// that transfer from them can name them) in one transaction: all or nothing. Each job goes
/// through [`insert_job`] (a savepoint each), so dependencies are checked exactly as for
/// SubmitJob.
pub async fn insert_sweep(
    pool: &PgPool,
    id: Uuid,
    plan: &proto::sweep::SweepPlan,
) -> Result<InsertedSweep> {
    let sweep_id = id.to_string();
    let labels = serde_json::to_value(&plan.labels).map_err(|e| Error::Internal(e.into()))?;
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO sweeps (id, name, kind, labels, spec) VALUES ($1, $2, $3, $4, $5)")
        .bind(id)
        .bind(&plan.name)
        .bind(plan.kind)
        .bind(labels)
        .bind(plan.to_json())
        .execute(&mut *tx)
        .await?;
    let positions: Vec<i32> = (0..plan.arms.len() as i32).collect();
    let names: Vec<&str> = plan.arms.iter().map(|a| a.name.as_str()).collect();
    let baselines: Vec<bool> = plan.arms.iter().map(|a| a.random_init).collect();
    sqlx::query(
        "INSERT INTO sweep_arms (sweep_id, position, name, baseline)
         SELECT $1, * FROM UNNEST($2::integer[], $3::text[], $4::boolean[])",
    )
    .bind(id)
    .bind(&positions)
    .bind(&names)
    .bind(&baselines)
    .execute(&mut *tx)
    .await?;
    let runs = plan.runs();
    let mut sources: HashMap<u64, String> = HashMap::new();
    let mut job_ids = Vec::with_capacity(runs.len());
    let mut arms = Vec::with_capacity(runs.len());
    let mut seeds = Vec::with_capacity(runs.len());
    let mut is_source = Vec::with_capacity(runs.len());
    let mut queued = Vec::new();
    for run in &runs {
        let job_id = Uuid::now_v7();
        let spec = match run.arm {
            None => plan.source_spec(run.seed, &sweep_id).ok_or_else(|| {
                Error::Internal(anyhow::anyhow!("source run without a source stage"))
            })??,
            Some(arm) => {
                let source = if plan.arms[arm].from_source {
                    Some(sources.get(&run.seed).map(String::as_str).ok_or_else(|| {
                        Error::Internal(anyhow::anyhow!("arm stored before its seed's source"))
                    })?)
                } else {
                    None
                };
                plan.run_spec(arm, run.seed, &sweep_id, source)?
            }
        };
        // A violation only found here (a dependency that does not exist) is named under the
        // sweep field the spec came from: `spec.base.<path>` or `spec.source.<path>`.
        let root = if run.arm.is_none() {
            "spec.source"
        } else {
            "spec.base"
        };
        let row = insert_job(&mut *tx, job_id, &spec)
            .await
            .map_err(|e| match e {
                Error::InvalidArgument { field, description } => Error::InvalidArgument {
                    field: match field.strip_prefix("spec") {
                        Some(rest) => format!("{root}{rest}"),
                        None => field,
                    },
                    description,
                },
                other => other,
            })?;
        if row.state == "queued" {
            queued.push(job_id);
        }
        if run.arm.is_none() {
            sources.insert(run.seed, job_id.to_string());
        }
        job_ids.push(job_id);
        arms.push(match run.arm {
            None => proto::sweep::SOURCE_ARM.to_owned(),
            Some(a) => plan.arms[a].name.clone(),
        });
        seeds.push(run.seed.to_string());
        is_source.push(run.arm.is_none());
    }
    let positions: Vec<i32> = (0..runs.len() as i32).collect();
    sqlx::query(
        "INSERT INTO sweep_runs (sweep_id, job_id, arm, seed, is_source, position)
         SELECT $1, u.job_id, u.arm, u.seed::numeric, u.is_source, u.position
         FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::boolean[], $6::integer[])
              AS u(job_id, arm, seed, is_source, position)",
    )
    .bind(id)
    .bind(&job_ids)
    .bind(&arms)
    .bind(&seeds)
    .bind(&is_source)
    .bind(&positions)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(InsertedSweep {
        queued,
        jobs: runs.len(),
    })
}

/// A sweep as one consistent picture: its row (with `cancelled_at`), arms and runs (with their
/// jobs' states) read in one REPEATABLE READ snapshot, so that a reader never sees, say, every
/// job cancelled but the sweep not yet. `None` when there is no such sweep.
pub async fn sweep_snapshot(
    pool: &PgPool,
    id: Uuid,
) -> Result<Option<(SweepRow, Vec<SweepArmRow>, Vec<SweepRunRow>)>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let Some(row) = get_sweep(&mut *tx, id).await? else {
        return Ok(None);
    };
    let arms = sweep_arms(&mut *tx, id).await?;
    let runs = sweep_runs(&mut *tx, id).await?;
    tx.commit().await?;
    Ok(Some((row, arms, runs)))
}

pub async fn get_sweep(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<SweepRow>> {
    Ok(sqlx::query_as("SELECT * FROM sweeps WHERE id = $1")
        .bind(id)
        .fetch_optional(ex)
        .await?)
}

/// The sweep's arms in grid order.
pub async fn sweep_arms(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Vec<SweepArmRow>> {
    Ok(sqlx::query_as(
        "SELECT position, name, baseline FROM sweep_arms WHERE sweep_id = $1 ORDER BY position",
    )
    .bind(id)
    .fetch_all(ex)
    .await?)
}

/// Every job of the sweep with its state, in creation order (sources first, then arm by arm,
/// seed by seed).
pub async fn sweep_runs(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Vec<SweepRunRow>> {
    let rows: Vec<(Uuid, String, String, bool, String, Option<String>)> = sqlx::query_as(
        "SELECT r.job_id, r.arm, r.seed::text, r.is_source, j.state, j.error
         FROM sweep_runs r JOIN jobs j ON j.id = r.job_id
         WHERE r.sweep_id = $1 ORDER BY r.position",
    )
    .bind(id)
    .fetch_all(ex)
    .await?;
    rows.into_iter()
        .map(|(job_id, arm, seed, is_source, state, error)| {
            let seed = seed.parse().map_err(|e| {
                Error::Internal(anyhow::anyhow!("sweep run {job_id} has seed {seed:?}: {e}"))
            })?;
            Ok(SweepRunRow {
                job_id,
                arm,
                seed,
                is_source,
                state,
                error,
            })
        })
        .collect()
}

/// How many jobs of each of these sweeps are in each state.
pub async fn sweep_state_counts(
    ex: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<(String, i64)>>> {
    let rows: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT r.sweep_id, j.state, count(*)
         FROM sweep_runs r JOIN jobs j ON j.id = r.job_id
         WHERE r.sweep_id = ANY($1)
         GROUP BY r.sweep_id, j.state",
    )
    .bind(ids)
    .fetch_all(ex)
    .await?;
    let mut by_sweep = HashMap::<Uuid, Vec<(String, i64)>>::new();
    for (id, state, n) in rows {
        by_sweep.entry(id).or_default().push((state, n));
    }
    Ok(by_sweep)
}

/// One page of sweeps, newest first, and the token of the next page (`None` on the last page).
pub async fn list_sweeps(
    ex: impl PgExecutor<'_>,
    page_size: u32,
    after: Option<PageToken>,
) -> Result<(Vec<SweepRow>, Option<PageToken>)> {
    let limit = i64::from(page_size);
    let mut rows = sqlx::query_as::<_, SweepRow>(
        "SELECT * FROM sweeps
         WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2))
         ORDER BY created_at DESC, id DESC
         LIMIT $3",
    )
    .bind(after.map(|t| t.created_at))
    .bind(after.map(|t| t.id))
    .bind(limit + 1)
    .fetch_all(ex)
    .await?;
    let next = if rows.len() as i64 > limit {
        rows.truncate(page_size as usize);
        rows.last().map(|r| PageToken {
            created_at: r.created_at,
            id: r.id,
        })
    } else {
        None
    };
    Ok((rows, next))
}

/// Records that CancelSweep was called (the first time only). False for an unknown sweep.
pub async fn mark_sweep_cancelled(ex: impl PgExecutor<'_>, id: Uuid) -> Result<bool> {
    let done =
        sqlx::query("UPDATE sweeps SET cancelled_at = coalesce(cancelled_at, now()) WHERE id = $1")
            .bind(id)
            .execute(ex)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// The points of the given metrics of the sweep's succeeded arm runs (sources excluded), by
/// job, in (name, step) order.
pub async fn sweep_metric_points(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    names: &[String],
) -> Result<HashMap<Uuid, Vec<MetricPoint>>> {
    let rows: Vec<(Uuid, String, i64, i32, f64)> = sqlx::query_as(
        "SELECT p.job_id, p.name, p.step, p.epoch, p.value
         FROM sweep_runs r
         JOIN jobs j ON j.id = r.job_id AND j.state = 'succeeded'
         JOIN metric_points p ON p.job_id = r.job_id AND p.name = ANY($2)
         WHERE r.sweep_id = $1 AND NOT r.is_source
         ORDER BY p.job_id, p.name, p.step",
    )
    .bind(id)
    .bind(names)
    .fetch_all(ex)
    .await?;
    let mut by_job = HashMap::<Uuid, Vec<MetricPoint>>::new();
    for (job, n, s, e, v) in rows {
        by_job.entry(job).or_default().push(point((n, s, e, v)));
    }
    Ok(by_job)
}

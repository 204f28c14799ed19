//! Jobs: submitting (with dependency edges), promotion and `dependency_failed` cascades,
//! dispatch bookkeeping, cancelling, and the reads of jobs and their attempts.
//!
//! Must not touch leases or metric points (see [`super::leases`], [`super::metrics`]).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use proto::queue::Ready;
use proto::spec::JobSpec;
use proto::{AttemptOutcome, JobId, JobState};
use sqlx::{Acquire, PgConnection, PgExecutor, PgPool, Postgres};
use uuid::Uuid;

use super::attempts::end_attempt;
use super::requests::{claim_key, Claimed};
use super::state::{self, state};
use super::{millis, once_more_on_deadlock, typed, uuids, AttemptRow, JobRow};
use crate::domain::{self, JobQuery, PageToken, RequestKey, TRANSFER_SOURCE_FIELD};
use crate::error::{Error, Result};

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
///
/// No cycle check: a cycle cannot arise. The new job's id is fresh and its dependencies must
/// already exist (checked here, under the share lock, and `job_dependencies` references `jobs`),
/// so no existing job can reach the new one; and edges are only ever added with their job.
pub async fn insert_job<'c>(
    db: impl Acquire<'c, Database = Postgres>,
    id: JobId,
    spec: &JobSpec,
) -> Result<JobRow> {
    let labels = serde_json::to_value(&spec.labels).map_err(|e| Error::Internal(e.into()))?;
    let deps: Vec<Uuid> = spec.dependencies.iter().map(|d| d.as_uuid()).collect();
    let mut tx = db.begin().await?;
    let found = lock_dependencies(&mut tx, &deps).await?;
    let (initial, error) = initial_state(spec, &found)?;
    let row = sqlx::query_as::<_, JobRow>(concat!(
        "INSERT INTO jobs (id, name, kind, spec, labels, state, max_attempts, error, finished_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $6 = ",
        state!(failed),
        " THEN now() END)
         RETURNING *"
    ))
    .bind(id.as_uuid())
    .bind(&spec.name)
    .bind(spec.experiment.kind())
    .bind(spec.to_json())
    .bind(labels)
    .bind(initial.as_str())
    .bind(max_attempts(spec))
    .bind(error)
    .fetch_one(&mut *tx)
    .await?;
    if !deps.is_empty() {
        sqlx::query(
            "INSERT INTO job_dependencies (job_id, depends_on) SELECT $1, unnest($2::uuid[])",
        )
        .bind(id.as_uuid())
        .bind(&deps)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(row)
}

/// [`insert_job`] with an optional idempotency key, in a transaction of its own: the key is
/// claimed first (see [`super::requests`]); when an earlier submit holds it with the same spec,
/// nothing is written and that job comes back as it is now. Returns the job and whether it was
/// created by this call.
pub async fn submit_job(
    pool: &PgPool,
    id: JobId,
    spec: &JobSpec,
    key: Option<&RequestKey>,
) -> Result<(JobRow, bool)> {
    let Some(key) = key else {
        return Ok((insert_job(pool, id, spec).await?, true));
    };
    let mut tx = pool.begin().await?;
    if let Claimed::Earlier(earlier) = claim_key(&mut tx, key, id.as_uuid()).await? {
        drop(tx);
        let row = get_job(pool, JobId::from(earlier)).await?.ok_or_else(|| {
            Error::Internal(anyhow::anyhow!(
                "request {} names job {earlier}, which does not exist",
                key.id
            ))
        })?;
        return Ok((row, false));
    }
    let row = insert_job(&mut *tx, id, spec).await?;
    tx.commit().await?;
    Ok((row, true))
}

/// `spec.max_attempts` as stored.
pub(super) fn max_attempts(spec: &JobSpec) -> i32 {
    i32::try_from(spec.max_attempts).unwrap_or(i32::MAX)
}

/// A dependency's kind and state, as [`lock_dependencies`] read it.
pub(super) type Found = HashMap<Uuid, (String, JobState)>;

/// Reads these jobs' kinds and states `FOR SHARE` (in id order): a dependency cannot end
/// between this read and the commit of the job that depends on it without seeing that job.
/// Ids that name no job are absent from the answer.
pub(super) async fn lock_dependencies(conn: &mut PgConnection, deps: &[Uuid]) -> Result<Found> {
    if deps.is_empty() {
        return Ok(Found::new());
    }
    let found: Vec<(Uuid, String, String)> =
        sqlx::query_as("SELECT id, kind, state FROM jobs WHERE id = ANY($1) ORDER BY id FOR SHARE")
            .bind(deps)
            .fetch_all(&mut *conn)
            .await?;
    let mut by_id = Found::with_capacity(found.len());
    for (id, kind, text) in found {
        by_id.insert(id, (kind, state::job_state(text)?));
    }
    Ok(by_id)
}

/// Checks a spec's dependencies against what [`lock_dependencies`] found (each must exist; a
/// transfer's source must be an `mnist_classifier` job) and gives the state the job starts in:
/// `failed` with `dependency_failed` when one failed or was cancelled, `queued` when all
/// succeeded, else `waiting`. Field paths are the job spec's (`spec.depends_on[i]`).
pub(super) fn initial_state(spec: &JobSpec, found: &Found) -> Result<(JobState, Option<String>)> {
    let deps: Vec<Uuid> = spec.dependencies.iter().map(|d| d.as_uuid()).collect();
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
    let states: Vec<(Uuid, JobState)> = deps.iter().map(|d| (*d, found[d].1)).collect();
    let broken = states
        .iter()
        .find(|(_, s)| matches!(s, JobState::Failed | JobState::Cancelled));
    Ok(match broken {
        Some((dep, dep_state)) => (
            JobState::Failed,
            Some(domain::dependency_failed(*dep, *dep_state)),
        ),
        None if states.iter().all(|(_, s)| *s == JobState::Succeeded) => (JobState::Queued, None),
        None => (JobState::Waiting, None),
    })
}

/// The ids of the jobs that `id` depends on, in id order.
pub async fn dependencies_of(ex: impl PgExecutor<'_>, id: JobId) -> Result<Vec<JobId>> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT depends_on FROM job_dependencies WHERE job_id = $1 ORDER BY depends_on",
    )
    .bind(id.as_uuid())
    .fetch_all(ex)
    .await?;
    Ok(typed(ids))
}

/// Locks a job that is about to end (or be cancelled) and the jobs waiting for it, all at once
/// in id order: the one order in which every path that ends a job and changes its dependents
/// takes row locks (CancelSweep locks a whole sweep's open jobs in the same order), so that
/// two of them meeting on the same rows wait for each other instead of deadlocking. Returns
/// nothing: the caller goes on to read and update the rows it now holds.
pub(super) async fn lock_with_dependents(conn: &mut PgConnection, id: JobId) -> Result<()> {
    sqlx::query(concat!(
        "SELECT id FROM jobs
         WHERE id = $1
            OR (state = ",
        state!(waiting),
        " AND id IN (SELECT job_id FROM job_dependencies WHERE depends_on = $1))
         ORDER BY id
         FOR UPDATE"
    ))
    .bind(id.as_uuid())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// After `id` succeeded: every waiting dependent whose dependencies have now all succeeded
/// becomes `queued` and undispatched. Returns their ids.
pub(super) async fn promote_dependents(conn: &mut PgConnection, id: JobId) -> Result<Vec<JobId>> {
    // Lock first, in id order: a second dependency finishing at the same time waits here until
    // this transaction commits, and then sees this one as succeeded.
    let waiting: Vec<Uuid> = sqlx::query_scalar(concat!(
        "SELECT id FROM jobs
         WHERE state = ",
        state!(waiting),
        "
           AND id IN (SELECT job_id FROM job_dependencies WHERE depends_on = $1)
         ORDER BY id
         FOR UPDATE"
    ))
    .bind(id.as_uuid())
    .fetch_all(&mut *conn)
    .await?;
    if waiting.is_empty() {
        return Ok(Vec::new());
    }
    let mut queued: Vec<Uuid> = sqlx::query_scalar(concat!(
        "UPDATE jobs j SET state = ",
        state!(queued),
        ", dispatched_at = NULL, not_before = NULL, updated_at = now()
         WHERE j.id = ANY($1) AND j.state = ",
        state!(waiting),
        "
           AND NOT EXISTS (
               SELECT 1 FROM job_dependencies d JOIN jobs p ON p.id = d.depends_on
               WHERE d.job_id = j.id AND p.state <> ",
        state!(succeeded),
        ")
         RETURNING j.id"
    ))
    .bind(&waiting)
    .fetch_all(&mut *conn)
    .await?;
    queued.sort();
    Ok(typed(queued))
}

/// After `id` failed or was cancelled: every job waiting for it, and every job waiting for
/// those, fails with `dependency_failed: job <dependency> is <state>` naming its own
/// dependency that ended. Returns their ids.
pub(super) async fn fail_dependents(conn: &mut PgConnection, id: JobId) -> Result<Vec<JobId>> {
    let mut failed = Vec::new();
    let mut frontier = vec![id.as_uuid()];
    while !frontier.is_empty() {
        let waiting: Vec<Uuid> = sqlx::query_scalar(concat!(
            "SELECT id FROM jobs
             WHERE state = ",
            state!(waiting),
            "
               AND id IN (SELECT job_id FROM job_dependencies WHERE depends_on = ANY($1))
             ORDER BY id
             FOR UPDATE"
        ))
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
            .into_iter()
            .map(|(_, dep, text)| Ok(domain::dependency_failed(dep, state::job_state(text)?)))
            .collect::<Result<_>>()?;
        let mut level: Vec<Uuid> = sqlx::query_scalar(concat!(
            "UPDATE jobs j SET state = ",
            state!(failed),
            ", error = u.error, finished_at = now(),
                               updated_at = now(), dispatched_at = NULL
             FROM UNNEST($1::uuid[], $2::text[]) AS u(id, error)
             WHERE j.id = u.id AND j.state = ",
            state!(waiting),
            "
             RETURNING j.id"
        ))
        .bind(&ids)
        .bind(&errors)
        .fetch_all(&mut *conn)
        .await?;
        level.sort();
        failed.extend_from_slice(&level);
        frontier = level;
    }
    Ok(typed(failed))
}

/// Marks these jobs dispatched now and returns where each waits (queue and priority), for the
/// push that follows; jobs that are no longer queued are left out. When the push fails, the
/// caller [`clear_dispatched`]s them so the next reconcile retries.
pub async fn take_for_dispatch(ex: impl PgExecutor<'_>, ids: &[JobId]) -> Result<Vec<Ready>> {
    let rows: Vec<(Uuid, String, i32)> = sqlx::query_as(concat!(
        "UPDATE jobs SET dispatched_at = now() WHERE id = ANY($1) AND state = ",
        state!(queued),
        " RETURNING id, queue, priority"
    ))
    .bind(uuids(ids))
    .fetch_all(ex)
    .await?;
    Ok(rows.into_iter().map(ready).collect())
}

fn ready((id, queue, priority): (Uuid, String, i32)) -> Ready {
    Ready {
        id,
        queue,
        priority,
    }
}

/// Forgets that these jobs were dispatched (the push failed), so the next reconcile retries.
pub async fn clear_dispatched(ex: impl PgExecutor<'_>, ids: &[JobId]) -> Result<()> {
    sqlx::query(concat!(
        "UPDATE jobs SET dispatched_at = NULL WHERE id = ANY($1) AND state = ",
        state!(queued)
    ))
    .bind(uuids(ids))
    .execute(ex)
    .await?;
    Ok(())
}

/// Forgets every queued job's dispatch record, so the next [`take_due_for_dispatch`] pushes them
/// all: for when Redis lost its keys (a FLUSHALL, a restart without persistence). Returns how
/// many jobs that concerned.
pub async fn forget_all_dispatches(ex: impl PgExecutor<'_>) -> Result<u64> {
    let done = sqlx::query(concat!(
        "UPDATE jobs SET dispatched_at = NULL WHERE state = ",
        state!(queued),
        " AND dispatched_at IS NOT NULL"
    ))
    .execute(ex)
    .await?;
    Ok(done.rows_affected())
}

/// Picks up to `limit` queued jobs that are due for a push (never dispatched, or dispatched more
/// than `redispatch_after` ago, and past their retry backoff), marks them dispatched now and
/// returns them with their queue and priority, highest priority first, then oldest. `SKIP
/// LOCKED` keeps two coordinators from taking the same rows in the same instant; a duplicate push
/// would be harmless anyway.
pub async fn take_due_for_dispatch(
    ex: impl PgExecutor<'_>,
    redispatch_after: Duration,
    limit: i64,
) -> Result<Vec<Ready>> {
    let rows: Vec<(Uuid, String, i32, DateTime<Utc>)> = sqlx::query_as(concat!(
        "UPDATE jobs SET dispatched_at = now()
         WHERE id IN (
             SELECT id FROM jobs
             WHERE state = ",
        state!(queued),
        "
               AND (dispatched_at IS NULL OR dispatched_at < now() - $1 * interval '1 millisecond')
               AND (not_before IS NULL OR not_before <= now())
             ORDER BY priority DESC, created_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED)
         RETURNING id, queue, priority, created_at"
    ))
    .bind(millis(redispatch_after))
    .bind(limit)
    .fetch_all(ex)
    .await?;
    let mut rows = rows;
    rows.sort_by_key(|(id, _, priority, created)| (-priority, *created, *id));
    Ok(rows
        .into_iter()
        .map(|(id, queue, priority, _)| ready((id, queue, priority)))
        .collect())
}

/// Cancels a waiting, queued or running job. A running job's worker finds out at its next
/// heartbeat (keep_running = false) and its later writes are refused as stale. The jobs waiting
/// for it fail with `dependency_failed` in the same transaction; their ids come back with the
/// cancelled row. Retried once when Postgres breaks a deadlock.
pub async fn cancel_job(pool: &PgPool, id: JobId, reason: &str) -> Result<(JobRow, Vec<JobId>)> {
    once_more_on_deadlock(|| async move {
        let mut tx = pool.begin().await?;
        let cancelled = cancel_in(&mut tx, id, reason).await?;
        tx.commit().await?;
        Ok(cancelled)
    })
    .await
}

/// [`cancel_job`]'s work inside the caller's transaction: locks the job and its waiting
/// dependents ([`lock_with_dependents`]), refuses an unknown (NOT_FOUND) or ended job
/// (FAILED_PRECONDITION), cancels it, closes its attempt and fails its waiting dependents.
pub(super) async fn cancel_in(
    conn: &mut PgConnection,
    id: JobId,
    reason: &str,
) -> Result<(JobRow, Vec<JobId>)> {
    lock_with_dependents(&mut *conn, id).await?;
    let current: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
        .bind(id.as_uuid())
        .fetch_optional(&mut *conn)
        .await?;
    let Some(current) = current else {
        return Err(Error::job_not_found(id));
    };
    let current = state::job_state(current)?;
    if current.is_terminal() {
        return Err(Error::FailedPrecondition(format!(
            "job {id} is already {current}"
        )));
    }
    let row = sqlx::query_as::<_, JobRow>(concat!(
        "UPDATE jobs SET state = ",
        state!(cancelled),
        ", finished_at = now(), updated_at = now(),
                         lease_expires_at = NULL, error = $2
         WHERE id = $1
         RETURNING *"
    ))
    .bind(id.as_uuid())
    .bind(reason)
    .fetch_one(&mut *conn)
    .await?;
    end_attempt(
        &mut *conn,
        id.as_uuid(),
        row.attempt,
        AttemptOutcome::Cancelled,
        Some(reason),
    )
    .await?;
    let failed = fail_dependents(&mut *conn, id).await?;
    Ok((row, failed))
}

/// How many jobs are in each state (states without jobs are absent).
pub async fn count_jobs_by_state(ex: impl PgExecutor<'_>) -> Result<Vec<(JobState, i64)>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state")
            .fetch_all(ex)
            .await?;
    rows.into_iter()
        .map(|(text, n)| Ok((state::job_state(text)?, n)))
        .collect()
}

/// One queue's queued jobs: how many, and how long the longest-waiting one has waited.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueStat {
    pub queue: String,
    pub depth: i64,
    /// Seconds since the oldest queued job became ready (its last update, or the end of its
    /// retry backoff).
    pub oldest_age_s: f64,
}

/// Every queue that has queued jobs, by name (the Prometheus queue gauges).
pub async fn queue_stats(ex: impl PgExecutor<'_>) -> Result<Vec<QueueStat>> {
    let rows: Vec<(String, i64, f64)> = sqlx::query_as(concat!(
        "SELECT queue, count(*),
                greatest(extract(epoch FROM now() - min(greatest(updated_at,
                    coalesce(not_before, updated_at)))), 0)::float8
         FROM jobs WHERE state = ",
        state!(queued),
        " GROUP BY queue ORDER BY queue"
    ))
    .fetch_all(ex)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(queue, depth, oldest_age_s)| QueueStat {
            queue,
            depth,
            oldest_age_s,
        })
        .collect())
}

pub async fn get_job(ex: impl PgExecutor<'_>, id: JobId) -> Result<Option<JobRow>> {
    Ok(sqlx::query_as("SELECT * FROM jobs WHERE id = $1")
        .bind(id.as_uuid())
        .fetch_optional(ex)
        .await?)
}

/// Every attempt of the job, oldest first.
pub async fn attempts_of(ex: impl PgExecutor<'_>, id: JobId) -> Result<Vec<AttemptRow>> {
    Ok(
        sqlx::query_as("SELECT * FROM job_attempts WHERE job_id = $1 ORDER BY attempt")
            .bind(id.as_uuid())
            .fetch_all(ex)
            .await?,
    )
}

/// [`attempts_of`] for a page of jobs, in one query.
pub async fn attempts_of_jobs(
    ex: impl PgExecutor<'_>,
    ids: &[JobId],
) -> Result<HashMap<JobId, Vec<AttemptRow>>> {
    let rows: Vec<AttemptRow> = sqlx::query_as(
        "SELECT * FROM job_attempts WHERE job_id = ANY($1) ORDER BY job_id, attempt",
    )
    .bind(uuids(ids))
    .fetch_all(ex)
    .await?;
    let mut by_job = HashMap::<JobId, Vec<AttemptRow>>::new();
    for row in rows {
        by_job.entry(row.job_id).or_default().push(row);
    }
    Ok(by_job)
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
           AND (cardinality($6::text[]) = 0 OR kind = ANY($6))
           AND ($7 = '' OR strpos(lower(name), lower($7)) > 0)
         ORDER BY created_at DESC, id DESC
         LIMIT $5",
    )
    .bind(state::names(&q.states))
    .bind(&q.labels)
    .bind(q.after.map(|t| t.created_at))
    .bind(q.after.map(|t| t.id))
    .bind(limit + 1)
    .bind(&q.kinds)
    .bind(&q.name_contains)
    .fetch_all(ex)
    .await?;
    let next = if rows.len() as i64 > limit {
        rows.truncate(q.page_size as usize);
        rows.last().map(|r| PageToken {
            created_at: r.created_at,
            id: r.id.as_uuid(),
        })
    } else {
        None
    };
    Ok((rows, next))
}

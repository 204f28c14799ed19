//! Sweeps: storing a sweep with its arms and jobs, the consistent snapshot GetSweep reads,
//! listing, cancelling, and the points the summary needs.
//!
//! A sweep's jobs are ordinary jobs: they are inserted and cancelled through [`super::jobs`].
//! Must not derive a sweep's state (the api does, from the jobs' states read here).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use proto::{JobId, JobState, SweepId};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use super::jobs::{cancel_in, insert_job};
use super::state::{self, state};
use super::{point, uuids};
use crate::domain::{MetricPoint, PageToken};
use crate::error::{Error, Result};

/// One row of `sweeps`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SweepRow {
    #[sqlx(try_from = "Uuid")]
    pub id: SweepId,
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
    pub job_id: JobId,
    /// The arm's name, `source` for a source-stage job.
    pub arm: String,
    pub seed: u64,
    pub is_source: bool,
    /// The job's state now.
    pub state: JobState,
    pub error: Option<String>,
}

/// What [`insert_sweep`] stored.
#[derive(Debug, Clone, PartialEq)]
pub struct InsertedSweep {
    /// Jobs that start queued: the caller dispatches them.
    pub queued: Vec<JobId>,
    pub jobs: usize,
}

/// What cancelling a sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepCancelled {
    /// The jobs it cancelled, in the order it cancelled them.
    pub cancelled: Vec<JobId>,
    /// Jobs outside the sweep that waited for one of them and failed with it.
    pub dependents_failed: Vec<JobId>,
}

/// Stores a validated sweep, its arms and every one of its jobs (sources first, so the arms
/// that transfer from them can name them) in one transaction: all or nothing. Each job goes
/// through [`insert_job`] (a savepoint each), so dependencies are checked exactly as for
/// SubmitJob.
pub async fn insert_sweep(
    pool: &PgPool,
    id: SweepId,
    plan: &proto::sweep::SweepPlan,
) -> Result<InsertedSweep> {
    let sweep_id = id.to_string();
    let labels = serde_json::to_value(&plan.labels).map_err(|e| Error::Internal(e.into()))?;
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO sweeps (id, name, kind, labels, spec) VALUES ($1, $2, $3, $4, $5)")
        .bind(id.as_uuid())
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
    .bind(id.as_uuid())
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
        let job_id = JobId::from(Uuid::now_v7());
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
        if row.state == JobState::Queued {
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
    .bind(id.as_uuid())
    .bind(uuids(&job_ids))
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
    id: SweepId,
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

pub async fn get_sweep(ex: impl PgExecutor<'_>, id: SweepId) -> Result<Option<SweepRow>> {
    Ok(sqlx::query_as("SELECT * FROM sweeps WHERE id = $1")
        .bind(id.as_uuid())
        .fetch_optional(ex)
        .await?)
}

/// The sweep's arms in grid order.
pub async fn sweep_arms(ex: impl PgExecutor<'_>, id: SweepId) -> Result<Vec<SweepArmRow>> {
    Ok(sqlx::query_as(
        "SELECT position, name, baseline FROM sweep_arms WHERE sweep_id = $1 ORDER BY position",
    )
    .bind(id.as_uuid())
    .fetch_all(ex)
    .await?)
}

/// Every job of the sweep with its state, in creation order (sources first, then arm by arm,
/// seed by seed).
pub async fn sweep_runs(ex: impl PgExecutor<'_>, id: SweepId) -> Result<Vec<SweepRunRow>> {
    let rows: Vec<(Uuid, String, String, bool, String, Option<String>)> = sqlx::query_as(
        "SELECT r.job_id, r.arm, r.seed::text, r.is_source, j.state, j.error
         FROM sweep_runs r JOIN jobs j ON j.id = r.job_id
         WHERE r.sweep_id = $1 ORDER BY r.position",
    )
    .bind(id.as_uuid())
    .fetch_all(ex)
    .await?;
    rows.into_iter()
        .map(|(job_id, arm, seed, is_source, text, error)| {
            let seed = seed.parse().map_err(|e| {
                Error::Internal(anyhow::anyhow!("sweep run {job_id} has seed {seed:?}: {e}"))
            })?;
            Ok(SweepRunRow {
                job_id: JobId::from(job_id),
                arm,
                seed,
                is_source,
                state: state::job_state(text)?,
                error,
            })
        })
        .collect()
}

/// How many jobs of each of these sweeps are in each state.
pub async fn sweep_state_counts(
    ex: impl PgExecutor<'_>,
    ids: &[SweepId],
) -> Result<HashMap<SweepId, Vec<(JobState, i64)>>> {
    let rows: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT r.sweep_id, j.state, count(*)
         FROM sweep_runs r JOIN jobs j ON j.id = r.job_id
         WHERE r.sweep_id = ANY($1)
         GROUP BY r.sweep_id, j.state",
    )
    .bind(uuids(ids))
    .fetch_all(ex)
    .await?;
    let mut by_sweep = HashMap::<SweepId, Vec<(JobState, i64)>>::new();
    for (id, text, n) in rows {
        by_sweep
            .entry(SweepId::from(id))
            .or_default()
            .push((state::job_state(text)?, n));
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
            id: r.id.as_uuid(),
        })
    } else {
        None
    };
    Ok((rows, next))
}

/// Records that CancelSweep was called (the first time only). False for an unknown sweep.
pub async fn mark_sweep_cancelled(ex: impl PgExecutor<'_>, id: SweepId) -> Result<bool> {
    let done =
        sqlx::query("UPDATE sweeps SET cancelled_at = coalesce(cancelled_at, now()) WHERE id = $1")
            .bind(id.as_uuid())
            .execute(ex)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// Cancels a sweep in one transaction: records `cancelled_at` (the first time) and cancels every
/// job of it that has not ended, the last planned first (arm runs before the sources they wait
/// for, so that they end `cancelled`, not `dependency_failed`). Jobs that ended keep their
/// results. `None` when there is no such sweep. Calling it again cancels nothing more.
pub async fn cancel_sweep(
    pool: &PgPool,
    id: SweepId,
    reason: &str,
) -> Result<Option<SweepCancelled>> {
    let mut tx = pool.begin().await?;
    if !mark_sweep_cancelled(&mut *tx, id).await? {
        return Ok(None);
    }
    let open: Vec<Uuid> = sqlx::query_scalar(concat!(
        "SELECT r.job_id FROM sweep_runs r JOIN jobs j ON j.id = r.job_id
         WHERE r.sweep_id = $1 AND j.state IN (",
        state!(waiting),
        ", ",
        state!(queued),
        ", ",
        state!(running),
        ")
         ORDER BY r.position DESC"
    ))
    .bind(id.as_uuid())
    .fetch_all(&mut *tx)
    .await?;
    let mut done = SweepCancelled::default();
    for job in open.into_iter().map(JobId::from) {
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

/// The epoch-end points of the given metrics of the sweep's succeeded arm runs (sources
/// excluded), by job, in (name, step) order: for each run, metric and epoch only the point with
/// the highest step of that epoch.
///
/// That is all the summary reads (`crate::summary`): the early value is epoch 1's end, the final
/// value the highest step (the end of its own epoch), and the convergence curve the epoch ends.
/// So a run's few hundred epochs travel, not its every step (a per-step metric may have a
/// million points); the selection is Postgres's (`DISTINCT ON`), so the coordinator never holds
/// more than the epoch ends.
pub async fn sweep_epoch_end_points(
    ex: impl PgExecutor<'_>,
    id: SweepId,
    names: &[String],
) -> Result<HashMap<JobId, Vec<MetricPoint>>> {
    let rows: Vec<(Uuid, String, i64, i32, f64)> = sqlx::query_as(concat!(
        "SELECT job_id, name, step, epoch, value FROM (
             SELECT DISTINCT ON (p.job_id, p.name, p.epoch) p.job_id, p.name, p.step, p.epoch, p.value
             FROM sweep_runs r
             JOIN jobs j ON j.id = r.job_id AND j.state = ",
        state!(succeeded),
        "
             JOIN metric_points p ON p.job_id = r.job_id AND p.name = ANY($2)
             WHERE r.sweep_id = $1 AND NOT r.is_source
             ORDER BY p.job_id, p.name, p.epoch, p.step DESC
         ) AS ends
         ORDER BY job_id, name, step"
    ))
    .bind(id.as_uuid())
    .bind(names)
    .fetch_all(ex)
    .await?;
    let mut by_job = HashMap::<JobId, Vec<MetricPoint>>::new();
    for (job, n, s, e, v) in rows {
        by_job
            .entry(JobId::from(job))
            .or_default()
            .push(point((n, s, e, v)));
    }
    Ok(by_job)
}

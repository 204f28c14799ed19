//! Sweeps: storing a sweep with its arms and jobs, the consistent snapshot GetSweep reads (one
//! page of runs), the job counts WatchSweep reads, listing, cancelling, and the points the
//! summary needs.
//!
//! A sweep's jobs are ordinary jobs: the same rows, checked by the same rules as
//! [`super::jobs::insert_job`]'s (stored here in multi-row inserts), and cancelled through
//! [`super::jobs`]. Must not derive a sweep's state (the api does, from the jobs' states read
//! here).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use proto::spec::JobSpec;
use proto::{JobId, JobState, SweepId};
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use super::jobs::{cancel_in, initial_state, lock_dependencies};
use super::requests::{claim_key, Claimed};
use super::state::{self, state};
use super::{once_more_on_deadlock, point, uuids};
use crate::domain::{MetricPoint, PageToken, RequestKey, RunPage};
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
    /// 0-based creation order within the sweep.
    pub position: i32,
    pub job_id: JobId,
    /// The arm's name, `source` for a source-stage job.
    pub arm: String,
    pub seed: u64,
    pub is_source: bool,
    /// The job's state now.
    pub state: JobState,
    pub error: Option<String>,
}

/// What [`insert_sweep`] stored, or found.
#[derive(Debug, Clone, PartialEq)]
pub struct InsertedSweep {
    /// The sweep: the new one, or the one an earlier submit with the same key stored.
    pub id: SweepId,
    /// Jobs that start queued: the caller dispatches them (none when `new` is false).
    pub queued: Vec<JobId>,
    /// Jobs this call stored (0 when `new` is false).
    pub jobs: usize,
    /// False when the key was an earlier submit's with the same spec: nothing was written.
    pub new: bool,
}

/// What cancelling a sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepCancelled {
    /// The jobs it cancelled, in the order it cancelled them.
    pub cancelled: Vec<JobId>,
    /// Jobs outside the sweep that waited for one of them and failed with it.
    pub dependents_failed: Vec<JobId>,
}

/// Rows per multi-row insert of a sweep's jobs, edges and runs: a 10,000-job sweep is ten
/// statements per table, each well under a few MB of parameters.
const INSERT_BATCH: usize = 1000;

/// One job of a sweep before it is stored.
struct NewJob {
    id: JobId,
    spec: JobSpec,
    /// The sweep field its spec came from, for error paths: `spec.source` or `spec.base`.
    root: &'static str,
    arm: String,
    seed: u64,
    is_source: bool,
}

/// Stores a validated sweep, its arms and every one of its jobs in one transaction: all or
/// nothing. With a key, the key is claimed first (see [`super::requests`]): when an earlier
/// submit holds it with the same spec nothing is written and that sweep's id comes back.
///
/// The jobs are inserted with multi-row inserts of [`INSERT_BATCH`] rows, not one by one: a
/// sweep's jobs depend only on its own source jobs (stored in this transaction) and on the jobs
/// its specs name (`depends_on`, a transfer's own `source_job_id`), which must already exist.
/// Those are checked once, under a share lock, exactly as [`super::jobs::insert_job`] checks a
/// job's (existence, a transfer source's kind, and the state each job starts in); a violation is
/// named under the sweep field the spec came from (`spec.base.<path>` or `spec.source.<path>`).
/// No cycle check: the sources depend only on jobs that existed before, and the arms only on
/// those and on the sources, so nothing older can reach a new job.
pub async fn insert_sweep(
    pool: &PgPool,
    id: SweepId,
    plan: &proto::sweep::SweepPlan,
    key: Option<&RequestKey>,
) -> Result<InsertedSweep> {
    let sweep_id = id.to_string();
    let labels = serde_json::to_value(&plan.labels).map_err(|e| Error::Internal(e.into()))?;
    let jobs = plan_jobs(plan, &sweep_id)?;
    let mut tx = pool.begin().await?;
    if let Some(key) = key {
        if let Claimed::Earlier(earlier) = claim_key(&mut tx, key, id.as_uuid()).await? {
            return Ok(InsertedSweep {
                id: SweepId::from(earlier),
                queued: Vec::new(),
                jobs: 0,
                new: false,
            });
        }
    }
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
    // The dependencies outside the sweep, each read (and share-locked) once.
    let own: HashSet<Uuid> = jobs.iter().map(|j| j.id.as_uuid()).collect();
    let mut external: Vec<Uuid> = jobs
        .iter()
        .flat_map(|j| j.spec.dependencies.iter().map(|d| d.as_uuid()))
        .filter(|d| !own.contains(d))
        .collect();
    external.sort();
    external.dedup();
    let mut found = lock_dependencies(&mut tx, &external).await?;
    // Each job's first state, in creation order: a source's is known before its arms need it.
    let mut initial = Vec::with_capacity(jobs.len());
    for job in &jobs {
        let (state, error) = initial_state(&job.spec, &found).map_err(|e| reroot(e, job.root))?;
        if job.is_source {
            found.insert(
                job.id.as_uuid(),
                (job.spec.experiment.kind().to_owned(), state),
            );
        }
        initial.push((state, error));
    }
    for (batch, states) in jobs.chunks(INSERT_BATCH).zip(initial.chunks(INSERT_BATCH)) {
        insert_jobs(&mut tx, batch, states).await?;
    }
    let edges: Vec<(Uuid, Uuid)> = jobs
        .iter()
        .flat_map(|j| {
            j.spec
                .dependencies
                .iter()
                .map(move |d| (j.id.as_uuid(), d.as_uuid()))
        })
        .collect();
    for batch in edges.chunks(INSERT_BATCH) {
        let (from, to): (Vec<Uuid>, Vec<Uuid>) = batch.iter().copied().unzip();
        sqlx::query(
            "INSERT INTO job_dependencies (job_id, depends_on)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[])",
        )
        .bind(&from)
        .bind(&to)
        .execute(&mut *tx)
        .await?;
    }
    for (n, batch) in jobs.chunks(INSERT_BATCH).enumerate() {
        let first = (n * INSERT_BATCH) as i32;
        let positions: Vec<i32> = (first..first + batch.len() as i32).collect();
        let ids: Vec<Uuid> = batch.iter().map(|j| j.id.as_uuid()).collect();
        let arms: Vec<&str> = batch.iter().map(|j| j.arm.as_str()).collect();
        let seeds: Vec<String> = batch.iter().map(|j| j.seed.to_string()).collect();
        let is_source: Vec<bool> = batch.iter().map(|j| j.is_source).collect();
        sqlx::query(
            "INSERT INTO sweep_runs (sweep_id, job_id, arm, seed, is_source, position)
             SELECT $1, u.job_id, u.arm, u.seed::numeric, u.is_source, u.position
             FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::boolean[], $6::integer[])
                  AS u(job_id, arm, seed, is_source, position)",
        )
        .bind(id.as_uuid())
        .bind(&ids)
        .bind(&arms)
        .bind(&seeds)
        .bind(&is_source)
        .bind(&positions)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    let queued = jobs
        .iter()
        .zip(&initial)
        .filter(|(_, (state, _))| *state == JobState::Queued)
        .map(|(j, _)| j.id)
        .collect();
    Ok(InsertedSweep {
        id,
        queued,
        jobs: jobs.len(),
        new: true,
    })
}

/// Every job of the plan with a fresh id and its spec, in creation order (sources first, so
/// the arms that transfer from them can name them).
fn plan_jobs(plan: &proto::sweep::SweepPlan, sweep_id: &str) -> Result<Vec<NewJob>> {
    let runs = plan.runs();
    let mut sources: HashMap<u64, String> = HashMap::new();
    let mut jobs = Vec::with_capacity(runs.len());
    for run in &runs {
        let id = JobId::from(Uuid::now_v7());
        let (spec, arm) = match run.arm {
            None => {
                let spec = plan.source_spec(run.seed, sweep_id).ok_or_else(|| {
                    Error::Internal(anyhow::anyhow!("source run without a source stage"))
                })??;
                sources.insert(run.seed, id.to_string());
                (spec, proto::sweep::SOURCE_ARM.to_owned())
            }
            Some(arm) => {
                let source = if plan.arms[arm].from_source {
                    Some(sources.get(&run.seed).map(String::as_str).ok_or_else(|| {
                        Error::Internal(anyhow::anyhow!("arm planned before its seed's source"))
                    })?)
                } else {
                    None
                };
                let spec = plan.run_spec(arm, run.seed, sweep_id, source)?;
                (spec, plan.arms[arm].name.clone())
            }
        };
        jobs.push(NewJob {
            id,
            spec,
            root: if run.arm.is_none() {
                "spec.source"
            } else {
                "spec.base"
            },
            arm,
            seed: run.seed,
            is_source: run.arm.is_none(),
        });
    }
    Ok(jobs)
}

/// A job spec's violation (`spec.<path>`) as the sweep field it came from (`<root>.<path>`).
fn reroot(e: Error, root: &str) -> Error {
    match e {
        Error::InvalidArgument { field, description } => Error::InvalidArgument {
            field: match field.strip_prefix("spec") {
                Some(rest) => format!("{root}{rest}"),
                None => field,
            },
            description,
        },
        other => other,
    }
}

/// One multi-row insert of jobs with the states they start in.
async fn insert_jobs(
    conn: &mut PgConnection,
    jobs: &[NewJob],
    states: &[(JobState, Option<String>)],
) -> Result<()> {
    let mut ids = Vec::with_capacity(jobs.len());
    let mut names = Vec::with_capacity(jobs.len());
    let mut kinds = Vec::with_capacity(jobs.len());
    let mut specs = Vec::with_capacity(jobs.len());
    let mut labels = Vec::with_capacity(jobs.len());
    let mut max_attempts = Vec::with_capacity(jobs.len());
    for job in jobs {
        ids.push(job.id.as_uuid());
        names.push(job.spec.name.as_str());
        kinds.push(job.spec.experiment.kind());
        specs.push(job.spec.to_json().to_string());
        labels
            .push(serde_json::to_string(&job.spec.labels).map_err(|e| Error::Internal(e.into()))?);
        max_attempts.push(super::jobs::max_attempts(&job.spec));
    }
    let state_names: Vec<&str> = states.iter().map(|(s, _)| s.as_str()).collect();
    let errors: Vec<Option<&str>> = states.iter().map(|(_, e)| e.as_deref()).collect();
    sqlx::query(concat!(
        "INSERT INTO jobs (id, name, kind, spec, labels, state, max_attempts, error, finished_at)
         SELECT u.id, u.name, u.kind, u.spec::jsonb, u.labels::jsonb, u.state, u.max_attempts,
                u.error, CASE WHEN u.state = ",
        state!(failed),
        " THEN now() END
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::integer[], $8::text[])
              AS u(id, name, kind, spec, labels, state, max_attempts, error)"
    ))
    .bind(&ids)
    .bind(&names)
    .bind(&kinds)
    .bind(&specs)
    .bind(&labels)
    .bind(&state_names)
    .bind(&max_attempts)
    .bind(&errors)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A sweep as one consistent picture: what [`sweep_snapshot`] reads.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSnapshot {
    pub row: SweepRow,
    pub arms: Vec<SweepArmRow>,
    /// How many of all its jobs are in each state.
    pub counts: Vec<(JobState, i64)>,
    /// One page of its runs, in creation order.
    pub runs: Vec<SweepRunRow>,
    /// Where the next page starts (the position of the last run here), `None` on the last page.
    pub next: Option<i32>,
}

/// A sweep as one consistent picture: its row (with `cancelled_at`), arms, job counts and one
/// page of its runs (with their jobs' states) read in one REPEATABLE READ snapshot, so that a
/// reader never sees, say, every job cancelled but the sweep not yet. `None` when there is no
/// such sweep.
pub async fn sweep_snapshot(
    pool: &PgPool,
    id: SweepId,
    page: RunPage,
) -> Result<Option<SweepSnapshot>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let Some(row) = get_sweep(&mut *tx, id).await? else {
        return Ok(None);
    };
    let arms = sweep_arms(&mut *tx, id).await?;
    let counts = sweep_state_counts(&mut *tx, &[id])
        .await?
        .remove(&id)
        .unwrap_or_default();
    let (runs, next) = sweep_runs_page(&mut *tx, id, page).await?;
    tx.commit().await?;
    Ok(Some(SweepSnapshot {
        row,
        arms,
        counts,
        runs,
        next,
    }))
}

/// What a WatchSweep look reads: whether CancelSweep was called and how many of the sweep's
/// jobs are in each state. One aggregate statement (one snapshot), no runs, no spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepProgress {
    pub cancelled: bool,
    pub counts: Vec<(JobState, i64)>,
}

/// The sweep's [`SweepProgress`]; `None` when there is no such sweep.
pub async fn sweep_progress(ex: impl PgExecutor<'_>, id: SweepId) -> Result<Option<SweepProgress>> {
    let rows: Vec<(bool, Option<String>, i64)> = sqlx::query_as(
        "SELECT s.cancelled_at IS NOT NULL, j.state, count(j.id)
         FROM sweeps s
         LEFT JOIN sweep_runs r ON r.sweep_id = s.id
         LEFT JOIN jobs j ON j.id = r.job_id
         WHERE s.id = $1
         GROUP BY 1, 2",
    )
    .bind(id.as_uuid())
    .fetch_all(ex)
    .await?;
    let Some((cancelled, _, _)) = rows.first() else {
        return Ok(None);
    };
    let cancelled = *cancelled;
    let mut counts = Vec::with_capacity(rows.len());
    for (_, text, n) in rows {
        if let Some(text) = text {
            counts.push((state::job_state(text)?, n));
        }
    }
    Ok(Some(SweepProgress { cancelled, counts }))
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
    let (runs, _) = sweep_runs_page(
        ex,
        id,
        RunPage {
            size: u32::MAX,
            after: None,
        },
    )
    .await?;
    Ok(runs)
}

/// A run as the page query reads it: position, job, arm, seed (as text), source, state, error.
type RunPageRow = (i32, Uuid, String, String, bool, String, Option<String>);

/// One page of the sweep's runs in creation order, and where the next page starts (`None` on
/// the last page).
pub async fn sweep_runs_page(
    ex: impl PgExecutor<'_>,
    id: SweepId,
    page: RunPage,
) -> Result<(Vec<SweepRunRow>, Option<i32>)> {
    let limit = i64::from(page.size);
    let rows: Vec<RunPageRow> = sqlx::query_as(
        "SELECT r.position, r.job_id, r.arm, r.seed::text, r.is_source, j.state, j.error
         FROM sweep_runs r JOIN jobs j ON j.id = r.job_id
         WHERE r.sweep_id = $1 AND r.position > $2
         ORDER BY r.position
         LIMIT $3",
    )
    .bind(id.as_uuid())
    .bind(page.after.unwrap_or(-1))
    .bind(limit.saturating_add(1))
    .fetch_all(ex)
    .await?;
    let mut runs = rows
        .into_iter()
        .map(|(position, job_id, arm, seed, is_source, text, error)| {
            let seed = seed.parse().map_err(|e| {
                Error::Internal(anyhow::anyhow!("sweep run {job_id} has seed {seed:?}: {e}"))
            })?;
            Ok(SweepRunRow {
                position,
                job_id: JobId::from(job_id),
                arm,
                seed,
                is_source,
                state: state::job_state(text)?,
                error,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let next = if runs.len() as i64 > limit {
        runs.truncate(page.size as usize);
        runs.last().map(|r| r.position)
    } else {
        None
    };
    Ok((runs, next))
}

/// The ids of every job of the sweep (what WatchSweep subscribes to); empty for an unknown
/// sweep.
pub async fn sweep_job_ids(ex: impl PgExecutor<'_>, id: SweepId) -> Result<Vec<JobId>> {
    let ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT job_id FROM sweep_runs WHERE sweep_id = $1 ORDER BY position")
            .bind(id.as_uuid())
            .fetch_all(ex)
            .await?;
    Ok(ids.into_iter().map(JobId::from).collect())
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
///
/// Lock order: every open job of the sweep is locked up front in id order, the order a job
/// ending takes with its waiting dependents ([`super::jobs::lock_with_dependents`]), so a source completing
/// while its sweep is cancelled waits instead of deadlocking. A deadlock with some other graph
/// (a job outside the sweep waiting on it, locked later) is retried once ([`once_more_on_deadlock`]).
pub async fn cancel_sweep(
    pool: &PgPool,
    id: SweepId,
    reason: &str,
) -> Result<Option<SweepCancelled>> {
    once_more_on_deadlock(|| cancel_sweep_once(pool, id, reason)).await
}

async fn cancel_sweep_once(
    pool: &PgPool,
    id: SweepId,
    reason: &str,
) -> Result<Option<SweepCancelled>> {
    let mut tx = pool.begin().await?;
    if !mark_sweep_cancelled(&mut *tx, id).await? {
        return Ok(None);
    }
    let mut open: Vec<(Uuid, i32)> = sqlx::query_as(concat!(
        "SELECT j.id, r.position FROM jobs j JOIN sweep_runs r ON r.job_id = j.id
         WHERE r.sweep_id = $1 AND j.state IN (",
        state!(waiting),
        ", ",
        state!(queued),
        ", ",
        state!(running),
        ")
         ORDER BY j.id
         FOR UPDATE OF j"
    ))
    .bind(id.as_uuid())
    .fetch_all(&mut *tx)
    .await?;
    open.sort_by_key(|(_, position)| std::cmp::Reverse(*position));
    let mut done = SweepCancelled::default();
    for job in open.into_iter().map(|(job, _)| JobId::from(job)) {
        match cancel_in(&mut tx, job, reason).await {
            Ok((_, failed)) => {
                done.cancelled.push(job);
                done.dependents_failed.extend(failed);
            }
            // Failed with a job cancelled just before: keep it.
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

//! Postgres access: the only module that writes SQL.
//!
//! Every state transition is one conditional statement (`UPDATE ... WHERE state = ... RETURNING`)
//! or a short transaction that locks the job row first, so two coordinators, or a worker racing
//! the lease reaper, can never both win. Functions take `impl PgExecutor<'_>` (a pool or a
//! transaction) when they run one statement, and `&PgPool` or `impl Acquire` when they need a
//! transaction of their own. Queries are checked at run time (`sqlx::query`), so building needs
//! no database.
//!
//! Dependencies: a job that ends changes the jobs waiting for it in the same transaction (a
//! success promotes those whose dependencies have all succeeded to `queued`; a failure or a
//! cancellation fails them, transitively, with `dependency_failed`), and returns their ids so
//! the caller can dispatch them and wake their watchers. Rows are locked in one global order:
//! a job that ends (completion, failure, cancellation) is locked together with its waiting
//! dependents, all in id order, before anything changes, and CancelSweep locks all of a sweep's
//! open jobs in id order up front; so two dependencies ending at once see each other's outcome,
//! and a sweep's source completing while the sweep is cancelled waits instead of deadlocking.
//! Dependents further down a chain are locked as the cascade reaches them; a deadlock there
//! (SQLSTATE 40P01, across graphs only) is retried once, since the aborted transaction wrote
//! nothing.
//!
//! Idempotent submission: a submit with a `request_id` claims the key (`submit_requests`) first
//! in the transaction that stores the job or sweep ([`requests`]).
//!
//! Attempts: every claim inserts a `job_attempts` row (`running`, with the step of the training
//! state it resumes from) and every way an attempt ends (completion, failure, lease expiry,
//! hand-back, cancellation) closes it in the transaction that changes the job. Only failures and
//! lease expiries count in `failed_attempts`, which is what `max_attempts` limits. After a
//! `resume` artifact is recorded only the newest few of the job are kept; the deleted records
//! come back to the caller, whose blob store deletes their objects.
//!
//! States: rows carry [`JobState`] and [`AttemptOutcome`], never their names; the one mapping
//! to SQL text is [`state`] (binds of `as_str()`, and the `state!`/`outcome!` literals in query
//! text, which the partial indexes need).
//!
//! The parts: [`jobs`] (submit, dependencies, dispatch bookkeeping, cancel, reads),
//! [`leases`] (claim, heartbeat, complete, fail, hand back, the reaper), [`attempts`] (attempt
//! records and lease checks that every worker write shares), [`metrics`], [`artifacts`],
//! [`sweeps`], [`workers`] (the fleet). Callers use the re-exports here (`store::claim_job`).
//!
//! Must not touch Redis, must not know about gRPC types, and must not decide policy (how long a
//! lease lasts, how long a retry waits): callers pass those in.

mod artifacts;
mod attempts;
mod jobs;
mod leases;
mod metrics;
mod requests;
pub(crate) mod state;
mod sweeps;
mod workers;

use std::future::Future;

use std::time::Duration;

use chrono::{DateTime, Utc};
use proto::{AttemptOutcome, JobId, JobState};
use uuid::Uuid;

use crate::domain::MetricPoint;
use crate::error::{is_deadlock, Result};

/// Runs a transaction's work, and once more when Postgres aborted it to break a deadlock
/// (SQLSTATE 40P01): the aborted transaction wrote nothing, and the second try meets the other
/// transaction's outcome. Only for work that is safe to repeat from the start.
async fn once_more_on_deadlock<T, F, Fut>(mut work: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    match work().await {
        Err(e) if is_deadlock(&e) => work().await,
        other => other,
    }
}

pub use artifacts::{
    artifact_uri_in_use, get_artifact, list_artifacts, newest_artifact, newest_resume_state,
    record_artifact, ArtifactRow, Recorded, Retention,
};
pub use attempts::check_lease;
pub use jobs::{
    attempts_of, attempts_of_jobs, cancel_job, clear_dispatched, count_jobs_by_state,
    dependencies_of, forget_all_dispatches, get_job, insert_job, list_jobs, queue_stats,
    submit_job, take_due_for_dispatch, take_for_dispatch, QueueStat,
};
pub use leases::{
    claim_job, claim_job_fitting, complete_job, database_now, extend_running_leases, fail_job,
    heartbeat, reap_expired_leases, release_job, Claim, Completed, ReapedJob,
};
pub use metrics::{
    last_metric_seq, latest_metrics, latest_metrics_of, metric_page, metrics_after, record_metrics,
    StoredPoints,
};
pub use sweeps::{
    cancel_sweep, get_sweep, insert_sweep, list_sweeps, mark_sweep_cancelled, sweep_arms,
    sweep_epoch_end_points, sweep_job_ids, sweep_progress, sweep_runs, sweep_runs_page,
    sweep_snapshot, sweep_state_counts, InsertedSweep, SweepArmRow, SweepCancelled, SweepProgress,
    SweepRow, SweepRunRow, SweepSnapshot,
};
pub use workers::{
    get_worker, list_workers, live_queues, live_worker_slots, record_worker, WorkerRow,
};

/// One row of `jobs`, as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct JobRow {
    #[sqlx(try_from = "Uuid")]
    pub id: JobId,
    pub name: String,
    pub kind: String,
    /// The JobSpec in the proto3 JSON mapping.
    pub spec: serde_json::Value,
    pub labels: serde_json::Value,
    #[sqlx(try_from = "String")]
    pub state: JobState,
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
    /// The queue it waits on (read out of the spec).
    pub queue: String,
    /// The device kind it needs (`any`, `cuda`, `cpu`) and its GPU memory on CUDA, in MiB.
    pub needs_device: String,
    pub needs_gpu_mib: i32,
}

/// One row of `job_attempts`: one claim of a job and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AttemptRow {
    #[sqlx(try_from = "Uuid")]
    pub job_id: JobId,
    pub attempt: i32,
    pub worker_id: String,
    pub claimed_at: DateTime<Utc>,
    /// `None` while the attempt runs.
    pub ended_at: Option<DateTime<Utc>>,
    /// [`AttemptOutcome::Running`] while the attempt runs.
    #[sqlx(try_from = "String")]
    pub outcome: AttemptOutcome,
    /// The step of the training state the claim handed out (0: from scratch).
    pub resumed_from_step: i64,
    pub reason: Option<String>,
}

/// A duration as the float milliseconds that SQL multiplies with `interval '1 millisecond'`.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Ids as the `uuid[]` that a query binds.
fn uuids<T: Copy + Into<Uuid>>(ids: &[T]) -> Vec<Uuid> {
    ids.iter().map(|&id| id.into()).collect()
}

/// Ids a query returned, typed.
fn typed<T: From<Uuid>>(ids: Vec<Uuid>) -> Vec<T> {
    ids.into_iter().map(T::from).collect()
}

/// A `(name, step, epoch, value)` row as a point.
fn point((name, step, epoch, value): (String, i64, i32, f64)) -> MetricPoint {
    MetricPoint {
        name,
        step,
        epoch,
        value,
    }
}

//! The gRPC services: `trainq.v1.JobService` (users) and `trainq.v1.WorkerService` (workers).
//!
//! Each handler parses its request into domain types at the edge (`TryFrom`, see
//! [`crate::domain`]), calls the store, and converts rows back into wire types (watchers
//! learn of a write from Postgres's change notifications, [`crate::changes`]). Errors become `tonic::Status` only through `From<Error>`.
//!
//! Must not write SQL, touch Redis or the blob store directly (store, dispatch and artifacts
//! do), and must not fail a request because Redis is down.

mod artifacts;
mod fleet;
mod follow;
mod jobs;
pub mod limits;
mod sweeps;
mod watch;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use proto::{v1, JobId};
use sqlx::{PgConnection, PgPool};

pub use artifacts::ArtifactChunks;
pub use jobs::JobApi;
pub use workers::WorkerApi;

use crate::artifacts::ArtifactStore;
use crate::dispatch::Dispatcher;
use crate::domain::MetricPoint;
use crate::error::{Error, Result};
use crate::events::Notifier;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store::{self, ArtifactRow, AttemptRow, JobRow};

/// What every handler shares.
pub struct AppState {
    pub pool: PgPool,
    /// A few connections of their own for the liveness writes (lease renewals, WorkerHeartbeat),
    /// so that they never wait behind metric batches or watcher reads for a connection, and
    /// committed without waiting for the WAL flush (`synchronous_commit = off`): a renewal lost
    /// in a Postgres crash only makes a lease look older, and after an outage the reaper waits a
    /// lease timeout anyway (`reconcile::LeaseGrace`).
    pub liveness_pool: PgPool,
    pub dispatcher: Arc<Dispatcher>,
    pub notifier: Notifier,
    /// Where artifact bytes live.
    pub artifacts: ArtifactStore,
    /// How long a claim or heartbeat leases a job.
    pub lease_timeout: Duration,
    /// Base of the exponential retry backoff.
    pub retry_backoff: Duration,
    /// Ends open WatchJob streams so a graceful shutdown does not wait for jobs to finish.
    pub shutdown: Shutdown,
    /// Counters and histograms of what the handlers see (claims, retries, final states).
    pub metrics: Arc<Metrics>,
    /// How many checkpoints a job keeps.
    pub retention: store::Retention,
    /// How many watch streams may be open, and how many of their reads run at once.
    pub watch_limits: limits::WatchLimits,
}

impl AppState {
    /// What a follow loop needs from the coordinator.
    fn follow_context(&self) -> follow::Context {
        follow::Context {
            shutdown: self.shutdown.clone(),
            limits: self.watch_limits.clone(),
        }
    }
}

fn timestamp(t: DateTime<Utc>) -> proto::Timestamp {
    proto::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// The stored spec, read back from its proto3 JSON mapping.
fn spec_of(row: &JobRow) -> Result<v1::JobSpec> {
    serde_json::from_value(row.spec.clone()).map_err(|e| {
        Error::Internal(anyhow::anyhow!(
            "job {} has an unreadable spec: {e}",
            row.id
        ))
    })
}

fn state_of(row: &JobRow) -> v1::JobState {
    row.state.into()
}

/// A stored job as the wire `Job`, with its latest metric values and its attempts (oldest
/// first).
/// `live` are the live workers ([`fleet::live_workers`]), read when a queued job needs its
/// waiting reason.
fn job_to_proto(
    row: JobRow,
    latest: Vec<MetricPoint>,
    attempts: Vec<AttemptRow>,
    live: Option<&[store::WorkerRow]>,
) -> Result<v1::Job> {
    let attempts = attempts.into_iter().map(attempt_to_proto).collect();
    let waiting_reason = fleet::waiting_reason(&row, live);
    Ok(v1::Job {
        waiting_reason,
        id: row.id.to_string(),
        spec: Some(spec_of(&row)?),
        state: state_of(&row) as i32,
        attempt: row.attempt.max(0) as u32,
        worker_id: row.worker_id.unwrap_or_default(),
        created_at: Some(timestamp(row.created_at)),
        started_at: row.started_at.map(timestamp),
        finished_at: row.finished_at.map(timestamp),
        error: row.error.unwrap_or_default(),
        latest_metrics: latest.into_iter().map(Into::into).collect(),
        updated_at: Some(timestamp(row.updated_at)),
        attempts,
        failed_attempts: row.failed_attempts.max(0) as u32,
        final_step: row.final_step.unwrap_or(0).max(0) as u64,
    })
}

/// A job with its latest metrics, or NOT_FOUND. Its three reads share one pooled connection
/// (the pool checks a connection each time it hands one out).
async fn load_job(state: &AppState, id: JobId) -> Result<v1::Job> {
    let mut conn = state.pool.acquire().await?;
    let row = store::get_job(&mut *conn, id)
        .await?
        .ok_or_else(|| Error::job_not_found(id))?;
    job_of_row(&mut conn, state.lease_timeout, id, row).await
}

/// The job whose row was just read, with its latest metrics and attempts read now (and, when it
/// is queued, which queues live workers serve: `lease_timeout` says who is live).
async fn job_of_row(
    conn: &mut PgConnection,
    lease_timeout: Duration,
    id: JobId,
    row: JobRow,
) -> Result<v1::Job> {
    let latest = store::latest_metrics(&mut *conn, id).await?;
    let attempts = store::attempts_of(&mut *conn, id).await?;
    let live = fleet::live_workers(&mut *conn, lease_timeout, std::slice::from_ref(&row)).await?;
    job_to_proto(row, latest, attempts, live.as_deref())
}

/// An attempt record as the wire `Attempt`.
fn attempt_to_proto(row: AttemptRow) -> v1::Attempt {
    v1::Attempt {
        attempt: row.attempt.max(0) as u32,
        worker_id: row.worker_id,
        claimed_at: Some(timestamp(row.claimed_at)),
        ended_at: row.ended_at.map(timestamp),
        outcome: v1::AttemptOutcome::from(row.outcome) as i32,
        resumed_from_step: row.resumed_from_step.max(0) as u64,
        reason: row.reason.unwrap_or_default(),
    }
}

/// An artifact record as the wire `Artifact`.
fn artifact_to_proto(row: ArtifactRow) -> v1::Artifact {
    // Both widths were checked on the way in, and the columns have CHECK (>= 0).
    v1::Artifact {
        id: row.id.to_string(),
        job_id: row.job_id.to_string(),
        attempt: row.attempt.max(0) as u32,
        kind: row.kind,
        name: row.name,
        epoch: row.epoch.max(0) as u32,
        size_bytes: row.size_bytes.max(0) as u64,
        sha256: row.sha256,
        uri: row.uri,
        created_at: Some(timestamp(row.created_at)),
        step: row.step.max(0) as u64,
    }
}

/// Pushes the jobs that just became queued onto their queues. They are marked dispatched first
/// (which also reads each one's queue and priority); a failed push clears the mark and is only
/// logged: the jobs are safely stored as queued, and the reconciler pushes them later.
async fn dispatch_now(state: &AppState, ids: &[JobId]) {
    if ids.is_empty() {
        return;
    }
    let ready = match store::take_for_dispatch(&state.pool, ids).await {
        Ok(ready) => ready,
        Err(e) => {
            // Harmless: they are still undispatched, and the reconciler will push them.
            tracing::warn!(jobs = ?ids, error = %e, "could not prepare dispatch");
            return;
        }
    };
    if let Err(e) = state.dispatcher.push(&ready).await {
        tracing::warn!(jobs = ?ids, error = %e, "dispatch failed; the reconciler will retry");
        if let Err(e) = store::clear_dispatched(&state.pool, ids).await {
            // The reconciler pushes them once their dispatch is older than its delay.
            tracing::warn!(jobs = ?ids, error = %e, "could not clear the dispatch mark");
        }
    }
}

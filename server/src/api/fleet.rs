//! The fleet: workers' reports of themselves (WorkerService.WorkerHeartbeat), JobService's
//! ListWorkers and GetWorker, and why a queued job waits (`Job.waiting_reason`).
//!
//! Liveness is the lease timeout: a worker silent for longer is lost, as its jobs' leases would
//! be. Must not import the service modules (they import this one).

use std::collections::HashSet;
use std::time::Duration;

use proto::v1;
use proto::JobState;
use sqlx::PgExecutor;

use super::{timestamp, AppState};
use crate::domain::{parse_worker_id, WorkerReport};
use crate::error::{Error, Result};
use crate::store::{self, JobRow, WorkerRow};

/// How long ListWorkers keeps showing a lost worker unless asked for every one.
pub const SHOW_LOST_FOR: Duration = Duration::from_secs(3600);

pub async fn record(state: &AppState, req: v1::WorkerHeartbeatRequest) -> Result<()> {
    let report = WorkerReport::try_from(req)?;
    store::record_worker(&state.pool, &report).await
}

pub async fn list(
    state: &AppState,
    req: v1::ListWorkersRequest,
) -> Result<v1::ListWorkersResponse> {
    let within = (!req.include_lost).then_some(SHOW_LOST_FOR);
    let rows = store::list_workers(&state.pool, state.lease_timeout, within).await?;
    Ok(v1::ListWorkersResponse {
        workers: rows.into_iter().map(worker_to_proto).collect(),
    })
}

pub async fn get(state: &AppState, req: v1::GetWorkerRequest) -> Result<v1::Worker> {
    let id = parse_worker_id("worker_id", &req.worker_id)?;
    store::get_worker(&state.pool, state.lease_timeout, &id)
        .await?
        .map(worker_to_proto)
        .ok_or_else(|| Error::NotFound(format!("worker {id:?} not found")))
}

fn worker_to_proto(row: WorkerRow) -> v1::Worker {
    v1::Worker {
        worker_id: row.id,
        host: row.host,
        version: row.version,
        devices: row
            .devices
            .into_iter()
            .map(|d| v1::WorkerDevice {
                name: d.name,
                memory_total_bytes: d.memory_total_bytes,
                memory_used_bytes: d.memory_used_bytes,
            })
            .collect(),
        slots_total: row.slots_total.max(0) as u32,
        slots_busy: row.slots_busy.max(0) as u32,
        queues: row.queues,
        state: if row.live {
            v1::WorkerState::Live
        } else {
            v1::WorkerState::Lost
        } as i32,
        started_at: Some(timestamp(row.started_at)),
        last_seen_at: Some(timestamp(row.last_seen_at)),
        running_job_ids: row.running.into_iter().map(|id| id.to_string()).collect(),
    }
}

/// The queues live workers serve, read once for a page of jobs (only when one is queued).
pub async fn served_queues(
    ex: impl PgExecutor<'_>,
    lease_timeout: Duration,
    rows: &[JobRow],
) -> Result<Option<HashSet<String>>> {
    if !rows.iter().any(|r| r.state == JobState::Queued) {
        return Ok(None);
    }
    let queues = store::live_queues(ex, lease_timeout).await?;
    Ok(Some(queues.into_iter().collect()))
}

/// Why a queued job waits, when no live worker serves its queue; empty otherwise.
pub fn waiting_reason(row: &JobRow, served: Option<&HashSet<String>>) -> String {
    match served {
        Some(served) if row.state == JobState::Queued && !served.contains(&row.queue) => {
            format!("no live worker serves queue {}", row.queue)
        }
        _ => String::new(),
    }
}

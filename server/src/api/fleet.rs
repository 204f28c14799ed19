//! The fleet: workers' reports of themselves (WorkerService.WorkerHeartbeat), JobService's
//! ListWorkers and GetWorker, and why a queued job waits (`Job.waiting_reason`).
//!
//! Liveness is the lease timeout: a worker silent for longer is lost, as its jobs' leases would
//! be. Must not import the service modules (they import this one).

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
    store::record_worker(&state.liveness_pool, &report).await
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

/// The live workers (seen within the lease timeout), read once for a page of jobs and only
/// when one of them is queued; what [`waiting_reason`] compares a job with.
pub async fn live_workers(
    ex: impl PgExecutor<'_>,
    lease_timeout: Duration,
    rows: &[JobRow],
) -> Result<Option<Vec<WorkerRow>>> {
    if !rows.iter().any(|r| r.state == JobState::Queued) {
        return Ok(None);
    }
    let workers = store::list_workers(ex, lease_timeout, Some(lease_timeout)).await?;
    Ok(Some(workers.into_iter().filter(|w| w.live).collect()))
}

/// Whether the worker trains on CUDA (a device named `cuda...`).
fn is_cuda(w: &WorkerRow) -> bool {
    w.devices.iter().any(|d| d.name.starts_with("cuda"))
}

/// The most GPU memory one of the worker's CUDA devices has, MiB; `None` when unknown.
fn gpu_total_mib(w: &WorkerRow) -> Option<u64> {
    w.devices
        .iter()
        .filter(|d| d.name.starts_with("cuda") && d.memory_total_bytes > 0)
        .map(|d| d.memory_total_bytes / (1024 * 1024))
        .max()
}

/// Why a queued job waits, when no live worker could ever run it: none serves its queue, none
/// of those has the device kind it needs, or (needing CUDA, or any device with only CUDA workers
/// there) none has as much GPU memory as it needs. Empty otherwise.
pub fn waiting_reason(row: &JobRow, live: Option<&[WorkerRow]>) -> String {
    let Some(live) = live else {
        return String::new();
    };
    if row.state != JobState::Queued {
        return String::new();
    }
    let queue = &row.queue;
    let serving: Vec<&WorkerRow> = live.iter().filter(|w| w.queues.contains(queue)).collect();
    if serving.is_empty() {
        return format!("no live worker serves queue {queue}");
    }
    let kind_ok: Vec<&WorkerRow> = serving
        .iter()
        .copied()
        .filter(|w| match row.needs_device.as_str() {
            "cuda" => is_cuda(w),
            "cpu" => !is_cuda(w),
            _ => true,
        })
        .collect();
    match (kind_ok.is_empty(), row.needs_device.as_str()) {
        (true, "cuda") => return format!("no live worker with a CUDA device serves queue {queue}"),
        (true, _) => return format!("no live CPU worker serves queue {queue}"),
        _ => {}
    }
    let need = u64::try_from(row.needs_gpu_mib).unwrap_or(0);
    let fits = kind_ok
        .iter()
        .any(|w| !is_cuda(w) || gpu_total_mib(w).is_none_or(|total| total >= need));
    if fits {
        String::new()
    } else {
        format!("no worker with {need} MiB of GPU memory serves queue {queue}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::worker::Device;

    fn worker(queues: &[&str], cuda_mib: Option<u64>) -> WorkerRow {
        let now = chrono::Utc::now();
        WorkerRow {
            id: "w".into(),
            host: "h".into(),
            version: "v".into(),
            devices: vec![match cuda_mib {
                Some(mib) => Device {
                    name: "cuda:0".into(),
                    memory_total_bytes: mib * 1024 * 1024,
                    memory_used_bytes: 0,
                },
                None => Device {
                    name: "cpu".into(),
                    memory_total_bytes: 0,
                    memory_used_bytes: 0,
                },
            }],
            slots_total: 1,
            slots_busy: 0,
            queues: queues.iter().map(|q| q.to_string()).collect(),
            started_at: now,
            last_seen_at: now,
            live: true,
            running: vec![],
        }
    }

    fn job(queue: &str, device: &str, mib: i32) -> JobRow {
        let now = chrono::Utc::now();
        JobRow {
            id: proto::JobId::from(uuid::Uuid::now_v7()),
            name: "j".into(),
            kind: "mnist_classifier".into(),
            spec: serde_json::json!({}),
            labels: serde_json::json!({}),
            state: JobState::Queued,
            attempt: 0,
            max_attempts: 3,
            worker_id: None,
            lease_expires_at: None,
            not_before: None,
            dispatched_at: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
            error: None,
            failed_attempts: 0,
            final_step: None,
            queue: queue.into(),
            needs_device: device.into(),
            needs_gpu_mib: mib,
        }
    }

    #[test]
    fn a_queued_job_says_which_need_no_live_worker_meets() {
        let cpu = worker(&["default"], None);
        let gpu = worker(&["gpu"], Some(24_000));
        let fleet = [cpu, gpu];
        let reason = |j: JobRow| waiting_reason(&j, Some(&fleet));
        assert_eq!(reason(job("default", "any", 320)), "");
        assert_eq!(reason(job("gpu", "any", 320)), "");
        assert_eq!(
            reason(job("nowhere", "any", 320)),
            "no live worker serves queue nowhere"
        );
        assert_eq!(
            reason(job("default", "cuda", 320)),
            "no live worker with a CUDA device serves queue default"
        );
        assert_eq!(
            reason(job("gpu", "cpu", 320)),
            "no live CPU worker serves queue gpu"
        );
        assert_eq!(
            reason(job("gpu", "cuda", 40_000)),
            "no worker with 40000 MiB of GPU memory serves queue gpu"
        );
        assert_eq!(
            reason(job("default", "any", 40_000)),
            "",
            "a CPU worker runs it"
        );
        let mut running = job("nowhere", "any", 1);
        running.state = JobState::Running;
        assert_eq!(reason(running), "");
        assert_eq!(waiting_reason(&job("nowhere", "any", 1), None), "");
    }
}

//! `trainq.v1.WorkerService`: claim, heartbeat, report metrics, complete, fail, hand back;
//! upload and download artifacts.
//!
//! Every call but ClaimJob carries a lease; the store refuses writes from a lease that is no
//! longer current. "Not claimed" and "stop running" are answers, not errors. With a worker
//! token bound to a worker id, a claim or write for another worker id is refused
//! ([`crate::auth::check_acting_as`]).

use std::sync::Arc;

use proto::v1::{self, worker_service_server::WorkerService};
use proto::{AttemptOutcome, JobState};
use tonic::{Request, Response, Status, Streaming};

use super::{artifact_to_proto, artifacts, dispatch_now, fleet, spec_of, timestamp, AppState};
use crate::auth;
use crate::domain::{
    self, parse_job_id, parse_worker_id, Capacity, Completion, Lease, MetricsReport,
};
use crate::error::Result;
use crate::store;

/// Implements `WorkerService` over the shared [`AppState`].
#[derive(Clone)]
pub struct WorkerApi {
    state: Arc<AppState>,
}

impl WorkerApi {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    async fn claim(&self, req: v1::ClaimJobRequest) -> Result<v1::ClaimJobResponse> {
        let id = parse_job_id("job_id", &req.job_id)?;
        let worker_id = parse_worker_id("worker_id", &req.worker_id)?;
        let capacity = Capacity::parse(&req.device_kind, req.free_gpu_memory_mib)?;
        let Some(store::Claim {
            job: row,
            resume_from,
            waited,
        }) = store::claim_job_fitting(
            &self.state.pool,
            id,
            &worker_id,
            self.state.lease_timeout,
            &capacity,
        )
        .await?
        else {
            // Someone else won, or the job was cancelled, or it is a duplicate message, or it
            // does not fit this worker (it stays queued for one it fits).
            return Ok(v1::ClaimJobResponse::default());
        };
        self.state.metrics.claimed(waited);
        tracing::info!(
            job_id = %id, attempt = row.attempt, worker = %worker_id,
            resume_from_step = resume_from.as_ref().map_or(0, |a| a.step),
            waited_ms = waited.as_millis() as u64, "job claimed"
        );
        Ok(v1::ClaimJobResponse {
            claimed: true,
            lease: Some(v1::JobLease {
                job_id: id.to_string(),
                attempt: row.attempt.max(0) as u32,
                worker_id,
            }),
            spec: Some(spec_of(&row)?),
            lease_expires_at: row.lease_expires_at.map(timestamp),
            resume_from: resume_from.map(artifact_to_proto),
        })
    }

    async fn heartbeat(&self, req: v1::HeartbeatRequest) -> Result<v1::HeartbeatResponse> {
        let lease = Lease::try_from(req.lease)?;
        let expires =
            store::heartbeat(&self.state.liveness_pool, &lease, self.state.lease_timeout).await?;
        Ok(v1::HeartbeatResponse {
            keep_running: expires.is_some(),
            lease_expires_at: expires.map(timestamp),
        })
    }

    async fn report(&self, req: v1::ReportMetricsRequest) -> Result<v1::ReportMetricsResponse> {
        let report = MetricsReport::try_from(req)?;
        let lease = &report.lease;
        let done = store::record_metrics(&self.state.pool, lease, &report.points).await?;
        if let Some((name, step)) = &done.first_conflict {
            tracing::warn!(
                job_id = %lease.job_id, attempt = lease.attempt, conflicting = done.conflicting,
                first_name = %name, first_step = step,
                "metric points repeat a stored (name, step) with a different value; the stored values stay"
            );
        }
        Ok(v1::ReportMetricsResponse {
            stored: u32::try_from(done.stored).unwrap_or(u32::MAX),
            conflicting: u32::try_from(done.conflicting).unwrap_or(u32::MAX),
        })
    }

    async fn complete(&self, req: v1::CompleteJobRequest) -> Result<v1::CompleteJobResponse> {
        let Completion { lease, final_step } = Completion::try_from(req)?;
        let store::Completed { queued, pruned } =
            store::complete_job(&self.state.pool, &lease, final_step).await?;
        tracing::info!(job_id = %lease.job_id, attempt = lease.attempt, final_step, "job succeeded");
        artifacts::delete_pruned(&self.state, &pruned).await;
        self.state.metrics.finished(JobState::Succeeded.as_str());
        for dependent in &queued {
            tracing::info!(job_id = %dependent, attempt = 0, dependency = %lease.job_id, "dependencies succeeded; job queued");
        }
        dispatch_now(&self.state, &queued).await;
        Ok(v1::CompleteJobResponse {})
    }

    async fn fail(&self, req: v1::FailJobRequest) -> Result<v1::FailJobResponse> {
        let lease = Lease::try_from(req.lease)?;
        let reason = domain::reason_text(&req.reason, "failed without a reason");
        let base = self.state.retry_backoff;
        let (state, failed) = store::fail_job(
            &self.state.pool,
            &lease,
            &reason,
            req.permanent,
            |failed_attempts| domain::retry_backoff(base, failed_attempts, &mut rand::rng()),
        )
        .await?;
        tracing::info!(job_id = %lease.job_id, attempt = lease.attempt, %state, %reason, "attempt failed");
        self.state
            .metrics
            .attempt_ended(state.as_str(), AttemptOutcome::Failed.as_str());
        for dependent in failed {
            tracing::info!(job_id = %dependent, attempt = 0, dependency = %lease.job_id, "dependency failed");
        }
        Ok(v1::FailJobResponse {
            state: v1::JobState::from(state) as i32,
        })
    }

    /// Queues the job again at once (its worker is shutting down) and pushes it, so another
    /// worker can resume it without waiting for the lease to expire.
    async fn release(&self, req: v1::ReleaseJobRequest) -> Result<v1::ReleaseJobResponse> {
        let lease = Lease::try_from(req.lease)?;
        let reason = domain::reason_text(&req.reason, "handed back by its worker");
        store::release_job(&self.state.pool, &lease, &reason).await?;
        tracing::info!(
            job_id = %lease.job_id, attempt = lease.attempt, worker = %lease.worker_id, %reason,
            "job handed back"
        );
        dispatch_now(&self.state, &[lease.job_id]).await;
        Ok(v1::ReleaseJobResponse {
            state: v1::JobState::from(JobState::Queued) as i32,
        })
    }
}

/// The request, if its token may act as the worker whose lease it carries (see
/// [`auth::check_acting_as`]).
fn acting_as_lease_holder<T>(
    request: Request<T>,
    lease: impl Fn(&T) -> Option<&v1::JobLease>,
) -> Result<T> {
    let bound = auth::bound_worker(&request);
    let req = request.into_inner();
    let worker_id = lease(&req).map_or("", |l| l.worker_id.as_str());
    auth::check_acting_as(bound.as_ref(), worker_id)?;
    Ok(req)
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn claim_job(
        &self,
        request: Request<v1::ClaimJobRequest>,
    ) -> Result<Response<v1::ClaimJobResponse>, Status> {
        let bound = auth::bound_worker(&request);
        let req = request.into_inner();
        auth::check_acting_as(bound.as_ref(), &req.worker_id)?;
        Ok(Response::new(self.claim(req).await?))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let req = acting_as_lease_holder(request, |r| r.lease.as_ref())?;
        Ok(Response::new(WorkerApi::heartbeat(self, req).await?))
    }

    async fn report_metrics(
        &self,
        request: Request<v1::ReportMetricsRequest>,
    ) -> Result<Response<v1::ReportMetricsResponse>, Status> {
        let req = acting_as_lease_holder(request, |r| r.lease.as_ref())?;
        Ok(Response::new(self.report(req).await?))
    }

    async fn complete_job(
        &self,
        request: Request<v1::CompleteJobRequest>,
    ) -> Result<Response<v1::CompleteJobResponse>, Status> {
        let req = acting_as_lease_holder(request, |r| r.lease.as_ref())?;
        Ok(Response::new(self.complete(req).await?))
    }

    async fn fail_job(
        &self,
        request: Request<v1::FailJobRequest>,
    ) -> Result<Response<v1::FailJobResponse>, Status> {
        let req = acting_as_lease_holder(request, |r| r.lease.as_ref())?;
        Ok(Response::new(self.fail(req).await?))
    }

    async fn release_job(
        &self,
        request: Request<v1::ReleaseJobRequest>,
    ) -> Result<Response<v1::ReleaseJobResponse>, Status> {
        let req = acting_as_lease_holder(request, |r| r.lease.as_ref())?;
        Ok(Response::new(self.release(req).await?))
    }

    async fn upload_artifact(
        &self,
        request: Request<Streaming<v1::UploadArtifactChunk>>,
    ) -> Result<Response<v1::Artifact>, Status> {
        let bound = auth::bound_worker(&request);
        Ok(Response::new(
            artifacts::upload(&self.state, request.into_inner(), bound.as_ref()).await?,
        ))
    }

    async fn worker_heartbeat(
        &self,
        request: Request<v1::WorkerHeartbeatRequest>,
    ) -> Result<Response<v1::WorkerHeartbeatResponse>, Status> {
        let bound = auth::bound_worker(&request);
        let req = request.into_inner();
        auth::check_acting_as(bound.as_ref(), &req.worker_id)?;
        fleet::record(&self.state, req).await?;
        Ok(Response::new(v1::WorkerHeartbeatResponse {}))
    }

    type DownloadArtifactStream = artifacts::ArtifactChunks;

    async fn download_artifact(
        &self,
        request: Request<v1::DownloadArtifactRequest>,
    ) -> Result<Response<Self::DownloadArtifactStream>, Status> {
        Ok(Response::new(
            artifacts::download(self.state.clone(), request.into_inner()).await?,
        ))
    }
}

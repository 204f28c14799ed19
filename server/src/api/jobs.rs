//! `trainq.v1.JobService`: submit, inspect, list, cancel and watch jobs; list and download
//! their artifacts.

use std::sync::Arc;

use proto::spec::JobSpec;
use proto::v1::{self, job_service_server::JobService};
use proto::{JobId, JobState};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::limits::Admitted;
use super::{
    artifacts, dispatch_now, fleet, job_to_proto, load_job, state_of, sweeps, watch, AppState,
};
use crate::domain::{self, parse_job_id, JobQuery, MetricsQuery, RequestKey, RequestKind};
use crate::error::{Error, Result};
use crate::store;

/// Implements `JobService` over the shared [`AppState`].
#[derive(Clone)]
pub struct JobApi {
    state: Arc<AppState>,
}

impl JobApi {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// Stores a validated job (with its dependencies), then, if it is ready to run, tries to
    /// push its id. A failed push is only logged (see [`dispatch_now`]). With a request_id that
    /// an earlier submit used for the same spec, that job is the answer (its state now) and
    /// nothing is stored or pushed.
    async fn submit(&self, req: v1::SubmitJobRequest) -> Result<v1::SubmitJobResponse> {
        let spec = JobSpec::try_from(
            req.spec
                .ok_or_else(|| Error::invalid("spec", "is required"))?,
        )?;
        let key = RequestKey::parse(
            RequestKind::Job,
            "request_id",
            &req.request_id,
            &spec.to_json(),
        )?;
        let id = JobId::from(Uuid::now_v7());
        let (row, new) = store::submit_job(&self.state.pool, id, &spec, key.as_ref()).await?;
        let state = state_of(&row);
        if !new {
            tracing::info!(
                job_id = %row.id, request_id = %req.request_id, state = %row.state,
                "job submitted again with the same request id; answered with the first"
            );
        } else {
            tracing::info!(
                job_id = %id, attempt = row.attempt, name = %spec.name, kind = spec.experiment.kind(), state = %row.state,
                dependencies = spec.dependencies.len(), "job submitted"
            );
            if row.state == JobState::Queued {
                dispatch_now(&self.state, &[id]).await;
            }
        }
        Ok(v1::SubmitJobResponse {
            job_id: row.id.to_string(),
            state: state as i32,
        })
    }

    /// WatchJob for the web UI's live stream: the same admission limits (no per-connection
    /// limit: the caller is an HTTP client) and loop, starting after the point cursor `after`
    /// the page was rendered at (see [`watch::start`]).
    pub async fn watch_after(
        &self,
        id: JobId,
        after: Option<i64>,
    ) -> std::result::Result<Admitted<watch::JobEvents>, Status> {
        let permit = self.state.watch_limits.admit(None)?;
        let slot = self.state.watch_limits.read_slot().await;
        let events = watch::start(self.state.clone(), id, after).await?;
        drop(slot);
        Ok(Admitted::new(events, permit))
    }

    async fn get(&self, job_id: &str) -> Result<v1::Job> {
        let id = parse_job_id("job_id", job_id)?;
        load_job(&self.state, id).await
    }

    async fn list(&self, req: v1::ListJobsRequest) -> Result<v1::ListJobsResponse> {
        let query = JobQuery::try_from(req)?;
        let (rows, next) = store::list_jobs(&self.state.pool, &query).await?;
        let ids: Vec<JobId> = rows.iter().map(|r| r.id).collect();
        let mut latest = store::latest_metrics_of(&self.state.pool, &ids).await?;
        let mut attempts = store::attempts_of_jobs(&self.state.pool, &ids).await?;
        let live = fleet::live_workers(&self.state.pool, self.state.lease_timeout, &rows).await?;
        let jobs = rows
            .into_iter()
            .map(|row| {
                let metrics = latest.remove(&row.id).unwrap_or_default();
                let attempts = attempts.remove(&row.id).unwrap_or_default();
                job_to_proto(row, metrics, attempts, live.as_deref())
            })
            .collect::<Result<_>>()?;
        Ok(v1::ListJobsResponse {
            jobs,
            next_page_token: next.map(|t| t.encode()).unwrap_or_default(),
        })
    }

    async fn cancel(&self, req: v1::CancelJobRequest) -> Result<v1::Job> {
        let id = parse_job_id("job_id", &req.job_id)?;
        let reason = domain::reason_text(&req.reason, "cancelled by user");
        let (row, failed) = store::cancel_job(&self.state.pool, id, &reason).await?;
        tracing::info!(job_id = %id, attempt = row.attempt, %reason, "job cancelled");
        for dependent in failed {
            tracing::info!(job_id = %dependent, attempt = 0, dependency = %id, "dependency cancelled");
        }
        let latest = store::latest_metrics(&self.state.pool, id).await?;
        let attempts = store::attempts_of(&self.state.pool, id).await?;
        job_to_proto(row, latest, attempts, None)
    }

    async fn metrics(&self, req: v1::GetMetricsRequest) -> Result<v1::GetMetricsResponse> {
        let query = MetricsQuery::try_from(req)?;
        let id = query.job_id;
        if store::get_job(&self.state.pool, id).await?.is_none() {
            return Err(Error::job_not_found(id));
        }
        let (points, next) = store::metric_page(&self.state.pool, &query).await?;
        Ok(v1::GetMetricsResponse {
            points: points.into_iter().map(Into::into).collect(),
            next_page_token: next.map(|t| t.encode()).unwrap_or_default(),
        })
    }
}

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<v1::SubmitJobRequest>,
    ) -> Result<Response<v1::SubmitJobResponse>, Status> {
        Ok(Response::new(self.submit(request.into_inner()).await?))
    }

    async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        Ok(Response::new(self.get(&request.into_inner().job_id).await?))
    }

    async fn list_jobs(
        &self,
        request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn cancel_job(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        Ok(Response::new(self.cancel(request.into_inner()).await?))
    }

    type WatchJobStream = Admitted<watch::JobEvents>;

    /// Admitted under the watch limits first (RESOURCE_EXHAUSTED past them); the first read
    /// holds a read slot like every later look.
    async fn watch_job(
        &self,
        request: Request<v1::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let permit = self.state.watch_limits.admit(request.remote_addr())?;
        let id = parse_job_id("job_id", &request.into_inner().job_id)?;
        let slot = self.state.watch_limits.read_slot().await;
        let events = watch::start(self.state.clone(), id, None).await?;
        drop(slot);
        Ok(Response::new(Admitted::new(events, permit)))
    }

    async fn get_metrics(
        &self,
        request: Request<v1::GetMetricsRequest>,
    ) -> Result<Response<v1::GetMetricsResponse>, Status> {
        Ok(Response::new(self.metrics(request.into_inner()).await?))
    }

    async fn list_artifacts(
        &self,
        request: Request<v1::ListArtifactsRequest>,
    ) -> Result<Response<v1::ListArtifactsResponse>, Status> {
        Ok(Response::new(
            artifacts::list(&self.state, request.into_inner()).await?,
        ))
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

    async fn submit_sweep(
        &self,
        request: Request<v1::SubmitSweepRequest>,
    ) -> Result<Response<v1::Sweep>, Status> {
        Ok(Response::new(
            sweeps::submit(&self.state, request.into_inner()).await?,
        ))
    }

    async fn get_sweep(
        &self,
        request: Request<v1::GetSweepRequest>,
    ) -> Result<Response<v1::Sweep>, Status> {
        Ok(Response::new(
            sweeps::get(&self.state, request.into_inner()).await?,
        ))
    }

    async fn list_sweeps(
        &self,
        request: Request<v1::ListSweepsRequest>,
    ) -> Result<Response<v1::ListSweepsResponse>, Status> {
        Ok(Response::new(
            sweeps::list(&self.state, request.into_inner()).await?,
        ))
    }

    async fn cancel_sweep(
        &self,
        request: Request<v1::CancelSweepRequest>,
    ) -> Result<Response<v1::Sweep>, Status> {
        Ok(Response::new(
            sweeps::cancel(&self.state, request.into_inner()).await?,
        ))
    }

    type WatchSweepStream = Admitted<sweeps::SweepEvents>;

    /// Admitted like WatchJob.
    async fn watch_sweep(
        &self,
        request: Request<v1::WatchSweepRequest>,
    ) -> Result<Response<Self::WatchSweepStream>, Status> {
        let permit = self.state.watch_limits.admit(request.remote_addr())?;
        let slot = self.state.watch_limits.read_slot().await;
        let events = sweeps::watch(self.state.clone(), request.into_inner()).await?;
        drop(slot);
        Ok(Response::new(Admitted::new(events, permit)))
    }

    async fn get_sweep_summary(
        &self,
        request: Request<v1::GetSweepSummaryRequest>,
    ) -> Result<Response<v1::SweepSummary>, Status> {
        Ok(Response::new(
            sweeps::summary(&self.state, request.into_inner()).await?,
        ))
    }

    async fn list_workers(
        &self,
        request: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        Ok(Response::new(
            fleet::list(&self.state, request.into_inner()).await?,
        ))
    }

    async fn get_worker(
        &self,
        request: Request<v1::GetWorkerRequest>,
    ) -> Result<Response<v1::Worker>, Status> {
        Ok(Response::new(
            fleet::get(&self.state, request.into_inner()).await?,
        ))
    }
}

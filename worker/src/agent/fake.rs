//! A coordinator stand-in for the agent's unit tests: a WorkerService that records the calls
//! it gets and answers from queues the test fills. Test-only; must not hold any logic the
//! agent relies on.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use proto::v1::upload_artifact_chunk::Part;
use proto::v1::worker_service_client::WorkerServiceClient;
use proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use proto::v1::{
    self as v1, ArtifactChunk, CompleteJobRequest, DownloadArtifactRequest, FailJobRequest,
    HeartbeatRequest, JobLease, ReleaseJobRequest, ReportMetricsRequest, UploadArtifactChunk,
    UploadArtifactHeader,
};
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use super::coordinator::Client;
use crate::train::{ArtifactFile, Event, Metric};
use client::connect::BearerToken;

#[derive(Default)]
pub struct State {
    /// `report N`, `upload NAME`, `heartbeat`, `download JOB KIND`, in arrival order.
    pub calls: Vec<String>,
    /// Each upload's header, data chunk sizes and bytes.
    pub uploads: Vec<(UploadArtifactHeader, Vec<usize>, Vec<u8>)>,
    pub upload_failures: VecDeque<Status>,
    /// Answers to the next ReportMetrics calls, before any succeeds.
    pub report_failures: VecDeque<Status>,
    pub downloads: VecDeque<Result<Vec<ArtifactChunk>, Status>>,
}

#[derive(Clone, Default)]
pub struct Fake(Arc<Mutex<State>>);

impl Fake {
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("fake state")
    }
}

#[tonic::async_trait]
impl WorkerService for Fake {
    async fn claim_job(
        &self,
        _: Request<v1::ClaimJobRequest>,
    ) -> Result<Response<v1::ClaimJobResponse>, Status> {
        Err(Status::unimplemented("claim"))
    }

    async fn heartbeat(
        &self,
        _: Request<HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        self.state().calls.push("heartbeat".into());
        Ok(Response::new(v1::HeartbeatResponse {
            keep_running: true,
            lease_expires_at: None,
        }))
    }

    async fn report_metrics(
        &self,
        r: Request<ReportMetricsRequest>,
    ) -> Result<Response<v1::ReportMetricsResponse>, Status> {
        let n = r.get_ref().points.len();
        let mut state = self.state();
        state.calls.push(format!("report {n}"));
        if let Some(status) = state.report_failures.pop_front() {
            return Err(status);
        }
        Ok(Response::new(v1::ReportMetricsResponse {
            stored: n as u32,
            conflicting: 0,
        }))
    }

    async fn complete_job(
        &self,
        _: Request<CompleteJobRequest>,
    ) -> Result<Response<v1::CompleteJobResponse>, Status> {
        Err(Status::unimplemented("complete"))
    }

    async fn fail_job(
        &self,
        _: Request<FailJobRequest>,
    ) -> Result<Response<v1::FailJobResponse>, Status> {
        Err(Status::unimplemented("fail"))
    }
    async fn release_job(
        &self,
        _: Request<ReleaseJobRequest>,
    ) -> Result<Response<v1::ReleaseJobResponse>, Status> {
        Err(Status::unimplemented("release"))
    }

    async fn worker_heartbeat(
        &self,
        _: Request<v1::WorkerHeartbeatRequest>,
    ) -> Result<Response<v1::WorkerHeartbeatResponse>, Status> {
        Err(Status::unimplemented("worker heartbeat"))
    }

    async fn upload_artifact(
        &self,
        r: Request<tonic::Streaming<UploadArtifactChunk>>,
    ) -> Result<Response<v1::Artifact>, Status> {
        let mut stream = r.into_inner();
        let mut header = None;
        let (mut sizes, mut bytes) = (Vec::new(), Vec::new());
        while let Some(chunk) = stream.message().await? {
            match chunk.part {
                Some(Part::Header(h)) if header.is_none() => header = Some(h),
                Some(Part::Data(d)) if header.is_some() => {
                    sizes.push(d.len());
                    bytes.extend(d);
                }
                _ => return Err(Status::invalid_argument("header first, then data")),
            }
        }
        let header = header.ok_or_else(|| Status::invalid_argument("no header"))?;
        let mut state = self.state();
        state.calls.push(format!("upload {}", header.name));
        if let Some(status) = state.upload_failures.pop_front() {
            return Err(status);
        }
        let artifact = v1::Artifact {
            kind: header.kind.clone(),
            name: header.name.clone(),
            size_bytes: header.size_bytes,
            sha256: header.sha256.clone(),
            ..Default::default()
        };
        state.uploads.push((header, sizes, bytes));
        Ok(Response::new(artifact))
    }

    type DownloadArtifactStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<ArtifactChunk, Status>>>;

    async fn download_artifact(
        &self,
        r: Request<DownloadArtifactRequest>,
    ) -> Result<Response<Self::DownloadArtifactStream>, Status> {
        let mut state = self.state();
        let r = r.into_inner();
        state
            .calls
            .push(format!("download {} {}", r.job_id, r.kind));
        match state.downloads.pop_front() {
            Some(Ok(chunks)) => Ok(Response::new(tokio_stream::iter(
                chunks.into_iter().map(Ok).collect::<Vec<_>>(),
            ))),
            Some(Err(status)) => Err(status),
            None => Err(Status::not_found("no such artifact")),
        }
    }
}

/// Serves `fake` on a free port and returns a client of it.
pub async fn serve(fake: Fake) -> Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_lazy();
    WorkerServiceClient::with_interceptor(channel, BearerToken::default())
}

pub fn lease() -> JobLease {
    JobLease {
        job_id: "0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b".into(),
        attempt: 2,
        worker_id: "w".into(),
    }
}

pub fn file(name: &str, len: usize) -> ArtifactFile {
    ArtifactFile {
        kind: "checkpoint".into(),
        name: name.into(),
        epoch: 3,
        step: 30,
        bytes: (0..len).map(|i| (i % 251) as u8).collect(),
    }
}

pub fn points(n: u64) -> Event {
    Event::Metrics(
        (1..=n)
            .map(|step| Metric {
                name: "train/loss".into(),
                step,
                epoch: 1,
                value: 0.5,
            })
            .collect(),
    )
}

pub fn chunks(bytes: &[u8], sha256: &str) -> Vec<ArtifactChunk> {
    let record = v1::Artifact {
        id: "a1".into(),
        kind: "checkpoint".into(),
        size_bytes: bytes.len() as u64,
        sha256: sha256.into(),
        ..Default::default()
    };
    let mut out: Vec<ArtifactChunk> = bytes
        .chunks(4)
        .map(|c| ArtifactChunk {
            artifact: None,
            data: c.to_vec(),
        })
        .collect();
    out[0].artifact = Some(record);
    out
}

//! What every area's tests share: [`TestServer`] (`server::run` in-process on 127.0.0.1:0, with a
//! database and Redis prefix of its own from the `tests` crate's [`Cleanup`]), the generated
//! clients, and builders of specs, claims and artifact uploads.
//!
//! Must not hold tests, and must not know where Postgres and Redis are (the `tests` crate does).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser as _;
use proto::v1::{
    self, job_service_client::JobServiceClient, worker_service_client::WorkerServiceClient,
};
use server::dispatch::Dispatcher;
use server::Config;
use sqlx::PgPool;
use tests::{free_port, redis_url, wait_until_serving, Cleanup, WAIT};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Code;

/// A coordinator running in this process.
pub struct TestServer {
    pub channel: Channel,
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    /// Straight to the server's database, for checks the API cannot make.
    pub pool: PgPool,
    /// The server's own Redis queue, seen from outside.
    pub queue: Dispatcher,
    /// The artifact directory of a `file://` store (empty for S3); removed at the end.
    pub artifacts: tempfile::TempDir,
    /// Where the server's Prometheus endpoint listens.
    pub metrics_addr: String,
    pub stop: oneshot::Sender<()>,
    pub task: JoinHandle<anyhow::Result<()>>,
    _cleanup: Cleanup,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(&redis_url(), &[]).await
    }

    /// `server_redis` is the server's REDIS_URL; the test observes the queue on the real Redis.
    pub async fn start_with(server_redis: &str, flags: &[&str]) -> Self {
        Self::start_configured(server_redis, flags, |_| {}).await
    }

    /// Like [`Self::start_with`], with a last say over the parsed configuration. Artifacts go
    /// to a temporary directory unless `flags` or `tweak` say otherwise.
    pub async fn start_configured(
        server_redis: &str,
        flags: &[&str],
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let artifacts = tempfile::tempdir().expect("artifact dir");
        let artifacts_url = format!("file://{}", artifacts.path().display());
        let cleanup = Cleanup::new();
        let db_url = cleanup.database_url();
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "trainq-server",
            "--metrics-listen",
            &metrics_addr,
            "--http-listen",
            "off",
            "--database-url",
            &db_url,
            "--redis-url",
            server_redis,
            "--redis-prefix",
            &cleanup.redis_prefix,
            "--reconcile-interval-ms",
            "100",
            "--retry-backoff-ms",
            "50",
            "--artifacts",
            &artifacts_url,
        ];
        args.extend_from_slice(flags);
        let mut config = Config::try_parse_from(args).expect("valid flags");
        tweak(&mut config);
        let (addr, stop, task) = spawn(config).await;
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_lazy();
        wait_until_serving(channel.clone()).await;
        let pool = PgPool::connect(&db_url)
            .await
            .expect("the server created its database");
        let queue = Dispatcher::new(&redis_url(), &cleanup.redis_prefix).expect("redis url");
        TestServer {
            channel,
            addr,
            pool,
            queue,
            artifacts,
            metrics_addr,
            stop,
            task,
            _cleanup: cleanup,
        }
    }

    /// The gRPC URI, for a client on a connection of its own.
    pub fn channel_uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::new(self.channel.clone())
    }

    pub fn workers(&self) -> WorkerServiceClient<Channel> {
        WorkerServiceClient::new(self.channel.clone())
    }

    pub async fn job_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Asks the server to stop; it must shut down cleanly and in time. Clean-up follows on drop.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server stops in time");
        result
            .expect("server task did not panic")
            .expect("server shut down cleanly");
        self.pool.close().await;
    }
}

/// Runs `server::run(config)` as a task, listening on a free port of 127.0.0.1: its address,
/// the sender that stops it, and the task.
pub async fn spawn(
    config: Config,
) -> (
    SocketAddr,
    oneshot::Sender<()>,
    JoinHandle<anyhow::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(server::run(config, listener, async {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

pub fn train(spec: &mut v1::JobSpec) -> &mut v1::Training {
    spec.training.get_or_insert_with(Default::default)
}

pub fn valid_spec() -> v1::JobSpec {
    v1::JobSpec {
        name: "mnist-smoke".into(),
        labels: [("team".to_string(), "vision".to_string())].into(),
        training: Some(v1::Training {
            epochs: 2,
            batch_size: 64,
            learning_rate: 1e-3,
            seed: 7,
            ..Default::default()
        }),
        max_attempts: 0,
        depends_on: vec![],
        experiment: Some(v1::job_spec::Experiment::MnistClassifier(
            v1::MnistClassifier {},
        )),
        ..Default::default()
    }
}

pub async fn submit(jobs: &mut JobServiceClient<Channel>, spec: v1::JobSpec) -> String {
    let resp = jobs
        .submit_job(v1::SubmitJobRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(resp.state(), v1::JobState::Queued);
    resp.job_id
}

pub async fn get(jobs: &mut JobServiceClient<Channel>, id: &str) -> v1::Job {
    jobs.get_job(v1::GetJobRequest { job_id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

pub fn point(name: &str, step: u64, value: f64) -> v1::MetricPoint {
    v1::MetricPoint {
        name: name.into(),
        step,
        epoch: 1,
        value,
    }
}

/// Waits until `check` holds, polling; panics with `what` after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn claim(workers: &mut WorkerServiceClient<Channel>, id: &str) -> v1::JobLease {
    let claim = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.into(),
            worker_id: "w".into(),
            ..Default::default()
        })
        .await
        .expect("claim")
        .into_inner();
    assert!(claim.claimed, "job {id} was claimable");
    claim.lease.expect("lease")
}

/// Claims a job that is in its retry backoff, as soon as the backoff has passed.
pub async fn claim_after_backoff(
    workers: &mut WorkerServiceClient<Channel>,
    id: &str,
) -> v1::JobLease {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let claim = workers
            .claim_job(v1::ClaimJobRequest {
                job_id: id.into(),
                worker_id: "w".into(),
                ..Default::default()
            })
            .await
            .expect("claim")
            .into_inner();
        if let Some(lease) = claim.lease {
            return lease;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} never became claimable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn claim_as(
    workers: &mut WorkerServiceClient<Channel>,
    id: &str,
    worker: &str,
) -> v1::ClaimJobResponse {
    workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.into(),
            worker_id: worker.into(),
            ..Default::default()
        })
        .await
        .expect("claim")
        .into_inner()
}

pub fn code_of<T>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// Deterministic bytes that differ from artifact to artifact.
pub fn content(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 131 + salt as usize * 7) % 251) as u8)
        .collect()
}

pub fn upload_header(
    lease: &v1::JobLease,
    kind: &str,
    name: &str,
    epoch: u32,
    data: &[u8],
) -> v1::UploadArtifactHeader {
    v1::UploadArtifactHeader {
        lease: Some(lease.clone()),
        kind: kind.into(),
        name: name.into(),
        epoch,
        size_bytes: data.len() as u64,
        sha256: sha256_hex(data),
        step: 0,
    }
}

/// The header, then `data` in chunks of `chunk` bytes.
pub fn upload_messages(
    header: v1::UploadArtifactHeader,
    data: &[u8],
    chunk: usize,
) -> Vec<v1::UploadArtifactChunk> {
    use v1::upload_artifact_chunk::Part;
    std::iter::once(Part::Header(header))
        .chain(data.chunks(chunk).map(|c| Part::Data(c.to_vec())))
        .map(|part| v1::UploadArtifactChunk { part: Some(part) })
        .collect()
}

pub async fn upload(
    workers: &mut WorkerServiceClient<Channel>,
    header: v1::UploadArtifactHeader,
    data: &[u8],
) -> Result<v1::Artifact, tonic::Status> {
    let messages = upload_messages(header, data, 1024 * 1024);
    workers
        .upload_artifact(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

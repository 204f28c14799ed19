//! The worker's async side: take job ids from Redis, claim them from the coordinator, fetch what
//! the job needs (a transfer's source checkpoint), hand it to the executor thread, and keep the
//! coordinator informed (heartbeats, metric batches, artifacts, the end).
//!
//! Ownership of a job comes only from a successful ClaimJob (a conditional update in Postgres);
//! every later write (metrics, artifact uploads, completion) names the claimed attempt. When the
//! coordinator says the lease is gone (cancelled, or expired and given to someone else) the agent
//! stops training and abandons the job without writing anything more. Coordinator hiccups do not
//! stop training: metrics and artifacts stay queued, in the order training produced them, and are
//! retried; everything queued is delivered before the job's end is recorded.
//!
//! A retried attempt resumes: the claim names the newest training state an earlier attempt stored
//! (`resume_from`), which the agent downloads and hands to the executor. On shutdown (SIGTERM) the
//! run stops at a step boundary and reports a training state; the agent delivers it and hands
//! the job back with ReleaseJob, which does not count as a failed attempt. Must not train on the
//! async runtime or touch Postgres.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::spec::{Cvae, Experiment, Init, JobSpec};
use proto::v1::upload_artifact_chunk::Part;
use proto::v1::worker_service_client::WorkerServiceClient;
use proto::v1::{
    Artifact, ClaimJobRequest, CompleteJobRequest, DownloadArtifactRequest, FailJobRequest,
    HeartbeatRequest, JobLease, MetricPoint, ReleaseJobRequest, ReportMetricsRequest,
    UploadArtifactChunk, UploadArtifactHeader,
};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;
use tracing::{info, info_span, warn, Instrument};

use crate::checkpoint;
use crate::config::MetricsListen;
use crate::config::ServeArgs;
use crate::dispatch::Queue;
use crate::executor::{Assignment, Executor};
use crate::metrics::{JobEnd, Metrics};
use crate::train::{ArtifactFile, Event, JobInputs, Metric, Outcome, TrainError};

/// Largest metric batch sent in one ReportMetrics call (the coordinator accepts 10,000).
const MAX_POINTS_PER_REPORT: usize = 5_000;
/// How long final reports are retried while the coordinator is unreachable.
const FINAL_REPORT_PATIENCE: Duration = Duration::from_secs(300);
/// Largest data chunk of an artifact upload (the coordinator accepts 4 MiB).
pub const UPLOAD_CHUNK_BYTES: usize = 1 << 20;
/// How long a popped job id is retried at ClaimJob while the coordinator is unreachable.
const CLAIM_PATIENCE: Duration = Duration::from_secs(30);
/// Tries at downloading a transfer's source checkpoint before the attempt fails (retryably).
const SOURCE_DOWNLOAD_TRIES: u32 = 5;

/// How long the agent pauses after the coordinator refused its token, so a misconfigured worker
/// logs an error now and then instead of spinning.
const REFUSED_PAUSE: Duration = Duration::from_secs(5);

/// The coordinator's WorkerService client, every call carrying the worker's token.
pub type Client = WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to every call (nothing when the worker has no token).
/// The value is marked sensitive, so it never shows in `Debug` output.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(Self(None));
        };
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow::anyhow!("the worker token must be printable ASCII"))?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<redacted>)"
        } else {
            "BearerToken(None)"
        })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The client of the coordinator at `args.coordinator`: over TLS trusting `--tls-ca` when given
/// (required for `https://`), with the worker's token on every call. Connects lazily.
pub fn connect(args: &ServeArgs) -> anyhow::Result<Client> {
    let mut endpoint = Endpoint::from_shared(args.coordinator.clone())
        .map_err(|e| anyhow::anyhow!("invalid coordinator address {}: {e}", args.coordinator))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(ca) = &args.tls_ca {
        let pem = std::fs::read(ca)
            .map_err(|e| anyhow::anyhow!("reading the TLS CA {}: {e}", ca.display()))?;
        // Other dependencies enable rustls's aws-lc-rs as well: choose ring explicitly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| anyhow::anyhow!("configuring TLS: {e}"))?;
    } else if args.coordinator.starts_with("https://") {
        anyhow::bail!("an https:// coordinator needs --tls-ca (TRAINQ_TLS_CA)");
    }
    let token = BearerToken::new(args.token.as_ref().map(|t| t.expose()))?;
    Ok(WorkerServiceClient::with_interceptor(
        endpoint.connect_lazy(),
        token,
    ))
}

/// The coordinator refused this worker's token (missing, unknown, or not a worker token).
fn is_refused(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unauthenticated | Code::PermissionDenied
    )
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on unix");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// Runs the worker until `shutdown` resolves. A job in progress at shutdown is stopped at a step
/// boundary and handed back to the coordinator for another attempt.
pub async fn serve(args: ServeArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let worker_id = args.worker_id.clone().unwrap_or_else(default_worker_id);
    let trainer_config = args.trainer.trainer_config()?;
    info!(%worker_id, device = ?trainer_config.device, coordinator = %args.coordinator, "worker starting");
    let metrics = Arc::new(Metrics::new(
        &worker_id,
        &format!("{:?}", trainer_config.device).to_lowercase(),
    ));
    if let MetricsListen::At(addr) = args.metrics_listen {
        // A port in use stops the start: two workers on one host need different addresses.
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!("binding the metrics endpoint {addr} (--metrics-listen): {e}")
        })?;
        info!(addr = %listener.local_addr()?, gpu = metrics.gpu_available(), "serving metrics on /metrics");
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(metrics, listener).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    let executor = Executor::spawn(trainer_config, args.trainer.torch_threads)?;
    let client = connect(&args)?;
    info!(
        auth = if args.token.is_some() {
            "token"
        } else {
            "none"
        },
        tls = args.tls_ca.is_some(),
        "coordinator client ready"
    );
    let keys = proto::queue::Keys::new(args.redis_prefix.clone());
    let mut queue = Queue::new(&args.redis_url, keys, Duration::from_secs(1))?;
    let agent = Agent {
        args,
        worker_id,
        client,
        executor,
        metrics,
    };

    tokio::pin!(shutdown);
    let mut backoff = Backoff::new();
    loop {
        let popped = tokio::select! {
            _ = &mut shutdown => break,
            popped = queue.pop() => popped,
        };
        let job_id = match popped {
            Ok(Some(id)) => {
                backoff.reset();
                id
            }
            Ok(None) => continue,
            Err(e) => {
                let wait = backoff.next();
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "redis pop failed");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        if agent.claim_and_run(&job_id, &mut shutdown).await == Flow::Shutdown {
            break;
        }
    }
    info!("worker stopped");
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Shutdown,
}

struct Agent {
    args: ServeArgs,
    worker_id: String,
    client: Client,
    executor: Executor,
    metrics: Arc<Metrics>,
}

impl Agent {
    async fn claim_and_run(
        &self,
        job_id: &str,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Flow {
        let mut client = self.client.clone();
        let request = ClaimJobRequest {
            job_id: job_id.to_string(),
            worker_id: self.worker_id.clone(),
        };
        // The popped id is gone from Redis: while the coordinator is unreachable (restarting),
        // keep trying for a while rather than leave the job to the reconciler's re-dispatch delay.
        let deadline = tokio::time::Instant::now() + CLAIM_PATIENCE;
        let mut backoff = Backoff::new();
        let claimed = loop {
            match client.claim_job(request.clone()).await {
                Ok(r) => break r.into_inner(),
                Err(status) if is_transient(&status) && tokio::time::Instant::now() < deadline => {
                    self.metrics.call_failed("claim");
                    let wait = backoff.next();
                    warn!(job_id, error = %status, retry_in_ms = wait.as_millis() as u64, "claim failed; retrying");
                    tokio::select! {
                        _ = &mut *shutdown => return Flow::Shutdown,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(status) if is_refused(&status) => {
                    // The job stays queued in Postgres; the reconciler re-dispatches it later.
                    tracing::error!(
                        job_id,
                        error = %status,
                        "the coordinator refused this worker's token; set --token \
                         (TRAINQ_WORKER_TOKEN) to one of the coordinator's TRAINQ_WORKER_TOKENS"
                    );
                    tokio::select! {
                        _ = &mut *shutdown => return Flow::Shutdown,
                        _ = tokio::time::sleep(REFUSED_PAUSE) => {}
                    }
                    return Flow::Continue;
                }
                Err(status) => {
                    // The job stays queued in Postgres; the coordinator's reconciler re-dispatches it.
                    warn!(job_id, error = %status, "claim failed");
                    return Flow::Continue;
                }
            }
        };
        let (Some(lease), true) = (claimed.lease, claimed.claimed) else {
            return Flow::Continue; // someone else has it, or it is no longer queued
        };
        let span = info_span!("job", job_id = %lease.job_id, attempt = lease.attempt);
        async {
            let spec = match claimed.spec.map(JobSpec::try_from) {
                Some(Ok(spec)) => spec,
                Some(Err(violation)) => {
                    let reason = format!("invalid spec: {violation}");
                    self.finish(
                        &lease,
                        Err(TrainError::Permanent(reason)),
                        Outbox::default(),
                    )
                    .await;
                    return Flow::Continue;
                }
                None => {
                    let reason = "claim returned no spec".to_string();
                    self.finish(
                        &lease,
                        Err(TrainError::Permanent(reason)),
                        Outbox::default(),
                    )
                    .await;
                    return Flow::Continue;
                }
            };
            info!(name = %spec.name, kind = spec.experiment.kind(), "job claimed");
            self.run(lease, spec, claimed.resume_from, shutdown).await
        }
        .instrument(span)
        .await
    }

    /// Trains one claimed job while heartbeating and reporting, then records how it ended.
    async fn run(
        &self,
        lease: JobLease,
        spec: JobSpec,
        resume_from: Option<Artifact>,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Flow {
        let inputs = match self.fetch_inputs(&lease, &spec).await {
            Ok(mut inputs) => {
                if let Some(state) = resume_from {
                    inputs.resume = self.fetch_training_state(&state).await;
                }
                inputs
            }
            Err(Fetch::LeaseLost) => {
                info!("lease lost while fetching the job's inputs; abandoning");
                return Flow::Continue;
            }
            Err(Fetch::Failed(e)) => {
                self.finish(&lease, Err(e), Outbox::default()).await;
                return Flow::Continue;
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        let (done_tx, mut done_rx) = oneshot::channel();
        let assignment = Assignment {
            spec,
            inputs,
            stop: stop.clone(),
            events: events_tx,
            done: done_tx,
            // Log lines of the training thread carry the job's id and attempt too.
            span: tracing::Span::current(),
        };
        if let Err(e) = self.executor.submit(assignment) {
            self.finish(
                &lease,
                Err(TrainError::Retryable(e.to_string())),
                Outbox::default(),
            )
            .await;
            return Flow::Shutdown;
        }
        self.metrics.job_started();

        let mut client = self.client.clone();
        let mut heartbeat =
            tokio::time::interval(Duration::from_millis(self.args.heartbeat_ms.max(50)));
        let mut report = tokio::time::interval(Duration::from_millis(self.args.report_ms.max(50)));
        let mut pending = Outbox::default();
        let mut lease_lost = false;
        let mut shutting_down = false;
        let result = loop {
            tokio::select! {
                result = &mut done_rx => {
                    break result.unwrap_or_else(|_| Err(TrainError::Retryable("executor thread died".into())));
                }
                Some(event) = events_rx.recv() => {
                    self.metrics.saw(&event);
                    pending.push(event);
                }
                _ = report.tick(), if !pending.is_empty() && !lease_lost => {
                    match pending.flush(&mut client, &lease).await {
                        Ok(()) => {}
                        Err(status) if is_stale(&status) => {
                            warn!(error = %status, "lease lost while reporting; stopping");
                            lease_lost = true;
                            stop.store(true, Ordering::Relaxed);
                        }
                        Err(status) => {
                            self.metrics.call_failed("report");
                            warn!(error = %status, buffered = pending.len(), "report failed; will retry");
                        }
                    }
                }
                _ = heartbeat.tick(), if !lease_lost => {
                    match client.heartbeat(HeartbeatRequest { lease: Some(lease.clone()) }).await {
                        Ok(r) if !r.get_ref().keep_running => {
                            info!("coordinator says stop (cancelled or lease lost)");
                            lease_lost = true;
                            stop.store(true, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(status) => {
                            self.metrics.call_failed("heartbeat");
                            warn!(error = %status, "heartbeat failed; training goes on");
                        }
                    }
                }
                _ = &mut *shutdown, if !shutting_down => {
                    info!("shutting down: stopping at the next step boundary");
                    shutting_down = true;
                    stop.store(true, Ordering::Relaxed);
                }
            }
        };
        while let Ok(event) = events_rx.try_recv() {
            self.metrics.saw(&event);
            pending.push(event);
        }
        if lease_lost {
            info!("job abandoned");
            self.metrics.job_ended(JobEnd::Abandoned);
        } else {
            self.metrics.job_ended(match &result {
                Ok(Outcome::Succeeded { .. }) => JobEnd::Succeeded,
                Ok(Outcome::Stopped { .. }) => JobEnd::HandedBack,
                Err(_) => JobEnd::Failed,
            });
            self.finish(&lease, result, pending).await;
        }
        if shutting_down {
            Flow::Shutdown
        } else {
            Flow::Continue
        }
    }

    /// What the job needs besides its spec: a transfer's source checkpoint, downloaded from the
    /// coordinator (the source job's newest `checkpoint` artifact, its SHA-256 checked). A source
    /// without a checkpoint fails the job for good; coordinator trouble is retried a few times
    /// (heartbeating in between, so the lease stays ours) and then fails this attempt only.
    async fn fetch_inputs(&self, lease: &JobLease, spec: &JobSpec) -> Result<JobInputs, Fetch> {
        let Experiment::CifarCvae(Cvae {
            init: Init::Transfer(transfer),
            ..
        }) = &spec.experiment
        else {
            return Ok(JobInputs::default());
        };
        let source = transfer.source_job_id.to_string();
        let source = source.as_str();
        let mut client = self.client.clone();
        let mut backoff = Backoff::new();
        let mut tries = 0;
        loop {
            tries += 1;
            let error = match download_checkpoint(&mut client, source).await {
                Ok(bytes) => {
                    info!(source, size = bytes.len(), "source checkpoint downloaded");
                    return Ok(JobInputs {
                        source_checkpoint: Some(bytes),
                        resume: None,
                    });
                }
                Err(Download::Status(status)) if status.code() == Code::NotFound => {
                    return Err(Fetch::Failed(TrainError::Permanent(format!(
                        "source job {source} has no checkpoint"
                    ))));
                }
                Err(Download::Status(status)) if status.code() == Code::InvalidArgument => {
                    return Err(Fetch::Failed(TrainError::Permanent(format!(
                        "source job {source}: {}",
                        status.message()
                    ))));
                }
                Err(e) => e,
            };
            if tries >= SOURCE_DOWNLOAD_TRIES {
                return Err(Fetch::Failed(TrainError::Retryable(format!(
                    "could not download source job {source}'s checkpoint: {error}"
                ))));
            }
            let wait = backoff.next();
            warn!(source, %error, retry_in_ms = wait.as_millis() as u64, "source checkpoint download failed");
            tokio::time::sleep(wait).await;
            match client
                .heartbeat(HeartbeatRequest {
                    lease: Some(lease.clone()),
                })
                .await
            {
                Ok(r) if !r.get_ref().keep_running => return Err(Fetch::LeaseLost),
                Ok(_) => {}
                Err(status) => warn!(error = %status, "heartbeat failed"),
            }
        }
    }

    /// The training state a retried attempt resumes from, downloaded by its artifact id (its
    /// size and SHA-256 checked). A state that is gone or corrupt, or that cannot be had after a
    /// few tries, is logged and the attempt starts from scratch: slower, never wrong.
    async fn fetch_training_state(&self, state: &Artifact) -> Option<Vec<u8>> {
        let mut client = self.client.clone();
        let mut backoff = Backoff::new();
        let request = DownloadArtifactRequest {
            artifact_id: state.id.clone(),
            job_id: String::new(),
            kind: String::new(),
        };
        for tries in 1..=SOURCE_DOWNLOAD_TRIES {
            match download(&mut client, request.clone()).await {
                Ok((_, bytes)) => {
                    info!(step = state.step, artifact = %state.id, size = bytes.len(), "training state downloaded");
                    return Some(bytes);
                }
                Err(Download::Status(status)) if status.code() == Code::NotFound => {
                    warn!(artifact = %state.id, "training state is gone; starting from scratch");
                    return None;
                }
                Err(e @ Download::Corrupt(_)) => {
                    warn!(artifact = %state.id, error = %e, "training state is corrupt; starting from scratch");
                    return None;
                }
                Err(e) if tries == SOURCE_DOWNLOAD_TRIES => {
                    warn!(artifact = %state.id, error = %e, "could not download the training state; starting from scratch");
                    return None;
                }
                Err(e) => {
                    let wait = backoff.next();
                    warn!(artifact = %state.id, error = %e, retry_in_ms = wait.as_millis() as u64, "training state download failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
        None
    }

    /// Sends what is still queued, then records how the attempt ended: CompleteJob (with the
    /// steps trained), ReleaseJob (stopped by a shutdown: hand the job back), or FailJob.
    /// Retries while the coordinator is unreachable (bounded by FINAL_REPORT_PATIENCE; after that
    /// the lease expires and the coordinator re-queues the job).
    async fn finish(
        &self,
        lease: &JobLease,
        result: Result<Outcome, TrainError>,
        mut pending: Outbox,
    ) {
        let mut client = self.client.clone();
        let deadline = tokio::time::Instant::now() + FINAL_REPORT_PATIENCE;
        let mut backoff = Backoff::new();
        loop {
            let outcome = async {
                pending.flush(&mut client, lease).await?;
                match &result {
                    Ok(Outcome::Succeeded { final_step }) => {
                        client
                            .complete_job(CompleteJobRequest {
                                lease: Some(lease.clone()),
                                final_step: *final_step,
                            })
                            .await?;
                    }
                    Ok(Outcome::Stopped { step }) => {
                        client
                            .release_job(ReleaseJobRequest {
                                lease: Some(lease.clone()),
                                reason: format!("worker shut down after step {step}; handed back"),
                            })
                            .await?;
                    }
                    Err(e) => {
                        let request = FailJobRequest {
                            lease: Some(lease.clone()),
                            reason: e.to_string(),
                            permanent: e.is_permanent(),
                        };
                        client.fail_job(request).await?;
                    }
                }
                Ok::<(), tonic::Status>(())
            }
            .await;
            match outcome {
                Ok(()) => {
                    match &result {
                        Ok(Outcome::Succeeded { final_step }) => {
                            info!(final_step, "job succeeded")
                        }
                        Ok(Outcome::Stopped { step }) => info!(step, "job handed back"),
                        Err(e) => warn!(error = %e, permanent = e.is_permanent(), "job failed"),
                    }
                    return;
                }
                Err(status) if is_stale(&status) => {
                    warn!(error = %status, "lease lost before the job could be recorded; abandoning");
                    return;
                }
                Err(status) if tokio::time::Instant::now() >= deadline => {
                    warn!(error = %status, "giving up on reporting the job's end; its lease will expire");
                    return;
                }
                Err(status) => {
                    let wait = backoff.next();
                    warn!(error = %status, retry_in_ms = wait.as_millis() as u64, "could not record the job's end");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Why a job's inputs could not be fetched.
enum Fetch {
    /// The coordinator says the lease is gone: abandon the job, write nothing.
    LeaseLost,
    /// Record this as the attempt's failure.
    Failed(TrainError),
}

/// What training produced and the coordinator has not stored yet, in the order it was produced.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<Outgoing>,
}

#[derive(Debug)]
enum Outgoing {
    Metrics(Vec<MetricPoint>),
    Artifact(ArtifactFile),
}

impl Outbox {
    /// Queues an event; consecutive metric batches merge into one, and a training state
    /// replaces any older one still queued (only the newest is worth sending).
    pub fn push(&mut self, event: Event) {
        match event {
            Event::Artifact(file) if file.kind == checkpoint::RESUME_KIND => {
                self.queue.retain(
                    |item| !matches!(item, Outgoing::Artifact(f) if f.kind == checkpoint::RESUME_KIND),
                );
                self.queue.push_back(Outgoing::Artifact(file));
            }
            Event::Metrics(batch) => {
                let points = batch.into_iter().map(to_wire);
                match self.queue.back_mut() {
                    Some(Outgoing::Metrics(queued)) => queued.extend(points),
                    _ => self.queue.push_back(Outgoing::Metrics(points.collect())),
                }
            }
            Event::Artifact(file) => self.queue.push_back(Outgoing::Artifact(file)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queued items: metric batches and artifacts.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Delivers the queue in order; an item leaves it only once the coordinator stored it. An
    /// artifact the coordinator refuses as invalid is dropped (with a warning): sending it again
    /// cannot succeed, and it must not hold back what follows.
    pub async fn flush(
        &mut self,
        client: &mut Client,
        lease: &JobLease,
    ) -> Result<(), tonic::Status> {
        while let Some(front) = self.queue.front_mut() {
            match front {
                Outgoing::Metrics(points) => send_metrics(client, lease, points).await?,
                Outgoing::Artifact(file) => match upload_artifact(client, lease, file).await {
                    Ok(stored) => {
                        info!(kind = %stored.kind, name = %stored.name, size = stored.size_bytes, "artifact stored")
                    }
                    Err(status) if status.code() == Code::InvalidArgument => {
                        warn!(kind = %file.kind, name = %file.name, error = %status, "artifact refused as invalid; dropping it")
                    }
                    Err(status) => return Err(status),
                },
            }
            self.queue.pop_front();
        }
        Ok(())
    }
}

/// Uploads one artifact: a header (lease, kind, name, epoch, size, lowercase hex SHA-256), then
/// the bytes in chunks of at most [`UPLOAD_CHUNK_BYTES`].
pub async fn upload_artifact(
    client: &mut Client,
    lease: &JobLease,
    file: &ArtifactFile,
) -> Result<proto::v1::Artifact, tonic::Status> {
    let header = UploadArtifactHeader {
        lease: Some(lease.clone()),
        kind: file.kind.clone(),
        name: file.name.clone(),
        epoch: file.epoch,
        size_bytes: file.bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(&file.bytes)),
        step: file.step,
    };
    let mut chunks = Vec::with_capacity(1 + file.bytes.len().div_ceil(UPLOAD_CHUNK_BYTES));
    chunks.push(UploadArtifactChunk {
        part: Some(Part::Header(header)),
    });
    chunks.extend(
        file.bytes
            .chunks(UPLOAD_CHUNK_BYTES)
            .map(|data| UploadArtifactChunk {
                part: Some(Part::Data(data.to_vec())),
            }),
    );
    Ok(client
        .upload_artifact(tokio_stream::iter(chunks))
        .await?
        .into_inner())
}

/// Why a checkpoint download failed.
#[derive(Debug, thiserror::Error)]
pub enum Download {
    #[error("{}", .0.message())]
    Status(#[from] tonic::Status),
    /// What arrived does not match its record (size, SHA-256) or has no record.
    #[error("{0}")]
    Corrupt(String),
}

/// The newest checkpoint of job `source` (the bytes, checked against the size and SHA-256 of the
/// record the first chunk carries).
pub async fn download_checkpoint(client: &mut Client, source: &str) -> Result<Vec<u8>, Download> {
    let request = DownloadArtifactRequest {
        artifact_id: String::new(),
        job_id: source.to_string(),
        kind: checkpoint::KIND.to_string(),
    };
    Ok(download(client, request).await?.1)
}

/// One artifact's record and bytes, the bytes checked against the record's size and SHA-256.
pub async fn download(
    client: &mut Client,
    request: DownloadArtifactRequest,
) -> Result<(Artifact, Vec<u8>), Download> {
    let mut stream = client.download_artifact(request).await?.into_inner();
    let mut record = None;
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        if record.is_none() {
            record = Some(chunk.artifact.ok_or_else(|| {
                Download::Corrupt("the first chunk carries no artifact record".into())
            })?);
        }
        bytes.extend_from_slice(&chunk.data);
    }
    let record = record.ok_or_else(|| Download::Corrupt("the download was empty".into()))?;
    if record.size_bytes != bytes.len() as u64 {
        return Err(Download::Corrupt(format!(
            "artifact {} should have {} bytes but {} arrived",
            record.id,
            record.size_bytes,
            bytes.len()
        )));
    }
    let digest = hex::encode(Sha256::digest(&bytes));
    if !digest.eq_ignore_ascii_case(&record.sha256) {
        return Err(Download::Corrupt(format!(
            "artifact {} should hash to {} but the bytes hash to {digest}",
            record.id, record.sha256
        )));
    }
    Ok((record, bytes))
}

/// Sends buffered points in chunks; points leave the buffer only once stored.
async fn send_metrics(
    client: &mut Client,
    lease: &JobLease,
    pending: &mut Vec<MetricPoint>,
) -> Result<(), tonic::Status> {
    while !pending.is_empty() {
        let n = pending.len().min(MAX_POINTS_PER_REPORT);
        let points = pending[..n].to_vec();
        client
            .report_metrics(ReportMetricsRequest {
                lease: Some(lease.clone()),
                points,
            })
            .await?;
        pending.drain(..n);
    }
    Ok(())
}

/// The coordinator (or its database) is unreachable for now: worth retrying.
fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// The coordinator refuses writes from an attempt that no longer holds the job.
fn is_stale(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::FailedPrecondition | Code::NotFound)
}

fn to_wire(m: Metric) -> MetricPoint {
    MetricPoint {
        name: m.name,
        step: m.step,
        epoch: m.epoch,
        value: m.value,
    }
}

/// Exponential backoff with jitter, from 100 ms up to 5 s.
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn new() -> Self {
        Self { attempt: 0 }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next(&mut self) -> Duration {
        let base = 100u64.saturating_mul(1 << self.attempt.min(6)).min(5_000);
        self.attempt += 1;
        let jitter = rand::random_range(0..=base / 2);
        Duration::from_millis(base / 2 + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
    use proto::v1::{self as v1, ArtifactChunk};
    use std::sync::Mutex;
    use tonic::{Request, Response, Status};

    /// What the fake coordinator saw, and what it answers next.
    #[derive(Default)]
    struct State {
        /// `report N`, `upload NAME`, `heartbeat`, `download JOB KIND`, in arrival order.
        calls: Vec<String>,
        /// Each upload's header, data chunk sizes and bytes.
        uploads: Vec<(UploadArtifactHeader, Vec<usize>, Vec<u8>)>,
        upload_failures: VecDeque<Status>,
        downloads: VecDeque<Result<Vec<ArtifactChunk>, Status>>,
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<State>>);

    impl Fake {
        fn state(&self) -> std::sync::MutexGuard<'_, State> {
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
            self.state().calls.push(format!("report {n}"));
            Ok(Response::new(v1::ReportMetricsResponse {
                stored: n as u32,
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
    async fn serve(fake: Fake) -> Client {
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

    #[test]
    fn the_worker_token_goes_into_every_call_as_a_bearer_header_and_never_into_debug_output() {
        use tonic::service::Interceptor as _;
        let mut token = BearerToken::new(Some(" s3cret-token ")).expect("token");
        let request = token.call(Request::new(())).expect("passes");
        let value = request.metadata().get("authorization").expect("header");
        assert_eq!(value.to_str().expect("ascii"), "Bearer s3cret-token");
        let shown = format!("{token:?} {:?}", request.metadata());
        assert!(!shown.contains("s3cret"), "{shown}");
        let mut none = BearerToken::new(None).expect("no token");
        let request = none.call(Request::new(())).expect("passes");
        assert!(request.metadata().get("authorization").is_none());

        use clap::Parser;
        let cli = crate::config::Cli::parse_from([
            "trainq-worker",
            "--coordinator",
            "https://coordinator:50051",
            "--token",
            "s3cret-token",
        ]);
        assert!(!format!("{cli:?}").contains("s3cret"));
        let err = connect(&cli.serve).expect_err("https needs a CA");
        assert!(err.to_string().contains("--tls-ca"), "{err}");
    }

    #[tokio::test]
    async fn over_tls_the_worker_client_trusts_its_ca_and_sends_its_token() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("self-signed certificate");
        let dir = tempfile::tempdir().expect("dir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, certified.cert.pem()).expect("write ca");
        let identity = tonic::transport::Identity::from_pem(
            certified.cert.pem(),
            certified.key_pair.serialize_pem(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        // The coordinator's side, reduced to what matters here: TLS and the header.
        let require_token = |request: Request<()>| match request.metadata().get("authorization") {
            Some(v) if v == "Bearer s3cret-token" => Ok(request),
            _ => Err(Status::unauthenticated("missing bearer token")),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .expect("tls")
                .add_service(InterceptedService::new(
                    WorkerServiceServer::new(Fake::default()),
                    require_token,
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let heartbeat = |mut client: Client| async move {
            client
                .heartbeat(HeartbeatRequest {
                    lease: Some(lease()),
                })
                .await
        };
        use clap::Parser;
        let coordinator = format!("https://localhost:{port}");
        let ca = ca.display().to_string();
        let args = |token: &[&str]| {
            let mut argv = vec![
                "trainq-worker",
                "--coordinator",
                &coordinator,
                "--tls-ca",
                &ca,
            ];
            argv.extend_from_slice(token);
            crate::config::Cli::parse_from(argv).serve
        };
        let with_token = connect(&args(&["--token", "s3cret-token"])).expect("client");
        heartbeat(with_token)
            .await
            .expect("served over TLS with the token");
        let without = connect(&args(&[])).expect("client");
        let err = heartbeat(without).await.expect_err("no token");
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(is_refused(&err));
    }

    fn lease() -> JobLease {
        JobLease {
            job_id: "0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b".into(),
            attempt: 2,
            worker_id: "w".into(),
        }
    }

    fn file(name: &str, len: usize) -> ArtifactFile {
        ArtifactFile {
            kind: "checkpoint".into(),
            name: name.into(),
            epoch: 3,
            step: 30,
            bytes: (0..len).map(|i| (i % 251) as u8).collect(),
        }
    }

    fn points(n: u64) -> Event {
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

    #[tokio::test]
    async fn an_artifact_uploads_as_a_header_then_chunks_of_at_most_one_mebibyte() {
        let fake = Fake::default();
        let mut client = serve(fake.clone()).await;
        let f = file("epoch-003.safetensors", 2 * UPLOAD_CHUNK_BYTES + 1000);
        let stored = upload_artifact(&mut client, &lease(), &f)
            .await
            .expect("uploaded");
        assert_eq!(stored.name, "epoch-003.safetensors");
        let state = fake.state();
        let (header, sizes, bytes) = &state.uploads[0];
        assert_eq!(header.lease, Some(lease()));
        assert_eq!(
            (header.kind.as_str(), header.name.as_str(), header.epoch),
            ("checkpoint", "epoch-003.safetensors", 3)
        );
        assert_eq!(header.size_bytes, f.bytes.len() as u64);
        assert_eq!(header.sha256, hex::encode(Sha256::digest(&f.bytes)));
        assert_eq!(header.sha256, header.sha256.to_lowercase());
        assert_eq!(sizes, &vec![UPLOAD_CHUNK_BYTES, UPLOAD_CHUNK_BYTES, 1000]);
        assert_eq!(bytes, &f.bytes);
    }

    #[test]
    fn a_queued_training_state_is_replaced_by_a_newer_one_and_nothing_else_is() {
        let state = |step: u64| {
            Event::Artifact(ArtifactFile {
                kind: checkpoint::RESUME_KIND.into(),
                name: checkpoint::resume_file_name(step),
                epoch: 1,
                step,
                bytes: vec![1, 2, 3],
            })
        };
        let mut outbox = Outbox::default();
        outbox.push(state(4));
        outbox.push(Event::Artifact(file("epoch-001.safetensors", 8)));
        outbox.push(state(8));
        outbox.push(state(12));
        let queued: Vec<String> = outbox
            .queue
            .iter()
            .map(|item| match item {
                Outgoing::Artifact(f) => f.name.clone(),
                Outgoing::Metrics(_) => "metrics".into(),
            })
            .collect();
        assert_eq!(
            queued,
            ["epoch-001.safetensors", "step-000000012.safetensors"]
        );
    }

    #[tokio::test]
    async fn the_outbox_delivers_metrics_and_artifacts_in_order_and_keeps_what_failed() {
        let fake = Fake::default();
        fake.state()
            .upload_failures
            .push_back(Status::unavailable("store down"));
        let mut client = serve(fake.clone()).await;
        let mut outbox = Outbox::default();
        outbox.push(points(2));
        outbox.push(Event::Artifact(file("epoch-001.safetensors", 10)));
        outbox.push(points(3));
        outbox.push(points(1));
        assert_eq!(outbox.len(), 3, "consecutive metric batches merge");

        let err = outbox
            .flush(&mut client, &lease())
            .await
            .expect_err("the upload fails once");
        assert_eq!(err.code(), Code::Unavailable);
        assert!(!is_stale(&err));
        assert_eq!(outbox.len(), 2, "the artifact and what follows stay queued");
        outbox
            .flush(&mut client, &lease())
            .await
            .expect("delivered");
        assert!(outbox.is_empty());
        assert_eq!(
            fake.state().calls,
            vec![
                "report 2",
                "upload epoch-001.safetensors",
                "upload epoch-001.safetensors",
                "report 4"
            ]
        );

        // A lost lease is reported as such; an invalid artifact is dropped, not retried forever.
        fake.state().upload_failures.extend([
            Status::failed_precondition("stale attempt"),
            Status::invalid_argument("bad name"),
        ]);
        outbox.push(Event::Artifact(file("a.png", 1)));
        let err = outbox
            .flush(&mut client, &lease())
            .await
            .expect_err("stale");
        assert!(is_stale(&err));
        outbox.push(points(1));
        outbox
            .flush(&mut client, &lease())
            .await
            .expect("dropped, then the rest");
        assert!(outbox.is_empty());
        assert_eq!(
            fake.state().calls.last().map(String::as_str),
            Some("report 1")
        );
    }

    fn chunks(bytes: &[u8], sha256: &str) -> Vec<ArtifactChunk> {
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

    #[tokio::test]
    async fn a_downloaded_checkpoint_is_concatenated_and_checked_against_its_sha256() {
        let fake = Fake::default();
        let bytes = b"ten bytes!".to_vec();
        let good = hex::encode(Sha256::digest(&bytes));
        fake.state().downloads.extend([
            Ok(chunks(&bytes, &good)),
            Ok(chunks(&bytes, &"0".repeat(64))),
            Err(Status::not_found("job has no checkpoint artifact")),
        ]);
        let mut client = serve(fake.clone()).await;
        let source = "0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b";
        let got = download_checkpoint(&mut client, source).await.expect("ok");
        assert_eq!(got, bytes);
        let err = download_checkpoint(&mut client, source)
            .await
            .expect_err("bad hash");
        assert!(
            matches!(err, Download::Corrupt(ref m) if m.contains("hash")),
            "{err}"
        );
        let err = download_checkpoint(&mut client, source)
            .await
            .expect_err("none");
        assert!(matches!(err, Download::Status(ref s) if s.code() == Code::NotFound));
        assert_eq!(
            fake.state().calls[0],
            format!("download {source} checkpoint")
        );
    }

    fn agent(client: Client) -> Agent {
        use clap::Parser;
        let cli = crate::config::Cli::parse_from(["trainq-worker", "--device", "cpu"]);
        let config = cli.serve.trainer.trainer_config().expect("config");
        Agent {
            args: cli.serve,
            worker_id: "w".into(),
            client,
            executor: Executor::spawn(config, 1).expect("executor"),
            metrics: Arc::new(Metrics::new("w", "cpu")),
        }
    }

    fn transfer_spec(source: &str) -> JobSpec {
        JobSpec::from_json(&format!(
            r#"{{"name":"t","training":{{"epochs":1,"batchSize":8,"learningRate":0.001}},
                "cifarCvae":{{"init":{{"transfer":{{"sourceJobId":"{source}",
                "conv1":"CONV1_ADAPTATION_LUMINANCE"}}}}}}}}"#
        ))
        .expect("spec")
    }

    #[tokio::test]
    async fn a_transfer_fetches_its_source_retrying_transient_errors_and_fails_without_one() {
        let fake = Fake::default();
        let bytes = b"checkpoint".to_vec();
        let sha = hex::encode(Sha256::digest(&bytes));
        fake.state().downloads.extend([
            Err(Status::unavailable("restarting")),
            Ok(chunks(&bytes, &sha)),
        ]);
        let agent = agent(serve(fake.clone()).await);
        let source = "0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b";
        let inputs = match agent.fetch_inputs(&lease(), &transfer_spec(source)).await {
            Ok(inputs) => inputs,
            Err(_) => panic!("fetched after one retry"),
        };
        assert_eq!(inputs.source_checkpoint, Some(bytes));
        assert_eq!(
            fake.state().calls,
            vec![
                format!("download {source} checkpoint"),
                "heartbeat".to_string(),
                format!("download {source} checkpoint"),
            ],
            "the lease is renewed between tries"
        );

        // The fake answers NOT_FOUND once its downloads run out.
        match agent.fetch_inputs(&lease(), &transfer_spec(source)).await {
            Err(Fetch::Failed(e)) => {
                assert!(e.is_permanent());
                assert_eq!(
                    e.to_string(),
                    format!("source job {source} has no checkpoint")
                );
            }
            _ => panic!("a source without a checkpoint fails the job"),
        }

        let random = JobSpec::from_json(
            r#"{"name":"r","training":{"epochs":1,"batchSize":8,"learningRate":0.001},"cifarCvae":{}}"#,
        )
        .expect("spec");
        let calls = fake.state().calls.len();
        match agent.fetch_inputs(&lease(), &random).await {
            Ok(inputs) => assert!(inputs.source_checkpoint.is_none()),
            Err(_) => panic!("nothing to fetch"),
        }
        assert_eq!(fake.state().calls.len(), calls, "no call for a random init");
    }
}

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
//!
//! Slots: `--slots N` runs N copies of the serve loop, each with its own Redis connection and
//! executor thread; they share the client, the metrics and the data sets on the device, and each
//! job has its own lease, heartbeat, outbox and stop flag, so cancelling one stops only its slot.
//!
//! Layout: this module is the serve loop (pop, claim, run, finish); [`heartbeat`] renews the
//! lease from the claim to the attempt's last call, independent of every other call;
//! [`outbox`] delivers metric batches and artifacts in order; [`transfer`] moves artifacts over
//! gRPC; [`coordinator`] is the client and what its errors mean; [`fleet`] reports the worker as
//! a whole (slots, queues, devices); [`concurrency`] says which slots may take a job. Those
//! modules never import this one. Retries wait by `client::retry` (backon).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::spec::{Cvae, Experiment, Init, JobSpec};
use proto::v1::{
    Artifact, ClaimJobRequest, CompleteJobRequest, DownloadArtifactRequest, FailJobRequest,
    HeartbeatRequest, JobLease, ReleaseJobRequest,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::{info, info_span, warn, Instrument};

use crate::config::MetricsListen;
use crate::config::ServeArgs;
use crate::dispatch::Queue;
use crate::executor::{Assignment, Executor};
use crate::metrics::{JobEnd, Metrics};
use crate::train::trainer::SharedData;
use crate::train::{JobInputs, Outcome, TrainError};
use concurrency::Concurrency;

pub mod concurrency;
pub mod coordinator;
#[cfg(test)]
mod fake;
pub mod fleet;
pub mod heartbeat;
pub mod outbox;
pub mod transfer;

pub use coordinator::{connect, Client};
use coordinator::{is_refused, is_stale, is_transient};
use heartbeat::Heartbeat;
use outbox::Outbox;
use transfer::{download, download_checkpoint, Download};

/// How long final reports are retried while the coordinator is unreachable.
const FINAL_REPORT_PATIENCE: Duration = Duration::from_secs(300);
/// How long a popped job id is retried at ClaimJob while the coordinator is unreachable.
const CLAIM_PATIENCE: Duration = Duration::from_secs(30);
/// Tries at downloading a transfer's source checkpoint before the attempt fails (retryably).
const SOURCE_DOWNLOAD_TRIES: u32 = 5;

/// How long the agent pauses after the coordinator refused its token, so a misconfigured worker
/// logs an error now and then instead of spinning.
const REFUSED_PAUSE: Duration = Duration::from_secs(5);

/// The next wait of a retry loop (the policy's cap once it has none left).
fn next_wait(delays: &mut impl Iterator<Item = Duration>) -> Duration {
    delays.next().unwrap_or(client::retry::MAX_DELAY)
}

fn default_worker_id() -> String {
    let host = Some(fleet::host_name())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// Runs the worker until `shutdown` resolves: `--slots` slots, each its own loop of pop, claim
/// and train on its own executor thread (the data sets on the device are shared by all). A job in
/// progress at shutdown is stopped at a step boundary and handed back to the coordinator for
/// another attempt; every slot does that for its own job.
pub async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let worker_id = args.worker_id.clone().unwrap_or_else(default_worker_id);
    let trainer_config = args.trainer.trainer_config()?;
    let cuda = trainer_config.device.is_cuda();
    let metrics = Arc::new(Metrics::new(
        &worker_id,
        &format!("{:?}", trainer_config.device).to_lowercase(),
    ));
    let slots = args.slot_count(cuda, metrics.gpu_memory_mib(&trainer_config.device));
    let threads = args.threads_per_slot(slots);
    info!(
        %worker_id,
        device = ?trainer_config.device,
        coordinator = %args.coordinator,
        slots,
        torch_threads_per_slot = threads,
        queues = %args.queues.0.join(","),
        "worker starting"
    );
    metrics.set_slots(slots);
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
    let data = SharedData::default();
    let mut loops = Vec::new();
    for slot in 0..slots as usize {
        let executor = Executor::spawn_slot(slot, trainer_config.clone(), threads, data.clone())?;
        let queue = Queue::new(
            &args.redis_url,
            &keys,
            &args.queues.0,
            Duration::from_secs(1),
        )?;
        loops.push((executor, queue));
    }
    tokio::spawn(fleet::report(
        client.clone(),
        fleet::Identity {
            worker_id: worker_id.clone(),
            device: trainer_config.device,
            slots,
            queues: args.queues.0.clone(),
        },
        metrics.clone(),
        Duration::from_millis(args.heartbeat_ms.max(50)),
        shutdown.clone(),
    ));
    let agent = Arc::new(Agent {
        args,
        worker_id,
        client,
        metrics,
        concurrency: Concurrency::new(slots),
        device: trainer_config.device,
    });
    let mut running = tokio::task::JoinSet::new();
    for (slot, (executor, queue)) in loops.into_iter().enumerate() {
        let (agent, shutdown) = (agent.clone(), shutdown.clone());
        running.spawn(
            async move {
                agent
                    .serve_slot(slot as u32, &executor, queue, &shutdown)
                    .await
            }
            .instrument(info_span!("slot", slot)),
        );
    }
    while let Some(ended) = running.join_next().await {
        if let Err(e) = ended {
            tracing::error!(error = %e, "a slot's loop panicked");
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
    metrics: Arc<Metrics>,
    /// Which slots may take a job now (fewer for a while after an out-of-memory failure).
    concurrency: Concurrency,
    /// The training device (what a claim says it can run).
    device: tch::Device,
}

impl Agent {
    /// Slot `slot`: pop a job id from the served queues, claim it and train it on `executor`,
    /// until shutdown (or until its executor thread is gone); it pauses while
    /// [`Concurrency`] has it out of service.
    async fn serve_slot(
        &self,
        slot: u32,
        executor: &Executor,
        mut queue: Queue,
        shutdown: &CancellationToken,
    ) {
        let mut delays = client::retry::delays();
        loop {
            if !self.concurrency.allows(slot, std::time::Instant::now()) {
                // Out of service for a while after an out-of-memory failure beside others.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
            let popped = tokio::select! {
                _ = shutdown.cancelled() => break,
                popped = queue.pop() => popped,
            };
            let job_id = match popped {
                Ok(Some(id)) => {
                    delays = client::retry::delays();
                    id
                }
                Ok(None) => continue,
                Err(e) => {
                    let wait = next_wait(&mut delays);
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "redis pop failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            if self.claim_and_run(executor, &job_id, shutdown).await == Flow::Shutdown {
                break;
            }
        }
    }

    async fn claim_and_run(
        &self,
        executor: &Executor,
        job_id: &str,
        shutdown: &CancellationToken,
    ) -> Flow {
        let mut client = self.client.clone();
        // What this slot can run: a job whose resources do not fit stays queued for another.
        let free_gpu_memory_mib = self
            .metrics
            .gpu_memory_bytes(&self.device)
            .map(|(total, used)| (total.saturating_sub(used) / (1024 * 1024)) as u32);
        let request = ClaimJobRequest {
            job_id: job_id.to_string(),
            worker_id: self.worker_id.clone(),
            device_kind: if self.device.is_cuda() { "cuda" } else { "cpu" }.to_string(),
            free_gpu_memory_mib,
        };
        // The popped id is gone from Redis: while the coordinator is unreachable (restarting),
        // keep trying for a while rather than leave the job to the reconciler's re-dispatch delay.
        let deadline = tokio::time::Instant::now() + CLAIM_PATIENCE;
        let mut delays = client::retry::delays();
        let claimed = loop {
            match client.claim_job(request.clone()).await {
                Ok(r) => break r.into_inner(),
                Err(status) if is_transient(&status) && tokio::time::Instant::now() < deadline => {
                    self.metrics.call_failed("claim");
                    let wait = next_wait(&mut delays);
                    warn!(job_id, error = %status, retry_in_ms = wait.as_millis() as u64, "claim failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Flow::Shutdown,
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
                        _ = shutdown.cancelled() => return Flow::Shutdown,
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
            // From the claim to the attempt's last call, the lease is renewed by its own task.
            let stop = Arc::new(AtomicBool::new(false));
            let heartbeat = self.start_heartbeat(&lease, stop.clone());
            let flow = self
                .start(
                    executor,
                    lease,
                    claimed.spec,
                    claimed.resume_from,
                    stop,
                    &heartbeat,
                    shutdown,
                )
                .await;
            heartbeat.stop().await;
            flow
        }
        .instrument(span)
        .await
    }

    /// Renews `lease` every `--heartbeat-ms` until stopped; a lost lease raises `stop`.
    fn start_heartbeat(&self, lease: &JobLease, stop: Arc<AtomicBool>) -> Heartbeat {
        let client = self.client.clone();
        let request = HeartbeatRequest {
            lease: Some(lease.clone()),
        };
        let metrics = self.metrics.clone();
        Heartbeat::spawn(
            Duration::from_millis(self.args.heartbeat_ms.max(50)),
            move || {
                let mut client = client.clone();
                let request = request.clone();
                async move {
                    let answer = client.heartbeat(request).await?;
                    Ok(answer.into_inner().keep_running)
                }
            },
            move |_| metrics.call_failed("heartbeat"),
            move || stop.store(true, Ordering::Relaxed),
        )
    }

    /// Parses the claimed spec and runs the job; an unusable spec fails it for good.
    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        executor: &Executor,
        lease: JobLease,
        spec: Option<proto::v1::JobSpec>,
        resume_from: Option<Artifact>,
        stop: Arc<AtomicBool>,
        heartbeat: &Heartbeat,
        shutdown: &CancellationToken,
    ) -> Flow {
        let spec = match spec.map(JobSpec::try_from) {
            Some(Ok(spec)) => spec,
            refused => {
                let reason = match refused {
                    Some(Err(violation)) => format!("invalid spec: {violation}"),
                    _ => "claim returned no spec".to_string(),
                };
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
        self.run(
            executor,
            lease,
            spec,
            resume_from,
            stop,
            heartbeat,
            shutdown,
        )
        .await
    }

    /// Trains one claimed job while heartbeating and reporting, then records how it ended.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        executor: &Executor,
        lease: JobLease,
        spec: JobSpec,
        resume_from: Option<Artifact>,
        stop: Arc<AtomicBool>,
        heartbeat: &Heartbeat,
        shutdown: &CancellationToken,
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
        if heartbeat.is_lost() {
            info!("lease lost while fetching the job's inputs; abandoning");
            return Flow::Continue;
        }
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
        if let Err(e) = executor.submit(assignment) {
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
                _ = heartbeat.lost(), if !lease_lost => {
                    lease_lost = true;
                    stop.store(true, Ordering::Relaxed);
                }
                _ = shutdown.cancelled(), if !shutting_down => {
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
        // The heartbeat may have learnt it while the last report was being sent.
        lease_lost |= heartbeat.is_lost();
        if lease_lost {
            info!("job abandoned");
            self.metrics.job_ended(JobEnd::Abandoned);
        } else {
            if let Err(e) = &result {
                if e.is_out_of_memory() {
                    let busy = self.metrics.slots_busy();
                    let serving = self
                        .concurrency
                        .out_of_memory(busy, std::time::Instant::now());
                    warn!(
                        busy,
                        slots_in_service = serving,
                        "out of memory beside other jobs: fewer slots take jobs for a while"
                    );
                }
            }
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
        let mut delays = client::retry::delays();
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
            let wait = next_wait(&mut delays);
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
        let mut delays = client::retry::delays();
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
                    let wait = next_wait(&mut delays);
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
        let mut delays = client::retry::delays();
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
                    let wait = next_wait(&mut delays);
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

#[cfg(test)]
mod tests {
    use super::fake::{chunks, lease, serve, Fake};
    use super::*;
    use sha2::{Digest, Sha256};
    use tonic::Status;

    fn agent(client: Client) -> Agent {
        use clap::Parser;
        let cli = crate::config::Cli::parse_from(["trainq-worker", "--device", "cpu"]);
        Agent {
            args: cli.serve,
            worker_id: "w".into(),
            client,
            metrics: Arc::new(Metrics::new("w", "cpu")),
            concurrency: Concurrency::new(1),
            device: tch::Device::Cpu,
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

//! The worker's async side: take job ids from Redis, claim them from the coordinator, hand them to
//! the executor thread, and keep the coordinator informed (heartbeats, metric batches, the end).
//!
//! Ownership of a job comes only from a successful ClaimJob (a conditional update in Postgres);
//! every later write names the claimed attempt. When the coordinator says the lease is gone
//! (cancelled, or expired and given to someone else) the agent stops training and abandons the
//! job without writing anything more. Coordinator hiccups do not stop training: reports stay
//! buffered and are retried. Must not train on the async runtime or touch Postgres.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::spec::JobSpec;
use proto::v1::worker_service_client::WorkerServiceClient;
use proto::v1::{
    ClaimJobRequest, CompleteJobRequest, FailJobRequest, HeartbeatRequest, JobLease, MetricPoint,
    ReportMetricsRequest,
};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tracing::{info, info_span, warn, Instrument};

use crate::config::ServeArgs;
use crate::dispatch::Queue;
use crate::executor::{Assignment, Executor};
use crate::train::{Metric, Outcome, TrainError};

/// Largest metric batch sent in one ReportMetrics call (the coordinator accepts 10,000).
const MAX_POINTS_PER_REPORT: usize = 5_000;
/// How long final reports are retried while the coordinator is unreachable.
const FINAL_REPORT_PATIENCE: Duration = Duration::from_secs(300);

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
    let executor = Executor::spawn(trainer_config, args.trainer.torch_threads)?;
    let channel = Endpoint::from_shared(args.coordinator.clone())
        .map_err(|e| anyhow::anyhow!("invalid coordinator address {}: {e}", args.coordinator))?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let client = WorkerServiceClient::new(channel);
    let keys = proto::queue::Keys::new(args.redis_prefix.clone());
    let mut queue = Queue::new(&args.redis_url, keys, Duration::from_secs(1))?;
    let agent = Agent {
        args,
        worker_id,
        client,
        executor,
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
    client: WorkerServiceClient<Channel>,
    executor: Executor,
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
        let claimed = match client.claim_job(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                // The job stays queued in Postgres; the coordinator's reconciler re-dispatches it.
                warn!(job_id, error = %status, "claim failed");
                return Flow::Continue;
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
                    self.finish(&lease, Err(TrainError::Permanent(reason)), Vec::new())
                        .await;
                    return Flow::Continue;
                }
                None => {
                    let reason = "claim returned no spec".to_string();
                    self.finish(&lease, Err(TrainError::Permanent(reason)), Vec::new())
                        .await;
                    return Flow::Continue;
                }
            };
            info!(name = %spec.name, kind = spec.experiment.kind(), "job claimed");
            self.run(lease, spec, shutdown).await
        }
        .instrument(span)
        .await
    }

    /// Trains one claimed job while heartbeating and reporting, then records how it ended.
    async fn run(
        &self,
        lease: JobLease,
        spec: JobSpec,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Flow {
        let stop = Arc::new(AtomicBool::new(false));
        let (metrics_tx, mut metrics_rx) = mpsc::unbounded_channel();
        let (done_tx, mut done_rx) = oneshot::channel();
        let assignment = Assignment {
            spec,
            stop: stop.clone(),
            metrics: metrics_tx,
            done: done_tx,
        };
        if let Err(e) = self.executor.submit(assignment) {
            self.finish(
                &lease,
                Err(TrainError::Retryable(e.to_string())),
                Vec::new(),
            )
            .await;
            return Flow::Shutdown;
        }

        let mut client = self.client.clone();
        let mut heartbeat =
            tokio::time::interval(Duration::from_millis(self.args.heartbeat_ms.max(50)));
        let mut report = tokio::time::interval(Duration::from_millis(self.args.report_ms.max(50)));
        let mut pending: Vec<MetricPoint> = Vec::new();
        let mut lease_lost = false;
        let mut shutting_down = false;
        let result = loop {
            tokio::select! {
                result = &mut done_rx => {
                    break result.unwrap_or_else(|_| Err(TrainError::Retryable("executor thread died".into())));
                }
                Some(batch) = metrics_rx.recv() => pending.extend(batch.into_iter().map(to_wire)),
                _ = report.tick(), if !pending.is_empty() && !lease_lost => {
                    match send_metrics(&mut client, &lease, &mut pending).await {
                        Ok(()) => {}
                        Err(status) if is_stale(&status) => {
                            warn!(error = %status, "lease lost while reporting; stopping");
                            lease_lost = true;
                            stop.store(true, Ordering::Relaxed);
                        }
                        Err(status) => warn!(error = %status, buffered = pending.len(), "report failed; will retry"),
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
                        Err(status) => warn!(error = %status, "heartbeat failed; training goes on"),
                    }
                }
                _ = &mut *shutdown, if !shutting_down => {
                    info!("shutting down: stopping at the next step boundary");
                    shutting_down = true;
                    stop.store(true, Ordering::Relaxed);
                }
            }
        };
        while let Ok(batch) = metrics_rx.try_recv() {
            pending.extend(batch.into_iter().map(to_wire));
        }
        if lease_lost {
            info!("job abandoned");
        } else {
            let result = match result {
                Ok(Outcome::Stopped) if shutting_down => Err(TrainError::Retryable(
                    "worker shut down before the job finished".into(),
                )),
                other => other,
            };
            self.finish(&lease, result, pending).await;
        }
        if shutting_down {
            Flow::Shutdown
        } else {
            Flow::Continue
        }
    }

    /// Sends what is still buffered, then CompleteJob or FailJob, retrying while the coordinator
    /// is unreachable (bounded by FINAL_REPORT_PATIENCE; after that the lease expires and the
    /// coordinator re-queues the job).
    async fn finish(
        &self,
        lease: &JobLease,
        result: Result<Outcome, TrainError>,
        mut pending: Vec<MetricPoint>,
    ) {
        let mut client = self.client.clone();
        let deadline = tokio::time::Instant::now() + FINAL_REPORT_PATIENCE;
        let mut backoff = Backoff::new();
        loop {
            let outcome = async {
                send_metrics(&mut client, lease, &mut pending).await?;
                match &result {
                    Ok(_) => {
                        client
                            .complete_job(CompleteJobRequest {
                                lease: Some(lease.clone()),
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
                        Ok(_) => info!("job succeeded"),
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

/// Sends buffered points in chunks; points leave the buffer only once stored.
async fn send_metrics(
    client: &mut WorkerServiceClient<Channel>,
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

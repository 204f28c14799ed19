//! The outbox: what training produced (metric batches, artifacts) and the coordinator has not
//! stored yet, delivered in the order it was produced; consecutive metric batches merge, a newer
//! training state replaces an older one still queued. An item leaves only once stored, or once
//! refused as invalid ([`on_refusal`]): a refused item is dropped with one warning and the job
//! goes on.
//!
//! Must not retry by itself or decide what a lost lease means: `flush` returns the first error
//! worth retrying (or the stale lease) to the agent, which retries on its report timer.

use std::collections::VecDeque;

use proto::v1::{JobLease, MetricPoint, ReportMetricsRequest};
use tonic::Code;
use tracing::{info, warn};

use super::coordinator::{is_stale, Client};
use super::transfer::upload_artifact;
use crate::checkpoint;
use crate::train::{ArtifactFile, Event, Metric};

/// Largest metric batch sent in one ReportMetrics call (the coordinator accepts 10,000).
const MAX_POINTS_PER_REPORT: usize = 5_000;

/// What to do with a queued item the coordinator did not store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The coordinator could not store it now: keep it and send it again later.
    Retry,
    /// The coordinator refused it as invalid: sending it again cannot succeed, drop it.
    Drop,
    /// The attempt no longer holds the job: stop, write nothing more.
    LeaseLost,
}

/// How a failed delivery (ReportMetrics or UploadArtifact) is handled: INVALID_ARGUMENT drops
/// the item, a stale lease stops the job, anything else is retried.
pub fn on_refusal(status: &tonic::Status) -> Refusal {
    if is_stale(status) {
        Refusal::LeaseLost
    } else if status.code() == Code::InvalidArgument {
        Refusal::Drop
    } else {
        Refusal::Retry
    }
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
    /// artifact or metric batch the coordinator refuses as invalid is dropped (with one warning):
    /// sending it again cannot succeed, and it must not hold back what follows.
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
                    Err(status) => match on_refusal(&status) {
                        Refusal::Drop => {
                            warn!(kind = %file.kind, name = %file.name, error = %status, "artifact refused as invalid; dropping it")
                        }
                        Refusal::Retry | Refusal::LeaseLost => return Err(status),
                    },
                },
            }
            self.queue.pop_front();
        }
        Ok(())
    }
}

/// Sends buffered points in chunks; points leave the buffer only once stored, or once refused
/// as invalid (dropped with a warning).
async fn send_metrics(
    client: &mut Client,
    lease: &JobLease,
    pending: &mut Vec<MetricPoint>,
) -> Result<(), tonic::Status> {
    while !pending.is_empty() {
        let n = pending.len().min(MAX_POINTS_PER_REPORT);
        let points = pending[..n].to_vec();
        let sent = client
            .report_metrics(ReportMetricsRequest {
                lease: Some(lease.clone()),
                points,
            })
            .await;
        match sent {
            Ok(reply) if reply.get_ref().conflicting > 0 => warn!(
                points = n, conflicting = reply.get_ref().conflicting,
                "points repeat a stored step with a different value; the coordinator kept the stored ones"
            ),
            Ok(_) => {}
            Err(status) => match on_refusal(&status) {
                Refusal::Drop => {
                    warn!(points = n, error = %status, "metric batch refused as invalid; dropping it")
                }
                Refusal::Retry | Refusal::LeaseLost => return Err(status),
            },
        }
        pending.drain(..n);
    }
    Ok(())
}

fn to_wire(m: Metric) -> MetricPoint {
    MetricPoint {
        name: m.name,
        step: m.step,
        epoch: m.epoch,
        value: m.value,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{file, lease, points, serve, Fake};
    use super::*;
    use tonic::Status;

    #[test]
    fn an_invalid_item_is_dropped_a_stale_lease_stops_and_the_rest_is_retried() {
        let refusal = |code| on_refusal(&Status::new(code, "m"));
        assert_eq!(refusal(Code::InvalidArgument), Refusal::Drop);
        assert_eq!(refusal(Code::FailedPrecondition), Refusal::LeaseLost);
        assert_eq!(refusal(Code::NotFound), Refusal::LeaseLost);
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::ResourceExhausted,
        ] {
            assert_eq!(refusal(code), Refusal::Retry, "{code:?}");
        }
    }

    #[tokio::test]
    async fn a_metric_batch_refused_as_invalid_is_dropped_once_and_the_rest_goes_on() {
        let fake = Fake::default();
        fake.state()
            .report_failures
            .push_back(Status::invalid_argument(
                "spec.points[0].name: control character",
            ));
        let mut client = serve(fake.clone()).await;
        let mut outbox = Outbox::default();
        outbox.push(points(2));
        outbox.push(Event::Artifact(file("epoch-001.safetensors", 10)));
        outbox.push(points(3));
        outbox
            .flush(&mut client, &lease())
            .await
            .expect("the invalid batch is dropped, the rest delivered");
        assert!(outbox.is_empty());
        assert_eq!(
            fake.state().calls,
            vec!["report 2", "upload epoch-001.safetensors", "report 3"],
            "the refused batch is sent once, never again"
        );
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
}

//! Dependencies between jobs: a transfer job waits for its source, is pushed when the source
//! succeeds, and its own dependents fail with it; missing or wrong sources are refused.
//!
//! Must not test sweeps (see `sweeps.rs`), whose transfer arms depend on sources the same way.

use proto::queue::DEFAULT_QUEUE;
use proto::v1::{self, job_event::Event, job_service_client::JobServiceClient};
use tests::{redis_url, WAIT};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic::Code;
use uuid::Uuid;

use crate::helpers::{claim, get, submit, valid_spec, TestServer};

/// Submits a spec that may start in any state; returns the id and that state.
async fn submit_any(
    jobs: &mut JobServiceClient<Channel>,
    spec: v1::JobSpec,
) -> (String, v1::JobState) {
    let resp = jobs
        .submit_job(v1::SubmitJobRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await
        .expect("submit")
        .into_inner();
    let state = resp.state();
    (resp.job_id, state)
}

/// A CVAE that starts from `source`'s classifier checkpoint.
fn transfer_spec(source: &str) -> v1::JobSpec {
    v1::JobSpec {
        name: "cvae-transfer".into(),
        experiment: Some(v1::job_spec::Experiment::CifarCvae(v1::CifarCvae {
            init: Some(v1::Initialization {
                kind: Some(v1::initialization::Kind::Transfer(v1::TransferInit {
                    source_job_id: source.into(),
                    conv1: v1::Conv1Adaptation::ReplicateThird as i32,
                    copy_conv2: true,
                    freeze: None,
                })),
            }),
            ..Default::default()
        })),
        ..valid_spec()
    }
}

/// A watcher of one job: the states it sees until its stream ends, and the newest one so far.
struct Watched {
    states: JoinHandle<Vec<v1::JobState>>,
    newest: watch::Receiver<Option<v1::JobState>>,
}

impl Watched {
    /// Waits until the watcher has seen `state`. WatchJob coalesces changes that come faster
    /// than it looks (a job may go from queued to failed in one event), so a test that wants
    /// every state waits for each before causing the next.
    async fn until(&mut self, state: v1::JobState) {
        tokio::time::timeout(WAIT, self.newest.wait_for(|s| *s == Some(state)))
            .await
            .unwrap_or_else(|_| panic!("the watcher never saw {state:?}"))
            .expect("watcher running");
    }
}

async fn watched_states(jobs: &mut JobServiceClient<Channel>, id: &str) -> Watched {
    let mut events = jobs
        .watch_job(v1::WatchJobRequest { job_id: id.into() })
        .await
        .expect("watch")
        .into_inner();
    let (tx, newest) = watch::channel(None);
    let states = tokio::spawn(async move {
        let mut states = Vec::new();
        let collect = async {
            while let Some(event) = events.next().await {
                if let Event::Job(job) = event.expect("event").event.expect("set") {
                    states.push(job.state());
                    tx.send_replace(Some(job.state()));
                }
            }
        };
        tokio::time::timeout(WAIT, collect)
            .await
            .expect("the stream ends after the terminal state");
        states
    });
    Watched { states, newest }
}

#[tokio::test]
async fn a_transfer_job_waits_for_its_source_is_dispatched_when_it_succeeds_and_its_own_dependent_fails_with_it(
) {
    // The reconciler stays out of the way: the push after CompleteJob is what is tested.
    let server = TestServer::start_with(&redis_url(), &["--reconcile-interval-ms", "600000"]).await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let source = submit(&mut jobs, valid_spec()).await;
    server
        .queue
        .delete_queues()
        .await
        .expect("the worker popped it");
    let (transfer, state) = submit_any(&mut jobs, transfer_spec(&source)).await;
    assert_eq!(state, v1::JobState::Waiting);
    let mut downstream_spec = valid_spec();
    downstream_spec.depends_on = vec![transfer.to_uppercase()];
    let (downstream, state) = submit_any(&mut jobs, downstream_spec).await;
    assert_eq!(state, v1::JobState::Waiting);
    assert!(
        server
            .queue
            .ready_ids(DEFAULT_QUEUE)
            .await
            .expect("redis")
            .is_empty(),
        "waiting jobs are not pushed"
    );
    let job = get(&mut jobs, &downstream).await;
    assert_eq!(
        job.spec.expect("spec").depends_on,
        [transfer.to_uppercase()],
        "the spec reads back as submitted"
    );

    let mut transfer_watch = watched_states(&mut jobs, &transfer).await;
    let downstream_watch = watched_states(&mut jobs, &downstream).await;
    transfer_watch.until(v1::JobState::Waiting).await;
    let lease = claim(&mut workers, &source).await;
    workers
        .complete_job(v1::CompleteJobRequest {
            lease: Some(lease),
            final_step: 0,
        })
        .await
        .expect("complete");
    assert_eq!(
        get(&mut jobs, &transfer).await.state(),
        v1::JobState::Queued
    );
    assert_eq!(
        server.queue.ready_ids(DEFAULT_QUEUE).await.expect("redis"),
        [transfer.as_str()],
        "pushed right after the source succeeded"
    );
    assert_eq!(
        get(&mut jobs, &downstream).await.state(),
        v1::JobState::Waiting
    );

    transfer_watch.until(v1::JobState::Queued).await;
    let lease = claim(&mut workers, &transfer).await;
    transfer_watch.until(v1::JobState::Running).await;
    workers
        .fail_job(v1::FailJobRequest {
            lease: Some(lease),
            reason: "diverged".into(),
            permanent: true,
        })
        .await
        .expect("fail");
    let job = get(&mut jobs, &downstream).await;
    assert_eq!(job.state(), v1::JobState::Failed);
    assert_eq!(
        job.error,
        format!("dependency_failed: job {transfer} is failed")
    );
    assert_eq!(job.attempt, 0, "it never ran");

    let states = transfer_watch.states.await.expect("watcher");
    assert_eq!(
        states,
        [
            v1::JobState::Waiting,
            v1::JobState::Queued,
            v1::JobState::Running,
            v1::JobState::Failed
        ]
    );
    let states = downstream_watch.states.await.expect("watcher");
    assert_eq!(states.first(), Some(&v1::JobState::Waiting));
    assert_eq!(
        states.last(),
        Some(&v1::JobState::Failed),
        "woken when it failed"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_submit_naming_a_missing_job_or_a_non_classifier_source_is_rejected_naming_the_field() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let classifier = submit(&mut jobs, valid_spec()).await;
    let (cvae, _) = submit_any(&mut jobs, transfer_spec(&classifier)).await;
    let missing = Uuid::now_v7().to_string();

    let mut spec = valid_spec();
    spec.depends_on = vec![classifier.clone(), missing.clone()];
    let err = jobs
        .submit_job(v1::SubmitJobRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await
        .expect_err("unknown dependency");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        format!("spec.depends_on[1]: job {missing} does not exist")
    );

    let err = jobs
        .submit_job(v1::SubmitJobRequest {
            spec: Some(transfer_spec(&missing)),
            request_id: String::new(),
        })
        .await
        .expect_err("unknown source");
    assert_eq!(
        err.message(),
        format!("spec.cifar_cvae.init.transfer.source_job_id: job {missing} does not exist")
    );
    let err = jobs
        .submit_job(v1::SubmitJobRequest {
            spec: Some(transfer_spec(&cvae)),
            request_id: String::new(),
        })
        .await
        .expect_err("a cvae is no classifier");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("spec.cifar_cvae.init.transfer.source_job_id: "),
        "{}",
        err.message()
    );
    assert_eq!(server.job_rows().await, 2, "nothing stored");
    server.stop().await;
}

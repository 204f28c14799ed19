//! WorkerService over a job's life: claim (one winner), heartbeat, metric reports (exactly
//! once), complete, fail, cancellation seen by the worker, lease expiry, and a hand-back whose
//! next attempt resumes from the stored training state.
//!
//! Must not test artifact uploads beyond the training state a hand-back resumes from
//! (see `artifacts.rs`).

use proto::metric::{TEST_ACCURACY, TRAIN_LOSS};
use proto::queue::DEFAULT_QUEUE;
use proto::v1::{self, job_event::Event};
use tests::{redis_url, WAIT};
use tokio_stream::StreamExt as _;
use tonic::Code;

use crate::helpers::{
    claim_as, content, eventually, get, point, submit, upload, upload_header, valid_spec,
    TestServer,
};

#[tokio::test]
async fn a_worker_runs_a_job_to_success_while_a_watcher_sees_every_state_and_point() {
    let server = TestServer::start().await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let mut events = jobs
        .watch_job(v1::WatchJobRequest { job_id: id.clone() })
        .await
        .expect("watch")
        .into_inner();

    let claim = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.clone(),
            worker_id: "w1".into(),
            ..Default::default()
        })
        .await;
    let claim = claim.expect("claim").into_inner();
    assert!(claim.claimed);
    assert_eq!(claim.spec, Some(valid_spec()));
    assert!(claim.lease_expires_at.is_some());
    let lease = claim.lease.expect("lease");
    assert_eq!((lease.attempt, lease.worker_id.as_str()), (1, "w1"));
    let second = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.clone(),
            worker_id: "w2".into(),
            ..Default::default()
        })
        .await;
    assert!(
        !second.expect("duplicate message").into_inner().claimed,
        "only one worker wins"
    );

    let beat = workers
        .heartbeat(v1::HeartbeatRequest {
            lease: Some(lease.clone()),
        })
        .await
        .expect("heartbeat");
    assert!(beat.into_inner().keep_running);
    let points = vec![
        point(TRAIN_LOSS, 1, 2.3),
        point(TRAIN_LOSS, 2, 1.1),
        point(TEST_ACCURACY, 2, 0.91),
    ];
    let report = v1::ReportMetricsRequest {
        lease: Some(lease.clone()),
        points: points.clone(),
    };
    assert_eq!(
        workers
            .report_metrics(report.clone())
            .await
            .expect("report")
            .into_inner()
            .stored,
        3
    );
    assert_eq!(
        workers
            .report_metrics(report)
            .await
            .expect("retry")
            .into_inner()
            .stored,
        0,
        "exactly once"
    );
    workers
        .complete_job(v1::CompleteJobRequest {
            lease: Some(lease.clone()),
            final_step: 0,
        })
        .await
        .expect("complete");

    let mut states = Vec::new();
    let mut seen_points = Vec::new();
    let collect = async {
        while let Some(event) = events.next().await {
            match event.expect("event").event.expect("set") {
                Event::Job(job) => states.push(job.state()),
                Event::Metrics(batch) => seen_points.extend(batch.points),
            }
        }
    };
    tokio::time::timeout(WAIT, collect)
        .await
        .expect("the stream ends after the terminal state");
    assert_eq!(states.first(), Some(&v1::JobState::Queued));
    assert_eq!(states.last(), Some(&v1::JobState::Succeeded));
    assert_eq!(seen_points, points, "every point, in storage order");

    let job = get(&mut jobs, &id).await;
    assert_eq!(job.state(), v1::JobState::Succeeded);
    assert!(job.finished_at.is_some());
    let mut latest: Vec<_> = job
        .latest_metrics
        .iter()
        .map(|p| (p.name.as_str(), p.step, p.value))
        .collect();
    latest.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(latest, [("test/accuracy", 2, 0.91), ("train/loss", 2, 1.1)]);
    let series = jobs
        .get_metrics(v1::GetMetricsRequest {
            job_id: id,
            ..Default::default()
        })
        .await
        .expect("metrics");
    let order: Vec<_> = series
        .into_inner()
        .points
        .iter()
        .map(|p| (p.name.clone(), p.step))
        .collect();
    assert_eq!(
        order,
        [
            ("test/accuracy".into(), 2),
            ("train/loss".into(), 1),
            ("train/loss".into(), 2)
        ]
    );

    let late = workers
        .report_metrics(v1::ReportMetricsRequest {
            lease: Some(lease),
            points,
        })
        .await;
    assert_eq!(
        late.expect_err("job is finished").code(),
        Code::FailedPrecondition
    );
    server.stop().await;
}

#[tokio::test]
async fn a_cancelled_running_job_tells_its_worker_to_stop_and_refuses_its_writes() {
    let server = TestServer::start().await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let claim = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.clone(),
            worker_id: "w".into(),
            ..Default::default()
        })
        .await;
    let lease = claim.expect("claim").into_inner().lease;
    jobs.cancel_job(v1::CancelJobRequest {
        job_id: id,
        reason: "wrong lr".into(),
    })
    .await
    .expect("cancel");

    let beat = workers
        .heartbeat(v1::HeartbeatRequest {
            lease: lease.clone(),
        })
        .await
        .expect("heartbeat answers");
    assert!(!beat.into_inner().keep_running);
    let write = workers
        .report_metrics(v1::ReportMetricsRequest {
            lease: lease.clone(),
            points: vec![],
        })
        .await;
    let write = write.expect_err("stale");
    assert_eq!(write.code(), Code::FailedPrecondition);
    assert!(
        write.message().starts_with("stale attempt"),
        "{}",
        write.message()
    );
    let done = workers
        .complete_job(v1::CompleteJobRequest {
            lease,
            final_step: 0,
        })
        .await;
    assert_eq!(done.expect_err("stale").code(), Code::FailedPrecondition);
    server.stop().await;
}

#[tokio::test]
async fn a_worker_that_stops_heartbeating_loses_its_job_to_another_attempt() {
    let server = TestServer::start_with(&redis_url(), &["--lease-timeout-ms", "200"]).await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let claim = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.clone(),
            worker_id: "dead".into(),
            ..Default::default()
        })
        .await;
    let lease = claim.expect("claim").into_inner().lease;
    eventually("the reaper requeues the job", || {
        let (mut jobs, id) = (jobs.clone(), id.clone());
        async move { get(&mut jobs, &id).await.state() == v1::JobState::Queued }
    })
    .await;
    assert_eq!(
        get(&mut jobs, &id).await.error,
        "lease expired on worker dead"
    );
    let beat = workers
        .heartbeat(v1::HeartbeatRequest { lease })
        .await
        .expect("heartbeat answers");
    assert!(!beat.into_inner().keep_running);
    server.stop().await;
}

#[tokio::test]
async fn a_handed_back_job_is_pushed_at_once_and_its_next_attempt_resumes_from_the_stored_state() {
    // No reconciler rounds: the push after the hand-back is the release's own.
    let server = TestServer::start_with(&redis_url(), &["--reconcile-interval-ms", "600000"]).await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    server
        .queue
        .delete_queues()
        .await
        .expect("a worker popped it");
    let first = claim_as(&mut workers, &id, "w1").await;
    assert!(first.claimed);
    assert_eq!(
        first.resume_from, None,
        "a first attempt starts from scratch"
    );
    let lease = first.lease.expect("lease");

    let state = content(5000, 9);
    let mut header = upload_header(&lease, "resume", "state.safetensors", 0, &state);
    let err = upload(&mut workers, header.clone(), &state)
        .await
        .expect_err("a training state must name its step");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("header.step: "),
        "{}",
        err.message()
    );
    header.step = 50;
    let stored = upload(&mut workers, header, &state).await.expect("upload");
    assert_eq!(stored.step, 50);

    let released = workers
        .release_job(v1::ReleaseJobRequest {
            lease: Some(lease.clone()),
            reason: "worker shutting down (SIGTERM)".into(),
        })
        .await
        .expect("release")
        .into_inner();
    assert_eq!(released.state(), v1::JobState::Queued);
    assert_eq!(
        server.queue.ready_ids(DEFAULT_QUEUE).await.expect("redis"),
        [id.as_str()],
        "pushed again at once"
    );

    let second = claim_as(&mut workers, &id, "w2").await;
    assert!(
        second.claimed,
        "claimable at once: no backoff after a hand-back"
    );
    assert_eq!(second.lease.as_ref().map(|l| l.attempt), Some(2));
    assert_eq!(second.resume_from, Some(stored));
    let stale = workers
        .release_job(v1::ReleaseJobRequest {
            lease: Some(lease),
            reason: String::new(),
        })
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    workers
        .complete_job(v1::CompleteJobRequest {
            lease: second.lease,
            final_step: 120,
        })
        .await
        .expect("complete");

    let job = get(&mut jobs, &id).await;
    assert_eq!(
        (
            job.state(),
            job.attempt,
            job.failed_attempts,
            job.final_step
        ),
        (v1::JobState::Succeeded, 2, 0, 120)
    );
    let attempts: Vec<_> = job
        .attempts
        .iter()
        .map(|a| {
            assert!(a.claimed_at.is_some() && a.ended_at.is_some(), "{a:?}");
            (
                a.attempt,
                a.worker_id.as_str(),
                a.outcome(),
                a.resumed_from_step,
                a.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        [
            (
                1,
                "w1",
                v1::AttemptOutcome::HandedBack,
                0,
                "worker shutting down (SIGTERM)"
            ),
            (2, "w2", v1::AttemptOutcome::Succeeded, 50, ""),
        ]
    );
    let listed = jobs
        .list_jobs(v1::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].attempts, job.attempts,
        "ListJobs fills attempts too"
    );
    server.stop().await;
}

/// Lease renewals have connections of their own: with every connection of the database pool
/// held by metric batches that wait on a lock, the heartbeat of another job still answers (and
/// keeps its lease), while a call that needs the database pool gives up with UNAVAILABLE.
#[tokio::test]
async fn heartbeats_are_answered_while_metric_batches_hold_every_pooled_connection() {
    let server = TestServer::start_with(&redis_url(), &["--db-acquire-timeout-ms", "500"]).await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let busy = submit(&mut jobs, valid_spec()).await;
    let other = submit(&mut jobs, valid_spec()).await;
    let busy_lease = crate::helpers::claim(&mut workers, &busy).await;
    let other_lease = crate::helpers::claim(&mut workers, &other).await;

    // Metric batches cannot finish while the latest-value table is locked; each one holds a
    // pooled connection while it waits (on the lock, or on the first batch's row lock).
    let mut lock = server.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE job_metric_latest IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let mut batches = Vec::new();
    for i in 0..24u64 {
        let mut workers = server.workers();
        let lease = busy_lease.clone();
        batches.push(tokio::spawn(async move {
            workers
                .report_metrics(v1::ReportMetricsRequest {
                    lease: Some(lease),
                    points: vec![point(TRAIN_LOSS, i + 1, 1.0)],
                })
                .await
        }));
    }
    eventually(
        "every pooled connection is held by a waiting batch",
        || async { sessions(&server.pool, "wait_event_type = 'Lock'").await >= 16 },
    )
    .await;
    let refused = jobs
        .get_job(v1::GetJobRequest {
            job_id: other.clone(),
        })
        .await
        .expect_err("the database pool is exhausted");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    let beat = workers
        .heartbeat(v1::HeartbeatRequest {
            lease: Some(other_lease),
        })
        .await
        .expect("a heartbeat answers all the same")
        .into_inner();
    assert!(beat.keep_running);
    assert!(
        sessions(&server.pool, "application_name = 'trainq-liveness'").await >= 1,
        "the heartbeat went through the liveness pool"
    );

    lock.rollback().await.expect("unlock");
    for batch in batches {
        let answer = batch.await.expect("task");
        // A batch that waited too long for a connection was refused (its worker retries); the
        // others are stored.
        if let Err(status) = answer {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
    }
    server.stop().await;
}

/// How many sessions on the test's database match `condition` (SQL over pg_stat_activity).
async fn sessions(pool: &sqlx::PgPool, condition: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND {condition}"
    ))
    .fetch_one(pool)
    .await
    .expect("pg_stat_activity")
}

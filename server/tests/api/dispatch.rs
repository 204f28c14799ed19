//! Dispatch through Redis: the reconciler pushes retried jobs once their backoff passed and
//! queued jobs whose id Redis lost, and a submit while Redis is down still stores the job.
//!
//! Must not touch the queue except through the test server's own [`server::dispatch::Dispatcher`].

use proto::queue::DEFAULT_QUEUE;
use proto::v1;
use tests::redis_url;

use crate::helpers::{eventually, get, submit, valid_spec, TestServer};

#[tokio::test]
async fn a_retried_job_is_dispatched_again_once_its_backoff_has_passed() {
    let server = TestServer::start().await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    assert!(server
        .queue
        .ready_ids(DEFAULT_QUEUE)
        .await
        .expect("redis")
        .contains(&id));
    server
        .queue
        .delete_queues()
        .await
        .expect("the worker popped it");
    let claim = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.clone(),
            worker_id: "w".into(),
            ..Default::default()
        })
        .await;
    let lease = claim.expect("claim").into_inner().lease;

    let failed = workers
        .fail_job(v1::FailJobRequest {
            lease,
            reason: "nccl timeout".into(),
            permanent: false,
        })
        .await;
    assert_eq!(
        failed.expect("fail").into_inner().state(),
        v1::JobState::Queued
    );
    eventually("the reconciler pushes the retried job", || async {
        server.queue.ready_ids(DEFAULT_QUEUE).await.expect("redis") == [id.clone()]
    })
    .await;
    let again = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.clone(),
            worker_id: "w".into(),
            ..Default::default()
        })
        .await;
    let again = again.expect("claim").into_inner();
    assert_eq!(
        (again.claimed, again.lease.map(|l| l.attempt)),
        (true, Some(2))
    );
    assert_eq!(get(&mut jobs, &id).await.error, "nccl timeout");
    server.stop().await;
}

#[tokio::test]
async fn queued_jobs_lost_from_redis_are_dispatched_again() {
    let server = TestServer::start_with(&redis_url(), &["--redispatch-after-ms", "300"]).await;
    let mut jobs = server.jobs();
    let id = submit(&mut jobs, valid_spec()).await;
    server
        .queue
        .delete_queues()
        .await
        .expect("redis loses the queue");
    eventually("the reconciler pushes the lost id", || async {
        server
            .queue
            .ready_ids(DEFAULT_QUEUE)
            .await
            .expect("redis")
            .contains(&id)
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_submit_while_redis_is_unreachable_still_stores_the_job_as_queued() {
    // A slow reconciler, so that it does not take the job while we look.
    let server = TestServer::start_with(
        "redis://127.0.0.1:1",
        &["--reconcile-interval-ms", "600000"],
    )
    .await;
    let mut jobs = server.jobs();
    let id = submit(&mut jobs, valid_spec()).await;
    let job = get(&mut jobs, &id).await;
    assert_eq!(job.state(), v1::JobState::Queued);
    let dispatched: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT dispatched_at FROM jobs")
            .fetch_one(&server.pool)
            .await
            .expect("row");
    assert_eq!(dispatched, None, "left for the reconciler");
    server.stop().await;
}

//! Watch streams under load: the limits on how many a connection and the coordinator hold open,
//! and changes made behind this coordinator's back (another coordinator) reaching its watchers
//! through the change poller.

use std::time::Duration;

use proto::v1::{self, job_event::Event, job_service_client::JobServiceClient};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic::Code;

use crate::helpers::*;

/// A client on a connection of its own (the per-connection limit counts TCP connections).
async fn own_connection(server: &TestServer) -> JobServiceClient<Channel> {
    let uri = server.channel_uri();
    JobServiceClient::new(
        Channel::from_shared(uri)
            .expect("uri")
            .connect()
            .await
            .expect("connect"),
    )
}

async fn watch(
    jobs: &mut JobServiceClient<Channel>,
    id: &str,
) -> Result<tonic::Streaming<v1::JobEvent>, tonic::Status> {
    Ok(jobs
        .watch_job(v1::WatchJobRequest { job_id: id.into() })
        .await?
        .into_inner())
}

#[tokio::test]
async fn watch_streams_past_the_per_connection_and_total_limits_are_refused_while_other_rpcs_answer(
) {
    let server = TestServer::start_with(
        &tests::redis_url(),
        &["--max-watchers", "5", "--max-watchers-per-connection", "3"],
    )
    .await;
    let mut jobs = server.jobs();
    let id = submit(&mut jobs, valid_spec()).await;

    let mut a = own_connection(&server).await;
    let mut on_a = Vec::new();
    for _ in 0..3 {
        on_a.push(
            watch(&mut a, &id)
                .await
                .expect("within the connection's share"),
        );
    }
    let refused = watch(&mut a, &id)
        .await
        .expect_err("a fourth on one connection");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("--max-watchers-per-connection"),
        "{}",
        refused.message()
    );

    let mut b = own_connection(&server).await;
    let mut on_b = Vec::new();
    for _ in 0..2 {
        on_b.push(
            watch(&mut b, &id)
                .await
                .expect("another connection has room"),
        );
    }
    let refused = watch(&mut b, &id).await.expect_err("a sixth in all");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("--max-watchers)"),
        "{}",
        refused.message()
    );

    // Unary calls and the other streams are untouched by the refusals.
    assert_eq!(get(&mut jobs, &id).await.id, id);
    let first = on_a[0].next().await.expect("an event").expect("ok");
    assert!(matches!(first.event, Some(Event::Job(_))));

    // A stream the client drops gives its place back.
    on_a.pop();
    let mut c = own_connection(&server).await;
    let deadline = tokio::time::Instant::now() + tests::WAIT;
    let _again = loop {
        match watch(&mut c, &id).await {
            Ok(stream) => break stream,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a closed stream's place was never given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    server.stop().await;
}

#[tokio::test]
async fn a_change_made_behind_the_coordinators_back_reaches_its_watchers_within_a_second() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let id = submit(&mut jobs, valid_spec()).await;
    let mut stream = watch(&mut jobs, &id).await.expect("watch");
    let first = stream.next().await.expect("first event").expect("ok");
    assert!(matches!(first.event, Some(Event::Job(ref j)) if j.state() == v1::JobState::Queued));
    // As another coordinator would: its writes reach Postgres, not this process's notifier.
    sqlx::query(
        "UPDATE jobs SET state = 'cancelled', error = 'elsewhere', finished_at = now(),
             updated_at = now() WHERE id = $1::uuid",
    )
    .bind(&id)
    .execute(&server.pool)
    .await
    .expect("update behind the coordinator's back");
    // The safety poll alone would take 30 s; the change poller's round is 500 ms.
    let event = tokio::time::timeout(Duration::from_secs(3), stream.next())
        .await
        .expect("seen within the change poller's interval")
        .expect("an event")
        .expect("ok");
    match event.event {
        Some(Event::Job(job)) => assert_eq!(
            (job.state(), job.error.as_str()),
            (v1::JobState::Cancelled, "elsewhere")
        ),
        other => panic!("expected the job, got {other:?}"),
    }
    server.stop().await;
}

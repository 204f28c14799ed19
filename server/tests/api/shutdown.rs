//! Shutdown: open watch streams end and `run` returns cleanly; a call in flight when shutdown
//! begins still completes.
//!
//! Must not stop a server any other way than through its shutdown signal.

use std::time::Duration;

use proto::v1;
use tests::WAIT;
use tokio_stream::StreamExt as _;
use tonic::Code;

use crate::helpers::{
    claim, content, submit, upload_header, upload_messages, valid_spec, TestServer,
};

#[tokio::test]
async fn shutdown_ends_open_watch_streams_and_run_returns_cleanly() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let id = submit(&mut jobs, valid_spec()).await;
    let mut events = jobs
        .watch_job(v1::WatchJobRequest { job_id: id })
        .await
        .expect("watch")
        .into_inner();
    assert!(
        matches!(events.next().await, Some(Ok(_))),
        "the first event is the job"
    );
    let ended = tokio::spawn(async move {
        let end = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("stream ends promptly");
        if let Some(Err(status)) = end {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
    });
    server.stop().await; // would time out if the open stream kept the server draining
    ended.await.expect("the stream ended as expected");
}

#[tokio::test]
async fn a_call_in_flight_when_shutdown_begins_still_completes() {
    let server = TestServer::start().await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let lease = claim(&mut workers, &id).await;
    let data = content(3 * 1024 * 1024, 7);
    let mut messages = upload_messages(
        upload_header(&lease, "checkpoint", "e.safetensors", 1, &data),
        &data,
        1024 * 1024,
    )
    .into_iter();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let call = tokio::spawn(async move {
        workers
            .upload_artifact(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    for message in messages.by_ref().take(2) {
        tx.send(message).await.expect("send");
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // the upload is under way

    let TestServer {
        stop, task, pool, ..
    } = server;
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(200)).await; // the server is draining
    assert!(!task.is_finished(), "still draining the upload");
    for message in messages {
        tx.send(message).await.expect("send the rest");
    }
    drop(tx);
    let artifact = call
        .await
        .expect("no panic")
        .expect("the upload completed")
        .into_inner();
    assert_eq!(artifact.size_bytes, data.len() as u64);
    tokio::time::timeout(WAIT, task)
        .await
        .expect("stops once drained")
        .expect("no panic")
        .expect("clean shutdown");
    pool.close().await;
}

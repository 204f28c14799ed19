//! Artifacts in a `file://` store: chunked uploads checked against their header, listing and
//! byte-identical downloads through both services, stale attempts, and unknown ids and kinds.
//! [`round_trip_artifacts`] is shared with the S3 test (`s3.rs`).
//!
//! Must not start an S3 server (see `s3.rs`).

use std::time::Duration;

use proto::v1::{self, job_service_client::JobServiceClient};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic::Code;
use uuid::Uuid;

use crate::helpers::{
    claim, claim_after_backoff, content, sha256_hex, submit, upload, upload_header,
    upload_messages, valid_spec, TestServer,
};

/// The record (from the first chunk), the bytes and the number of chunks of a download.
pub async fn download(
    jobs: &mut JobServiceClient<Channel>,
    req: v1::DownloadArtifactRequest,
) -> Result<(v1::Artifact, Vec<u8>, usize), tonic::Status> {
    let mut stream = jobs.download_artifact(req).await?.into_inner();
    let first = stream.next().await.expect("at least one chunk")?;
    let artifact = first.artifact.expect("the first chunk carries the record");
    let (mut data, mut chunks) = (first.data, 1);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        assert!(
            chunk.artifact.is_none(),
            "only the first chunk carries the record"
        );
        assert!(chunk.data.len() <= 1024 * 1024, "chunks are at most 1 MiB");
        data.extend(chunk.data);
        chunks += 1;
    }
    Ok((artifact, data, chunks))
}

pub async fn list_artifacts(
    jobs: &mut JobServiceClient<Channel>,
    job_id: &str,
    kind: &str,
) -> Vec<v1::Artifact> {
    jobs.list_artifacts(v1::ListArtifactsRequest {
        job_id: job_id.into(),
        kind: kind.into(),
    })
    .await
    .expect("list")
    .into_inner()
    .artifacts
}

/// Uploads two checkpoints and a sample grid to a running job, then checks that they list
/// oldest first and download byte for byte, by id and as the newest of their kind, through
/// both services.
pub async fn round_trip_artifacts(server: &TestServer) -> Vec<v1::Artifact> {
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let lease = claim(&mut workers, &id).await;
    let first = content(2 * 1024 * 1024 + 4321, 1);
    let second = content(12 * 1024 * 1024 + 17, 2); // more than one 10 MiB part
    let grid = content(999, 3);

    let a1 = upload(
        &mut workers,
        upload_header(&lease, "checkpoint", "epoch-001.safetensors", 1, &first),
        &first,
    )
    .await
    .expect("upload 1");
    assert_eq!(
        (
            a1.job_id.as_str(),
            a1.attempt,
            a1.kind.as_str(),
            a1.epoch,
            a1.size_bytes
        ),
        (id.as_str(), 1, "checkpoint", 1, first.len() as u64)
    );
    assert_eq!(a1.sha256, sha256_hex(&first));
    assert!(
        a1.uri
            .ends_with(&format!("jobs/{id}/1/checkpoint/epoch-001.safetensors")),
        "{}",
        a1.uri
    );
    let g = upload(
        &mut workers,
        upload_header(&lease, "samples", "grid.png", 1, &grid),
        &grid,
    )
    .await
    .expect("upload grid");
    let a2 = upload(
        &mut workers,
        upload_header(&lease, "checkpoint", "epoch-002.safetensors", 2, &second),
        &second,
    )
    .await
    .expect("upload 2");

    let listed = list_artifacts(&mut jobs, &id, "").await;
    assert_eq!(listed, [a1.clone(), g.clone(), a2.clone()], "oldest first");
    assert_eq!(
        list_artifacts(&mut jobs, &id, "checkpoint").await,
        [a1.clone(), a2.clone()]
    );

    let (record, data, chunks) = download(
        &mut jobs,
        v1::DownloadArtifactRequest {
            artifact_id: a1.id.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("download by id");
    assert_eq!(record, a1);
    assert!(data == first, "identical bytes by id");
    assert_eq!(chunks, 3, "2 MiB and a bit in 1 MiB chunks");

    let by_kind = v1::DownloadArtifactRequest {
        job_id: id.clone(),
        kind: "checkpoint".into(),
        ..Default::default()
    };
    let (record, data, _) = download(&mut jobs, by_kind.clone())
        .await
        .expect("download newest");
    assert_eq!(record, a2, "the newest checkpoint");
    assert!(data == second, "identical bytes by job and kind");

    // Workers download through their own service, with the same answer.
    let mut stream = workers
        .download_artifact(by_kind)
        .await
        .expect("worker download")
        .into_inner();
    let mut worker_data = Vec::new();
    while let Some(chunk) = stream.next().await {
        worker_data.extend(chunk.expect("chunk").data);
    }
    assert!(worker_data == second);
    vec![a1, g, a2]
}

#[tokio::test]
async fn uploaded_artifacts_are_listed_and_download_identically_by_id_and_by_job_and_kind() {
    let server = TestServer::start().await;
    let stored = round_trip_artifacts(&server).await;
    for artifact in &stored {
        let path = artifact.uri.strip_prefix("file://").expect("a file uri");
        let on_disk = std::fs::metadata(path).expect("the file is where its uri says");
        assert_eq!(on_disk.len(), artifact.size_bytes);
        assert!(path.starts_with(
            &server
                .artifacts
                .path()
                .canonicalize()
                .expect("dir")
                .display()
                .to_string()
        ));
    }
    server.stop().await;
}

/// Files under the artifact directory.
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test]
async fn an_upload_that_does_not_match_its_header_is_refused_and_leaves_nothing_behind() {
    let server = TestServer::start().await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let lease = claim(&mut workers, &id).await;
    let data = content(3 * 1024 * 1024, 4);

    let mut wrong_sha = upload_header(&lease, "checkpoint", "e.safetensors", 1, &data);
    wrong_sha.sha256 = sha256_hex(b"something else");
    let err = upload(&mut workers, wrong_sha, &data)
        .await
        .expect_err("wrong sha256");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("header.sha256: "),
        "{}",
        err.message()
    );

    let short = upload(
        &mut workers,
        upload_header(&lease, "checkpoint", "e.safetensors", 1, &data),
        &data[..1000],
    )
    .await
    .expect_err("fewer bytes than announced");
    assert!(
        short.message().starts_with("header.size_bytes: "),
        "{}",
        short.message()
    );
    let mut small = upload_header(&lease, "checkpoint", "e.safetensors", 1, &data);
    small.size_bytes = 10;
    let long = upload(&mut workers, small, &data)
        .await
        .expect_err("more bytes than announced");
    assert!(
        long.message().starts_with("header.size_bytes: "),
        "{}",
        long.message()
    );

    let mut bad_kind = upload_header(&lease, "Check/point", "e", 1, &data);
    bad_kind.kind = "Check/point".into();
    let err = upload(&mut workers, bad_kind, &data)
        .await
        .expect_err("bad kind");
    assert!(
        err.message().starts_with("header.kind: "),
        "{}",
        err.message()
    );
    let err = upload(
        &mut workers,
        upload_header(&lease, "checkpoint", "..", 1, &data),
        &data,
    )
    .await
    .expect_err("bad name");
    assert!(
        err.message().starts_with("header.name: "),
        "{}",
        err.message()
    );

    use v1::upload_artifact_chunk::Part;
    let headless = vec![v1::UploadArtifactChunk {
        part: Some(Part::Data(vec![1, 2, 3])),
    }];
    let err = workers
        .upload_artifact(tokio_stream::iter(headless))
        .await
        .expect_err("data before the header");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("header: "), "{}", err.message());
    let empty: Vec<v1::UploadArtifactChunk> = vec![];
    let err = workers
        .upload_artifact(tokio_stream::iter(empty))
        .await
        .expect_err("empty stream");
    assert!(err.message().starts_with("header: "), "{}", err.message());

    assert!(
        list_artifacts(&mut jobs, &id, "").await.is_empty(),
        "nothing recorded"
    );
    assert!(
        files_under(server.artifacts.path()).is_empty(),
        "nothing stored"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_upload_from_a_stale_attempt_is_refused_even_when_the_lease_goes_stale_midway() {
    let server = TestServer::start().await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let old = claim(&mut workers, &id).await;
    workers
        .fail_job(v1::FailJobRequest {
            lease: Some(old.clone()),
            reason: "oom".into(),
            permanent: false,
        })
        .await
        .expect("fail");
    let data = content(5000, 5);
    let err = upload(
        &mut workers,
        upload_header(&old, "checkpoint", "e", 1, &data),
        &data,
    )
    .await
    .expect_err("stale attempt");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().starts_with("stale attempt 1"),
        "{}",
        err.message()
    );

    // Attempt 2 starts an upload, then is cancelled before its last chunk: the check in the
    // recording transaction refuses it, and the object it had stored is deleted.
    let current = claim_after_backoff(&mut workers, &id).await;
    assert_eq!(current.attempt, 2);
    let data = content(3 * 1024 * 1024, 6);
    let mut messages = upload_messages(
        upload_header(&current, "checkpoint", "e", 1, &data),
        &data,
        1024 * 1024,
    );
    let last = messages.pop().expect("a last chunk");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for m in messages {
        tx.send(m).await.expect("queued");
    }
    let call = {
        let mut workers = workers.clone();
        tokio::spawn(async move {
            workers
                .upload_artifact(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    jobs.cancel_job(v1::CancelJobRequest {
        job_id: id.clone(),
        reason: "enough".into(),
    })
    .await
    .expect("cancel");
    tx.send(last).await.expect("last chunk");
    drop(tx);
    let err = call
        .await
        .expect("no panic")
        .expect_err("stale by the time it is recorded");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        list_artifacts(&mut jobs, &id, "").await.is_empty(),
        "nothing recorded"
    );
    assert!(
        files_under(server.artifacts.path()).is_empty(),
        "and no object left behind"
    );
    server.stop().await;
}

#[tokio::test]
async fn artifacts_of_unknown_jobs_ids_and_kinds_are_not_found() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let id = submit(&mut jobs, valid_spec()).await;
    let unknown = Uuid::now_v7().to_string();
    let code = |r: Result<tonic::Response<v1::ListArtifactsResponse>, tonic::Status>| {
        r.expect_err("must fail").code()
    };
    assert_eq!(
        code(
            jobs.list_artifacts(v1::ListArtifactsRequest {
                job_id: unknown.clone(),
                kind: String::new()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            jobs.list_artifacts(v1::ListArtifactsRequest {
                job_id: id.clone(),
                kind: "Bad Kind".into()
            })
            .await
        ),
        Code::InvalidArgument
    );
    for (req, want) in [
        (
            v1::DownloadArtifactRequest {
                artifact_id: unknown.clone(),
                ..Default::default()
            },
            Code::NotFound,
        ),
        (
            v1::DownloadArtifactRequest {
                job_id: id.clone(),
                kind: "checkpoint".into(),
                ..Default::default()
            },
            Code::NotFound,
        ),
        (
            v1::DownloadArtifactRequest {
                job_id: unknown.clone(),
                kind: "checkpoint".into(),
                ..Default::default()
            },
            Code::NotFound,
        ),
        (
            v1::DownloadArtifactRequest {
                job_id: id.clone(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            v1::DownloadArtifactRequest::default(),
            Code::InvalidArgument,
        ),
        (
            v1::DownloadArtifactRequest {
                artifact_id: unknown.clone(),
                job_id: id.clone(),
                kind: "x".into(),
            },
            Code::InvalidArgument,
        ),
    ] {
        let got = download(&mut jobs, req.clone())
            .await
            .expect_err("must fail");
        assert_eq!(got.code(), want, "{req:?}: {got:?}");
    }
    server.stop().await;
}

/// The artifact records and the files of the store, each as (kind, name), sorted.
async fn records_and_files(server: &TestServer, job_id: &str) -> (Vec<String>, Vec<String>) {
    let mut records: Vec<String> = list_artifacts(&mut server.jobs(), job_id, "")
        .await
        .into_iter()
        .map(|a| format!("{}/{}", a.kind, a.name))
        .collect();
    records.sort();
    let mut files: Vec<String> = files_under(server.artifacts.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(job_id))
        .map(|p| {
            let kind = p.parent().and_then(|d| d.file_name()).expect("kind folder");
            format!(
                "{}/{}",
                kind.to_string_lossy(),
                p.file_name().expect("name").to_string_lossy()
            )
        })
        .collect();
    files.sort();
    (records, files)
}

#[tokio::test]
async fn checkpoints_past_the_retention_and_a_succeeded_jobs_training_states_leave_record_and_file()
{
    let server = TestServer::start_with(&tests::redis_url(), &["--keep-checkpoints", "2"]).await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let lease = claim(&mut workers, &id).await;
    for epoch in 1..=3u32 {
        let data = content(2048, epoch as u8);
        let mut header = upload_header(
            &lease,
            "checkpoint",
            &format!("epoch-{epoch:03}.safetensors"),
            epoch,
            &data,
        );
        header.step = u64::from(epoch) * 10;
        upload(&mut workers, header, &data)
            .await
            .expect("checkpoint");
        let data = content(4096, 100 + epoch as u8);
        let mut header = upload_header(
            &lease,
            "resume",
            &format!("state-{epoch:03}.safetensors"),
            epoch,
            &data,
        );
        header.step = u64::from(epoch) * 10;
        upload(&mut workers, header, &data)
            .await
            .expect("training state");
    }
    let expected_running = vec![
        "checkpoint/epoch-002.safetensors".to_string(),
        "checkpoint/epoch-003.safetensors".to_string(),
        "resume/state-002.safetensors".to_string(),
        "resume/state-003.safetensors".to_string(),
    ];
    let (records, files) = records_and_files(&server, &id).await;
    assert_eq!(records, expected_running, "the newest two of each kind");
    assert_eq!(files, records, "the store holds exactly what is recorded");

    workers
        .complete_job(v1::CompleteJobRequest {
            lease: Some(lease),
            final_step: 30,
        })
        .await
        .expect("complete");
    let (records, files) = records_and_files(&server, &id).await;
    assert_eq!(
        records,
        [
            "checkpoint/epoch-002.safetensors",
            "checkpoint/epoch-003.safetensors"
        ],
        "a job that succeeded keeps no training state"
    );
    assert_eq!(files, records);
    server.stop().await;
}

//! Hostile input: every RPC that names an unknown job or artifact answers NOT_FOUND (never
//! INTERNAL), and oversized or malformed requests are refused naming the limit while the server
//! keeps serving.
//!
//! Must not depend on a job's progress beyond one claim.

use proto::metric::TRAIN_LOSS;
use proto::v1;
use tonic::Code;
use uuid::Uuid;

use crate::helpers::{
    claim, claim_as, code_of, content, get, point, submit, upload, upload_header, upload_messages,
    valid_spec, TestServer,
};

#[tokio::test]
async fn every_rpc_that_names_an_unknown_job_or_artifact_answers_not_found_and_never_internal() {
    let server = TestServer::start().await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    submit(&mut jobs, valid_spec()).await; // a database that is not empty
    let unknown = Uuid::new_v4().to_string();
    let lease = v1::JobLease {
        job_id: unknown.clone(),
        attempt: 1,
        worker_id: "w".into(),
    };
    let by_id = v1::DownloadArtifactRequest {
        artifact_id: Uuid::new_v4().to_string(),
        ..Default::default()
    };
    let by_job = v1::DownloadArtifactRequest {
        job_id: unknown.clone(),
        kind: "checkpoint".into(),
        ..Default::default()
    };
    let answers = [
        (
            "GetJob",
            code_of(
                jobs.get_job(v1::GetJobRequest {
                    job_id: unknown.clone(),
                })
                .await,
            ),
        ),
        (
            "CancelJob",
            code_of(
                jobs.cancel_job(v1::CancelJobRequest {
                    job_id: unknown.clone(),
                    reason: String::new(),
                })
                .await,
            ),
        ),
        (
            "WatchJob",
            code_of(
                jobs.watch_job(v1::WatchJobRequest {
                    job_id: unknown.clone(),
                })
                .await,
            ),
        ),
        (
            "GetMetrics",
            code_of(
                jobs.get_metrics(v1::GetMetricsRequest {
                    job_id: unknown.clone(),
                    names: vec![TRAIN_LOSS.into()],
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "ListArtifacts",
            code_of(
                jobs.list_artifacts(v1::ListArtifactsRequest {
                    job_id: unknown.clone(),
                    kind: "checkpoint".into(),
                })
                .await,
            ),
        ),
        (
            "JobService.DownloadArtifact by id",
            code_of(jobs.download_artifact(by_id.clone()).await),
        ),
        (
            "JobService.DownloadArtifact by job and kind",
            code_of(jobs.download_artifact(by_job.clone()).await),
        ),
        (
            "Heartbeat",
            code_of(
                workers
                    .heartbeat(v1::HeartbeatRequest {
                        lease: Some(lease.clone()),
                    })
                    .await,
            ),
        ),
        (
            "ReportMetrics",
            code_of(
                workers
                    .report_metrics(v1::ReportMetricsRequest {
                        lease: Some(lease.clone()),
                        points: vec![point(TRAIN_LOSS, 1, 1.0)],
                    })
                    .await,
            ),
        ),
        (
            "CompleteJob",
            code_of(
                workers
                    .complete_job(v1::CompleteJobRequest {
                        lease: Some(lease.clone()),
                        final_step: 1,
                    })
                    .await,
            ),
        ),
        (
            "FailJob",
            code_of(
                workers
                    .fail_job(v1::FailJobRequest {
                        lease: Some(lease.clone()),
                        reason: "x".into(),
                        permanent: false,
                    })
                    .await,
            ),
        ),
        (
            "ReleaseJob",
            code_of(
                workers
                    .release_job(v1::ReleaseJobRequest {
                        lease: Some(lease.clone()),
                        reason: String::new(),
                    })
                    .await,
            ),
        ),
        (
            "UploadArtifact",
            code_of(
                upload(
                    &mut workers,
                    upload_header(&lease, "checkpoint", "e.safetensors", 1, b"abc"),
                    b"abc",
                )
                .await,
            ),
        ),
        (
            "WorkerService.DownloadArtifact by id",
            code_of(workers.download_artifact(by_id).await),
        ),
        (
            "WorkerService.DownloadArtifact by job and kind",
            code_of(workers.download_artifact(by_job).await),
        ),
    ];
    let wrong: Vec<_> = answers
        .iter()
        .filter(|(_, code)| *code != Code::NotFound)
        .collect();
    assert!(wrong.is_empty(), "not NOT_FOUND: {wrong:?}");
    let claim = claim_as(&mut workers, &unknown, "w").await;
    assert!(
        !claim.claimed && claim.lease.is_none(),
        "a claim of an unknown job is an answer (not claimed), not an error"
    );
    server.stop().await;
}

#[tokio::test]
async fn oversized_and_malformed_requests_are_refused_naming_the_limit_and_the_server_keeps_serving(
) {
    let server = TestServer::start().await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let metrics = |names: Vec<String>| v1::GetMetricsRequest {
        job_id: id.clone(),
        names,
        ..Default::default()
    };
    let field_of = |r: Result<tonic::Response<v1::GetMetricsResponse>, tonic::Status>| {
        let e = r.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        e.message().split(':').next().unwrap_or_default().to_owned()
    };
    assert_eq!(
        field_of(jobs.get_metrics(metrics(vec!["a".into(); 65])).await),
        "names"
    );
    assert_eq!(
        field_of(
            jobs.get_metrics(metrics(vec!["ok".into(), "x".repeat(129)]))
                .await
        ),
        "names[1]"
    );
    jobs.get_metrics(metrics(vec![TRAIN_LOSS.into(); 64]))
        .await
        .expect("64 names are fine");
    let kind = jobs
        .list_artifacts(v1::ListArtifactsRequest {
            job_id: id.clone(),
            kind: "../etc".into(),
        })
        .await
        .expect_err("bad kind");
    assert_eq!(kind.code(), Code::InvalidArgument);
    assert!(kind.message().starts_with("kind: "), "{}", kind.message());

    // More than 8 MiB in one message is refused before it is decoded, by either service.
    let huge = metrics(vec!["n".repeat(128); 70_000]);
    let err = jobs.get_metrics(huge).await.expect_err("oversized");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let lease = claim(&mut workers, &id).await;
    let big = content(9 * 1024 * 1024, 6);
    let messages = upload_messages(
        upload_header(&lease, "checkpoint", "huge.safetensors", 1, &big),
        &big,
        big.len(),
    );
    let err = workers
        .upload_artifact(tokio_stream::iter(messages))
        .await
        .expect_err("oversized chunk");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // A whole 4 MiB chunk, the documented limit, fits.
    let data = content(4 * 1024 * 1024, 5);
    let messages = upload_messages(
        upload_header(&lease, "checkpoint", "big.safetensors", 1, &data),
        &data,
        data.len(),
    );
    workers
        .upload_artifact(tokio_stream::iter(messages))
        .await
        .expect("one 4 MiB chunk");
    assert_eq!(get(&mut jobs, &id).await.state(), v1::JobState::Running);
    server.stop().await;
}

#[tokio::test]
async fn a_reason_holding_nul_still_cancels_or_fails_the_job_with_the_nul_dropped() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let mut workers = server.workers();
    let cancelled = submit(&mut jobs, valid_spec()).await;
    let job = jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: cancelled.clone(),
            reason: "stop\0 now".into(),
        })
        .await
        .expect("a NUL in the reason is not INTERNAL")
        .into_inner();
    assert_eq!(job.state(), v1::JobState::Cancelled);
    assert_eq!(job.error, "stop now");
    let failed = submit(&mut jobs, valid_spec()).await;
    let lease = claim(&mut workers, &failed).await;
    workers
        .fail_job(v1::FailJobRequest {
            lease: Some(lease),
            reason: "bad\0 input".into(),
            permanent: true,
        })
        .await
        .expect("a NUL in a failure reason is not INTERNAL");
    let job = get(&mut jobs, &failed).await;
    assert_eq!(job.state(), v1::JobState::Failed);
    assert!(job.error.contains("bad input"), "{}", job.error);
    server.stop().await;
}

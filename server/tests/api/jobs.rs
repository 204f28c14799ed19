//! JobService on its own: submit (a queued row and a push), validation of every spec field,
//! unknown and malformed ids, and cancelling a queued job.
//!
//! Must not claim jobs except to show that a cancelled one cannot be claimed.

use proto::queue::DEFAULT_QUEUE;
use proto::v1;
use tonic::Code;
use uuid::Uuid;

use crate::helpers::{get, submit, train, valid_spec, TestServer};
use tests::redis_url;

#[tokio::test]
async fn a_submitted_job_reads_back_queued_with_its_spec_and_its_id_is_on_the_ready_queue() {
    // The reconciler stays out of the way: this is about the submit's own push.
    let server = TestServer::start_with(&redis_url(), &["--reconcile-interval-ms", "600000"]).await;
    let mut jobs = server.jobs();
    let id = submit(&mut jobs, valid_spec()).await;

    let job = get(&mut jobs, &id).await;
    assert_eq!(job.id, id);
    assert_eq!(job.state(), v1::JobState::Queued);
    assert_eq!(
        job.spec,
        Some(valid_spec()),
        "the spec comes back exactly as submitted"
    );
    assert_eq!(job.attempt, 0);
    assert!(job.created_at.is_some() && job.started_at.is_none());
    assert_eq!(
        server.queue.ready_ids(DEFAULT_QUEUE).await.expect("redis"),
        [id.as_str()]
    );
    let dispatched: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT dispatched_at FROM jobs")
            .fetch_one(&server.pool)
            .await
            .expect("row");
    assert!(dispatched.is_some(), "a successful push is recorded");

    let listed = jobs
        .list_jobs(v1::ListJobsRequest {
            labels: [("team".into(), "vision".into())].into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        listed
            .jobs
            .iter()
            .map(|j| j.id.as_str())
            .collect::<Vec<_>>(),
        [id.as_str()]
    );
    server.stop().await;
}

#[tokio::test]
async fn each_invalid_spec_is_rejected_naming_its_field_and_nothing_is_stored() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let with = |f: fn(&mut v1::JobSpec)| {
        let mut s = valid_spec();
        f(&mut s);
        Some(s)
    };
    let cases: Vec<(&str, Option<v1::JobSpec>)> = vec![
        ("spec", None),
        ("spec.experiment", with(|s| s.experiment = None)),
        ("spec.training", with(|s| s.training = None)),
        ("spec.training.epochs", with(|s| train(s).epochs = 0)),
        (
            "spec.training.batch_size",
            with(|s| train(s).batch_size = 0),
        ),
        (
            "spec.training.batch_size",
            with(|s| train(s).batch_size = 8193),
        ),
        (
            "spec.training.learning_rate",
            with(|s| train(s).learning_rate = 0.0),
        ),
        (
            "spec.training.learning_rate",
            with(|s| train(s).learning_rate = -0.1),
        ),
        (
            "spec.training.learning_rate",
            with(|s| train(s).learning_rate = f64::NAN),
        ),
        ("spec.name", with(|s| s.name = String::new())),
        ("spec.name", with(|s| s.name = "x".repeat(129))),
        (
            "spec.labels",
            with(|s| _ = s.labels.insert("bad key!".into(), "v".into())),
        ),
        ("spec.max_attempts", with(|s| s.max_attempts = 21)),
    ];
    for (field, spec) in cases {
        let err = jobs
            .submit_job(v1::SubmitJobRequest {
                spec,
                request_id: String::new(),
            })
            .await
            .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: message was {:?}",
            err.message()
        );
    }
    assert_eq!(server.job_rows().await, 0, "no invalid job was stored");
    assert!(
        server
            .queue
            .ready_ids(DEFAULT_QUEUE)
            .await
            .expect("redis")
            .is_empty(),
        "and none was dispatched"
    );
    server.stop().await;
}

#[tokio::test]
async fn unknown_job_ids_are_not_found_and_malformed_ones_are_invalid() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let unknown = Uuid::now_v7().to_string();
    let codes =
        |r: Result<tonic::Response<v1::Job>, tonic::Status>| r.expect_err("must fail").code();
    assert_eq!(
        codes(
            jobs.get_job(v1::GetJobRequest {
                job_id: unknown.clone()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        codes(
            jobs.cancel_job(v1::CancelJobRequest {
                job_id: unknown.clone(),
                reason: String::new()
            })
            .await
        ),
        Code::NotFound
    );
    let watch = jobs
        .watch_job(v1::WatchJobRequest {
            job_id: unknown.clone(),
        })
        .await;
    assert_eq!(watch.expect_err("unknown").code(), Code::NotFound);
    let metrics = jobs
        .get_metrics(v1::GetMetricsRequest {
            job_id: unknown,
            ..Default::default()
        })
        .await;
    assert_eq!(metrics.expect_err("unknown").code(), Code::NotFound);

    let bad = jobs
        .get_job(v1::GetJobRequest {
            job_id: "not-a-uuid".into(),
        })
        .await
        .expect_err("malformed");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("job_id: "), "{}", bad.message());
    let claim = server
        .workers()
        .claim_job(v1::ClaimJobRequest {
            job_id: "x".into(),
            worker_id: "w".into(),
            ..Default::default()
        })
        .await;
    assert!(claim
        .expect_err("malformed")
        .message()
        .starts_with("job_id: "));
    let token = jobs
        .list_jobs(v1::ListJobsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await;
    let token = token.expect_err("bad token");
    assert_eq!(
        (token.code(), token.message().starts_with("page_token: ")),
        (Code::InvalidArgument, true)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_cancelled_queued_job_cannot_be_claimed_or_cancelled_again() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let id = submit(&mut jobs, valid_spec()).await;
    let job = jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancel");
    let job = job.into_inner();
    assert_eq!(
        (job.state(), job.error.as_str()),
        (v1::JobState::Cancelled, "cancelled by user")
    );
    assert!(job.finished_at.is_some());

    let again = jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: id.clone(),
            reason: String::new(),
        })
        .await;
    let again = again.expect_err("already cancelled");
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert!(again.message().contains("cancelled"), "{}", again.message());
    let claim = server
        .workers()
        .claim_job(v1::ClaimJobRequest {
            job_id: id,
            worker_id: "w".into(),
            ..Default::default()
        })
        .await;
    assert!(!claim.expect("claim answers").into_inner().claimed);
    server.stop().await;
}

#[tokio::test]
async fn a_submit_repeated_with_its_request_id_returns_the_first_job_and_another_spec_is_already_exists(
) {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let submit_with = |spec: v1::JobSpec, request_id: &str| v1::SubmitJobRequest {
        spec: Some(spec),
        request_id: request_id.into(),
    };
    let first = jobs
        .submit_job(submit_with(valid_spec(), "cli-0190aaaa"))
        .await
        .expect("first")
        .into_inner();
    assert_eq!(first.state(), v1::JobState::Queued);
    let again = jobs
        .submit_job(submit_with(valid_spec(), "cli-0190aaaa"))
        .await
        .expect("repeat")
        .into_inner();
    assert_eq!(again, first, "the first job, as it is now");
    let mut other = valid_spec();
    train(&mut other).epochs = 3;
    let reused = jobs
        .submit_job(submit_with(other.clone(), "cli-0190aaaa"))
        .await
        .expect_err("another spec");
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
    assert!(
        reused.message().starts_with("request_id: ") && reused.message().contains(&first.job_id),
        "{}",
        reused.message()
    );
    for bad in ["has space", &"x".repeat(129), "a/b"] {
        let err = jobs
            .submit_job(submit_with(valid_spec(), bad))
            .await
            .expect_err("bad request id");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with("request_id: "),
            "{}",
            err.message()
        );
    }
    assert_eq!(server.job_rows().await, 1);
    let second = jobs
        .submit_job(submit_with(other, "cli-0190aaab"))
        .await
        .expect("another key")
        .into_inner();
    assert_ne!(second.job_id, first.job_id);
    assert_eq!(server.job_rows().await, 2);
    server.stop().await;
}

#[tokio::test]
async fn list_jobs_filters_by_kind_and_name_and_names_a_bad_filter() {
    let server = TestServer::start_with(&redis_url(), &[]).await;
    let mut jobs = server.jobs();
    let mut named = valid_spec();
    named.name = "Needle-in-haystack".into();
    let needle = submit(&mut jobs, named).await;
    submit(&mut jobs, valid_spec()).await;
    let page = jobs
        .list_jobs(v1::ListJobsRequest {
            name_contains: "NEEDLE".into(),
            kinds: vec!["mnist_classifier".into()],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<_> = page.jobs.iter().map(|j| j.id.clone()).collect();
    assert_eq!(ids, vec![needle], "the name filter ignores case");
    for (req, field) in [
        (
            v1::ListJobsRequest {
                kinds: vec!["mnist_classifier".into(), "resnet".into()],
                ..Default::default()
            },
            "kinds[1]",
        ),
        (
            v1::ListJobsRequest {
                name_contains: "x".repeat(257),
                ..Default::default()
            },
            "name_contains",
        ),
    ] {
        let err = jobs.list_jobs(req).await.expect_err("a bad filter");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{field}: {err:?}");
    }
}

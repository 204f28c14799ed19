//! Service tests: `server::run` in-process on 127.0.0.1:0, each test with a database of its own
//! (created by the server, dropped at the end) and a Redis key prefix of its own, driven through
//! the generated tonic clients.
//!
//! Needs DATABASE_URL (any database on the server, for example
//! postgres://postgres@127.0.0.1:5432/postgres) and Redis at REDIS_URL (default
//! redis://127.0.0.1:6379).

mod common;

use common::{admin_url, free_port, redis_url, wait_until_serving, Cleanup, WAIT};

use std::time::Duration;

use clap::Parser as _;
use proto::v1::{
    self, job_event::Event, job_service_client::JobServiceClient,
    worker_service_client::WorkerServiceClient,
};
use server::dispatch::Dispatcher;
use server::Config;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic::Code;
use uuid::Uuid;

/// A coordinator running in this process.
struct TestServer {
    channel: Channel,
    /// Straight to the server's database, for checks the API cannot make.
    pool: PgPool,
    /// The server's own Redis queue, seen from outside.
    queue: Dispatcher,
    /// The artifact directory of a `file://` store (empty for S3); removed at the end.
    artifacts: tempfile::TempDir,
    /// Where the server's Prometheus endpoint listens.
    metrics_addr: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
    _cleanup: Cleanup,
}

impl TestServer {
    async fn start() -> Self {
        Self::start_with(&redis_url(), &[]).await
    }

    /// `server_redis` is the server's REDIS_URL; the test observes the queue on the real Redis.
    async fn start_with(server_redis: &str, flags: &[&str]) -> Self {
        Self::start_configured(server_redis, flags, |_| {}).await
    }

    /// Like [`Self::start_with`], with a last say over the parsed configuration. Artifacts go
    /// to a temporary directory unless `flags` or `tweak` say otherwise.
    async fn start_configured(
        server_redis: &str,
        flags: &[&str],
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let artifacts = tempfile::tempdir().expect("artifact dir");
        let artifacts_url = format!("file://{}", artifacts.path().display());
        let cleanup = Cleanup::new();
        let db_url = cleanup.db_url();
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "trainq-server",
            "--metrics-listen",
            &metrics_addr,
            "--database-url",
            &db_url,
            "--redis-url",
            server_redis,
            "--redis-prefix",
            &cleanup.redis_prefix,
            "--reconcile-interval-ms",
            "100",
            "--retry-backoff-ms",
            "50",
            "--artifacts",
            &artifacts_url,
        ];
        args.extend_from_slice(flags);
        let mut config = Config::try_parse_from(args).expect("valid flags");
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server::run(config, listener, async {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_lazy();
        wait_until_serving(channel.clone()).await;
        let pool = PgPool::connect(&db_url)
            .await
            .expect("the server created its database");
        let queue = Dispatcher::new(&redis_url(), &cleanup.redis_prefix).expect("redis url");
        TestServer {
            channel,
            pool,
            queue,
            artifacts,
            metrics_addr,
            stop,
            task,
            _cleanup: cleanup,
        }
    }

    fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::new(self.channel.clone())
    }

    fn workers(&self) -> WorkerServiceClient<Channel> {
        WorkerServiceClient::new(self.channel.clone())
    }

    async fn job_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Asks the server to stop; it must shut down cleanly and in time. Clean-up follows on drop.
    async fn stop(self) {
        let _ = self.stop.send(());
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server stops in time");
        result
            .expect("server task did not panic")
            .expect("server shut down cleanly");
        self.pool.close().await;
    }
}

/// `GET path` over plain HTTP/1.0: the status code and the body.
async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    (status, body.to_string())
}

/// The value of the sample `series` (name and labels exactly as exposed) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn train(spec: &mut v1::JobSpec) -> &mut v1::Training {
    spec.training.get_or_insert_with(Default::default)
}

fn valid_spec() -> v1::JobSpec {
    v1::JobSpec {
        name: "mnist-smoke".into(),
        labels: [("team".to_string(), "vision".to_string())].into(),
        training: Some(v1::Training {
            epochs: 2,
            batch_size: 64,
            learning_rate: 1e-3,
            seed: 7,
            ..Default::default()
        }),
        max_attempts: 0,
        depends_on: vec![],
        experiment: Some(v1::job_spec::Experiment::MnistClassifier(
            v1::MnistClassifier {},
        )),
    }
}

async fn submit(jobs: &mut JobServiceClient<Channel>, spec: v1::JobSpec) -> String {
    let resp = jobs
        .submit_job(v1::SubmitJobRequest { spec: Some(spec) })
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(resp.state(), v1::JobState::Queued);
    resp.job_id
}

async fn get(jobs: &mut JobServiceClient<Channel>, id: &str) -> v1::Job {
    jobs.get_job(v1::GetJobRequest { job_id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

fn point(name: &str, step: u64, value: f64) -> v1::MetricPoint {
    v1::MetricPoint {
        name: name.into(),
        step,
        epoch: 1,
        value,
    }
}

/// Waits until `check` holds, polling; panics with `what` after [`WAIT`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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
        server.queue.ready_ids().await.expect("redis"),
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
            .submit_job(v1::SubmitJobRequest { spec })
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
        server.queue.ready_ids().await.expect("redis").is_empty(),
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
            names: vec![],
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
        })
        .await;
    assert!(!claim.expect("claim answers").into_inner().claimed);
    server.stop().await;
}

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
        point("train/loss", 1, 2.3),
        point("train/loss", 2, 1.1),
        point("test/accuracy", 2, 0.91),
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
            names: vec![],
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
async fn a_retried_job_is_dispatched_again_once_its_backoff_has_passed() {
    let server = TestServer::start().await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    assert!(server.queue.ready_ids().await.expect("redis").contains(&id));
    server
        .queue
        .delete_queue()
        .await
        .expect("the worker popped it");
    let claim = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.clone(),
            worker_id: "w".into(),
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
        server.queue.ready_ids().await.expect("redis") == [id.clone()]
    })
    .await;
    let again = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.clone(),
            worker_id: "w".into(),
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
        .delete_queue()
        .await
        .expect("redis loses the queue");
    eventually("the reconciler pushes the lost id", || async {
        server.queue.ready_ids().await.expect("redis").contains(&id)
    })
    .await;
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

#[tokio::test]
async fn health_reports_serving_and_reflection_lists_the_services_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1 as r1, v1alpha as r1a};
    let server = TestServer::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel.clone());
    for service in ["", "trainq.v1.JobService", "trainq.v1.WorkerService"] {
        let req = tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        let status = health
            .check(req)
            .await
            .expect("health")
            .into_inner()
            .status();
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }

    let mut v1 = r1::server_reflection_client::ServerReflectionClient::new(server.channel.clone());
    let req = r1::ServerReflectionRequest {
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
        ..Default::default()
    };
    let mut stream = v1
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("v1")
        .into_inner();
    let resp = stream.next().await.expect("one response").expect("ok");
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("unexpected response {resp:?}")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "trainq.v1.JobService",
        "trainq.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    let mut v1alpha =
        r1a::server_reflection_client::ServerReflectionClient::new(server.channel.clone());
    let req = r1a::ServerReflectionRequest {
        message_request: Some(
            r1a::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
        ..Default::default()
    };
    let mut stream = v1alpha
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("v1alpha")
        .into_inner();
    assert!(stream.next().await.expect("one response").is_ok());
    server.stop().await;
}

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
async fn a_server_waits_for_an_unreachable_postgres_instead_of_exiting_and_still_stops_on_request()
{
    let artifacts = tempfile::tempdir().expect("artifact dir");
    let artifacts_url = format!("file://{}", artifacts.path().display());
    let config = Config::try_parse_from([
        "trainq-server",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/trainq",
        "--metrics-listen",
        "off",
        "--artifacts",
        &artifacts_url,
    ])
    .expect("valid flags");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::run(config, listener, async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !task.is_finished(),
        "still waiting for postgres, not crashed"
    );
    let _ = stop.send(());
    let result = tokio::time::timeout(WAIT, task)
        .await
        .expect("stops in time")
        .expect("no panic");
    result.expect("a shutdown while waiting is a clean exit");
}

// ---------------------------------------------------------------------------------------------
// Dependencies
// ---------------------------------------------------------------------------------------------

/// Submits a spec that may start in any state; returns the id and that state.
async fn submit_any(
    jobs: &mut JobServiceClient<Channel>,
    spec: v1::JobSpec,
) -> (String, v1::JobState) {
    let resp = jobs
        .submit_job(v1::SubmitJobRequest { spec: Some(spec) })
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

async fn claim(workers: &mut WorkerServiceClient<Channel>, id: &str) -> v1::JobLease {
    let claim = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.into(),
            worker_id: "w".into(),
        })
        .await
        .expect("claim")
        .into_inner();
    assert!(claim.claimed, "job {id} was claimable");
    claim.lease.expect("lease")
}

/// Claims a job that is in its retry backoff, as soon as the backoff has passed.
async fn claim_after_backoff(workers: &mut WorkerServiceClient<Channel>, id: &str) -> v1::JobLease {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let claim = workers
            .claim_job(v1::ClaimJobRequest {
                job_id: id.into(),
                worker_id: "w".into(),
            })
            .await
            .expect("claim")
            .into_inner();
        if let Some(lease) = claim.lease {
            return lease;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} never became claimable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The states a watcher of `id` sees until its stream ends.
async fn watched_states(
    jobs: &mut JobServiceClient<Channel>,
    id: &str,
) -> JoinHandle<Vec<v1::JobState>> {
    let mut events = jobs
        .watch_job(v1::WatchJobRequest { job_id: id.into() })
        .await
        .expect("watch")
        .into_inner();
    tokio::spawn(async move {
        let mut states = Vec::new();
        let collect = async {
            while let Some(event) = events.next().await {
                if let Event::Job(job) = event.expect("event").event.expect("set") {
                    states.push(job.state());
                }
            }
        };
        tokio::time::timeout(WAIT, collect)
            .await
            .expect("the stream ends after the terminal state");
        states
    })
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
        .delete_queue()
        .await
        .expect("the worker popped it");
    let (transfer, state) = submit_any(&mut jobs, transfer_spec(&source)).await;
    assert_eq!(state, v1::JobState::Waiting);
    let mut downstream_spec = valid_spec();
    downstream_spec.depends_on = vec![transfer.to_uppercase()];
    let (downstream, state) = submit_any(&mut jobs, downstream_spec).await;
    assert_eq!(state, v1::JobState::Waiting);
    assert!(
        server.queue.ready_ids().await.expect("redis").is_empty(),
        "waiting jobs are not pushed"
    );
    let job = get(&mut jobs, &downstream).await;
    assert_eq!(
        job.spec.expect("spec").depends_on,
        [transfer.to_uppercase()],
        "the spec reads back as submitted"
    );

    let transfer_watch = watched_states(&mut jobs, &transfer).await;
    let downstream_watch = watched_states(&mut jobs, &downstream).await;
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
        server.queue.ready_ids().await.expect("redis"),
        [transfer.as_str()],
        "pushed right after the source succeeded"
    );
    assert_eq!(
        get(&mut jobs, &downstream).await.state(),
        v1::JobState::Waiting
    );

    let lease = claim(&mut workers, &transfer).await;
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

    let states = transfer_watch.await.expect("watcher");
    assert_eq!(
        states,
        [
            v1::JobState::Waiting,
            v1::JobState::Queued,
            v1::JobState::Running,
            v1::JobState::Failed
        ]
    );
    let states = downstream_watch.await.expect("watcher");
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
        .submit_job(v1::SubmitJobRequest { spec: Some(spec) })
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

// ---------------------------------------------------------------------------------------------
// Artifacts
// ---------------------------------------------------------------------------------------------

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// Deterministic bytes that differ from artifact to artifact.
fn content(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 131 + salt as usize * 7) % 251) as u8)
        .collect()
}

fn upload_header(
    lease: &v1::JobLease,
    kind: &str,
    name: &str,
    epoch: u32,
    data: &[u8],
) -> v1::UploadArtifactHeader {
    v1::UploadArtifactHeader {
        lease: Some(lease.clone()),
        kind: kind.into(),
        name: name.into(),
        epoch,
        size_bytes: data.len() as u64,
        sha256: sha256_hex(data),
        step: 0,
    }
}

/// The header, then `data` in chunks of `chunk` bytes.
fn upload_messages(
    header: v1::UploadArtifactHeader,
    data: &[u8],
    chunk: usize,
) -> Vec<v1::UploadArtifactChunk> {
    use v1::upload_artifact_chunk::Part;
    std::iter::once(Part::Header(header))
        .chain(data.chunks(chunk).map(|c| Part::Data(c.to_vec())))
        .map(|part| v1::UploadArtifactChunk { part: Some(part) })
        .collect()
}

async fn upload(
    workers: &mut WorkerServiceClient<Channel>,
    header: v1::UploadArtifactHeader,
    data: &[u8],
) -> Result<v1::Artifact, tonic::Status> {
    let messages = upload_messages(header, data, 1024 * 1024);
    workers
        .upload_artifact(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

/// The record (from the first chunk), the bytes and the number of chunks of a download.
async fn download(
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

async fn list_artifacts(
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
async fn round_trip_artifacts(server: &TestServer) -> Vec<v1::Artifact> {
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
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
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

// ---------------------------------------------------------------------------------------------
// Artifacts on S3 (a real moto server)
// ---------------------------------------------------------------------------------------------

/// Where `moto_server` is: $TRAINQ_MOTO_SERVER, `.tools/moto_server` (scripts/setup.sh links it
/// from the project's virtualenv), or on PATH.
fn moto_server_binary() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("TRAINQ_MOTO_SERVER") {
        return path.into();
    }
    let mut candidates =
        vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/moto_server")];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("moto_server")));
    }
    candidates
        .into_iter()
        .find(|c| c.is_file())
        .unwrap_or_else(|| {
            panic!(
                "moto_server not found ($TRAINQ_MOTO_SERVER, .tools/moto_server, or on PATH): \
             run scripts/setup.sh, which installs moto[server] into the project's virtualenv"
            )
        })
}

/// A moto S3 server on a free port of 127.0.0.1, killed on drop.
struct Moto {
    port: u16,
    child: std::process::Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One plain HTTP/1.1 request to moto; returns the status line and headers.
async fn http(port: u16, method: &str, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    Ok(text.split("\r\n\r\n").next().unwrap_or_default().to_owned())
}

impl Moto {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = std::process::Command::new(moto_server_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let moto = Moto { port, child };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while http(port, "GET", "/").await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "moto_server did not start listening"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        moto
    }

    async fn create_bucket(&self, bucket: &str) {
        let head = http(self.port, "PUT", &format!("/{bucket}"))
            .await
            .expect("PUT bucket");
        assert!(
            head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
            "{head}"
        );
    }
}

#[tokio::test]
async fn artifacts_round_trip_through_a_real_s3_server() {
    let moto = Moto::start().await;
    moto.create_bucket("trainq-artifacts").await;
    let settings = server::artifacts::S3Settings {
        endpoint: Some(format!("http://127.0.0.1:{}", moto.port)),
        region: Some("us-east-1".into()),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        allow_http: Some(true),
    };
    let server = TestServer::start_configured(
        &redis_url(),
        &["--artifacts", "s3://trainq-artifacts/runs/ci"],
        |config| config.s3 = settings,
    )
    .await;
    let stored = round_trip_artifacts(&server).await;
    // Look in the bucket directly, with a client of our own.
    use object_store::ObjectStoreExt as _;
    let bucket = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{}", moto.port))
        .with_region("us-east-1")
        .with_bucket_name("trainq-artifacts")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_allow_http(true)
        .build()
        .expect("s3 client");
    for artifact in &stored {
        let key = artifact
            .uri
            .strip_prefix("s3://trainq-artifacts/")
            .expect("an s3 uri in the bucket");
        assert!(key.starts_with("runs/ci/jobs/"), "{key}");
        let meta = bucket
            .head(&object_store::path::Path::from(key))
            .await
            .expect("the object is in the bucket");
        assert_eq!(meta.size, artifact.size_bytes, "{key}");
    }
    assert!(
        files_under(server.artifacts.path()).is_empty(),
        "nothing went to local files"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Hand-backs, resumable state and attempts
// ---------------------------------------------------------------------------------------------

async fn claim_as(
    workers: &mut WorkerServiceClient<Channel>,
    id: &str,
    worker: &str,
) -> v1::ClaimJobResponse {
    workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.into(),
            worker_id: worker.into(),
        })
        .await
        .expect("claim")
        .into_inner()
}

#[tokio::test]
async fn a_handed_back_job_is_pushed_at_once_and_its_next_attempt_resumes_from_the_stored_state() {
    // No reconciler rounds: the push after the hand-back is the release's own.
    let server = TestServer::start_with(&redis_url(), &["--reconcile-interval-ms", "600000"]).await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    server
        .queue
        .delete_queue()
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
        server.queue.ready_ids().await.expect("redis"),
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

// ---------------------------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------------------------

fn code_of<T>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

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
                    names: vec!["train/loss".into()],
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
                        points: vec![point("train/loss", 1, 1.0)],
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
    jobs.get_metrics(metrics(vec!["train/loss".into(); 64]))
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

// ---------------------------------------------------------------------------------------------
// Postgres outages and shutdown
// ---------------------------------------------------------------------------------------------

/// A TCP proxy in front of the test's Postgres that can be cut (every connection dropped, new
/// ones closed at once) and restored, to play a Postgres outage without touching the shared
/// server.
struct PgProxy {
    addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl PgProxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (up, conns) = (up.clone(), conns.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the connection closes at once
                    }
                    let conn = tokio::spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    conns.lock().expect("lock").push(conn);
                }
            })
        };
        Self {
            addr,
            up,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for conn in self.conns.lock().expect("lock").drain(..) {
            conn.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test]
async fn calls_answer_unavailable_quickly_while_postgres_is_down_and_work_again_when_it_is_back() {
    let admin = admin_url();
    let (_, rest) = admin.split_once('@').expect("DATABASE_URL has user@host");
    let (host_port, _) = rest.split_once('/').expect("DATABASE_URL names a database");
    let target = tokio::net::lookup_host(host_port)
        .await
        .expect("postgres host resolves")
        .next()
        .expect("an address");
    let proxy = PgProxy::start(target).await;
    let proxied = format!("@{}/", proxy.addr);
    let server = TestServer::start_configured(
        &redis_url(),
        &["--db-acquire-timeout-ms", "500"],
        |config| {
            config.database_url =
                config
                    .database_url
                    .replacen(&format!("@{host_port}/"), &proxied, 1);
        },
    )
    .await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let lease = claim(&mut workers, &id).await;

    proxy.cut();
    let started = tokio::time::Instant::now();
    let read = jobs
        .get_job(v1::GetJobRequest { job_id: id.clone() })
        .await
        .expect_err("postgres is down");
    let write = jobs
        .submit_job(v1::SubmitJobRequest {
            spec: Some(valid_spec()),
        })
        .await
        .expect_err("postgres is down");
    let beat = workers
        .heartbeat(v1::HeartbeatRequest {
            lease: Some(lease.clone()),
        })
        .await
        .expect_err("postgres is down");
    let took = started.elapsed();
    assert_eq!(
        (read.code(), write.code(), beat.code()),
        (Code::Unavailable, Code::Unavailable, Code::Unavailable),
        "{read:?} {write:?} {beat:?}"
    );
    assert!(took < Duration::from_secs(5), "failed fast: {took:?}");

    proxy.restore();
    eventually("calls work again once postgres is back", || {
        let (mut jobs, id) = (jobs.clone(), id.clone());
        async move { jobs.get_job(v1::GetJobRequest { job_id: id }).await.is_ok() }
    })
    .await;
    let beat = workers
        .heartbeat(v1::HeartbeatRequest { lease: Some(lease) })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(beat.keep_running, "the lease survived the outage");
    server.stop().await;
}

#[tokio::test]
async fn a_server_gives_up_on_an_unreachable_postgres_after_db_wait_ms_with_a_clear_error() {
    let artifacts = tempfile::tempdir().expect("artifact dir");
    let artifacts_url = format!("file://{}", artifacts.path().display());
    let config = Config::try_parse_from([
        "trainq-server",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/trainq",
        "--metrics-listen",
        "off",
        "--db-wait-ms",
        "600",
        "--artifacts",
        &artifacts_url,
    ])
    .expect("valid flags");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let result = tokio::time::timeout(
        WAIT,
        server::run(config, listener, std::future::pending::<()>()),
    )
    .await
    .expect("gives up in time");
    let message = format!("{:#}", result.expect_err("an error, not a clean exit"));
    assert!(
        message.contains("postgres was not reachable within --db-wait-ms (600 ms)"),
        "{message}"
    );
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

#[tokio::test]
async fn the_metrics_endpoint_counts_jobs_by_state_dispatch_latency_retries_and_rpcs() {
    let server = TestServer::start().await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let first = submit(&mut jobs, valid_spec()).await;
    let _second = submit(&mut jobs, valid_spec()).await;
    let (status, text) = http_get(&server.metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(&text, "trainq_jobs{state=\"queued\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "trainq_jobs{state=\"running\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(sample(&text, "trainq_queue_depth"), Some(2.0), "{text}");
    assert_eq!(sample(&text, "trainq_store_up"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "trainq_redis_up"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "trainq_dispatch_latency_seconds_count"),
        Some(0.0),
        "{text}"
    );

    // A claim observes how long the job waited; a retryable failure is a retry.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let lease = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: first.clone(),
            worker_id: "w".into(),
        })
        .await
        .expect("claim")
        .into_inner()
        .lease;
    workers
        .fail_job(v1::FailJobRequest {
            lease,
            reason: "nccl timeout".into(),
            permanent: false,
        })
        .await
        .expect("fail");
    let _ = jobs
        .get_job(v1::GetJobRequest {
            job_id: "not-a-uuid".into(),
        })
        .await
        .expect_err("invalid id");
    let (_, text) = http_get(&server.metrics_addr, "/metrics").await;
    assert_eq!(
        sample(&text, "trainq_dispatch_latency_seconds_count"),
        Some(1.0),
        "{text}"
    );
    let waited = sample(&text, "trainq_dispatch_latency_seconds_sum").expect("a sum");
    assert!((0.1..10.0).contains(&waited), "waited {waited} s: {text}");
    assert_eq!(
        sample(&text, "trainq_dispatch_latency_seconds_bucket{le=\"0.1\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "trainq_retries_total{cause=\"failed\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "trainq_jobs{state=\"queued\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "trainq_rpc_duration_seconds_count{code=\"0\",method=\"SubmitJob\",service=\"trainq.v1.JobService\"}"
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "trainq_rpc_duration_seconds_count{code=\"3\",method=\"GetJob\",service=\"trainq.v1.JobService\"}"
        ),
        Some(1.0),
        "{text}"
    );
    let (status, _) = http_get(&server.metrics_addr, "/nothing-here").await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test]
async fn a_lease_expiry_is_counted_and_the_job_retried() {
    let server = TestServer::start_with(&redis_url(), &["--lease-timeout-ms", "300"]).await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let claimed = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.clone(),
            worker_id: "silent".into(),
        })
        .await
        .expect("claim")
        .into_inner();
    assert!(claimed.claimed);
    eventually("the reaper takes the silent worker's job", || async {
        get(&mut jobs.clone(), &id).await.state() == v1::JobState::Queued
    })
    .await;
    let (_, text) = http_get(&server.metrics_addr, "/metrics").await;
    assert_eq!(
        sample(&text, "trainq_lease_expiries_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "trainq_retries_total{cause=\"lease_expired\"}"),
        Some(1.0),
        "{text}"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Sweeps
// ---------------------------------------------------------------------------------------------

fn json_value(v: serde_json::Value) -> proto::Value {
    serde_json::from_value(v).expect("JSON is a google.protobuf.Value")
}

/// A CVAE sweep: random initialisation against a luminance transfer from a source stage.
fn study_spec(seeds: Vec<u64>) -> v1::SweepSpec {
    let base: v1::JobSpec = serde_json::from_value(serde_json::json!({
        "name": "ignored",
        "labels": {"team": "vision"},
        "training": {"epochs": 2, "batchSize": 64, "learningRate": 0.001},
        "cifarCvae": {}
    }))
    .expect("a JobSpec");
    v1::SweepSpec {
        name: "study".into(),
        labels: [("project".to_owned(), "transfer".to_owned())].into(),
        base: Some(base),
        grid: vec![v1::GridAxis {
            field: "cifarCvae.init".into(),
            values: vec![
                json_value(serde_json::json!({"random": {}})),
                json_value(
                    serde_json::json!({"transfer": {"conv1": "CONV1_ADAPTATION_LUMINANCE", "copyConv2": true}}),
                ),
            ],
            names: vec!["random".into(), "lum".into()],
        }],
        seeds,
        source: Some(valid_spec()),
    }
}

async fn submit_sweep(jobs: &mut JobServiceClient<Channel>, spec: v1::SweepSpec) -> v1::Sweep {
    jobs.submit_sweep(v1::SubmitSweepRequest { spec: Some(spec) })
        .await
        .expect("submit sweep")
        .into_inner()
}

async fn get_sweep(jobs: &mut JobServiceClient<Channel>, id: &str) -> v1::Sweep {
    jobs.get_sweep(v1::GetSweepRequest {
        sweep_id: id.into(),
    })
    .await
    .expect("get sweep")
    .into_inner()
}

fn run_of<'a>(sweep: &'a v1::Sweep, arm: &str, seed: u64) -> &'a v1::SweepRun {
    sweep
        .runs
        .iter()
        .find(|r| r.arm == arm && r.seed == seed)
        .unwrap_or_else(|| panic!("run {arm}/{seed}"))
}

fn transfer_source_of(job: &v1::Job) -> String {
    match job.spec.as_ref().and_then(|s| s.experiment.as_ref()) {
        Some(v1::job_spec::Experiment::CifarCvae(c)) => {
            match c.init.as_ref().and_then(|i| i.kind.as_ref()) {
                Some(v1::initialization::Kind::Transfer(t)) => t.source_job_id.clone(),
                _ => String::new(),
            }
        }
        _ => String::new(),
    }
}

/// Claims a job, reports `points` (name, step, epoch, value) and completes it.
async fn run_to_success(
    workers: &mut WorkerServiceClient<Channel>,
    id: &str,
    points: &[(&str, u64, u32, f64)],
) {
    let lease = claim(workers, id).await;
    if !points.is_empty() {
        workers
            .report_metrics(v1::ReportMetricsRequest {
                lease: Some(lease.clone()),
                points: points
                    .iter()
                    .map(|&(name, step, epoch, value)| v1::MetricPoint {
                        name: name.into(),
                        step,
                        epoch,
                        value,
                    })
                    .collect(),
            })
            .await
            .expect("report");
    }
    workers
        .complete_job(v1::CompleteJobRequest {
            lease: Some(lease),
            final_step: 20,
        })
        .await
        .expect("complete");
}

#[tokio::test]
async fn a_sweep_stores_sources_and_arms_in_order_and_transfer_arms_wait_on_their_seeds_source() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let sweep = submit_sweep(&mut jobs, study_spec(vec![7, 3])).await;
    assert_eq!(sweep.state(), v1::SweepState::Running);
    assert_eq!(sweep.arms, ["random", "lum"]);
    let order: Vec<(&str, u64, bool)> = sweep
        .runs
        .iter()
        .map(|r| (r.arm.as_str(), r.seed, r.source))
        .collect();
    assert_eq!(
        order,
        [
            ("source", 7, true),
            ("source", 3, true),
            ("random", 7, false),
            ("random", 3, false),
            ("lum", 7, false),
            ("lum", 3, false),
        ]
    );
    assert_eq!(server.job_rows().await, 6);
    for seed in [7, 3] {
        let source = run_of(&sweep, "source", seed);
        assert_eq!(source.state(), v1::JobState::Queued);
        assert_eq!(run_of(&sweep, "random", seed).state(), v1::JobState::Queued);
        let lum = run_of(&sweep, "lum", seed);
        assert_eq!(lum.state(), v1::JobState::Waiting);
        let job = get(&mut jobs, &lum.job_id).await;
        assert_eq!(transfer_source_of(&job), source.job_id);
        let spec = job.spec.expect("spec");
        assert_eq!(spec.name, format!("study/lum/s{seed}"));
        assert_eq!(spec.training.as_ref().expect("training").seed, seed);
        assert_eq!(spec.labels["sweep"], "study");
        assert_eq!(spec.labels["sweep_id"], sweep.sweep_id);
        assert_eq!(spec.labels["arm"], "lum");
        assert_eq!(spec.labels["seed"], seed.to_string());
        assert_eq!(spec.labels["project"], "transfer");
        assert_eq!(spec.labels["team"], "vision");
        let source_job = get(&mut jobs, &source.job_id).await;
        assert_eq!(
            source_job.spec.expect("spec").name,
            format!("study/source/s{seed}")
        );
    }
    let counts: Vec<(v1::JobState, u32)> = sweep
        .jobs_by_state
        .iter()
        .map(|c| (c.state(), c.count))
        .collect();
    assert_eq!(
        counts,
        [(v1::JobState::Waiting, 2), (v1::JobState::Queued, 4)]
    );
    // The queued jobs were pushed at once.
    let mut queued = server.queue.ready_ids().await.expect("redis");
    queued.sort();
    queued.dedup();
    let mut expected: Vec<String> = sweep
        .runs
        .iter()
        .filter(|r| r.state() == v1::JobState::Queued)
        .map(|r| r.job_id.clone())
        .collect();
    expected.sort();
    assert_eq!(queued, expected);
    // Reads agree with the submit's answer; the spec comes back as submitted.
    let read = get_sweep(&mut jobs, &sweep.sweep_id).await;
    assert_eq!(read, sweep);
    assert_eq!(read.spec, Some(study_spec(vec![7, 3])));
    let listed = jobs
        .list_jobs(v1::ListJobsRequest {
            labels: [("sweep_id".to_owned(), sweep.sweep_id.clone())].into(),
            ..Default::default()
        })
        .await
        .expect("list jobs")
        .into_inner();
    assert_eq!(listed.jobs.len(), 6);
    server.stop().await;
}

#[tokio::test]
async fn an_invalid_sweep_is_rejected_naming_its_field_and_nothing_is_stored() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let mut repeated_seed = study_spec(vec![1, 2, 1]);
    let mut bad_value = study_spec(vec![1]);
    bad_value.grid.push(v1::GridAxis {
        field: "training.learningRate".into(),
        values: vec![
            json_value(serde_json::json!(0.01)),
            json_value(serde_json::json!(-1)),
        ],
        names: vec![],
    });
    let mut no_source_id = study_spec(vec![1]);
    no_source_id.source = None;
    // Valid on its own, but its source does not exist: the transaction rolls back every job
    // stored before it.
    let mut missing_source = study_spec(vec![1]);
    missing_source.source = None;
    missing_source.grid[0].values[1] = json_value(serde_json::json!({"transfer": {
        "conv1": "CONV1_ADAPTATION_LUMINANCE",
        "sourceJobId": "0190aaaa-0000-7000-8000-000000000000"
    }}));
    let mut no_spec = study_spec(vec![1]);
    no_spec.base = None;
    repeated_seed.name = "repeated".into();
    for (spec, field) in [
        (Some(repeated_seed), "spec.seeds[2]"),
        (Some(bad_value), "spec.grid[1].values[1]"),
        (Some(no_source_id), "spec.grid[0].values[1]"),
        (
            Some(missing_source),
            "spec.base.cifar_cvae.init.transfer.source_job_id",
        ),
        (Some(no_spec), "spec.base"),
        (None, "spec"),
    ] {
        let status = jobs
            .submit_sweep(v1::SubmitSweepRequest { spec })
            .await
            .expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{field}: {}",
            status.message()
        );
    }
    assert_eq!(server.job_rows().await, 0);
    let sweeps: i64 = sqlx::query_scalar("SELECT count(*) FROM sweeps")
        .fetch_one(&server.pool)
        .await
        .expect("count");
    assert_eq!(sweeps, 0);
    server.stop().await;
}

#[tokio::test]
async fn unknown_sweep_ids_are_not_found_and_malformed_ones_are_invalid() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let unknown = Uuid::now_v7().to_string();
    for id in [unknown.as_str(), "nope", ""] {
        let want = if id == unknown {
            Code::NotFound
        } else {
            Code::InvalidArgument
        };
        let get = jobs
            .get_sweep(v1::GetSweepRequest {
                sweep_id: id.into(),
            })
            .await;
        assert_eq!(code_of(get), want, "get {id:?}");
        let cancel = jobs
            .cancel_sweep(v1::CancelSweepRequest {
                sweep_id: id.into(),
                reason: String::new(),
            })
            .await;
        assert_eq!(code_of(cancel), want, "cancel {id:?}");
        let watch = jobs
            .watch_sweep(v1::WatchSweepRequest {
                sweep_id: id.into(),
            })
            .await;
        assert_eq!(code_of(watch), want, "watch {id:?}");
        let summary = jobs
            .get_sweep_summary(v1::GetSweepSummaryRequest {
                sweep_id: id.into(),
                ..Default::default()
            })
            .await;
        assert_eq!(code_of(summary), want, "summary {id:?}");
    }
    let bad_token = jobs
        .list_sweeps(v1::ListSweepsRequest {
            page_size: 0,
            page_token: "garbage".into(),
        })
        .await;
    assert_eq!(code_of(bad_token), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn sweeps_are_listed_newest_first_page_by_page_with_their_job_counts() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit_sweep(&mut jobs, study_spec(vec![1])).await.sweep_id);
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = jobs
            .list_sweeps(v1::ListSweepsRequest {
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .expect("list")
            .into_inner();
        for s in &page.sweeps {
            assert!(s.runs.is_empty(), "listed without runs");
            let total: u32 = s.jobs_by_state.iter().map(|c| c.count).sum();
            assert_eq!(total, 3);
            seen.push(s.sweep_id.clone());
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);
    server.stop().await;
}

/// Collects the sweep states a watcher sees until its stream ends.
async fn watched_sweep(
    jobs: &mut JobServiceClient<Channel>,
    id: &str,
) -> JoinHandle<Vec<v1::Sweep>> {
    let mut stream = jobs
        .watch_sweep(v1::WatchSweepRequest {
            sweep_id: id.into(),
        })
        .await
        .expect("watch sweep")
        .into_inner();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let collect = async {
            while let Some(sweep) = stream.next().await {
                seen.push(sweep.expect("message"));
            }
        };
        tokio::time::timeout(WAIT, collect)
            .await
            .expect("the stream ends once every job ended");
        seen
    })
}

#[tokio::test]
async fn cancelling_a_sweep_cancels_its_unfinished_jobs_keeps_finished_ones_and_ends_its_watchers()
{
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let mut workers = server.workers();
    let sweep = submit_sweep(&mut jobs, study_spec(vec![1, 2])).await;
    let watcher = watched_sweep(&mut jobs, &sweep.sweep_id).await;
    // Seed 1's source succeeds, so its transfer run is queued; seed 1's random run is running.
    run_to_success(&mut workers, &run_of(&sweep, "source", 1).job_id, &[]).await;
    let running = run_of(&sweep, "random", 1).job_id.clone();
    claim(&mut workers, &running).await;
    let cancelled = jobs
        .cancel_sweep(v1::CancelSweepRequest {
            sweep_id: sweep.sweep_id.clone(),
            reason: "wrong learning rate".into(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.state(), v1::SweepState::Cancelled);
    for run in &cancelled.runs {
        let want = if run.source && run.seed == 1 {
            v1::JobState::Succeeded
        } else {
            v1::JobState::Cancelled
        };
        assert_eq!(run.state(), want, "{} s{}", run.arm, run.seed);
    }
    assert_eq!(get(&mut jobs, &running).await.error, "wrong learning rate");
    let seen = watcher.await.expect("watcher");
    let last = seen.last().expect("some message");
    assert_eq!(last.state(), v1::SweepState::Cancelled);
    assert_eq!(seen[0].state(), v1::SweepState::Running);
    // Cancelling again changes nothing and is not an error.
    let again = jobs
        .cancel_sweep(v1::CancelSweepRequest {
            sweep_id: sweep.sweep_id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancel again")
        .into_inner();
    assert_eq!(again.runs, cancelled.runs);
    server.stop().await;
}

#[tokio::test]
async fn a_sweep_watcher_sees_each_change_and_the_stream_ends_when_every_job_ended() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let mut workers = server.workers();
    let mut spec = study_spec(vec![5]);
    spec.source = None;
    spec.grid[0].values.truncate(1);
    spec.grid[0].names.truncate(1);
    let sweep = submit_sweep(&mut jobs, spec).await;
    assert_eq!(sweep.runs.len(), 1);
    let watcher = watched_sweep(&mut jobs, &sweep.sweep_id).await;
    let id = sweep.runs[0].job_id.clone();
    let lease = claim(&mut workers, &id).await;
    // Give the watcher a moment to see the running state before the job ends.
    eventually("the job runs", || {
        let mut jobs = jobs.clone();
        let id = id.clone();
        async move { get(&mut jobs, &id).await.state() == v1::JobState::Running }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    workers
        .fail_job(v1::FailJobRequest {
            lease: Some(lease),
            reason: "diverged".into(),
            permanent: true,
        })
        .await
        .expect("fail");
    let seen = watcher.await.expect("watcher");
    let states: Vec<(v1::SweepState, v1::JobState)> = seen
        .iter()
        .map(|s| (s.state(), s.runs[0].state()))
        .collect();
    assert_eq!(
        states,
        [
            (v1::SweepState::Running, v1::JobState::Queued),
            (v1::SweepState::Running, v1::JobState::Running),
            (v1::SweepState::Partial, v1::JobState::Failed),
        ]
    );
    server.stop().await;
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

#[track_caller]
fn assert_stat(s: Option<&v1::Stat>, n: u32, mean: f64, sd: Option<f64>, t: f64) {
    let s = s.expect("a stat");
    assert_eq!(s.n, n, "{s:?}");
    assert!(close(s.mean, mean), "mean {} != {mean}", s.mean);
    match sd {
        None => assert!(
            s.sd.is_none() && s.ci_low.is_none() && s.ci_high.is_none(),
            "{s:?}"
        ),
        Some(sd) => {
            assert!(close(s.sd.expect("sd"), sd), "sd {:?} != {sd}", s.sd);
            let half = t * sd / f64::from(n).sqrt();
            assert!(close(s.ci_low.expect("low"), mean - half), "{s:?}");
            assert!(close(s.ci_high.expect("high"), mean + half), "{s:?}");
        }
    }
}

const T1: f64 = 12.706204736174705;
const T2: f64 = 4.302652729749464;
const NELBO: &str = "test/neg_elbo_nats";

/// Three seeds; the random arm all succeed, the transfer arm's seed 3 fails. neg_elbo at the
/// end of epoch 1 (step 10) and epoch 2 (step 20), with an extra mid-epoch point:
///
/// | seed | random e1, e2 | lum e1, e2 |
/// | 1    | 100, 90       | 89, 88     |
/// | 2    | 104, 94       | 91, 89     |
/// | 3    | 102, 86       | (failed)   |
async fn finished_study(server: &TestServer) -> v1::Sweep {
    let mut jobs = server.jobs();
    let mut workers = server.workers();
    let sweep = submit_sweep(&mut jobs, study_spec(vec![1, 2, 3])).await;
    for seed in [1, 2, 3] {
        run_to_success(&mut workers, &run_of(&sweep, "source", seed).job_id, &[]).await;
    }
    for (seed, e1, e2) in [(1, 100.0, 90.0), (2, 104.0, 94.0), (3, 102.0, 86.0)] {
        let points = [(NELBO, 5, 1, 50.0), (NELBO, 10, 1, e1), (NELBO, 20, 2, e2)];
        run_to_success(
            &mut workers,
            &run_of(&sweep, "random", seed).job_id,
            &points,
        )
        .await;
    }
    for (seed, e1, e2) in [(1, 89.0, 88.0), (2, 91.0, 89.0)] {
        let points = [(NELBO, 10, 1, e1), (NELBO, 20, 2, e2)];
        run_to_success(&mut workers, &run_of(&sweep, "lum", seed).job_id, &points).await;
    }
    let failing = run_of(&sweep, "lum", 3).job_id.clone();
    let lease = claim(&mut workers, &failing).await;
    workers
        .fail_job(v1::FailJobRequest {
            lease: Some(lease),
            reason: "diverged".into(),
            permanent: true,
        })
        .await
        .expect("fail");
    get_sweep(&mut jobs, &sweep.sweep_id).await
}

#[tokio::test]
async fn the_summary_gives_seed_statistics_paired_differences_convergence_and_missing_runs() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let sweep = finished_study(&server).await;
    assert_eq!(sweep.state(), v1::SweepState::Partial);
    let summary = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            ..Default::default()
        })
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(summary.baseline_arm, "random");
    assert_eq!(summary.convergence_metric, NELBO);
    assert_eq!(summary.convergence_target, 90.0);
    let [random, lum] = summary.arms.as_slice() else {
        panic!("two arms: {summary:?}")
    };
    let names: Vec<&str> = random.metrics.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "test/neg_elbo_nats",
            "test/bits_per_dim",
            "test/recon",
            "test/kl"
        ]
    );
    // Random: early 100, 104, 102; final 90, 94, 86.
    assert!(random.baseline && !lum.baseline);
    assert_eq!((random.seeds_planned, random.seeds_succeeded), (3, 3));
    assert!(random.missing.is_empty());
    let m = &random.metrics[0];
    assert_stat(m.early.as_ref(), 3, 102.0, Some(2.0), T2);
    assert_stat(m.last.as_ref(), 3, 90.0, Some(4.0), T2);
    assert!(m.early_diff.is_none() && m.last_diff.is_none());
    // A metric nobody reported: n = 0.
    assert_eq!(random.metrics[1].last.as_ref().expect("stat").n, 0);
    // Mean curve 102 (step 10), 90 (step 20): reaches the target at step 20; per seed, seeds 1
    // (90) and 3 (86) reach it at step 20, seed 2 (94) never.
    assert!(random.converged);
    assert_eq!(random.convergence_step, 20);
    assert_stat(
        random.convergence_step_per_seed.as_ref(),
        2,
        20.0,
        Some(0.0),
        T1,
    );
    assert_eq!(random.seeds_not_converged, 1);
    // Lum: seed 3 failed.
    assert_eq!((lum.seeds_planned, lum.seeds_succeeded), (3, 2));
    let missing = &lum.missing[..];
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0].seed, 3);
    assert_eq!(missing[0].job_id, run_of(&sweep, "lum", 3).job_id);
    assert_eq!(missing[0].state(), v1::JobState::Failed);
    assert_eq!(missing[0].error, "diverged");
    let m = &lum.metrics[0];
    assert_stat(m.early.as_ref(), 2, 90.0, Some(2f64.sqrt()), T1);
    assert_stat(m.last.as_ref(), 2, 88.5, Some(0.5f64.sqrt()), T1);
    // Paired by seed: early 89-100 = -11, 91-104 = -13; final 88-90 = -2, 89-94 = -5.
    assert_stat(m.early_diff.as_ref(), 2, -12.0, Some(2f64.sqrt()), T1);
    assert_stat(m.last_diff.as_ref(), 2, -3.5, Some(4.5f64.sqrt()), T1);
    // Mean curve 90 (step 10) already at the target; per seed 10 (89) and 20 (91, then 89).
    assert!(lum.converged);
    assert_eq!(lum.convergence_step, 10);
    assert_stat(
        lum.convergence_step_per_seed.as_ref(),
        2,
        15.0,
        Some(50f64.sqrt()),
        T1,
    );
    assert_eq!(lum.seeds_not_converged, 0);

    // Another baseline: the transfer arm; an unknown one is refused.
    let flipped = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            metrics: vec![NELBO.into()],
            baseline_arm: "lum".into(),
            convergence_metric: NELBO.into(),
        })
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(flipped.convergence_target, 88.5);
    assert_stat(
        flipped.arms[0].metrics[0].last_diff.as_ref(),
        2,
        3.5,
        Some(4.5f64.sqrt()),
        T1,
    );
    assert!(!flipped.arms[0].converged);
    assert_eq!(flipped.arms[0].seeds_not_converged, 2);
    let unknown = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            baseline_arm: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown arm");
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert!(
        unknown.message().starts_with("baseline_arm: "),
        "{unknown:?}"
    );
    let twice = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            metrics: vec![NELBO.into(), NELBO.into()],
            ..Default::default()
        })
        .await
        .expect_err("repeated metric");
    assert!(twice.message().starts_with("metrics[1]: "), "{twice:?}");
    server.stop().await;
}

#[tokio::test]
async fn the_sweep_summary_view_gives_the_same_numbers_as_the_rpc() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let sweep = finished_study(&server).await;
    let summary = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            ..Default::default()
        })
        .await
        .expect("summary")
        .into_inner();
    type Row = (
        String,
        String,
        String,
        i32,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<i32>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT arm, metric, stage, n, mean, sd, ci_low, ci_high,
                diff_n, diff_mean, diff_sd, diff_ci_low, diff_ci_high
         FROM sweep_summary WHERE sweep_id = $1
         ORDER BY arm_position, metric, stage",
    )
    .bind(Uuid::parse_str(&sweep.sweep_id).expect("uuid"))
    .fetch_all(&server.pool)
    .await
    .expect("view");
    assert_eq!(rows.len(), 2 * 4 * 2);
    let same = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => close(a, b),
        (a, b) => a == b,
    };
    for (arm, metric, stage, n, mean, sd, low, high, dn, dmean, dsd, dlow, dhigh) in rows {
        let a = summary.arms.iter().find(|a| a.arm == arm).expect("the arm");
        let m = a
            .metrics
            .iter()
            .find(|m| m.name == metric)
            .expect("the metric");
        let (s, d) = match stage.as_str() {
            "early" => (m.early.as_ref(), m.early_diff.as_ref()),
            "final" => (m.last.as_ref(), m.last_diff.as_ref()),
            other => panic!("stage {other}"),
        };
        let s = s.expect("a stat");
        let what = format!("{arm} {metric} {stage}");
        assert_eq!(n as u32, s.n, "{what}");
        if s.n > 0 {
            assert!(same(mean, Some(s.mean)), "{what}: {mean:?} vs {}", s.mean);
        } else {
            assert_eq!(mean, None, "{what}");
        }
        assert!(
            same(sd, s.sd) && same(low, s.ci_low) && same(high, s.ci_high),
            "{what}"
        );
        match d {
            None => assert_eq!((dn, dmean), (None, None), "{what}"),
            Some(d) => {
                assert_eq!(dn.map(|n| n as u32), Some(d.n), "{what}");
                if d.n > 0 {
                    assert!(same(dmean, Some(d.mean)), "{what}");
                }
                assert!(
                    same(dsd, d.sd) && same(dlow, d.ci_low) && same(dhigh, d.ci_high),
                    "{what}"
                );
            }
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_summary_without_a_single_random_arm_needs_a_named_baseline() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let mut spec = study_spec(vec![1]);
    spec.source = None;
    spec.grid = vec![v1::GridAxis {
        field: "training.learningRate".into(),
        values: vec![
            json_value(serde_json::json!(0.001)),
            json_value(serde_json::json!(0.01)),
        ],
        names: vec![],
    }];
    let sweep = submit_sweep(&mut jobs, spec).await;
    let status = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("two random arms");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let named = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            baseline_arm: "0.01".into(),
            ..Default::default()
        })
        .await
        .expect("named baseline")
        .into_inner();
    assert_eq!(named.baseline_arm, "0.01");
    assert!(named.arms[1].baseline);
    assert_eq!(named.arms[0].missing.len(), 1, "queued runs are missing");
    server.stop().await;
}

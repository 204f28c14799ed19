//! Service tests: `server::run` in-process on 127.0.0.1:0, each test with a database of its own
//! (created by the server, dropped at the end) and a Redis key prefix of its own, driven through
//! the generated tonic clients.
//!
//! Needs DATABASE_URL (any database on the server, for example
//! postgres://postgres@127.0.0.1:5432/postgres) and Redis at REDIS_URL (default
//! redis://127.0.0.1:6379).

use std::time::Duration;

use clap::Parser as _;
use proto::v1::{
    self, job_event::Event, job_service_client::JobServiceClient,
    worker_service_client::WorkerServiceClient,
};
use server::dispatch::Dispatcher;
use server::Config;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic::Code;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must name a Postgres server for the service tests")
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A coordinator running in this process.
struct TestServer {
    channel: Channel,
    /// Straight to the server's database, for checks the API cannot make.
    pool: PgPool,
    /// The server's own Redis queue, seen from outside.
    queue: Dispatcher,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
    _cleanup: Cleanup,
}

/// Drops the test's database and Redis queue when the test ends, passed or failed.
struct Cleanup {
    db_name: String,
    redis_prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (db_name, prefix) = (self.db_name.clone(), self.redis_prefix.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: use a fresh one.
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut admin = PgConnection::connect(&admin_url()).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                let _ = Dispatcher::new(&redis_url(), &prefix)?.delete_queue().await;
                anyhow::Ok(())
            })
        })
        .join();
        if !matches!(cleaned, Ok(Ok(()))) {
            eprintln!(
                "could not clean up test database {}: {cleaned:?}",
                self.db_name
            );
        }
    }
}

impl TestServer {
    async fn start() -> Self {
        Self::start_with(&redis_url(), &[]).await
    }

    /// `server_redis` is the server's REDIS_URL; the test observes the queue on the real Redis.
    async fn start_with(server_redis: &str, flags: &[&str]) -> Self {
        let cleanup = Cleanup {
            db_name: format!("trainq_test_{}", Uuid::new_v4().simple()),
            redis_prefix: format!("trainq-test:{}:", Uuid::new_v4()),
        };
        let admin = admin_url();
        let base = admin.split('?').next().unwrap_or(&admin);
        let (server_root, _) = base
            .rsplit_once('/')
            .expect("DATABASE_URL names a database");
        let db_url = format!("{server_root}/{}", cleanup.db_name);
        let mut args = vec![
            "trainq-server",
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
        ];
        args.extend_from_slice(flags);
        let config = Config::try_parse_from(args).expect("valid flags");
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

/// Polls gRPC health until the server answers (it serves only after migrating).
async fn wait_until_serving(channel: Channel) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let req = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        if health.check(req).await.is_ok() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server did not start serving"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let done = workers.complete_job(v1::CompleteJobRequest { lease }).await;
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
    let config = Config::try_parse_from([
        "trainq-server",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/trainq",
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

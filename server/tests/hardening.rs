//! Service tests of the coordinator's hardening (issue 17): metric labels that clients cannot
//! invent, the exposure gauges and warning when auth is off on a non-loopback address, worker
//! tokens bound to worker ids. (TCP_NODELAY on accepted connections is a unit test in lib.rs.)
//!
//! `server::run` in-process, each test with a database of its own (created by the server,
//! dropped at the end). Needs DATABASE_URL (any database on the server, for example
//! postgres://postgres@127.0.0.1:5432/postgres); Redis at REDIS_URL may be up or not.

use tests::{free_port, redis_url, wait_until_serving, Cleanup, WAIT};

use clap::Parser as _;
use proto::v1::upload_artifact_chunk::Part;
use proto::v1::worker_service_client::WorkerServiceClient;
use proto::v1::{self, job_service_client::JobServiceClient};
use server::Config;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use uuid::Uuid;

/// A coordinator running in this process with its metrics endpoint on a port of its own.
struct TestServer {
    addr: std::net::SocketAddr,
    metrics_port: u16,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _cleanup: Cleanup,
    _artifacts: tempfile::TempDir,
}

impl TestServer {
    /// Listens on `listen` (an IP with port 0) with `flags` added.
    async fn start(listen: &str, flags: &[String]) -> Self {
        tests::logcapture::capture_log();
        let artifacts = tempfile::tempdir().expect("artifact dir");
        let cleanup = Cleanup::new();
        let metrics_port = free_port();
        let mut args: Vec<String> = vec![
            "trainq-server".into(),
            "--database-url".into(),
            cleanup.database_url(),
            "--redis-url".into(),
            redis_url(),
            "--redis-prefix".into(),
            cleanup.redis_prefix.clone(),
            "--artifacts".into(),
            format!("file://{}", artifacts.path().display()),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}"),
            "--http-listen".into(),
            "off".into(),
        ];
        args.extend_from_slice(flags);
        let config = Config::try_parse_from(args).expect("valid flags");
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server::run(config, listener, async {
            let _ = stopped.await;
        }));
        let server = TestServer {
            addr,
            metrics_port,
            stop: Some(stop),
            task: Some(task),
            _cleanup: cleanup,
            _artifacts: artifacts,
        };
        wait_until_serving(server.channel()).await;
        server
    }

    /// A channel to the server over loopback (whatever address it listens on).
    fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://127.0.0.1:{}", self.addr.port()))
            .expect("uri")
            .connect_lazy()
    }

    /// The text of `GET /metrics`.
    async fn scrape(&self) -> String {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .expect("metrics endpoint");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut response = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
            .await
            .expect("scrape in time")
            .expect("response");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("server stops in time")
                .expect("server task did not panic")
                .expect("server shut down cleanly");
        }
    }
}

/// The value of one series (`name{labels}` exactly as rendered) in a scrape.
fn series(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    let v: MetadataValue<_> = format!("Bearer {token}").parse().expect("ascii header");
    request.metadata_mut().insert("authorization", v);
    request
}

fn unique(what: &str) -> String {
    format!("{what}-{}", Uuid::new_v4().simple())
}

/// Calls `path` (any name) with an empty message, as a client that made the name up would.
async fn call_path(channel: Channel, path: &str, token: Option<&str>) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = PathAndQuery::try_from(path.to_owned()).expect("a path");
    let codec = tonic_prost::ProstCodec::<v1::GetJobRequest, v1::Job>::default();
    let request = match token {
        Some(t) => bearer(v1::GetJobRequest::default(), t),
        None => Request::new(v1::GetJobRequest::default()),
    };
    grpc.unary(request, path, codec)
        .await
        .expect_err("no such method")
}

#[tokio::test]
async fn made_up_method_names_refused_by_auth_do_not_become_metric_series() {
    let client = unique("client");
    let flags = vec![
        "--client-tokens".into(),
        client.clone(),
        "--worker-tokens".into(),
        unique("worker"),
    ];
    let server = TestServer::start("127.0.0.1:0", &flags).await;
    let made_up: Vec<String> = (0..5).map(|i| format!("Invented{i}x")).collect();
    for name in &made_up {
        // Refused by the interceptor, before the method is resolved.
        let status = call_path(
            server.channel(),
            &format!("/trainq.v1.JobService/{name}"),
            None,
        )
        .await;
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        let status = call_path(
            server.channel(),
            &format!("/trainq.v1.WorkerService/{name}"),
            Some(&client),
        )
        .await;
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    // A real method keeps its name, also when refused.
    let status = call_path(server.channel(), "/trainq.v1.JobService/GetJob", None).await;
    assert_eq!(status.code(), Code::Unauthenticated);
    let text = server.scrape().await;
    for name in &made_up {
        assert!(
            !text.contains(name.as_str()),
            "{name} became a series:\n{text}"
        );
    }
    assert_eq!(
        series(
            &text,
            "trainq_rpc_duration_seconds_count{code=\"16\",method=\"unknown\",service=\"unknown\"}"
        ),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            "trainq_rpc_duration_seconds_count{code=\"7\",method=\"unknown\",service=\"unknown\"}"
        ),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            "trainq_rpc_duration_seconds_count{code=\"16\",method=\"GetJob\",service=\"trainq.v1.JobService\"}"
        ),
        Some(1.0),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test]
async fn auth_off_on_a_non_loopback_address_warns_and_shows_in_the_gauges() {
    let open = TestServer::start("0.0.0.0:0", &[]).await;
    let text = open.scrape().await;
    assert_eq!(series(&text, "trainq_auth_enabled"), Some(0.0), "{text}");
    assert_eq!(series(&text, "trainq_insecure_listen"), Some(1.0), "{text}");
    let port = open.addr.port();
    let warned = tests::logcapture::captured_log().lines().any(|l| {
        l.contains("WARN")
            && l.contains("auth is off while listening on a non-loopback address")
            && l.contains(&format!("0.0.0.0:{port}"))
    });
    assert!(
        warned,
        "no warning for 0.0.0.0:{port}:\n{}",
        tests::logcapture::captured_log()
    );
    open.stop().await;

    // Auth off on loopback: only reachable from this host.
    let local = TestServer::start("127.0.0.1:0", &[]).await;
    let text = local.scrape().await;
    assert_eq!(series(&text, "trainq_auth_enabled"), Some(0.0), "{text}");
    assert_eq!(series(&text, "trainq_insecure_listen"), Some(0.0), "{text}");
    let port = local.addr.port();
    assert!(
        !tests::logcapture::captured_log()
            .lines()
            .any(|l| l.contains("non-loopback") && l.contains(&format!("127.0.0.1:{port}"))),
        "{}",
        tests::logcapture::captured_log()
    );
    local.stop().await;

    // Auth on, every interface.
    let flags = vec!["--client-tokens".into(), unique("client")];
    let guarded = TestServer::start("0.0.0.0:0", &flags).await;
    let text = guarded.scrape().await;
    assert_eq!(series(&text, "trainq_auth_enabled"), Some(1.0), "{text}");
    assert_eq!(series(&text, "trainq_insecure_listen"), Some(0.0), "{text}");
    guarded.stop().await;
}

fn valid_spec() -> v1::JobSpec {
    v1::JobSpec {
        name: "bound-worker".into(),
        training: Some(v1::Training {
            epochs: 1,
            batch_size: 64,
            learning_rate: 1e-3,
            seed: 7,
            ..Default::default()
        }),
        experiment: Some(v1::job_spec::Experiment::MnistClassifier(
            v1::MnistClassifier {},
        )),
        ..Default::default()
    }
}

fn lease(job_id: &str, attempt: u32, worker_id: &str) -> Option<v1::JobLease> {
    Some(v1::JobLease {
        job_id: job_id.into(),
        attempt,
        worker_id: worker_id.into(),
    })
}

/// Every worker write with `worker_id` in its lease, with `token`: each call's result.
async fn every_write(
    workers: &mut WorkerServiceClient<Channel>,
    token: &str,
    job_id: &str,
    attempt: u32,
    worker_id: &str,
) -> Vec<(&'static str, Result<(), Status>)> {
    let l = || lease(job_id, attempt, worker_id);
    let mut results = Vec::new();
    let r = workers
        .heartbeat(bearer(v1::HeartbeatRequest { lease: l() }, token))
        .await;
    results.push(("Heartbeat", r.map(drop)));
    let r = workers
        .report_metrics(bearer(
            v1::ReportMetricsRequest {
                lease: l(),
                points: vec![v1::MetricPoint {
                    name: proto::metric::TRAIN_LOSS.into(),
                    step: 1,
                    epoch: 1,
                    value: 0.5,
                }],
            },
            token,
        ))
        .await;
    results.push(("ReportMetrics", r.map(drop)));
    let header = v1::UploadArtifactChunk {
        part: Some(Part::Header(v1::UploadArtifactHeader {
            lease: l(),
            kind: "checkpoint".into(),
            name: "model.safetensors".into(),
            epoch: 1,
            size_bytes: 1,
            sha256: "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb".into(),
            ..Default::default()
        })),
    };
    let data = v1::UploadArtifactChunk {
        part: Some(Part::Data(vec![b'a'])),
    };
    let r = workers
        .upload_artifact(bearer(tokio_stream::iter([header, data]), token))
        .await;
    results.push(("UploadArtifact", r.map(drop)));
    let r = workers
        .fail_job(bearer(
            v1::FailJobRequest {
                lease: l(),
                reason: "test".into(),
                permanent: false,
            },
            token,
        ))
        .await;
    results.push(("FailJob", r.map(drop)));
    let r = workers
        .release_job(bearer(
            v1::ReleaseJobRequest {
                lease: l(),
                reason: "test".into(),
            },
            token,
        ))
        .await;
    results.push(("ReleaseJob", r.map(drop)));
    let r = workers
        .complete_job(bearer(
            v1::CompleteJobRequest {
                lease: l(),
                ..Default::default()
            },
            token,
        ))
        .await;
    results.push(("CompleteJob", r.map(drop)));
    results
}

/// A coordinator with a client token, a worker token bound to `gpu-0` and an unbound one, and
/// one job submitted (queued).
struct Bound {
    server: TestServer,
    jobs: JobServiceClient<Channel>,
    workers: WorkerServiceClient<Channel>,
    client: String,
    bound: String,
    unbound: String,
    job_id: String,
}

impl Bound {
    async fn start() -> Self {
        let (client, bound, unbound) = (unique("client"), unique("bound"), unique("unbound"));
        let flags = vec![
            "--client-tokens".into(),
            client.clone(),
            "--worker-tokens".into(),
            format!("gpu-0={bound},{unbound}"),
        ];
        let server = TestServer::start("127.0.0.1:0", &flags).await;
        let mut jobs = JobServiceClient::new(server.channel());
        let workers = WorkerServiceClient::new(server.channel());
        let submit = v1::SubmitJobRequest {
            spec: Some(valid_spec()),
            request_id: String::new(),
        };
        let job_id = jobs
            .submit_job(bearer(submit, &client))
            .await
            .expect("submit")
            .into_inner()
            .job_id;
        Self {
            server,
            jobs,
            workers,
            client,
            bound,
            unbound,
            job_id,
        }
    }
}

#[tokio::test]
async fn a_worker_token_bound_to_a_worker_id_acts_only_as_that_worker() {
    let Bound {
        server,
        mut jobs,
        mut workers,
        client,
        bound,
        unbound,
        job_id,
    } = Bound::start().await;

    // The bound token cannot claim for another worker id; the job stays unclaimed.
    let denied = workers
        .claim_job(bearer(
            v1::ClaimJobRequest {
                job_id: job_id.clone(),
                worker_id: "gpu-1".into(),
                ..Default::default()
            },
            &bound,
        ))
        .await
        .expect_err("another worker id");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("\"gpu-1\""), "{denied:?}");
    let job = jobs
        .get_job(bearer(
            v1::GetJobRequest {
                job_id: job_id.clone(),
            },
            &client,
        ))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(job.state(), v1::JobState::Queued);

    // It claims as its own worker.
    let claim = workers
        .claim_job(bearer(
            v1::ClaimJobRequest {
                job_id: job_id.clone(),
                worker_id: "gpu-0".into(),
                ..Default::default()
            },
            &bound,
        ))
        .await
        .expect("claim")
        .into_inner();
    assert!(claim.claimed);
    let attempt = claim.lease.as_ref().expect("lease").attempt;

    // Every write with a lease naming another worker is refused before the lease is looked at.
    for (rpc, result) in every_write(&mut workers, &bound, &job_id, attempt, "gpu-1").await {
        let status = result.expect_err(rpc);
        assert_eq!(status.code(), Code::PermissionDenied, "{rpc}: {status:?}");
        assert!(status.message().contains("\"gpu-1\""), "{rpc}: {status:?}");
    }
    // An unbound token is not refused for the worker id: the lease check answers instead
    // (a stale lease is FAILED_PRECONDITION, or "stop running" for a heartbeat).
    for (rpc, result) in every_write(&mut workers, &unbound, &job_id, attempt, "gpu-1").await {
        if let Err(status) = result {
            assert_ne!(status.code(), Code::PermissionDenied, "{rpc}: {status:?}");
        }
    }
    // The bound worker's own writes go through.
    let beat = workers
        .heartbeat(bearer(
            v1::HeartbeatRequest {
                lease: claim.lease.clone(),
            },
            &bound,
        ))
        .await
        .expect("own heartbeat")
        .into_inner();
    assert!(beat.keep_running);
    workers
        .complete_job(bearer(
            v1::CompleteJobRequest {
                lease: claim.lease.clone(),
                ..Default::default()
            },
            &bound,
        ))
        .await
        .expect("own completion");
    server.stop().await;
}

#[tokio::test]
async fn an_unbound_worker_token_claims_for_any_worker_id() {
    let Bound {
        server,
        mut workers,
        unbound,
        job_id,
        ..
    } = Bound::start().await;
    let claim = workers
        .claim_job(bearer(
            v1::ClaimJobRequest {
                job_id,
                worker_id: "any-host-123".into(),
                ..Default::default()
            },
            &unbound,
        ))
        .await
        .expect("claim")
        .into_inner();
    assert!(claim.claimed);
    server.stop().await;
}

//! Bearer-token auth and TLS: [`AuthServer`] runs `server::run` in-process on 127.0.0.1:0 with
//! tokens configured (and TLS for one test), called through the generated clients with and
//! without tokens; Redis may be up or not. Every server of this test binary logs into one
//! captured buffer (the process's global subscriber, at DEBUG), which the log test searches for
//! tokens.
//!
//! Must not wait for a server before its test chose the channel (plaintext or TLS) to wait on.

use clap::Parser as _;
use proto::v1::worker_service_client::WorkerServiceClient;
use proto::v1::{self, job_service_client::JobServiceClient};
use server::Config;
use tests::{redis_url, wait_until_serving, Cleanup, WAIT};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};
use uuid::Uuid;

use crate::helpers::spawn;

/// Tokens unique to one test, so checks of the shared log see only this test's.
struct Tokens {
    client: String,
    worker: String,
}

impl Tokens {
    fn new() -> Self {
        Tokens {
            client: format!("client-{}", Uuid::new_v4().simple()),
            worker: format!("worker-{}", Uuid::new_v4().simple()),
        }
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--client-tokens".into(),
            format!(
                "{},another-client-token-{}",
                self.client,
                Uuid::new_v4().simple()
            ),
            "--worker-tokens".into(),
            self.worker.clone(),
        ]
    }
}

/// A coordinator running in this process; its database and Redis keys are removed on drop.
struct AuthServer {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _cleanup: Cleanup,
    _artifacts: tempfile::TempDir,
}

impl AuthServer {
    async fn start(flags: &[String]) -> Self {
        tests::logcapture::capture_log();
        let artifacts = tempfile::tempdir().expect("artifact dir");
        let cleanup = Cleanup::new();
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
            "off".into(),
            "--http-listen".into(),
            "off".into(),
        ];
        args.extend_from_slice(flags);
        let config = Config::try_parse_from(args).expect("valid flags");
        let (addr, stop, task) = spawn(config).await;
        AuthServer {
            addr,
            stop: Some(stop),
            task: Some(task),
            _cleanup: cleanup,
            _artifacts: artifacts,
        }
    }

    fn plaintext(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect_lazy()
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

/// A request carrying `authorization: <value>` when given.
fn with_auth<T>(message: T, value: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(v) = value {
        let v: MetadataValue<_> = v.parse().expect("ascii header");
        request.metadata_mut().insert("authorization", v);
    }
    request
}

async fn list_jobs(channel: &Channel, auth: Option<&str>) -> Result<(), Status> {
    JobServiceClient::new(channel.clone())
        .list_jobs(with_auth(v1::ListJobsRequest::default(), auth))
        .await
        .map(drop)
}

async fn heartbeat(channel: &Channel, auth: Option<&str>) -> Result<(), Status> {
    let request = v1::HeartbeatRequest {
        lease: Some(v1::JobLease {
            job_id: Uuid::nil().to_string(),
            attempt: 1,
            ..Default::default()
        }),
    };
    WorkerServiceClient::new(channel.clone())
        .heartbeat(with_auth(request, auth))
        .await
        .map(drop)
}

fn code(result: Result<(), Status>) -> Option<Code> {
    result.err().map(|s| s.code())
}

#[tokio::test]
async fn calls_without_a_token_or_with_an_unknown_one_are_unauthenticated_on_both_services() {
    let tokens = Tokens::new();
    let server = AuthServer::start(&tokens.flags()).await;
    let channel = server.plaintext();
    wait_until_serving(channel.clone()).await;

    for auth in [
        None,
        Some("Bearer not-a-token"),
        Some(tokens.client.as_str()),
    ] {
        let err = list_jobs(&channel, auth).await.expect_err("refused");
        assert_eq!(err.code(), Code::Unauthenticated, "{auth:?}: {err:?}");
        let err = heartbeat(&channel, auth).await.expect_err("refused");
        assert_eq!(err.code(), Code::Unauthenticated, "{auth:?}: {err:?}");
    }
    let err = list_jobs(&channel, None).await.expect_err("refused");
    assert_eq!(err.message(), "missing bearer token");
    let err = heartbeat(&channel, Some("Bearer nope"))
        .await
        .expect_err("refused");
    assert_eq!(err.message(), "invalid token");
    server.stop().await;
}

#[tokio::test]
async fn a_token_of_the_other_role_is_permission_denied_and_the_right_one_is_let_through() {
    let tokens = Tokens::new();
    let server = AuthServer::start(&tokens.flags()).await;
    let channel = server.plaintext();
    wait_until_serving(channel.clone()).await;
    let client = format!("Bearer {}", tokens.client);
    let worker = format!("Bearer {}", tokens.worker);

    let err = heartbeat(&channel, Some(&client))
        .await
        .expect_err("denied");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "a client token cannot call trainq.v1.WorkerService"
    );
    let err = list_jobs(&channel, Some(&worker))
        .await
        .expect_err("denied");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "a worker token cannot call trainq.v1.JobService"
    );

    list_jobs(&channel, Some(&client))
        .await
        .expect("a client token lists jobs");
    // No such job: the worker token got past auth to the service itself.
    assert!(
        matches!(
            code(heartbeat(&channel, Some(&worker)).await),
            Some(Code::NotFound | Code::FailedPrecondition | Code::InvalidArgument)
        ),
        "a worker token reaches WorkerService"
    );
    server.stop().await;
}

#[tokio::test]
async fn health_and_reflection_answer_without_a_token() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = AuthServer::start(&Tokens::new().flags()).await;
    let channel = server.plaintext();
    wait_until_serving(channel.clone()).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "trainq.v1.JobService".into(),
        })
        .await
        .expect("health needs no token")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection needs no token")
        .into_inner();
    let response = responses
        .next()
        .await
        .expect("one answer")
        .expect("a listing");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"trainq.v1.JobService"), "{names:?}");
    server.stop().await;
}

#[tokio::test]
async fn tokens_never_appear_in_the_server_log() {
    let tokens = Tokens::new();
    let flags = tokens.flags();
    let other_client = flags[1]
        .split(',')
        .nth(1)
        .expect("two client tokens")
        .to_string();
    let server = AuthServer::start(&flags).await;
    let channel = server.plaintext();
    wait_until_serving(channel.clone()).await;
    let client = format!("Bearer {}", tokens.client);
    let worker = format!("Bearer {}", tokens.worker);
    let wrong = format!("Bearer wrong-{}", Uuid::new_v4().simple());
    for auth in [&client, &worker, &wrong] {
        let _ = list_jobs(&channel, Some(auth)).await;
        let _ = heartbeat(&channel, Some(auth)).await;
    }
    server.stop().await;

    let log = tests::logcapture::captured_log();
    assert!(
        log.contains("auth: on (2 client, 1 worker tokens)"),
        "start-up line missing:\n{log}"
    );
    assert!(log.contains("call with an invalid token refused"), "{log}");
    for secret in [
        &tokens.client,
        &other_client,
        &tokens.worker,
        &wrong[7..].to_string(),
    ] {
        assert!(
            !log.contains(secret.as_str()),
            "a token leaked into the log:\n{log}"
        );
    }
}

#[tokio::test]
async fn over_tls_a_client_that_trusts_the_certificate_connects_and_a_plaintext_client_fails() {
    server::auth::install_crypto_provider(); // for the client's side
    let certified = tests::tls::SelfSigned::localhost();
    let (cert, key) = (&certified.cert, &certified.key);

    let tokens = Tokens::new();
    let mut flags = tokens.flags();
    flags.extend([
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ]);
    let server = AuthServer::start(&flags).await;
    let tls = Endpoint::from_shared(format!("https://localhost:{}", server.addr.port()))
        .expect("uri")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&certified.cert_pem))
                .domain_name("localhost"),
        )
        .expect("tls config")
        .connect_lazy();
    wait_until_serving(tls.clone()).await;
    list_jobs(&tls, Some(&format!("Bearer {}", tokens.client)))
        .await
        .expect("a TLS client with a token is served");
    assert_eq!(
        code(list_jobs(&tls, None).await),
        Some(Code::Unauthenticated)
    );

    let plain = server.plaintext();
    let err = list_jobs(&plain, Some(&format!("Bearer {}", tokens.client)))
        .await
        .expect_err("plaintext is not served");
    assert!(
        !matches!(
            err.code(),
            Code::Ok | Code::Unauthenticated | Code::PermissionDenied
        ),
        "{err:?}"
    );
    server.stop().await;
}

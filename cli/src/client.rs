//! Connecting to the coordinator (plaintext or TLS), the bearer token, the gRPC health check,
//! retrying submits, and what a failed call means as an exit code.
//!
//! The token is sent as `authorization: Bearer <token>` metadata on every call and is never
//! printed (not in errors, not in Debug output).
//!
//! TLS: an `https://` address, or any address when a CA file is given, is reached over TLS
//! (rustls with ring, like the worker). With a CA file only that CA is trusted (a private CA, a
//! self-signed certificate); without one the webpki roots (Mozilla's) are.

use std::path::Path;

use ::client::connect::{BearerToken, WithoutCa};
use proto::v1::job_service_client::JobServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Exit codes, documented in `trainq --help`.
pub mod exit {
    pub const OK: u8 = 0;
    /// A watched job (watch, submit --wait) failed or was cancelled.
    pub const JOB_FAILED: u8 = 1;
    /// Bad usage or a bad spec file (also the coordinator's INVALID_ARGUMENT, and
    /// ALREADY_EXISTS for a --request-id used before with another spec).
    pub const USAGE: u8 = 2;
    /// A job or artifact that does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// The coordinator is unreachable, refused the token, or failed otherwise.
    pub const SERVER: u8 = 4;
}

/// An error with the exit code it should end the process with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(exit::USAGE, message)
    }

    /// A gRPC status as a message and exit code; field violations are listed one per line.
    pub fn from_status(what: &str, status: &tonic::Status) -> Self {
        use tonic::Code;
        let code = match status.code() {
            Code::NotFound => exit::NOT_FOUND,
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::AlreadyExists => exit::USAGE,
            _ => exit::SERVER,
        };
        let hint = match status.code() {
            Code::Unauthenticated => " (set --token or TRAINQ_TOKEN)",
            Code::Unavailable => " (is trainq-server running? set --server or TRAINQ_SERVER)",
            _ => "",
        };
        Self::new(
            code,
            format!("{what}: {} ({:?}){hint}", status.message(), status.code()),
        )
    }
}

/// Tries of a submit in all: the first and up to this many minus one retries, 50 ms to about
/// 1.6 s apart (`client::retry`), a few seconds at most.
pub const SUBMIT_TRIES: usize = 6;

/// A fresh request id for one invocation's submit (UUID v7: unique, and sortable by time).
pub fn new_request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Whether a failed call may be sent again: the coordinator was unreachable or answered
/// UNAVAILABLE (its database is restarting, the connection broke), or the deadline passed. Any
/// of these may come after the coordinator did the work, so only a call that is safe to repeat
/// (a submit with a request_id) is retried.
pub fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
    )
}

/// Calls `call` until it succeeds or fails with something other than [`is_transient`], at most
/// [`SUBMIT_TRIES`] times with backoff, saying on stderr what it retries. For submits with a
/// request_id only: the coordinator answers a repeat with the first call's result, so a retry
/// after a reply that was lost creates nothing twice.
pub async fn retry_submit<T, F, Fut>(what: &str, call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    use ::client::retry::{tries, Retryable as _};
    call.retry(tries(SUBMIT_TRIES))
        .when(is_transient)
        .notify(|status, after| {
            eprintln!(
                "trainq: {what}: {} ({:?}); retrying in {} ms with the same request id",
                status.message(),
                status.code(),
                after.as_millis()
            )
        })
        .await
}

/// Adds the bearer token to every request (the shared interceptor; never shown in `Debug`).
pub type Auth = BearerToken;

pub type Client = JobServiceClient<InterceptedService<Channel, Auth>>;

/// `localhost:50051` becomes `http://localhost:50051` (`https://` when `tls` is set).
pub use ::client::connect::normalise_url;

/// Where the coordinator is and how to reach it: the options every command shares.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// `host:port`, `http://host:port` or `https://host:port`.
    pub server: &'a str,
    /// PEM file of the CA to trust; turns TLS on.
    pub tls_ca: Option<&'a Path>,
}

impl Target<'_> {
    /// The full URL: a bare `host:port` gets `https://` with a CA file, `http://` without.
    pub fn url(&self) -> String {
        normalise_url(self.server, self.tls_ca.is_some())
    }

    /// The endpoint, with TLS when the URL is `https://`: trusting the CA file when one is
    /// given, else the webpki roots. Bad addresses and unreadable CA files are usage errors.
    pub fn endpoint(&self) -> Result<Endpoint, CliError> {
        let endpoint =
            ::client::connect::endpoint(&self.url(), self.tls_ca, WithoutCa::WebpkiRoots)
                .map_err(|e| CliError::usage(e.to_string()))?;
        Ok(endpoint.connect_timeout(std::time::Duration::from_secs(10)))
    }

    /// A connected channel; an unreachable coordinator is exit code 4.
    pub async fn channel(&self) -> Result<Channel, CliError> {
        let url = self.url();
        self.endpoint()?
            .connect()
            .await
            .map_err(|e| unreachable(&url, &e))
    }
}

/// An unreachable coordinator as exit code 4, with the transport error's causes.
fn unreachable(url: &str, e: &tonic::transport::Error) -> CliError {
    // tonic's own message is just "transport error": the cause is in the source chain.
    let mut cause = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !cause.ends_with(&text) {
            cause.push_str(&format!(": {text}"));
        }
        source = s.source();
    }
    CliError::new(
        exit::SERVER,
        format!("cannot reach the coordinator at {url}: {cause} (set --server or TRAINQ_SERVER)"),
    )
}

fn bearer(token: Option<&str>) -> Result<Auth, CliError> {
    BearerToken::new(token).map_err(|e| CliError::usage(e.to_string()))
}

/// Connects to the coordinator's JobService; an unreachable one is exit code 4.
pub async fn connect(target: Target<'_>, token: Option<&str>) -> Result<Client, CliError> {
    let auth = bearer(token)?;
    let channel = target.channel().await?;
    Ok(JobServiceClient::with_interceptor(channel, auth)
        .max_decoding_message_size(64 * 1024 * 1024))
}

/// Asks the coordinator's grpc.health.v1 Health/Check about `service` ("" is the whole server)
/// and returns the status it reports. The health service is open, so no token is needed (one is
/// sent when given). Unreachable, or no answer within `timeout`: exit code 4.
pub async fn health(
    target: Target<'_>,
    token: Option<&str>,
    service: &str,
    timeout: std::time::Duration,
) -> Result<ServingStatus, CliError> {
    let auth = bearer(token)?;
    let url = target.url();
    let endpoint = target.endpoint()?.connect_timeout(timeout).timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| unreachable(&url, &e))?;
    let mut client = HealthClient::with_interceptor(channel, auth);
    let resp = client
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| CliError::from_status(&format!("health of {url}"), &s))?;
    Ok(resp.into_inner().status())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn statuses_map_to_documented_exit_codes() {
        let code = |c| CliError::from_status("x", &tonic::Status::new(c, "m")).code;
        assert_eq!(code(tonic::Code::NotFound), exit::NOT_FOUND);
        assert_eq!(code(tonic::Code::InvalidArgument), exit::USAGE);
        assert_eq!(code(tonic::Code::Unavailable), exit::SERVER);
        assert_eq!(code(tonic::Code::Unauthenticated), exit::SERVER);
    }

    #[tokio::test(start_paused = true)]
    async fn a_submit_is_retried_only_while_the_coordinator_is_unavailable() {
        let mut calls = 0;
        let answer = retry_submit("submit", || {
            calls += 1;
            let n = calls;
            async move {
                match n {
                    1 => Err(tonic::Status::unavailable("database unavailable")),
                    2 => Err(tonic::Status::deadline_exceeded("slow")),
                    _ => Ok(n),
                }
            }
        })
        .await;
        assert_eq!(answer.expect("third time"), 3);
        let mut calls = 0;
        let refused: Result<(), _> = retry_submit("submit", || {
            calls += 1;
            async { Err(tonic::Status::already_exists("request_id: used")) }
        })
        .await;
        assert_eq!(
            (refused.expect_err("refused").code(), calls),
            (tonic::Code::AlreadyExists, 1)
        );
        let mut calls = 0;
        let down: Result<(), _> = retry_submit("submit", || {
            calls += 1;
            async { Err(tonic::Status::unavailable("down")) }
        })
        .await;
        assert_eq!(
            (down.expect_err("gave up").code(), calls),
            (tonic::Code::Unavailable, SUBMIT_TRIES)
        );
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
    }

    #[test]
    fn the_token_goes_into_the_authorization_header_and_not_into_debug_output() {
        let mut auth = bearer(Some("s3cret")).expect("ascii");
        assert!(!format!("{auth:?}").contains("s3cret"));
        let req = auth.call(tonic::Request::new(())).expect("intercepted");
        assert_eq!(
            req.metadata().get("authorization").map(|v| v.to_str().ok()),
            Some(Some("Bearer s3cret"))
        );
    }

    #[test]
    fn https_without_a_ca_uses_the_webpki_roots() {
        let target = Target {
            server: "https://example.com:443",
            tls_ca: None,
        };
        target
            .endpoint()
            .expect("an https endpoint with the webpki roots");
    }

    #[test]
    fn a_missing_ca_file_or_a_ca_with_a_plaintext_address_is_a_usage_error() {
        let missing = Target {
            server: "q:1",
            tls_ca: Some(Path::new("/nonexistent/ca.pem")),
        };
        let err = missing.endpoint().expect_err("unreadable CA");
        assert_eq!(err.code, exit::USAGE);
        assert!(
            err.message.contains("/nonexistent/ca.pem"),
            "{}",
            err.message
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").expect("write");
        let plaintext = Target {
            server: "http://q:1",
            tls_ca: Some(&ca),
        };
        let err = plaintext.endpoint().expect_err("CA with http://");
        assert_eq!(err.code, exit::USAGE);
        assert!(err.message.contains("https://"), "{}", err.message);
    }

    #[tokio::test]
    async fn health_of_an_unreachable_server_is_a_server_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let server = format!("127.0.0.1:{port}");
        let target = Target {
            server: &server,
            tls_ca: None,
        };
        let err = health(target, None, "", std::time::Duration::from_secs(2))
            .await
            .expect_err("nothing listens there");
        assert_eq!(err.code, exit::SERVER);
    }

    /// A health server over TLS with a self-signed certificate: SERVING for the whole server,
    /// NOT_SERVING for a named service, as `trainq health` reads them through `--tls-ca`.
    #[tokio::test]
    async fn health_over_tls_trusts_the_given_ca_and_reports_the_status() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certified = ::tests::tls::SelfSigned::localhost();
        let ca = certified.cert.clone();
        let identity =
            tonic::transport::Identity::from_pem(&certified.cert_pem, &certified.key_pem);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("down", tonic_health::ServingStatus::NotServing)
            .await;
        tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .expect("tls")
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let server = format!("localhost:{port}");
        let target = Target {
            server: &server,
            tls_ca: Some(&ca),
        };
        let second = std::time::Duration::from_secs(5);
        let status = health(target, Some("t"), "", second)
            .await
            .expect("checked");
        assert_eq!(status, ServingStatus::Serving);
        let status = health(target, None, "down", second).await.expect("checked");
        assert_eq!(status, ServingStatus::NotServing);
        // Without the CA the self-signed certificate is not trusted.
        let https = format!("https://localhost:{port}");
        let untrusted = Target {
            server: &https,
            tls_ca: None,
        };
        let err = health(untrusted, None, "", second)
            .await
            .expect_err("untrusted certificate");
        assert_eq!(err.code, exit::SERVER);
    }
}

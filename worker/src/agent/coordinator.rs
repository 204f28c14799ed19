//! The worker's client of the coordinator's WorkerService, and what its errors mean: connecting
//! (`--coordinator`, `--tls-ca`, `--token`, through the `client` crate) and classifying a failed
//! call as transient, refused (the token) or stale (the lease is gone).
//!
//! A leaf of `agent`: must not make calls itself, and must not read the token anywhere but in
//! [`connect`] (it goes into the interceptor, marked sensitive, and nowhere else).

use std::time::Duration;

use client::connect::{BearerToken, ConnectError, WithoutCa};
use proto::v1::worker_service_client::WorkerServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

use crate::config::ServeArgs;

/// The coordinator's WorkerService client, every call carrying the worker's token.
pub type Client = WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

/// The client of the coordinator at `args.coordinator`: over TLS trusting `--tls-ca` when given
/// (required for `https://`), with the worker's token on every call. Connects lazily.
pub fn connect(args: &ServeArgs) -> anyhow::Result<Client> {
    let endpoint =
        client::connect::endpoint(&args.coordinator, args.tls_ca.as_deref(), WithoutCa::Refuse)
            .map_err(|e| match e {
                ConnectError::HttpsNeedsCa { .. } => {
                    anyhow::anyhow!("an https:// coordinator needs --tls-ca (TRAINQ_TLS_CA)")
                }
                ConnectError::BadToken => {
                    anyhow::anyhow!("the worker token must be printable ASCII")
                }
                other => anyhow::anyhow!("coordinator {}: {other}", args.coordinator),
            })?
            .connect_timeout(Duration::from_secs(5));
    let token = BearerToken::new(args.token.as_ref().map(|t| t.expose()))
        .map_err(|_| anyhow::anyhow!("the worker token must be printable ASCII"))?;
    Ok(WorkerServiceClient::with_interceptor(
        endpoint.connect_lazy(),
        token,
    ))
}

/// The coordinator refused this worker's token (missing, unknown, or not a worker token).
pub fn is_refused(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unauthenticated | Code::PermissionDenied
    )
}

/// The coordinator (or its database) is unreachable for now: worth retrying.
pub fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// The coordinator refuses writes from an attempt that no longer holds the job.
pub fn is_stale(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::FailedPrecondition | Code::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[tokio::test]
    async fn the_worker_token_stays_out_of_debug_output_and_https_needs_a_ca() {
        let cli = crate::config::Cli::parse_from([
            "trainq-worker",
            "--coordinator",
            "https://coordinator:50051",
            "--token",
            "s3cret-token",
        ]);
        assert!(!format!("{cli:?}").contains("s3cret"));
        let err = connect(&cli.serve).expect_err("https needs a CA");
        assert!(err.to_string().contains("--tls-ca"), "{err}");
        let plain = crate::config::Cli::parse_from([
            "trainq-worker",
            "--coordinator",
            "http://127.0.0.1:1",
            "--token",
            "s3cret-token",
        ]);
        let client = connect(&plain.serve).expect("a lazy plaintext client");
        assert!(!format!("{client:?}").contains("s3cret"));
        assert!(is_refused(&tonic::Status::unauthenticated("no token")));
        assert!(is_refused(&tonic::Status::permission_denied(
            "client token"
        )));
        assert!(!is_refused(&tonic::Status::unavailable("down")));
    }
}

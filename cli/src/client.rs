//! Connecting to the coordinator, the bearer token, and what a failed call means as an exit code.
//!
//! The token is sent as `authorization: Bearer <token>` metadata on every call and is never
//! printed (not in errors, not in Debug output).

use proto::v1::job_service_client::JobServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Exit codes, documented in `trainq --help`.
pub mod exit {
    pub const OK: u8 = 0;
    /// A watched job (watch, submit --wait) failed or was cancelled.
    pub const JOB_FAILED: u8 = 1;
    /// Bad usage or a bad spec file (also the coordinator's INVALID_ARGUMENT).
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
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => exit::USAGE,
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

/// Adds the bearer token to every request.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Auth(<token>)"
        } else {
            "Auth(none)"
        })
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

pub type Client = JobServiceClient<InterceptedService<Channel, Auth>>;

/// `localhost:50051` becomes `http://localhost:50051`.
pub fn normalise_url(server: &str) -> String {
    if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    }
}

/// Connects to the coordinator; an unreachable one is exit code 4.
pub async fn connect(server: &str, token: Option<&str>) -> Result<Client, CliError> {
    let url = normalise_url(server);
    let auth = match token.filter(|t| !t.is_empty()) {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| CliError::usage("the token must be printable ASCII"))?,
        ),
        None => None,
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| CliError::usage(format!("bad server address {url:?}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(10));
    let channel = endpoint.connect().await.map_err(|e| {
        // tonic's own message is just "transport error": the cause is in the source chain.
        let mut cause = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let text = s.to_string();
            if !cause.ends_with(&text) {
                cause.push_str(&format!(": {text}"));
            }
            source = s.source();
        }
        CliError::new(
            exit::SERVER,
            format!(
                "cannot reach the coordinator at {url}: {cause} (set --server or TRAINQ_SERVER)"
            ),
        )
    })?;
    Ok(JobServiceClient::with_interceptor(channel, Auth(auth))
        .max_decoding_message_size(64 * 1024 * 1024))
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

    #[test]
    fn the_token_goes_into_the_authorization_header_and_not_into_debug_output() {
        let value = "Bearer s3cret".parse().expect("ascii");
        let mut auth = Auth(Some(value));
        assert!(!format!("{auth:?}").contains("s3cret"));
        let req = auth.call(tonic::Request::new(())).expect("intercepted");
        assert_eq!(
            req.metadata().get("authorization").map(|v| v.to_str().ok()),
            Some(Some("Bearer s3cret"))
        );
    }

    #[test]
    fn a_server_address_without_a_scheme_gets_http() {
        assert_eq!(normalise_url("localhost:50051"), "http://localhost:50051");
        assert_eq!(normalise_url("https://q:1"), "https://q:1");
    }
}

//! `trainq health`: the coordinator's grpc.health.v1 check, the container healthcheck of
//! docker-compose.yml. Exits 0 when SERVING, 1 for any other answer, 4 when unreachable.
//!
//! The check itself (connection, TLS, token) is [`crate::client::health`]'s; this module only
//! prints the status and chooses the exit code.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;

use crate::client::{self, exit, CliError, Target};
use crate::output::{print, Output};

/// Asks about `service` ("" for the whole server), waiting at most `timeout_s` seconds (at
/// least 1), and prints the status.
pub async fn run(
    target: Target<'_>,
    token: Option<&str>,
    service: &str,
    timeout_s: u64,
    out: Output,
) -> Result<u8, CliError> {
    let timeout = Duration::from_secs(timeout_s.max(1));
    let status = client::health(target, token, service, timeout).await?;
    let name = status.as_str_name();
    if out == Output::Json {
        print(&format!("{}\n", serde_json::json!({ "status": name })));
    } else {
        print(&format!("{name}\n"));
    }
    Ok(health_exit_code(status))
}

/// `trainq health`'s exit code: 0 for SERVING, 1 for any other answer.
pub fn health_exit_code(status: ServingStatus) -> u8 {
    if status == ServingStatus::Serving {
        exit::OK
    } else {
        exit::JOB_FAILED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_serving_is_healthy() {
        assert_eq!(health_exit_code(ServingStatus::Serving), exit::OK);
        assert_ne!(health_exit_code(ServingStatus::NotServing), exit::OK);
        assert_ne!(health_exit_code(ServingStatus::Unknown), exit::OK);
        assert_ne!(health_exit_code(ServingStatus::ServiceUnknown), exit::OK);
    }
}

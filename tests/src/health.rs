//! Waiting until a coordinator serves: gRPC health (which needs no token, so it works with auth
//! on), polled until it answers. A coordinator serves only after creating and migrating its
//! database, so an answer means it is ready.
//!
//! Must not send anything but health checks.

use std::time::Duration;

use tonic::transport::Channel;

/// How long a test waits for anything that should be quick.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls gRPC health on `channel` until the server answers; panics after [`WAIT`].
pub async fn wait_until_serving(channel: Channel) {
    let answered = wait_for_health(channel, WAIT, || Ok(())).await;
    if let Err(e) = answered {
        panic!("server did not start serving: {e:#}");
    }
}

/// Polls gRPC health on `channel` every 50 ms until the server answers. Before each new try
/// `alive` may give up early (a server process that exited); after `within` the last error is
/// returned.
pub async fn wait_for_health(
    channel: Channel,
    within: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let req = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        let error = match health.check(req).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        alive()?;
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("no answer within {within:?}: {error}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

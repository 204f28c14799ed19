//! The process's shutdown signal: the first SIGINT (Ctrl-C) or SIGTERM (docker stop, systemd)
//! cancels a [`CancellationToken`] that every part of a binary can clone and wait on.
//!
//! Must not decide what shutting down means (stop accepting, hand a job back): the owners of
//! the token do.

pub use tokio_util::sync::CancellationToken;

/// A token cancelled by the first SIGINT or SIGTERM. The handlers are installed before this
/// returns (so a signal sent right after is seen); call it inside a tokio runtime.
pub fn on_signal() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let signals = Signals::install()?;
    let cancel = token.clone();
    tokio::spawn(async move {
        signals.recv().await;
        tracing::info!("shutdown signal received");
        cancel.cancel();
    });
    Ok(token)
}

#[cfg(unix)]
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self)
    }

    async fn recv(self) {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn sigterm_cancels_the_token_and_every_clone() {
        let token = on_signal().expect("handlers");
        let clone = token.clone();
        assert!(!token.is_cancelled());
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(10), clone.cancelled())
            .await
            .expect("cancelled by SIGTERM");
        assert!(token.is_cancelled());
    }
}

//! The shutdown signal, shared by the gRPC server, the background loops and open WatchJob
//! streams, so that one trigger stops them all: a `CancellationToken` (the `client` crate's
//! signal type) behind the names the coordinator uses.
//!
//! Must not decide when to shut down: `run`'s caller does, through the future it passes in.

use tokio_util::sync::CancellationToken;

/// Fires the signal (once; later calls are no-ops).
#[derive(Debug)]
pub struct Trigger(CancellationToken);

/// Waits for the signal. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown(CancellationToken);

/// A connected trigger and signal.
pub fn channel() -> (Trigger, Shutdown) {
    let token = CancellationToken::new();
    (Trigger(token.clone()), Shutdown(token))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.cancel();
    }
}

/// A trigger that is gone fires too, as the signal can no longer come otherwise.
impl Drop for Trigger {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Shutdown {
    /// True once the signal has fired.
    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves when the signal fires (at once if it already has, or if the trigger is gone).
    pub async fn wait(&mut self) {
        self.0.cancelled().await;
    }

    /// The token itself, for code that takes a `CancellationToken`.
    pub fn token(&self) -> CancellationToken {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_signal_even_after_it_fired() {
        let (trigger, mut a) = channel();
        let mut b = a.clone();
        assert!(!a.is_triggered());
        trigger.fire();
        a.wait().await;
        b.wait().await;
        assert!(b.is_triggered());
    }
}

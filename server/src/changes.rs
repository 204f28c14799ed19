//! Change notifications from Postgres: how a write on any coordinator replica (or in psql)
//! reaches the watchers on this one.
//!
//! Migration 0010's triggers send a NOTIFY on [`CHANNEL`] from the writing transaction itself
//! whenever a job's state or attempt changes (`s<job id>`) or metric points are stored for it
//! (`p<job id>`). Postgres delivers it to every listening session when that transaction commits.
//! This module holds one connection of its own (outside the pool) that LISTENs, and turns each
//! notification into a [`Notifier`] call: a state change wakes every watcher of the job, points
//! only WatchJob's. This is the only way watchers are woken: the coordinator that made a change
//! learns of it the same way as every other replica, in the same time.
//!
//! Notifications sent while the connection is down are lost, so after every (re)connection
//! every job watched here is woken once ("look again"): a watcher reads Postgres and sends what
//! it missed. The follow loop's slow safety poll covers the rest.
//!
//! Must not write, and must not decide what a watcher sends (it only says "look again").

use std::time::Duration;

use sqlx::postgres::{PgListener, PgNotification, PgPoolOptions};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::events::Notifier;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// The channel the triggers notify on (migration 0010).
pub const CHANNEL: &str = "trainq_changes";

/// Pause between attempts to connect the listener again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// What one notification asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The job's state (or attempt) changed: wake every watcher.
    State(Uuid),
    /// Metric points were stored for the job: wake its WatchJob watchers.
    Points(Uuid),
}

impl Change {
    /// Parses a payload (`s<uuid>` or `p<uuid>`); anything else is `None`.
    pub fn parse(payload: &str) -> Option<Change> {
        let (kind, id) = payload.split_at_checked(1)?;
        let id = Uuid::try_parse(id).ok()?;
        match kind {
            "s" => Some(Change::State(id)),
            "p" => Some(Change::Points(id)),
            _ => None,
        }
    }

    fn wake(self, notifier: &Notifier) {
        match self {
            Change::State(id) => notifier.notify(id),
            Change::Points(id) => notifier.notify_points(id),
        }
    }
}

/// Connects a listener on a connection of its own: a pool of one, outside the coordinator's
/// pool, with the same connect options.
pub async fn listen(pool: &PgPool) -> sqlx::Result<PgListener> {
    let own = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(pool.connect_options().as_ref().clone());
    let mut listener = PgListener::connect_with(&own).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Delivers notifications to `notifier` until shutdown, reconnecting (and then waking every
/// watched job) whenever the connection is lost. `listener` is the first connection, made
/// before the coordinator serves, so nothing a first watcher waits for is missed.
pub fn spawn(
    pool: PgPool,
    listener: Option<PgListener>,
    notifier: Notifier,
    metrics: std::sync::Arc<Metrics>,
    mut shutdown: Shutdown,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut current = listener;
        loop {
            let mut listener = match current.take() {
                Some(listener) => listener,
                None => {
                    let connected = tokio::select! {
                        _ = shutdown.wait() => break,
                        connected = listen(&pool) => connected,
                    };
                    match connected {
                        Ok(listener) => {
                            tracing::info!("listening for change notifications again");
                            listener
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot listen for change notifications yet");
                            tokio::select! {
                                _ = shutdown.wait() => break,
                                _ = tokio::time::sleep(RECONNECT_PAUSE) => continue,
                            }
                        }
                    }
                }
            };
            metrics.change_listener_up(true);
            // Whatever was notified while nobody listened is lost: every watcher looks again.
            for id in notifier.watched() {
                notifier.notify(id);
            }
            loop {
                let received: sqlx::Result<Option<PgNotification>> = tokio::select! {
                    _ = shutdown.wait() => return,
                    received = listener.try_recv() => received,
                };
                match received {
                    Ok(Some(notification)) => match Change::parse(notification.payload()) {
                        Some(change) => change.wake(&notifier),
                        None => tracing::debug!(
                            payload = notification.payload(),
                            "ignoring an unknown change notification"
                        ),
                    },
                    Ok(None) => {
                        tracing::warn!(
                            "lost the change-notification connection to postgres; reconnecting"
                        );
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "change notifications failed; reconnecting");
                        break;
                    }
                }
            }
            metrics.change_listener_up(false);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_into_changes_and_anything_else_is_ignored() {
        let id = Uuid::now_v7();
        assert_eq!(Change::parse(&format!("s{id}")), Some(Change::State(id)));
        assert_eq!(Change::parse(&format!("p{id}")), Some(Change::Points(id)));
        for bad in [
            "",
            "s",
            "x",
            &format!("x{id}"),
            &format!("s{id}x"),
            "ssss",
            "é",
        ] {
            assert_eq!(Change::parse(bad), None, "{bad:?}");
        }
    }
}

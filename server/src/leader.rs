//! Which coordinator replica runs the background loops (the reconciler and the lease reaper):
//! the one that holds a Postgres session-level advisory lock ([`LOCK_KEY`]) on a connection of
//! its own. Every replica serves every RPC; only the leader re-dispatches and reaps, so N
//! replicas do that work once, not N times.
//!
//! Each replica checks every [`CHECK_EVERY`]: a follower tries `pg_try_advisory_lock` (never
//! waits for it); the leader runs a query on its lock connection to know the session (and so
//! the lock) is still there, and steps down when that fails or takes longer than
//! [`CHECK_TIMEOUT`]. A leader that dies or is killed loses its session, and with it the lock,
//! at once (Postgres sees the connection close); a leader cut off from Postgres by the network
//! steps down at its next check, and Postgres frees the lock when its TCP keep-alive gives up
//! on the session ([`KEEPALIVE`]: about 25 s), after which another replica takes over. Between
//! the two no replica leads, so the loops never run twice at once, except that a round already
//! under way when its leader steps down finishes: that is harmless, because every write of
//! both loops is conditional (SKIP LOCKED batches, `WHERE state = ...` updates) and was safe to
//! run on several coordinators at once before there was a leader.
//!
//! This needs a direct session with Postgres: a pooler in transaction mode (PgBouncer's default)
//! would lose the lock between statements. Must not run the loops itself (`reconcile` asks
//! [`Leadership::leads`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{ConnectOptions as _, Connection as _, PgConnection, PgPool};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// The advisory lock every replica of one database competes for ("trainq" in ASCII).
pub const LOCK_KEY: i64 = 0x74_72_61_69_6e_71;

/// How often a replica checks (and a follower tries to take) the leadership: the longest the
/// loops stay without a leader after the leader exits.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A leader whose lock connection does not answer within this steps down.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The server-side TCP keep-alive of the lock session (idle, interval, count): how soon Postgres
/// frees the lock of a leader that vanished without closing its connection.
const KEEPALIVE: (u32, u32, u32) = (10, 5, 3);

/// Whether this replica leads now. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Leadership {
    leads: Arc<AtomicBool>,
}

impl Leadership {
    /// True while this replica holds the lock (as of its last check).
    pub fn leads(&self) -> bool {
        self.leads.load(Ordering::SeqCst)
    }

    fn set(&self, leads: bool, metrics: &Metrics) {
        if self.leads.swap(leads, Ordering::SeqCst) != leads {
            if leads {
                tracing::info!(
                    "this coordinator now leads the background loops (reconciler, lease reaper)"
                );
            } else {
                tracing::warn!("this coordinator no longer leads the background loops");
            }
        }
        metrics.leader(leads);
    }
}

/// Competes for the leadership every [`CHECK_EVERY`] until shutdown, then gives it up (closing
/// the lock connection frees the lock at once, so another replica takes over within a check).
/// A follower keeps its connection between tries; any error drops the connection (and with it
/// the lock, if held), and the next check starts over.
pub fn spawn(
    pool: PgPool,
    leadership: Leadership,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut conn: Option<PgConnection> = None;
        let mut ticker = tokio::time::interval(CHECK_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = ticker.tick() => {}
            }
            let leads = leadership.leads();
            let checked = tokio::time::timeout(CHECK_TIMEOUT, check(&pool, &mut conn, leads)).await;
            let leads_now = match checked {
                Ok(Ok(leads_now)) => leads_now,
                Ok(Err(e)) => {
                    if leads {
                        tracing::warn!(error = %e, "the leader's lock connection failed");
                    } else {
                        tracing::debug!(error = %e, "cannot compete for the leadership now");
                    }
                    conn = None;
                    false
                }
                Err(_) => {
                    if leads {
                        tracing::warn!("the leader's lock connection did not answer in time");
                    }
                    conn = None;
                    false
                }
            };
            leadership.set(leads_now, &metrics);
        }
        leadership.set(false, &metrics);
        if let Some(conn) = conn {
            let _ = conn.close().await;
        }
    })
}

/// One check on the lock connection (made first if there is none): a leader's session must
/// still answer; a follower tries to take the lock. Returns whether this replica leads.
async fn check(pool: &PgPool, conn: &mut Option<PgConnection>, leads: bool) -> sqlx::Result<bool> {
    let conn = match conn {
        Some(conn) => conn,
        None => {
            let (idle, interval, count) = KEEPALIVE;
            let options = pool.connect_options().as_ref().clone().options([
                ("tcp_keepalives_idle", idle.to_string()),
                ("tcp_keepalives_interval", interval.to_string()),
                ("tcp_keepalives_count", count.to_string()),
                ("application_name", "trainq-leader".to_string()),
            ]);
            conn.insert(options.connect().await?)
        }
    };
    if leads {
        conn.ping().await?;
        return Ok(true);
    }
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(conn)
        .await
}

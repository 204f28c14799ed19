//! Limits on the streams a coordinator holds open: how many WatchJob/WatchSweep streams it
//! serves in all and per client connection, and how many of their reads run against Postgres
//! at once.
//!
//! A watcher is admitted when its call arrives and holds a [`WatchPermit`] for as long as its
//! stream lives: the permit travels inside the response stream ([`Admitted`]), so it is given
//! back when tonic drops the stream (the client went away or the stream ended). The read limit
//! keeps part of the database pool free for every other RPC however many watchers wake at once.
//!
//! Must not read Postgres or know what a job is.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::error::{Error, Result};

/// Default of `--max-watchers`: open WatchJob and WatchSweep streams in all.
pub const DEFAULT_MAX_WATCHERS: u32 = 2000;
/// Default of `--max-watchers-per-connection`.
pub const DEFAULT_MAX_WATCHERS_PER_CONNECTION: u32 = 100;

/// What the coordinator allows; see the fields of [`crate::config::Config`] with these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchLimitsConfig {
    pub max_watchers: u32,
    pub max_watchers_per_connection: u32,
    /// Watcher reads of Postgres at once (each holds one pooled connection while it runs).
    pub concurrent_reads: u32,
}

/// The shared counters behind the limits. Cheap to clone; clones share them.
#[derive(Debug, Clone)]
pub struct WatchLimits {
    config: WatchLimitsConfig,
    total: Arc<Semaphore>,
    per_connection: Arc<Mutex<HashMap<Peer, u32>>>,
    reads: Arc<Semaphore>,
}

/// Which client connection a call came on: its remote address (one per TCP connection), or one
/// shared bucket when the transport does not say.
type Peer = Option<SocketAddr>;

impl WatchLimits {
    pub fn new(config: WatchLimitsConfig) -> Self {
        WatchLimits {
            config,
            total: Arc::new(Semaphore::new(config.max_watchers as usize)),
            per_connection: Arc::default(),
            reads: Arc::new(Semaphore::new(config.concurrent_reads.max(1) as usize)),
        }
    }

    /// Admits one more watcher on the connection `peer`, or refuses it with RESOURCE_EXHAUSTED
    /// saying which limit it hit. Nothing is counted for a refused call.
    pub fn admit(&self, peer: Peer) -> Result<WatchPermit> {
        let total = match self.total.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => {
                return Err(Error::ResourceExhausted(format!(
                    "the coordinator already serves {} watch streams (its --max-watchers); \
                     retry later",
                    self.config.max_watchers
                )))
            }
        };
        let mut counts = crate::lock(&self.per_connection);
        let on_connection = counts.entry(peer).or_insert(0);
        if *on_connection >= self.config.max_watchers_per_connection {
            let limit = self.config.max_watchers_per_connection;
            if *on_connection == 0 {
                counts.remove(&peer);
            }
            return Err(Error::ResourceExhausted(format!(
                "this connection already has {limit} watch streams open (the coordinator's \
                 --max-watchers-per-connection); close one or open another connection"
            )));
        }
        *on_connection += 1;
        Ok(WatchPermit {
            _total: total,
            peer,
            per_connection: self.per_connection.clone(),
        })
    }

    /// Waits for a free read slot; a watcher holds it while it reads Postgres.
    pub async fn read_slot(&self) -> OwnedSemaphorePermit {
        self.reads
            .clone()
            .acquire_owned()
            .await
            .expect("the read semaphore is never closed")
    }

    /// Open watch streams right now.
    pub fn open(&self) -> u32 {
        self.config.max_watchers - self.total.available_permits() as u32
    }
}

/// One admitted watcher's place; given back when dropped.
#[derive(Debug)]
pub struct WatchPermit {
    _total: OwnedSemaphorePermit,
    peer: Peer,
    per_connection: Arc<Mutex<HashMap<Peer, u32>>>,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut counts = crate::lock(&self.per_connection);
        if let Some(n) = counts.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

/// A response stream that holds its watcher's permit until tonic drops it.
pub struct Admitted<S> {
    inner: S,
    _permit: WatchPermit,
}

impl<S> Admitted<S> {
    pub fn new(inner: S, permit: WatchPermit) -> Self {
        Admitted {
            inner,
            _permit: permit,
        }
    }
}

impl<S: Stream + Unpin> Stream for Admitted<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: u32, per_connection: u32) -> WatchLimits {
        WatchLimits::new(WatchLimitsConfig {
            max_watchers: total,
            max_watchers_per_connection: per_connection,
            concurrent_reads: 1,
        })
    }

    fn peer(port: u16) -> Peer {
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn refusal(r: Result<WatchPermit>) -> String {
        match r {
            Err(Error::ResourceExhausted(m)) => m,
            other => panic!("expected ResourceExhausted, got {other:?}"),
        }
    }

    #[test]
    fn a_connection_gets_at_most_its_share_and_others_still_get_theirs() {
        let l = limits(10, 2);
        let a1 = l.admit(peer(1)).expect("first");
        let _a2 = l.admit(peer(1)).expect("second");
        let m = refusal(l.admit(peer(1)));
        assert!(m.contains("--max-watchers-per-connection"), "{m}");
        let _b = l.admit(peer(2)).expect("another connection");
        assert_eq!(l.open(), 3, "the refused call holds nothing");
        drop(a1);
        l.admit(peer(1)).expect("room again after one stream ended");
    }

    #[test]
    fn the_total_is_shared_by_every_connection_and_given_back_on_drop() {
        let l = limits(3, 10);
        let held: Vec<_> = (0..3)
            .map(|p| l.admit(peer(p)).expect("admitted"))
            .collect();
        let m = refusal(l.admit(peer(9)));
        assert!(m.contains("--max-watchers"), "{m}");
        assert_eq!(l.open(), 3);
        drop(held);
        assert_eq!(l.open(), 0);
        assert!(
            crate::lock(&l.per_connection).is_empty(),
            "no counters left behind"
        );
        l.admit(peer(9)).expect("admitted once the others left");
    }
}

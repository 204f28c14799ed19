//! Redis dispatch: the only module that talks to Redis.
//!
//! The coordinator adds (`ZADD`) the ids of jobs that became ready to their queue's sorted set
//! ([`Keys::ready`], scored by [`proto::queue::score`] of their priority); workers pop them
//! (`BZPOPMIN`) and claim the job over gRPC. Redis is disposable: a
//! failed push is logged and left to the reconciler, and the coordinator starts and serves while
//! Redis is down. The connection is made lazily and then kept by a `ConnectionManager`, which
//! reconnects by itself: after a failure the next command reconnects, and the reconciler's
//! interval paces those tries.
//!
//! Redis losing its keys (FLUSHALL, a restart without persistence) is detected with a marker key
//! ([`Keys::alive_marker`]) that the reconciler sets with `SET NX` at every round: when that
//! succeeds the marker was missing, and every queued job is pushed again at once.
//!
//! Must not store anything but job ids, and must not be the reason a request fails: callers
//! treat every error from here as "try again later".

use std::time::Duration;

use proto::queue::{score, Keys, Ready};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;
use uuid::Uuid;

/// A Redis operation that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// How long one connection attempt or one command may take before it counts as a failure:
/// short, because a submit waits for its push.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Pushes job ids to the ready queue of one key prefix.
pub struct Dispatcher {
    client: redis::Client,
    keys: Keys,
    /// Set on the first successful connection; empty while Redis has never been reachable.
    conn: OnceCell<ConnectionManager>,
    /// The alive marker's value: which coordinator set it (for operators).
    token: String,
}

impl Dispatcher {
    /// Parses the URL only; nothing is connected until the first push.
    pub fn new(redis_url: &str, prefix: &str) -> Result<Self, DispatchError> {
        Ok(Self {
            client: redis::Client::open(redis_url)?,
            keys: Keys::new(prefix),
            conn: OnceCell::new(),
            token: format!("coordinator {}", Uuid::new_v4()),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The shared connection, connecting first if this is the first use (or every earlier try
    /// failed).
    async fn connection(&self) -> Result<ConnectionManager, DispatchError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(REDIS_TIMEOUT)
                    .set_response_timeout(REDIS_TIMEOUT)
                    // No retry loop inside the client (its backoff sleeps for seconds): a failed
                    // push is retried by the reconciler, and a submit must not wait for it.
                    .set_number_of_retries(0)
                    .set_max_delay(500);
                let connect = ConnectionManager::new_with_config(self.client.clone(), config);
                match tokio::time::timeout(REDIS_TIMEOUT * 2, connect).await {
                    Ok(result) => result.map_err(DispatchError::from),
                    Err(_) => Err(DispatchError::Timeout(REDIS_TIMEOUT * 2)),
                }
            })
            .await?;
        Ok(conn.clone())
    }

    /// Adds the jobs to their queues' ready sets, with one command per queue in one round trip.
    /// A job already there stays once (with its score brought up to date).
    pub async fn push(&self, jobs: &[Ready]) -> Result<(), DispatchError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut by_queue: std::collections::BTreeMap<&str, Vec<&Ready>> = Default::default();
        for job in jobs {
            by_queue.entry(job.queue.as_str()).or_default().push(job);
        }
        let mut pipe = redis::pipe();
        for (queue, jobs) in by_queue {
            let cmd = pipe.cmd("ZADD").arg(self.keys.ready(queue));
            for job in jobs {
                cmd.arg(score(job.priority)).arg(job.id.to_string());
            }
            cmd.ignore();
        }
        let mut conn = self.connection().await?;
        let () = self.bounded(pipe.query_async(&mut conn)).await?;
        Ok(())
    }

    /// Whether Redis answers (`PING`).
    pub async fn ping(&self) -> Result<(), DispatchError> {
        let mut conn = self.connection().await?;
        let _pong: String = self
            .bounded(redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(())
    }

    /// Sets the alive marker unless it is there (`SET NX`). True when it was missing: Redis is
    /// new to this prefix or lost its keys, so ids pushed before may be gone.
    pub async fn mark_alive(&self) -> Result<bool, DispatchError> {
        let mut conn = self.connection().await?;
        let cmd = redis::cmd("SET")
            .arg(self.keys.alive_marker())
            .arg(&self.token)
            .arg("NX")
            .to_owned();
        let set: Option<String> = self.bounded(cmd.query_async(&mut conn)).await?;
        Ok(set.is_some())
    }

    /// Deletes the alive marker, so the next [`Self::mark_alive`] reports it missing (when the
    /// re-push it announced could not be prepared; and test clean-up).
    pub async fn forget_alive(&self) -> Result<(), DispatchError> {
        let mut conn = self.connection().await?;
        let cmd = redis::cmd("DEL").arg(self.keys.alive_marker()).to_owned();
        let _deleted: i64 = self.bounded(cmd.query_async(&mut conn)).await?;
        Ok(())
    }

    /// The ids waiting in one queue's ready set, in the order workers pop them (for tests and
    /// operators).
    pub async fn ready_ids(&self, queue: &str) -> Result<Vec<String>, DispatchError> {
        let mut conn = self.connection().await?;
        let cmd = redis::cmd("ZRANGE")
            .arg(self.keys.ready(queue))
            .arg(0)
            .arg(-1)
            .to_owned();
        self.bounded(cmd.query_async(&mut conn)).await
    }

    /// Deletes every queue of this prefix (test clean-up; never touches other prefixes).
    pub async fn delete_queues(&self) -> Result<(), DispatchError> {
        let mut conn = self.connection().await?;
        let keys: Vec<String> = self
            .bounded(
                redis::cmd("KEYS")
                    .arg(self.keys.ready_pattern())
                    .query_async(&mut conn),
            )
            .await?;
        if keys.is_empty() {
            return Ok(());
        }
        let _deleted: i64 = self
            .bounded(redis::cmd("DEL").arg(keys).query_async(&mut conn))
            .await?;
        Ok(())
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, DispatchError> {
        match tokio::time::timeout(REDIS_TIMEOUT, fut).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(DispatchError::Timeout(REDIS_TIMEOUT)),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against the machine's Redis (REDIS_URL, default redis://127.0.0.1:6379), each test under
    //! its own key prefix and deleting its keys at the end.
    use super::*;

    fn redis_url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    fn unique_dispatcher() -> Dispatcher {
        Dispatcher::new(&redis_url(), &format!("trainq-test:{}:", Uuid::new_v4()))
            .expect("valid url")
    }

    fn ready(id: Uuid, queue: &str, priority: i32) -> Ready {
        Ready {
            id,
            queue: queue.into(),
            priority,
        }
    }

    fn default_queue(id: Uuid) -> Ready {
        ready(id, proto::queue::DEFAULT_QUEUE, 0)
    }

    #[tokio::test]
    async fn pushed_ids_pop_by_priority_then_age_each_on_its_own_queue_once() {
        let d = unique_dispatcher();
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        d.push(&[
            ready(ids[0], "default", 0),
            ready(ids[1], "default", 0),
            ready(ids[2], "gpu", 0),
        ])
        .await
        .expect("redis is reachable");
        d.push(&[ready(ids[3], "default", 5), ready(ids[4], "default", -5)])
            .await
            .expect("redis is reachable");
        // A repeat (the reconciler pushing again) leaves one copy.
        d.push(&[ready(ids[1], "default", 0)]).await.expect("push");
        let default = d.ready_ids("default").await.expect("zrange");
        let gpu = d.ready_ids("gpu").await.expect("zrange");
        d.delete_queues().await.expect("clean up");
        let text = |i: &[usize]| i.iter().map(|&i| ids[i].to_string()).collect::<Vec<_>>();
        assert_eq!(default, text(&[3, 0, 1, 4]), "priority first, then oldest");
        assert_eq!(gpu, text(&[2]));
        assert!(
            d.ready_ids("gpu").await.expect("zrange").is_empty(),
            "deleted"
        );
    }

    #[tokio::test]
    async fn the_alive_marker_is_reported_missing_only_until_it_is_set() {
        let d = unique_dispatcher();
        let first = d.mark_alive().await.expect("redis is reachable");
        let second = d.mark_alive().await.expect("redis is reachable");
        d.forget_alive().await.expect("del");
        let after_loss = d.mark_alive().await.expect("redis is reachable");
        d.forget_alive().await.expect("clean up");
        assert_eq!((first, second, after_loss), (true, false, true));
    }

    #[tokio::test]
    async fn two_prefixes_do_not_see_each_others_ids() {
        let (a, b) = (unique_dispatcher(), unique_dispatcher());
        a.push(&[default_queue(Uuid::now_v7())])
            .await
            .expect("push");
        let seen_by_b = b.ready_ids("default").await.expect("zrange");
        a.delete_queues().await.expect("clean up");
        assert!(seen_by_b.is_empty());
    }

    #[tokio::test]
    async fn a_push_to_an_unreachable_redis_fails_quickly_instead_of_hanging() {
        let d = Dispatcher::new("redis://127.0.0.1:1", "trainq-test:").expect("valid url");
        let started = std::time::Instant::now();
        assert!(d.push(&[default_queue(Uuid::now_v7())]).await.is_err());
        assert!(
            d.push(&[default_queue(Uuid::now_v7())]).await.is_err(),
            "a later push tries again and fails again"
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "took {:?}",
            started.elapsed()
        );
    }

    /// A private redis-server on a free port (this test stops it, so it must not be the shared one).
    struct PrivateRedis {
        port: u16,
        child: std::process::Child,
    }

    impl PrivateRedis {
        fn start(port: u16) -> Self {
            let child = std::process::Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("this test needs redis-server on PATH");
            Self { port, child }
        }

        fn stop(mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    async fn eventually_pushes(d: &Dispatcher) -> bool {
        for _ in 0..100 {
            if d.push(&[default_queue(Uuid::now_v7())]).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[tokio::test]
    async fn the_dispatcher_reconnects_by_itself_after_redis_restarts() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let d = Dispatcher::new(&format!("redis://127.0.0.1:{port}"), "trainq-test:")
            .expect("valid url");
        assert!(
            d.push(&[default_queue(Uuid::now_v7())]).await.is_err(),
            "not started yet"
        );
        let redis = PrivateRedis::start(port);
        assert!(eventually_pushes(&d).await, "connects once redis is up");
        let port = redis.port;
        redis.stop();
        assert!(
            d.push(&[default_queue(Uuid::now_v7())]).await.is_err(),
            "redis is down"
        );
        let redis = PrivateRedis::start(port);
        let reconnected = eventually_pushes(&d).await;
        redis.stop();
        assert!(
            reconnected,
            "the same dispatcher pushes again after the restart"
        );
    }
}

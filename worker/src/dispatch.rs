//! The worker's side of Redis: pops job ids from the ready sets of the queues it serves, in the
//! order given (`BZPOPMIN` takes from the first non-empty one: the highest priority there, then
//! the oldest job). The only worker module that knows Redis; key names come from
//! [`proto::queue::Keys`].
//!
//! Redis carries ids only. A popped id is a hint, not ownership: the worker must still claim the
//! job over gRPC, and a lost or duplicated id is harmless. Must not claim, ack or store anything.

use std::time::Duration;

use proto::queue::Keys;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

/// A dedicated connection for blocking pops (never shared with other commands, since BZPOPMIN
/// holds the connection while it waits). Reconnects lazily after errors.
pub struct Queue {
    client: redis::Client,
    /// The ready-set keys of the served queues, in the order they are served.
    keys: Vec<String>,
    conn: Option<MultiplexedConnection>,
    /// How long one BZPOPMIN waits before returning `None`, so the caller can check for shutdown.
    pop_timeout: Duration,
}

impl Queue {
    /// Pops from `queues` (at least one), in that order.
    pub fn new(
        redis_url: &str,
        keys: &Keys,
        queues: &[String],
        pop_timeout: Duration,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!queues.is_empty(), "a worker serves at least one queue");
        let client = redis::Client::open(redis_url)
            .map_err(|e| anyhow::anyhow!("invalid redis url {redis_url}: {e}"))?;
        Ok(Self {
            client,
            keys: queues.iter().map(|q| keys.ready(q)).collect(),
            conn: None,
            pop_timeout,
        })
    }

    async fn connection(&mut self) -> redis::RedisResult<&mut MultiplexedConnection> {
        if self.conn.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Duration::from_secs(5))
                .set_response_timeout(self.pop_timeout + Duration::from_secs(5));
            self.conn = Some(
                self.client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            );
        }
        Ok(self.conn.as_mut().expect("connection was just set"))
    }

    /// Waits up to `pop_timeout` for a job id. On error the connection is dropped and re-made on
    /// the next call; the caller backs off.
    pub async fn pop(&mut self) -> redis::RedisResult<Option<String>> {
        let timeout = self.pop_timeout.as_secs_f64();
        let mut cmd = redis::cmd("BZPOPMIN");
        cmd.arg(&self.keys).arg(timeout);
        let result: redis::RedisResult<Option<(String, String, f64)>> = async {
            let conn = self.connection().await?;
            cmd.query_async(conn).await
        }
        .await;
        match result {
            Ok(popped) => Ok(popped.map(|(_, id, _)| id)),
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }
}

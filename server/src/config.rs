//! The coordinator's configuration: one struct, every field a command-line flag with an
//! environment variable and a default that works on a developer machine.
//!
//! Must not read the environment anywhere else, and must not open connections: it only
//! describes what `run` should do. (One exception, on purpose: an `s3://` artifact store also
//! reads the standard `AWS_*` variables, through `object_store`'s `AmazonS3Builder::from_env`
//! in the artifacts module, so every way AWS tools are configured works unchanged.)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::artifacts::S3Settings;
pub use proto::ops::{MetricsListen, Secret};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// trainq coordinator: gRPC API, Postgres store, Redis dispatch, reconciler and lease reaper.
#[derive(Debug, Clone, Parser)]
#[command(name = "trainq-server", version, about, args_override_self = true)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "TRAINQ_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// Postgres, the source of truth. The database is created if missing and migrated at start.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/trainq"
    )]
    pub database_url: String,

    /// How long a request waits for a database connection before it answers UNAVAILABLE, so
    /// that calls fail fast while Postgres is down or restarting instead of hanging.
    #[arg(long, env = "TRAINQ_DB_ACQUIRE_TIMEOUT_MS", default_value_t = 3_000)]
    pub db_acquire_timeout_ms: u64,

    /// How long start-up waits for Postgres to be reachable (retrying with backoff, one log line
    /// per failure) before the coordinator gives up and exits with an error.
    #[arg(long, env = "TRAINQ_DB_WAIT_MS", default_value_t = 60_000)]
    pub db_wait_ms: u64,

    /// Redis, which carries only job ids. The server starts and serves even when it is down.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Prefix of every Redis key, so several deployments (or tests) can share one Redis.
    #[arg(long, env = "TRAINQ_REDIS_PREFIX", default_value = proto::queue::DEFAULT_PREFIX)]
    pub redis_prefix: String,

    /// How long a claim or heartbeat keeps a job leased to its worker. A worker that is silent
    /// for longer loses the job to the lease reaper. The reaper also holds back for this long
    /// after start-up and after the database failed, so workers can renew leases that nobody
    /// could renew meanwhile.
    #[arg(long, env = "TRAINQ_LEASE_TIMEOUT_MS", default_value_t = 30_000)]
    pub lease_timeout_ms: u64,

    /// How often the reconciler and the lease reaper scan Postgres.
    #[arg(long, env = "TRAINQ_RECONCILE_INTERVAL_MS", default_value_t = 2_000)]
    pub reconcile_interval_ms: u64,

    /// A queued job whose id was pushed to Redis longer ago than this is pushed again (its
    /// message may have been lost with Redis).
    #[arg(long, env = "TRAINQ_REDISPATCH_AFTER_MS", default_value_t = 30_000)]
    pub redispatch_after_ms: u64,

    /// Base delay before a failed attempt is retried; doubles with every attempt, with jitter.
    #[arg(long, env = "TRAINQ_RETRY_BACKOFF_MS", default_value_t = 2_000)]
    pub retry_backoff_ms: u64,

    /// Where artifacts (checkpoints, image grids) are stored: `file://DIR` (a relative DIR is
    /// resolved against the current directory and created) or `s3://BUCKET[/PREFIX]`, configured
    /// from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP for a plain-HTTP endpoint).
    #[arg(long, env = "TRAINQ_ARTIFACTS", default_value = "file://./artifacts")]
    pub artifacts: String,

    /// Most WatchJob and WatchSweep streams open at once, from every client together; past it a
    /// watch call is refused with RESOURCE_EXHAUSTED (the other RPCs are not affected).
    #[arg(long, env = "TRAINQ_MAX_WATCHERS", default_value_t = crate::api::limits::DEFAULT_MAX_WATCHERS)]
    pub max_watchers: u32,

    /// Most WatchJob and WatchSweep streams one client connection may hold open at once.
    #[arg(
        long,
        env = "TRAINQ_MAX_WATCHERS_PER_CONNECTION",
        default_value_t = crate::api::limits::DEFAULT_MAX_WATCHERS_PER_CONNECTION
    )]
    pub max_watchers_per_connection: u32,

    /// HTTP/2 streams (calls in flight, watch streams included) one client connection may have
    /// open at once; the client queues the rest.
    #[arg(long, env = "TRAINQ_MAX_STREAMS_PER_CONNECTION", default_value_t = 256)]
    pub max_streams_per_connection: u32,

    /// How many checkpoints each job keeps: the newest N by step, which include the final one of
    /// a job that succeeded; older ones are deleted (record and object) as new ones arrive. 0
    /// keeps every checkpoint. Training states (resume) are kept apart from this: the newest
    /// two while a job runs, none once it succeeded.
    #[arg(long, env = "TRAINQ_KEEP_CHECKPOINTS", default_value_t = crate::domain::DEFAULT_KEPT_CHECKPOINTS)]
    pub keep_checkpoints: u32,

    /// S3 settings that override the AWS variables: not a flag, for embedding and tests (which
    /// must not change the process-wide environment).
    #[arg(skip)]
    pub s3: S3Settings,

    /// Tokens (comma-separated) that may call `trainq.v1.JobService`, sent as
    /// `authorization: Bearer <token>`. Auth is on when any client or worker token is
    /// configured, off (every call allowed) when none is. Never logged.
    #[arg(
        long,
        env = "TRAINQ_CLIENT_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub client_tokens: Vec<Secret>,

    /// Tokens (comma-separated) that may call `trainq.v1.WorkerService` (workers' `--token`).
    /// `ID=TOKEN` binds a token to worker id `ID`: claims and writes with it for any other
    /// worker id are PERMISSION_DENIED (the worker must then run with `--worker-id ID`). A plain
    /// `TOKEN` may act as any worker.
    #[arg(
        long,
        env = "TRAINQ_WORKER_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub worker_tokens: Vec<Secret>,

    /// A file of more client tokens, one per line (blank lines and `#` comments skipped).
    #[arg(long, env = "TRAINQ_CLIENT_TOKENS_FILE")]
    pub client_tokens_file: Option<PathBuf>,

    /// A file of more worker tokens, one per line (`TOKEN` or `ID=TOKEN`).
    #[arg(long, env = "TRAINQ_WORKER_TOKENS_FILE")]
    pub worker_tokens_file: Option<PathBuf>,

    /// Serve gRPC over TLS with this certificate chain (PEM); needs `--tls-key`. Plaintext
    /// when unset.
    #[arg(long, env = "TRAINQ_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, env = "TRAINQ_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Leave Nagle's algorithm on for accepted gRPC connections (TCP_NODELAY off). Only for
    /// measuring: with it, small responses can stall for a delayed ACK (about 40 ms).
    #[arg(long, env = "TRAINQ_NO_TCP_NODELAY")]
    pub no_tcp_nodelay: bool,

    /// Where Prometheus scrapes `GET /metrics` (HTTP), or `off`.
    #[arg(long, env = "TRAINQ_METRICS_LISTEN", default_value = "0.0.0.0:9091")]
    pub metrics_listen: MetricsListen,

    /// Where the web UI is served (HTTP), or `off`. With client tokens configured it asks for
    /// one and keeps a session cookie.
    #[arg(long, env = "TRAINQ_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    pub http_listen: MetricsListen,

    /// Log line format. The level filter comes from RUST_LOG (default `info`).
    #[arg(long, env = "TRAINQ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    pub fn lease_timeout(&self) -> Duration {
        Duration::from_millis(self.lease_timeout_ms)
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_interval_ms.max(1))
    }

    pub fn redispatch_after(&self) -> Duration {
        Duration::from_millis(self.redispatch_after_ms)
    }

    pub fn retry_backoff(&self) -> Duration {
        Duration::from_millis(self.retry_backoff_ms)
    }

    pub fn db_acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.db_acquire_timeout_ms.max(1))
    }

    pub fn db_wait(&self) -> Duration {
        Duration::from_millis(self.db_wait_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_documented_defaults() {
        let c = Config::try_parse_from([
            "trainq-server",
            "--lease-timeout-ms",
            "5",
            "--log-format",
            "json",
        ])
        .expect("valid flags");
        assert_eq!(c.lease_timeout(), Duration::from_millis(5));
        assert_eq!(c.artifacts, "file://./artifacts");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.db_acquire_timeout(), Duration::from_secs(3));
        assert_eq!(c.db_wait(), Duration::from_secs(60));
        assert!(Config::try_parse_from(["trainq-server", "--log-format", "xml"]).is_err());
        assert!(c.client_tokens.is_empty() && c.worker_tokens.is_empty());
        assert!(!c.no_tcp_nodelay, "TCP_NODELAY is on by default");
        assert_eq!(
            c.metrics_listen,
            MetricsListen::At("0.0.0.0:9091".parse().expect("address"))
        );
        let off = Config::try_parse_from(["trainq-server", "--metrics-listen", "off"])
            .expect("valid flags");
        assert_eq!(off.metrics_listen, MetricsListen::Off);
        assert!(Config::try_parse_from(["trainq-server", "--metrics-listen", "9091"]).is_err());
        assert_eq!(
            c.http_listen,
            MetricsListen::At("0.0.0.0:8080".parse().expect("address")),
            "the web UI's port of the shared contract"
        );
    }

    #[test]
    fn tokens_are_comma_separated_and_never_shown_by_debug() {
        let c = Config::try_parse_from([
            "trainq-server",
            "--client-tokens",
            "alpha-secret,beta-secret",
            "--worker-tokens",
            "gamma-secret,gpu-0=delta-secret",
        ])
        .expect("valid flags");
        assert_eq!(c.client_tokens.len(), 2);
        assert_eq!(c.worker_tokens[0].expose(), "gamma-secret");
        assert_eq!(c.worker_tokens[1].expose(), "gpu-0=delta-secret");
        let shown = format!("{c:?}");
        assert!(!shown.contains("-secret"), "{shown}");
        assert!(Config::try_parse_from(["trainq-server", "--tls-cert", "c.pem"]).is_err());
    }
}

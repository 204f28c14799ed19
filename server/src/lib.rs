//! trainq's coordinator: the gRPC API in front of Postgres (the truth about every job) and Redis
//! (which only carries job ids to workers), plus the background loops that keep them in step.
//!
//! - [`config`]: flags and environment variables.
//! - [`auth`]: bearer tokens with a role per service, and the optional TLS identity.
//! - [`domain`]: request types parsed and validated at the edge; retry policy.
//! - [`store`]: Postgres, the only module that writes SQL.
//! - [`dispatch`]: Redis, the only module that talks to it.
//! - [`artifacts`]: the artifact store (local files or S3), the only module that touches it.
//! - [`api`]: the `JobService` and `WorkerService` implementations.
//! - [`error`]: the one error type and its mapping to gRPC status codes.
//! - [`events`]: in-process job change notifications for WatchJob and WatchSweep.
//! - [`changes`]: Postgres's change notifications (LISTEN), which feed [`events`] with the
//!   changes every replica makes.
//! - [`leader`]: which replica runs the background loops (a Postgres advisory lock).
//! - [`metrics`]: Prometheus metrics and their `/metrics` endpoint.
//! - [`web`]: the web UI on its own HTTP port.
//! - [`reconcile`]: the reconciler (re-dispatch) and the lease reaper.
//! - [`shutdown`]: the signal that stops everything.
//!
//! [`run`] does the work and is what tests call; the `trainq-server` binary only parses the
//! configuration, sets up logging and waits for SIGINT/SIGTERM. This crate must not link
//! libtorch or run training.

pub mod api;
pub mod artifacts;
pub mod auth;
pub mod changes;
pub mod config;
pub mod dispatch;
pub mod domain;
pub mod error;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod shutdown;
pub mod store;
pub mod summary;
pub mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use client::retry::{BackoffBuilder as _, ExponentialBuilder};
use proto::v1::job_service_server::JobServiceServer;
use proto::v1::worker_service_server::WorkerServiceServer;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

pub use config::Config;

use api::{AppState, JobApi, WorkerApi};
use artifacts::ArtifactStore;
use dispatch::Dispatcher;
use error::OversizedIsResourceExhausted;
use events::Notifier;
use metrics::Metrics;
use shutdown::Shutdown;

/// Locks `mutex`, ignoring poisoning. Every value the coordinator guards with a std mutex is a
/// counter, a map of counters or a plain value that one statement replaces, so a panic while it
/// was held cannot have left it half-written.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The schema, embedded at build time from the workspace's `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Longest pause between attempts to reach Postgres at start-up.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(10);
/// Longest start-up waits for Redis to say whether it lost its keys.
const REDIS_CHECK_AT_START: Duration = Duration::from_secs(1);
/// Longest start-up waits for the change-notification listener to connect.
const LISTEN_AT_START: Duration = Duration::from_secs(5);
/// Idle time before the kernel probes an accepted connection.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// How often the server pings a client over HTTP/2, and how long it waits for the answer
/// before it closes the connection.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections in the database pool.
const POOL_CONNECTIONS: u32 = 16;
/// Connections of the liveness pool (heartbeats), besides the database pool.
const LIVENESS_CONNECTIONS: u32 = 8;
/// Of those, how many watcher reads may hold at once: the other half always serves the other
/// RPCs, however many watchers wake together.
const WATCH_READ_CONNECTIONS: u32 = POOL_CONNECTIONS / 2;

/// Prepares the database (creating and migrating it), starts the background loops and serves
/// gRPC on `listener` until `shutdown` resolves; then reports NOT_SERVING, stops accepting,
/// lets in-flight calls finish, and stops the loops. Waits (with backoff, up to `--db-wait-ms`)
/// for Postgres if it is not up yet; serves whether or not Redis is up.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (trigger, signal) = shutdown::channel();
    let trigger = Arc::new(trigger);
    let bridge = {
        let trigger = trigger.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down");
            trigger.fire();
        })
    };
    let result = serve_until(config, listener, signal).await;
    trigger.fire();
    bridge.abort();
    result
}

async fn serve_until(
    config: Config,
    listener: TcpListener,
    signal: Shutdown,
) -> anyhow::Result<()> {
    let tokens = Arc::new(auth::Tokens::from_config(&config)?);
    let tls = auth::tls_config(&config)?;
    tracing::info!(
        "{}; tls: {}",
        tokens.describe(),
        if tls.is_some() { "on" } else { "off" }
    );
    let artifacts = ArtifactStore::open(&config.artifacts, &config.s3)
        .with_context(|| format!("opening the artifact store {:?}", config.artifacts))?;
    // Bound before anything else, so that a port already in use stops the start at once.
    let metrics_listener = bind_http(config.metrics_listen, "the metrics endpoint").await?;
    let http_listener = bind_http(config.http_listen, "the web UI").await?;
    let metrics = Arc::new(Metrics::new());
    let exposure = Exposure::of(&tokens, &listener)?;
    exposure.report(&metrics);
    let Some(pool) = connect_database(&config, signal.clone()).await? else {
        return Ok(()); // shut down before Postgres came up
    };
    let dispatcher = Arc::new(
        Dispatcher::new(&config.redis_url, &config.redis_prefix).context("invalid REDIS_URL")?,
    );
    // Before serving, so that a first start (or a Redis that lost its keys while we were down)
    // re-pushes what is queued without racing the first submits. Bounded: Redis may be down,
    // and then the reconciler does it later.
    match tokio::time::timeout(
        REDIS_CHECK_AT_START,
        reconcile::ensure_redis_marked(&pool, &dispatcher),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not check redis at start; the reconciler will")
        }
        Err(_) => tracing::warn!("redis did not answer at start; the reconciler will check it"),
    }
    let notifier = Notifier::new();
    let mut background = Vec::new();
    // Before serving, so that nothing a first watcher waits for is missed; if Postgres's
    // notifications cannot be had now, the listener keeps trying (watchers fall back to their
    // slow poll meanwhile).
    let change_listener = match tokio::time::timeout(LISTEN_AT_START, changes::listen(&pool)).await
    {
        Ok(Ok(change_listener)) => Some(change_listener),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot listen for change notifications yet; retrying");
            None
        }
        Err(_) => {
            tracing::warn!("listening for change notifications timed out; retrying");
            None
        }
    };
    background.push(changes::spawn(
        pool.clone(),
        change_listener,
        notifier.clone(),
        metrics.clone(),
        signal.clone(),
    ));
    let leadership = leader::Leadership::default();
    background.push(leader::spawn(
        pool.clone(),
        leadership.clone(),
        metrics.clone(),
        signal.clone(),
    ));
    if let Some(listener) = metrics_listener {
        tracing::info!(addr = %listener.local_addr()?, "serving metrics on /metrics");
        let serve = metrics::serve(
            metrics.clone(),
            pool.clone(),
            dispatcher.clone(),
            config.lease_timeout(),
            listener,
            signal.clone(),
        );
        background.push(tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!(error = %format!("{e:#}"), "metrics endpoint failed");
            }
        }));
    }
    background.extend(reconcile::spawn(
        reconcile::Background {
            pool: pool.clone(),
            dispatcher: dispatcher.clone(),
            leadership,
            interval: config.reconcile_interval(),
            redispatch_after: config.redispatch_after(),
            grace: Arc::new(reconcile::LeaseGrace::new(config.lease_timeout())),
            metrics: metrics.clone(),
        },
        signal.clone(),
    ));
    let liveness_pool = liveness_pool(&pool, config.db_acquire_timeout());
    let state = Arc::new(AppState {
        pool: pool.clone(),
        liveness_pool: liveness_pool.clone(),
        dispatcher,
        notifier,
        artifacts,
        lease_timeout: config.lease_timeout(),
        retry_backoff: config.retry_backoff(),
        shutdown: signal.clone(),
        metrics,
        retention: store::Retention {
            checkpoints: config.keep_checkpoints,
        },
        watch_limits: api::limits::WatchLimits::new(api::limits::WatchLimitsConfig {
            max_watchers: config.max_watchers,
            max_watchers_per_connection: config.max_watchers_per_connection,
            concurrent_reads: WATCH_READ_CONNECTIONS,
        }),
    });
    if let Some(listener) = http_listener {
        tracing::info!(addr = %listener.local_addr()?, "serving the web UI");
        let app = web::router(state.clone(), tokens.clone());
        let serve = web::serve(listener, app, signal.clone());
        background.push(tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!(error = %format!("{e:#}"), "web UI failed");
            }
        }));
    }
    let guards = Guards {
        tokens,
        tls,
        nodelay: !config.no_tcp_nodelay,
        max_streams: config.max_streams_per_connection,
    };
    let served = serve_grpc(state, guards, listener, signal).await;
    for task in background {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "background task panicked");
        }
    }
    pool.close().await;
    liveness_pool.close().await;
    served
}

/// The pool of the liveness writes ([`AppState::liveness_pool`]): the database pool's
/// connection settings, with `synchronous_commit = off`; connects on first use.
fn liveness_pool(pool: &PgPool, acquire_timeout: Duration) -> PgPool {
    let options = pool
        .connect_options()
        .as_ref()
        .clone()
        .options([("synchronous_commit", "off")])
        .application_name("trainq-liveness");
    PgPoolOptions::new()
        .max_connections(LIVENESS_CONNECTIONS)
        .acquire_timeout(acquire_timeout)
        // No ping before each use (a round trip per heartbeat): a connection that died with a
        // Postgres restart fails one renewal, which its worker retries.
        .test_before_acquire(false)
        .connect_lazy_with(options)
}

/// The listener of an HTTP endpoint that can be `off`.
async fn bind_http(
    listen: config::MetricsListen,
    what: &str,
) -> anyhow::Result<Option<TcpListener>> {
    match listen {
        config::MetricsListen::Off => Ok(None),
        config::MetricsListen::At(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .with_context(|| format!("binding {what} {addr}")),
    }
}

/// What stands between a caller and the trainq services: the tokens each service requires
/// (health and reflection stay open) and the TLS identity, if any.
struct Guards {
    tokens: Arc<auth::Tokens>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    /// TCP_NODELAY on accepted connections (off only to measure its effect).
    nodelay: bool,
    /// HTTP/2 streams one client connection may have open at once.
    max_streams: u32,
}

/// How exposed the gRPC endpoint is: auth on or off, and the address it listens on.
struct Exposure {
    auth_enabled: bool,
    addr: SocketAddr,
}

impl Exposure {
    fn of(tokens: &auth::Tokens, listener: &TcpListener) -> anyhow::Result<Self> {
        Ok(Self {
            auth_enabled: tokens.enabled(),
            addr: listener.local_addr().context("listener has no address")?,
        })
    }

    /// Auth off on an address other hosts can reach: every call is allowed from anywhere.
    fn insecure(&self) -> bool {
        !self.auth_enabled && !self.addr.ip().is_loopback()
    }

    /// Sets the gauges, and warns when the endpoint is open to other hosts without auth.
    fn report(&self, metrics: &Metrics) {
        metrics.exposure(self.auth_enabled, self.insecure());
        if self.insecure() {
            tracing::warn!(
                addr = %self.addr,
                "auth is off while listening on a non-loopback address: anyone who can reach it \
                 may submit, cancel and claim jobs; configure --client-tokens and --worker-tokens \
                 or listen on 127.0.0.1"
            );
        }
    }
}

/// Serves the two trainq services, gRPC health and reflection (v1 and v1alpha, so older grpcurl
/// works), over TLS when configured, until the signal fires; then reports NOT_SERVING for every service, stops accepting
/// and drains in-flight calls (tonic's graceful shutdown waits for them; open WatchJob and
/// download streams end on the same signal). Requests larger than
/// [`domain::MAX_MESSAGE_BYTES`] are refused with RESOURCE_EXHAUSTED before decoding.
async fn serve_grpc(
    state: Arc<AppState>,
    guards: Guards,
    listener: TcpListener,
    mut signal: Shutdown,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<JobApi>>().await;
    health.set_serving::<WorkerServiceServer<WorkerApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let addr = listener.local_addr().context("listener has no address")?;
    tracing::info!(%addr, nodelay = guards.nodelay, "serving gRPC");
    let incoming = incoming(listener, guards.nodelay);
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(guards.max_streams));
    if let Some(tls) = guards.tls {
        builder = builder.tls_config(tls).context("configuring TLS")?;
    }
    let mut builder = builder.layer(metrics::RpcTimer(state.metrics.clone()));
    let job_guard = auth::RequireRole::new(
        guards.tokens.clone(),
        auth::Role::Client,
        <JobServiceServer<JobApi> as tonic::server::NamedService>::NAME,
    );
    let worker_guard = auth::RequireRole::new(
        guards.tokens,
        auth::Role::Worker,
        <WorkerServiceServer<WorkerApi> as tonic::server::NamedService>::NAME,
    );
    builder
        .add_service(health_service)
        .add_service(reflection().build_v1().context("building reflection v1")?)
        .add_service(
            reflection()
                .build_v1alpha()
                .context("building reflection v1alpha")?,
        )
        .add_service(InterceptedService::new(
            OversizedIsResourceExhausted(
                JobServiceServer::new(JobApi::new(state.clone()))
                    .max_decoding_message_size(domain::MAX_MESSAGE_BYTES),
            ),
            job_guard,
        ))
        .add_service(InterceptedService::new(
            OversizedIsResourceExhausted(
                // Upload chunks (4 MiB of data plus their framing) fit well within the limit.
                WorkerServiceServer::new(WorkerApi::new(state))
                    .max_decoding_message_size(domain::MAX_MESSAGE_BYTES),
            ),
            worker_guard,
        ))
        .serve_with_incoming_shutdown(incoming, async move {
            signal.wait().await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            health.set_not_serving::<JobServiceServer<JobApi>>().await;
            health
                .set_not_serving::<WorkerServiceServer<WorkerApi>>()
                .await;
        })
        .await
        .context("gRPC server failed")
}

/// The accepted connections of the gRPC listener. TCP_NODELAY: without it a response written in
/// more than one segment (headers, then data and trailers) waits for the client's delayed ACK,
/// about 40 ms (`trainq-rpc-latency` shows it). Keep-alive probes find peers that vanished
/// without closing; HTTP/2 pings (set on the server) do the same for idle streams (WatchJob).
fn incoming(listener: tokio::net::TcpListener, nodelay: bool) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(nodelay))
        .with_keepalive(Some(TCP_KEEPALIVE))
}

/// Creates the database if missing, connects and migrates, retrying with backoff (a log line
/// per failure) while Postgres cannot be reached, for at most `--db-wait-ms`. `None` if the
/// shutdown signal fired first.
async fn connect_database(config: &Config, mut signal: Shutdown) -> anyhow::Result<Option<PgPool>> {
    let deadline = tokio::time::Instant::now() + config.db_wait();
    let mut delays = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(250))
        .with_factor(2.0)
        .with_max_delay(MAX_CONNECT_BACKOFF)
        .without_max_times()
        .build();
    loop {
        let e = match prepare_database(&config.database_url, config.db_acquire_timeout()).await {
            Ok(pool) => return Ok(Some(pool)),
            Err(Prepare::Fatal(e)) => return Err(e),
            Err(Prepare::Unreachable(e)) => e,
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(e.context(format!(
                "postgres was not reachable within --db-wait-ms ({} ms)",
                config.db_wait_ms
            )));
        }
        let pause = delays.next().unwrap_or(MAX_CONNECT_BACKOFF).min(left);
        tracing::warn!(error = %format!("{e:#}"), retry_in = ?pause, "postgres is not reachable yet");
        tokio::select! {
            _ = signal.wait() => return Ok(None),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Why the database could not be prepared: worth waiting for, or not.
enum Prepare {
    Unreachable(anyhow::Error),
    Fatal(anyhow::Error),
}

fn classify(e: sqlx::Error, what: &'static str) -> Prepare {
    let unreachable = error::is_unavailable(&e);
    let e = anyhow::Error::new(e).context(what);
    if unreachable {
        Prepare::Unreachable(e)
    } else {
        Prepare::Fatal(e)
    }
}

async fn prepare_database(url: &str, acquire_timeout: Duration) -> Result<PgPool, Prepare> {
    if !Postgres::database_exists(url)
        .await
        .map_err(|e| classify(e, "checking the database"))?
    {
        tracing::info!("creating the database");
        if let Err(e) = Postgres::create_database(url).await {
            // Another coordinator may have created it in the meantime.
            if !Postgres::database_exists(url).await.unwrap_or(false) {
                return Err(classify(e, "creating the database"));
            }
        }
    }
    // A short acquire timeout: while Postgres is down a call answers UNAVAILABLE quickly. Every
    // connection is pinged before it is handed out, so connections that died with a Postgres
    // restart are replaced instead of failing the call: the pool recovers by itself.
    let pool = PgPoolOptions::new()
        .max_connections(POOL_CONNECTIONS)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(true)
        .connect(url)
        .await
        .map_err(|e| classify(e, "connecting to postgres"))?;
    MIGRATOR.run(&pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => classify(e, "applying migrations"),
        other => Prepare::Fatal(anyhow::Error::new(other).context("applying migrations")),
    })?;
    tracing::info!("database ready");
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::incoming;

    /// The socket the server accepted for one client connection, with `nodelay` as configured.
    async fn accepted(nodelay: bool) -> tokio::net::TcpStream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = incoming(listener, nodelay);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted")
    }

    #[tokio::test]
    async fn accepted_grpc_connections_have_tcp_nodelay_unless_switched_off_for_measuring() {
        assert!(accepted(true).await.nodelay().expect("getsockopt"));
        assert!(!accepted(false).await.nodelay().expect("getsockopt"));
    }
}

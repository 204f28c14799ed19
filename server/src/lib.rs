//! trainq's coordinator: the gRPC API in front of Postgres (the truth about every job) and Redis
//! (which only carries job ids to workers), plus the background loops that keep them in step.
//!
//! - [`config`]: flags and environment variables.
//! - [`domain`]: request types parsed and validated at the edge; retry policy.
//! - [`store`]: Postgres, the only module that writes SQL.
//! - [`dispatch`]: Redis, the only module that talks to it.
//! - [`artifacts`]: the artifact store (local files or S3), the only module that touches it.
//! - [`api`]: the `JobService` and `WorkerService` implementations.
//! - [`error`]: the one error type and its mapping to gRPC status codes.
//! - [`events`]: in-process job change notifications for WatchJob.
//! - [`reconcile`]: the reconciler (re-dispatch) and the lease reaper.
//! - [`shutdown`]: the signal that stops everything.
//!
//! [`run`] does the work and is what tests call; the `trainq-server` binary only parses the
//! configuration, sets up logging and waits for SIGINT/SIGTERM. This crate must not link
//! libtorch or run training.

pub mod api;
pub mod artifacts;
pub mod config;
pub mod dispatch;
pub mod domain;
pub mod error;
pub mod events;
pub mod reconcile;
pub mod shutdown;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use proto::v1::job_service_server::JobServiceServer;
use proto::v1::worker_service_server::WorkerServiceServer;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use config::Config;

use api::{AppState, JobApi, WorkerApi};
use artifacts::ArtifactStore;
use dispatch::Dispatcher;
use events::Notifier;
use shutdown::Shutdown;

/// The schema, embedded at build time from the workspace's `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Longest pause between attempts to reach Postgres at start-up.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(10);

/// Prepares the database (creating and migrating it), starts the background loops and serves
/// gRPC on `listener` until `shutdown` resolves; then stops accepting, lets in-flight calls
/// finish, and stops the loops. Waits (with backoff) for Postgres if it is not up yet; serves
/// whether or not Redis is up.
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
    let artifacts = ArtifactStore::open(&config.artifacts, &config.s3)
        .with_context(|| format!("opening the artifact store {:?}", config.artifacts))?;
    let Some(pool) = connect_database(&config.database_url, signal.clone()).await? else {
        return Ok(()); // shut down before Postgres came up
    };
    let dispatcher = Arc::new(
        Dispatcher::new(&config.redis_url, &config.redis_prefix).context("invalid REDIS_URL")?,
    );
    let notifier = Notifier::new();
    let background = reconcile::spawn(
        reconcile::Background {
            pool: pool.clone(),
            dispatcher: dispatcher.clone(),
            notifier: notifier.clone(),
            interval: config.reconcile_interval(),
            redispatch_after: config.redispatch_after(),
        },
        signal.clone(),
    );
    let state = Arc::new(AppState {
        pool: pool.clone(),
        dispatcher,
        notifier,
        artifacts,
        lease_timeout: config.lease_timeout(),
        retry_backoff: config.retry_backoff(),
        shutdown: signal.clone(),
    });
    let served = serve_grpc(state, listener, signal).await;
    for task in background {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "background task panicked");
        }
    }
    pool.close().await;
    served
}

/// Serves the two trainq services, gRPC health and reflection (v1 and v1alpha, so older grpcurl
/// works) until the signal fires, then drains in-flight calls.
async fn serve_grpc(
    state: Arc<AppState>,
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
    tracing::info!(%addr, "serving gRPC");
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection().build_v1().context("building reflection v1")?)
        .add_service(
            reflection()
                .build_v1alpha()
                .context("building reflection v1alpha")?,
        )
        .add_service(JobServiceServer::new(JobApi::new(state.clone())))
        .add_service(
            // Upload chunks may be 4 MiB of data plus their framing; tonic's default limit is
            // exactly 4 MiB.
            WorkerServiceServer::new(WorkerApi::new(state))
                .max_decoding_message_size(domain::MAX_UPLOAD_CHUNK_BYTES + 1024),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            signal.wait().await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        })
        .await
        .context("gRPC server failed")
}

/// Creates the database if missing, connects and migrates, retrying with backoff while Postgres
/// cannot be reached. `None` if the shutdown signal fired first.
async fn connect_database(url: &str, mut signal: Shutdown) -> anyhow::Result<Option<PgPool>> {
    let mut delay = Duration::from_millis(250);
    loop {
        match prepare_database(url).await {
            Ok(pool) => return Ok(Some(pool)),
            Err(Prepare::Fatal(e)) => return Err(e),
            Err(Prepare::Unreachable(e)) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "postgres is not reachable yet");
            }
        }
        tokio::select! {
            _ = signal.wait() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_CONNECT_BACKOFF);
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

async fn prepare_database(url: &str) -> Result<PgPool, Prepare> {
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
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(5))
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

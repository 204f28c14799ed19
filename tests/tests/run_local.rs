//! scripts/run-local.sh where nothing answers at its DATABASE_URL and REDIS_URL: it starts a
//! private Postgres and Redis, the coordinator and a worker (the built debug binaries, through
//! TRAINQ_BIN_DIR), prints a grpcurl line that submits a job, and on Ctrl-C (SIGINT to its
//! process group, as a terminal sends it) stops everything it started and nothing else.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection as _;
use tests::*;
use tonic_health::pb::health_check_response::ServingStatus;

/// The script's output marker of the line to try (see scripts/run-local.sh).
const TRY: &str = "[run-local] try:";

/// The environment the script gets, besides what the test sets: enough to find its tools, and
/// nothing that would point the binaries elsewhere (tokens, TLS, another coordinator).
const PASSED_THROUGH: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "TRAINQ_PG_BIN",
    "TRAINQ_REDIS_SERVER",
];

/// The running script. Dropping it (a failed test) stops it the way a user would, then kills
/// whatever is left, so that no private server outlives the test.
struct RunLocal {
    child: Child,
    output: PathBuf,
    local_dir: PathBuf,
}

impl RunLocal {
    fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// The rest of the first output line that starts with `marker`.
    fn line(&self, marker: &str) -> Option<String> {
        self.output()
            .lines()
            .find_map(|l| l.strip_prefix(marker).map(|rest| rest.trim().to_owned()))
    }

    /// SIGINT to the script's process group: what Ctrl-C in its terminal does. Whether the
    /// signal was sent.
    fn interrupt(&self) -> bool {
        Command::new("kill")
            .args(["-INT", "--", &format!("-{}", self.child.id())])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The script's exit status, if it exits within `within`.
    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RunLocal {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // Its children run in process groups of their own: find them while they are still
            // its children.
            let children = Command::new("ps")
                .args(["-o", "pid=", "--ppid", &self.child.id().to_string()])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            self.interrupt();
            if self.wait_exit(Duration::from_secs(30)).is_none() {
                for pid in children.split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // An immediate shutdown (SIGQUIT) of a private Postgres the script failed to stop.
        let pid_file = self.local_dir.join("postgres/postmaster.pid");
        if let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
        {
            let _ = Command::new("kill").args(["-QUIT", &pid]).status();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- output of scripts/run-local.sh ----\n{}",
                self.output()
            );
        }
    }
}

fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// The port of a `scheme://[user@]127.0.0.1:PORT[/db]` URL the script printed.
fn port_of(url: &str) -> u16 {
    url.split("127.0.0.1:")
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no 127.0.0.1 port in {url:?}"))
}

fn start_run_local(dir: &Path, ports: &Ports) -> RunLocal {
    let server = binary("trainq-server");
    let bin_dir = server.parent().expect("the binaries' folder");
    assert!(binary("trainq-worker").starts_with(bin_dir));
    let local_dir = dir.join("local");
    let output = dir.join("run-local.log");
    let log = std::fs::File::create(&output).expect("the script's log");
    let root = workspace_root();
    // `env --default-signal=INT`: a shell cannot trap SIGINT if it started with SIGINT ignored,
    // as a test run in the background of a non-interactive shell would pass it on.
    let mut cmd = Command::new("env");
    cmd.arg("--default-signal=INT")
        .arg("bash")
        .arg(root.join("scripts/run-local.sh"))
        .current_dir(&root)
        .env_clear()
        .envs(
            PASSED_THROUGH
                .iter()
                .filter_map(|name| std::env::var_os(name).map(|value| (name.to_string(), value))),
        )
        .env("TRAINQ_BIN_DIR", bin_dir)
        .env("TRAINQ_LOCAL_DIR", &local_dir)
        .env(
            "DATABASE_URL",
            format!(
                "postgres://postgres@127.0.0.1:{}/trainq",
                ports.dead_postgres
            ),
        )
        .env(
            "REDIS_URL",
            format!("redis://127.0.0.1:{}", ports.dead_redis),
        )
        .env("TRAINQ_LISTEN", format!("127.0.0.1:{}", ports.grpc))
        .env(
            "TRAINQ_METRICS_LISTEN",
            format!("127.0.0.1:{}", ports.metrics),
        )
        .env("TRAINQ_HTTP_LISTEN", format!("127.0.0.1:{}", ports.http))
        .env(
            "TRAINQ_WORKER_METRICS_LISTEN",
            format!("127.0.0.1:{}", ports.worker_metrics),
        )
        .env("TRAINQ_DATA_DIR", shared_data_dir())
        .env(
            "TRAINQ_ARTIFACTS",
            format!("file://{}", dir.join("artifacts").display()),
        )
        .env("TRAINQ_DEVICE", "cpu")
        .env("TRAINQ_TORCH_THREADS", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().expect("clone the log")))
        .stderr(Stdio::from(log))
        // A process group of its own, like a command started from a terminal.
        .process_group(0);
    RunLocal {
        child: cmd.spawn().expect("starting scripts/run-local.sh"),
        output,
        local_dir,
    }
}

struct Ports {
    dead_postgres: u16,
    dead_redis: u16,
    grpc: u16,
    metrics: u16,
    http: u16,
    worker_metrics: u16,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_local_starts_private_servers_where_none_answer_and_ctrl_c_stops_all_it_started() {
    // The tried job trains for a few seconds.
    let _slot = training_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    // initdb and postgres run as the `postgres` user when the tests run as root: it must be able
    // to enter the folder (a temp dir is 0700).
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod the temp dir");
    let ports = Ports {
        dead_postgres: free_port(),
        dead_redis: free_port(),
        grpc: free_port(),
        metrics: free_port(),
        http: free_port(),
        worker_metrics: free_port(),
    };
    assert!(!accepts(ports.dead_postgres) && !accepts(ports.dead_redis));
    let mut script = start_run_local(dir.path(), &ports);

    let deadline = Instant::now() + Duration::from_secs(60);
    let try_line = loop {
        if let Some(line) = script.line(TRY) {
            break line;
        }
        if let Some(status) = script.child.try_wait().expect("the script's status") {
            panic!("scripts/run-local.sh exited ({status}) before printing the line to try");
        }
        assert!(
            Instant::now() < deadline,
            "scripts/run-local.sh printed no line to try within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Private servers, on ports of their own, with their data under TRAINQ_LOCAL_DIR.
    let postgres_url = script
        .line("[run-local] Postgres:")
        .expect("the Postgres line");
    let redis_url = script.line("[run-local] Redis:").expect("the Redis line");
    assert!(postgres_url.contains("(private"), "{postgres_url}");
    assert!(redis_url.contains("(private"), "{redis_url}");
    let postgres_url = postgres_url
        .split_whitespace()
        .next()
        .expect("a URL")
        .to_owned();
    let redis_url = redis_url
        .split_whitespace()
        .next()
        .expect("a URL")
        .to_owned();
    let (postgres_port, redis_port) = (port_of(&postgres_url), port_of(&redis_url));
    assert_ne!(postgres_port, ports.dead_postgres);
    assert_ne!(redis_port, ports.dead_redis);
    assert!(script.local_dir.join("postgres/PG_VERSION").exists());

    let channel =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", ports.grpc))
            .expect("a valid uri")
            .connect_lazy();
    wait_for_health(channel.clone(), WAIT, || Ok(()))
        .await
        .expect("the coordinator answers health");
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);

    // The coordinator created its database on the private server.
    let mut db = sqlx::PgConnection::connect(&postgres_url)
        .await
        .expect("the private Postgres answers");
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut db)
        .await
        .expect("a query on the private Postgres");
    assert_eq!(name, "trainq");
    db.close().await.expect("close");
    let mut redis = redis::Client::open(redis_url.as_str())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
        .expect("the private Redis answers");
    let pong: String = redis::cmd("PING").query(&mut redis).expect("PING");
    assert_eq!(pong, "PONG");
    drop(redis);

    // The printed line works as printed (from the repository, as the script was started).
    let grpcurl_dir = grpcurl()
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = grpcurl_dir {
        path = std::env::join_paths(std::iter::once(dir).chain(std::env::split_paths(&path)))
            .expect("a PATH");
    }
    let submitted = Command::new("bash")
        .args(["-c", &try_line])
        .current_dir(workspace_root())
        .env("PATH", path)
        .output()
        .expect("running the line to try");
    let answer = String::from_utf8_lossy(&submitted.stdout);
    assert!(
        submitted.status.success(),
        "{try_line}\n{answer}{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("grpcurl prints JSON");
    assert!(answer["jobId"].as_str().is_some(), "{answer}");

    assert!(
        script.interrupt(),
        "kill -INT of the script's process group failed"
    );
    let status = script
        .wait_exit(Duration::from_secs(30))
        .expect("the script exits within 30 s of Ctrl-C");
    assert_eq!(status.code(), Some(130), "exit status after SIGINT");
    for (what, port) in [
        ("coordinator", ports.grpc),
        ("coordinator metrics", ports.metrics),
        ("worker metrics", ports.worker_metrics),
        ("private Postgres", postgres_port),
        ("private Redis", redis_port),
    ] {
        assert!(!accepts(port), "the {what} still accepts on port {port}");
    }
    assert!(
        !script.local_dir.join("postgres/postmaster.pid").exists(),
        "the private Postgres was stopped cleanly"
    );

    // The machine's own Postgres, which the script did not start, still runs.
    let mut shared = sqlx::PgConnection::connect(&database_url())
        .await
        .expect("the machine's Postgres still answers");
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut shared)
        .await
        .expect("a query on the machine's Postgres");
    assert_eq!(one, 1);
}

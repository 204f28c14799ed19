//! The load generator behind `trainq-loadgen` (`src/bin/trainq-loadgen.rs`): a fleet of
//! simulated workers (no training) against one or more real coordinators, plus the clients
//! that keep them busy and watch them, and what it measures.
//!
//! A simulated worker is one tokio task with its own gRPC connection and its own Redis
//! connection, as a real one-slot worker has, and does what `worker/src/agent` does, minus the
//! training: WorkerHeartbeat every heartbeat interval (the fields of `agent/fleet.rs`), a
//! BZPOPMIN on the queue's ready set ([`proto::queue::Keys`]), ClaimJob, then, while it holds the
//! job, Heartbeat every interval on a task of its own (`agent/heartbeat.rs`: the first at once,
//! a slow one delays the next, `keep_running: false` means the lease is lost and the job is
//! abandoned) and one ReportMetrics batch every `--batch-every-ms`, then CompleteJob and the
//! next pop. Worker `i` talks to coordinator `i % n`. A submitter keeps the queue topped up
//! (or submits at `--submit-rate`); watchers follow the job a worker holds through another
//! coordinator than the worker's and time each metric batch from ReportMetrics' answer to the
//! watcher seeing it.
//!
//! Figures are taken over a window after a warm-up: client-side latency of every call started
//! in it, rates, the points stored (`count(*)` of `metric_points`, not what was sent), the
//! coordinators' CPU (utime + stime from `/proc/<pid>/stat`) and memory (`VmRSS`, `VmHWM`),
//! Postgres connections to the database (`pg_stat_activity`, sampled every second).
//!
//! Must not assert anything about the figures (the bench prints them; the test checks only
//! what must hold at any speed) and must not link libtorch.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use proto::queue::Keys;
use proto::v1::{
    self, job_event::Event, job_service_client::JobServiceClient,
    worker_service_client::WorkerServiceClient,
};
use rand::{Rng as _, SeedableRng as _};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::bench::{channel, mib, ms, quantile};
use crate::{binary, free_port, mnist_spec_json, Coordinator, TestEnv};

/// The `application_name` of the load generator's own database connection, left out of the
/// connection count.
const APP: &str = "trainq-loadgen";

/// The metric the simulated workers report.
const METRIC: &str = proto::metric::TRAIN_LOSS;

/// The queue the jobs go to and the workers serve.
const QUEUE: &str = proto::queue::DEFAULT_QUEUE;

/// The most points one ReportMetrics call may carry (the coordinator's limit).
const MAX_BATCH_POINTS: u32 = 10_000;

/// How long one BZPOPMIN waits (the real worker's pop timeout).
const POP_TIMEOUT: Duration = Duration::from_secs(1);

/// What the heartbeat p99 must stay under for a run to count as held.
pub const HELD_P99: Duration = Duration::from_millis(100);

/// Usage text of `trainq-loadgen --help`.
pub const USAGE: &str = "\
trainq-loadgen: simulated workers and clients against real coordinators

  --coordinators N      coordinators to start here, on one fresh database and Redis prefix (1)
  --addr URL            a running coordinator instead (repeatable; with --database-url for the
                        SQL figures, --redis-url/--redis-prefix for its queue, --pid for CPU/RSS)
  --pid PID             the process of the --addr of the same position (repeatable)
  --database-url URL    the database of the --addr coordinators
  --redis-url URL       their Redis (default $TRAINQ_TEST_REDIS_URL)
  --redis-prefix P      their Redis prefix (default trainq:)
  --workers N           simulated workers (100)
  --find-max N,N,..     step the worker count, one row per step, until one is not held
  --duration-s S        measuring window (30)
  --warmup-s S          before the window (10)
  --heartbeat-ms MS     WorkerHeartbeat and lease Heartbeat interval (1000)
  --batch-points N      points per ReportMetrics batch (1000, at most 10000)
  --batch-every-ms MS   one batch per worker this often while it holds a job (5000)
  --job-s S             how long a worker holds a job, on average (20; each 0.5x..1.5x)
  --submit-rate R       SubmitJob calls per second (default: keep the queue topped up)
  --watchers K          WatchJob clients on running jobs (0)
  --ingest-only         no fleet: concurrent reporters, each on one claimed job, as fast as
                        they can
  --reporters N,N,..    reporter counts of --ingest-only (4,16)
  --lease-timeout-ms MS passed to the coordinators started here (30000)
  --max-watchers N      passed to the coordinators started here (default: max(2000, K + 16))
  --server-arg ARG      one more argument for the coordinators started here (repeatable)
  --json                the results as one JSON object on stdout; the tables go to stderr
";

/// Every setting of one load-generator run.
#[derive(Debug, Clone)]
pub struct Options {
    pub coordinators: usize,
    pub addrs: Vec<String>,
    pub pids: Vec<u32>,
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    pub redis_prefix: Option<String>,
    pub workers: usize,
    pub find_max: Vec<usize>,
    pub duration: Duration,
    pub warmup: Duration,
    pub heartbeat: Duration,
    pub batch_points: u32,
    pub batch_every: Duration,
    pub job: Duration,
    pub submit_rate: Option<f64>,
    pub watchers: usize,
    pub ingest_only: bool,
    pub reporters: Vec<usize>,
    pub lease_timeout_ms: u64,
    pub max_watchers: Option<u32>,
    pub server_args: Vec<String>,
    pub json: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            coordinators: 1,
            addrs: Vec::new(),
            pids: Vec::new(),
            database_url: None,
            redis_url: None,
            redis_prefix: None,
            workers: 100,
            find_max: Vec::new(),
            duration: Duration::from_secs(30),
            warmup: Duration::from_secs(10),
            heartbeat: Duration::from_millis(1000),
            batch_points: 1000,
            batch_every: Duration::from_millis(5000),
            job: Duration::from_secs(20),
            submit_rate: None,
            watchers: 0,
            ingest_only: false,
            reporters: vec![4, 16],
            lease_timeout_ms: 30_000,
            max_watchers: None,
            server_args: Vec::new(),
            json: false,
        }
    }
}

fn list(text: &str) -> anyhow::Result<Vec<usize>> {
    text.split(',')
        .map(|n| {
            n.trim()
                .parse()
                .with_context(|| format!("{n:?} in {text:?}"))
        })
        .collect()
}

fn seconds(text: &str) -> anyhow::Result<Duration> {
    let s: f64 = text.parse()?;
    ensure!(
        s.is_finite() && s >= 0.0,
        "{text:?} is not a number of seconds"
    );
    Ok(Duration::from_secs_f64(s))
}

impl Options {
    /// Parses the arguments (without the program name); `None` for `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let mut o = Self::default();
        let mut coordinators_given = false;
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--coordinators" => {
                    o.coordinators = value()?.parse()?;
                    coordinators_given = true;
                }
                "--addr" => o.addrs.push(value()?),
                "--pid" => o.pids.push(value()?.parse()?),
                "--database-url" => o.database_url = Some(value()?),
                "--redis-url" => o.redis_url = Some(value()?),
                "--redis-prefix" => o.redis_prefix = Some(value()?),
                "--workers" => o.workers = value()?.parse()?,
                "--find-max" => o.find_max = list(&value()?)?,
                "--duration-s" => o.duration = seconds(&value()?)?,
                "--warmup-s" => o.warmup = seconds(&value()?)?,
                "--heartbeat-ms" => o.heartbeat = Duration::from_millis(value()?.parse()?),
                "--batch-points" => o.batch_points = value()?.parse()?,
                "--batch-every-ms" => o.batch_every = Duration::from_millis(value()?.parse()?),
                "--job-s" => o.job = seconds(&value()?)?,
                "--submit-rate" => o.submit_rate = Some(value()?.parse()?),
                "--watchers" => o.watchers = value()?.parse()?,
                "--ingest-only" => o.ingest_only = true,
                "--reporters" => o.reporters = list(&value()?)?,
                "--lease-timeout-ms" => o.lease_timeout_ms = value()?.parse()?,
                "--max-watchers" => o.max_watchers = Some(value()?.parse()?),
                "--server-arg" => o.server_args.push(value()?),
                "--json" => o.json = true,
                "-h" | "--help" => return Ok(None),
                other => bail!("unknown argument {other:?} (see --help)"),
            }
        }
        if !o.addrs.is_empty() {
            ensure!(
                !coordinators_given || o.coordinators == o.addrs.len(),
                "--coordinators {} but {} --addr given",
                o.coordinators,
                o.addrs.len()
            );
            o.coordinators = o.addrs.len();
            ensure!(
                o.server_args.is_empty() && o.max_watchers.is_none(),
                "--server-arg and --max-watchers are for coordinators started here, not --addr"
            );
        }
        ensure!(
            o.pids.len() <= o.addrs.len(),
            "--pid names the process of an --addr"
        );
        ensure!(o.coordinators >= 1, "--coordinators must be at least 1");
        ensure!(
            (1..=MAX_BATCH_POINTS).contains(&o.batch_points),
            "--batch-points must be 1..={MAX_BATCH_POINTS}"
        );
        ensure!(
            !o.heartbeat.is_zero() && !o.batch_every.is_zero(),
            "--heartbeat-ms and --batch-every-ms must be at least 1"
        );
        ensure!(!o.duration.is_zero(), "--duration-s must be above 0");
        ensure!(
            o.submit_rate.is_none_or(|r| r.is_finite() && r > 0.0),
            "--submit-rate must be above 0"
        );
        if o.ingest_only {
            ensure!(
                !o.reporters.is_empty() && o.reporters.iter().all(|&r| r > 0),
                "--reporters needs counts of at least 1"
            );
        } else {
            ensure!(
                o.workers >= 1 && o.find_max.iter().all(|&w| w > 0),
                "--workers (and every --find-max step) must be at least 1"
            );
        }
        Ok(Some(o))
    }

    /// The worker counts of the fleet runs: the `--find-max` steps, or `--workers`.
    pub fn fleet_sizes(&self) -> Vec<usize> {
        if self.find_max.is_empty() {
            vec![self.workers]
        } else {
            self.find_max.clone()
        }
    }
}

/// The RPCs the load generator times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    SubmitJob,
    ClaimJob,
    Heartbeat,
    WorkerHeartbeat,
    ReportMetrics,
    CompleteJob,
    /// Opening a stream (until its response headers came back).
    WatchJob,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::SubmitJob,
        Method::ClaimJob,
        Method::Heartbeat,
        Method::WorkerHeartbeat,
        Method::ReportMetrics,
        Method::CompleteJob,
        Method::WatchJob,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::SubmitJob => "SubmitJob",
            Method::ClaimJob => "ClaimJob",
            Method::Heartbeat => "Heartbeat",
            Method::WorkerHeartbeat => "WorkerHeartbeat",
            Method::ReportMetrics => "ReportMetrics",
            Method::CompleteJob => "CompleteJob",
            Method::WatchJob => "WatchJob",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The measuring window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    pub fn contains(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }

    pub fn secs(&self) -> f64 {
        (self.end - self.start).as_secs_f64()
    }
}

/// One method's calls started in the window.
#[derive(Debug, Clone, Default)]
pub struct MethodStats {
    pub calls: u64,
    pub errors: u64,
    pub latencies: Vec<Duration>,
}

impl MethodStats {
    pub fn p(&self, q: f64) -> Duration {
        quantile(&self.latencies, q)
    }
}

/// What one task saw; merged at the end.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Per [`Method`], calls started in the window.
    pub methods: [MethodStats; 7],
    /// ClaimJob calls started in the window that won the job.
    pub claimed: u64,
    /// ReportMetrics' `stored`, of calls started in the window.
    pub stored_window: u64,
    /// ReportMetrics' `stored`, every call of the run.
    pub stored_total: u64,
    /// ReportMetrics' `conflicting`, every call of the run.
    pub conflicting_total: u64,
    /// Attempts whose lease the coordinator refused (keep_running false, FAILED_PRECONDITION or
    /// NOT_FOUND on a lease call), in the whole run.
    pub leases_lost: u64,
    /// Failed Redis pops, in the whole run.
    pub redis_errors: u64,
    /// Submits left out at `--submit-rate` because [`SUBMITS_IN_FLIGHT`] were still waiting.
    pub submits_skipped: u64,
    /// Tasks that gave up (could not connect), with why.
    pub failures: Vec<String>,
}

impl Tally {
    fn record(&mut self, window: Window, m: Method, started: Instant, took: Duration, ok: bool) {
        if window.contains(started) {
            let s = &mut self.methods[m.index()];
            s.calls += 1;
            if ok {
                s.latencies.push(took);
            } else {
                s.errors += 1;
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        for (mine, theirs) in self.methods.iter_mut().zip(other.methods) {
            mine.calls += theirs.calls;
            mine.errors += theirs.errors;
            mine.latencies.extend(theirs.latencies);
        }
        self.claimed += other.claimed;
        self.stored_window += other.stored_window;
        self.stored_total += other.stored_total;
        self.conflicting_total += other.conflicting_total;
        self.leases_lost += other.leases_lost;
        self.redis_errors += other.redis_errors;
        self.submits_skipped += other.submits_skipped;
        self.failures.extend(other.failures);
    }

    pub fn method(&self, m: Method) -> &MethodStats {
        &self.methods[m.index()]
    }
}

/// Locks, ignoring poisoning (a panicking task has already spoiled the run).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Times one call into `tally`; returns its answer and when it started.
async fn call<T>(
    tally: &Mutex<Tally>,
    window: Window,
    m: Method,
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> (Result<T, Status>, Instant) {
    let started = Instant::now();
    let answer = fut.await;
    lock(tally).record(window, m, started, started.elapsed(), answer.is_ok());
    (answer.map(tonic::Response::into_inner), started)
}

/// A lease call the coordinator refused because the lease is gone.
fn refused(status: &Status) -> bool {
    matches!(status.code(), Code::FailedPrecondition | Code::NotFound)
}

/// The stop signal every task of a run watches.
#[derive(Clone)]
struct Stop(watch::Receiver<bool>);

impl Stop {
    fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    async fn wait(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }
}

/// A batch's steps: batch `b` of `n` points is steps `b * n + 1 ..= (b + 1) * n`.
fn batch_of(step: u64, n: u32) -> u64 {
    step.saturating_sub(1) / u64::from(n)
}

fn points(batch: u64, n: u32) -> Vec<v1::MetricPoint> {
    let first = batch * u64::from(n) + 1;
    (first..first + u64::from(n))
        .map(|step| v1::MetricPoint {
            name: METRIC.into(),
            step,
            epoch: 1,
            value: 1.0 / step as f64,
        })
        .collect()
}

/// A small valid job spec (the system tests' MNIST run; never trained here).
fn spec(name: &str) -> anyhow::Result<v1::JobSpec> {
    Ok(serde_json::from_str(&mnist_spec_json(name, 1, 64, 64))?)
}

// ---------------------------------------------------------------------------------------------
// The deployment: coordinators started here or given, the database and Redis they use.
// ---------------------------------------------------------------------------------------------

/// The coordinators under load and what the load generator reads beside them.
pub struct Deployment {
    pub urls: Vec<String>,
    pub pids: Vec<Option<u32>>,
    pub db: Option<PgPool>,
    pub redis_url: String,
    pub keys: Keys,
    /// Settings shown in the header (name, value).
    pub settings: Vec<(String, String)>,
    // Dropped in this order: the coordinators, then the database and prefix.
    _coordinators: Vec<Coordinator>,
    _env: Option<TestEnv>,
}

/// Coordinator names: A, B, C, ...
fn coordinator_name(i: usize) -> String {
    char::from(b'A' + (i % 26) as u8).to_string()
}

/// The `[default: N]` of a flag in clap's `--help` text, if the flag is there.
pub fn flag_default(help: &str, flag: &str) -> Option<String> {
    let at = help.find(&format!("{flag} "))?;
    let rest = &help[at..];
    let block = rest[flag.len()..]
        .find("\n      --")
        .map_or(rest, |end| &rest[..flag.len() + end]);
    let start = block.find("[default: ")? + "[default: ".len();
    let len = block[start..].find(']')?;
    Some(block[start..start + len].to_string())
}

/// What the started coordinators' database pool is: the `--db-max-connections` passed, or its
/// default when the coordinator has the flag.
fn pool_setting(server_args: &[String]) -> String {
    if let Some(i) = server_args.iter().position(|a| a == "--db-max-connections") {
        if let Some(v) = server_args.get(i + 1) {
            return format!("{v} connections each (--db-max-connections)");
        }
    }
    let help = std::process::Command::new(binary("trainq-server"))
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    match flag_default(&help, "--db-max-connections") {
        Some(n) => format!("{n} connections each (--db-max-connections default)"),
        None => "built in (the coordinator has no --db-max-connections)".into(),
    }
}

async fn measuring_pool(url: &str) -> anyhow::Result<PgPool> {
    let options = url.parse::<PgConnectOptions>()?.application_name(APP);
    PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .with_context(|| format!("connecting to {url}"))
}

impl Deployment {
    /// Starts `--coordinators` coordinators on a fresh database and Redis prefix, or takes the
    /// `--addr` ones.
    pub async fn start(o: &Options) -> anyhow::Result<Self> {
        let mut settings = Vec::new();
        if !o.addrs.is_empty() {
            let db = match &o.database_url {
                Some(url) => Some(measuring_pool(url).await?),
                None => None,
            };
            let prefix = o
                .redis_prefix
                .clone()
                .unwrap_or_else(|| proto::queue::DEFAULT_PREFIX.into());
            settings.push((
                "coordinators".into(),
                format!("{} given ({})", o.addrs.len(), o.addrs.join(", ")),
            ));
            settings.push((
                "database pool, lease timeout, watcher limits".into(),
                "the given coordinators' own (not started here)".into(),
            ));
            return Ok(Self {
                urls: o.addrs.clone(),
                pids: (0..o.addrs.len()).map(|i| o.pids.get(i).copied()).collect(),
                db,
                redis_url: o.redis_url.clone().unwrap_or_else(crate::redis_url),
                keys: Keys::new(prefix),
                settings,
                _coordinators: Vec::new(),
                _env: None,
            });
        }
        let env = TestEnv::new();
        let max_watchers = o
            .max_watchers
            .unwrap_or_else(|| (o.watchers as u32 + 16).max(2000));
        let mut extra = vec![
            "--lease-timeout-ms".to_string(),
            o.lease_timeout_ms.to_string(),
            "--max-watchers".into(),
            max_watchers.to_string(),
        ];
        extra.extend(o.server_args.iter().cloned());
        let extra_refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut coordinators = Vec::new();
        for i in 0..o.coordinators {
            let name = format!("coordinator-{}", coordinator_name(i));
            coordinators.push(
                env.start_coordinator_at(&name, free_port(), &extra_refs)
                    .await,
            );
        }
        let db = measuring_pool(&env.database_url()).await?;
        settings.push((
            "coordinators".into(),
            format!(
                "{} started here on one database ({}) and Redis prefix, logs in {}",
                o.coordinators,
                env.db_name,
                env.dir.path().display()
            ),
        ));
        settings.push(("coordinator flags".into(), extra.join(" ")));
        settings.push(("database pool".into(), pool_setting(&o.server_args)));
        settings.push((
            "watcher limits".into(),
            format!("--max-watchers {max_watchers}, --max-watchers-per-connection default (one connection per watcher here)"),
        ));
        Ok(Self {
            urls: coordinators.iter().map(Coordinator::url).collect(),
            pids: coordinators.iter().map(|c| Some(c.proc.pid())).collect(),
            db: Some(db),
            redis_url: env.redis.clone(),
            keys: Keys::new(env.redis_prefix.clone()),
            settings,
            _coordinators: coordinators,
            _env: Some(env),
        })
    }

    async fn count(&self, sql: &str) -> anyhow::Result<Option<u64>> {
        let Some(db) = &self.db else { return Ok(None) };
        let n: i64 = sqlx::query_scalar(sql)
            .fetch_one(db)
            .await
            .with_context(|| sql.to_string())?;
        Ok(Some(n.max(0) as u64))
    }

    async fn points_stored(&self) -> anyhow::Result<Option<u64>> {
        self.count("SELECT count(*) FROM metric_points").await
    }

    async fn lease_expired(&self) -> anyhow::Result<Option<u64>> {
        self.count("SELECT count(*) FROM job_attempts WHERE outcome = 'lease_expired'")
            .await
    }

    async fn claimed_again(&self) -> anyhow::Result<Option<u64>> {
        self.count("SELECT count(*) FROM jobs WHERE attempt > 1")
            .await
    }

    fn ready_key(&self) -> String {
        self.keys.ready(QUEUE)
    }
}

/// Postgres connections to the database, the load generator's own left out.
async fn pg_connections(db: &PgPool) -> Option<u64> {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name <> $1",
    )
    .bind(APP)
    .fetch_one(db)
    .await
    .ok()
    .map(|n| n.max(0) as u64)
}

// ---------------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------------

/// utime + stime (clock ticks) from the text of `/proc/<pid>/stat`.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    // The command may hold spaces and parentheses: the fields follow the last ')'.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // Field 3 (state) is fields[0]; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// A `/proc/<pid>/status` field (`VmRSS:`, `VmHWM:`) in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Busy and total clock ticks of all cores together, from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Clock ticks per second (`getconf CLK_TCK`, else the usual 100).
fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The open-files limit (soft, hard) from `/proc/self/limits`.
fn open_files_limit() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(3)
        .take(2)
        .map(|f| f.parse().unwrap_or(u64::MAX))
        .collect();
    Some((*v.first()?, *v.get(1)?))
}

/// Raises this process's open-files limit to at least `needed` (coordinators started here
/// inherit it) with util-linux `prlimit` (the crate forbids unsafe code, so no setrlimit);
/// returns the limit as it is now, for the header.
pub fn raise_open_files(needed: u64) -> String {
    let Some((soft, hard)) = open_files_limit() else {
        return "unknown".into();
    };
    if soft >= needed {
        return format!("{soft} (needed about {needed})");
    }
    let raised = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={needed}:{}", hard.max(needed)))
        .status()
        .is_ok_and(|s| s.success());
    match open_files_limit() {
        Some((now, _)) if raised && now >= needed => {
            format!("{now} (raised from {soft} with prlimit)")
        }
        Some((now, _)) => format!(
            "{now}, below the {needed} needed: could not raise it (run `ulimit -n {needed}` first)"
        ),
        None => "unknown".into(),
    }
}

/// CPU and memory of the processes under load, read at the window's start and end and sampled
/// every second in between.
struct Probe {
    pids: Vec<Option<u32>>,
    ticks_start: Vec<Option<u64>>,
    self_start: Option<u64>,
    machine_start: Option<(u64, u64)>,
}

impl Probe {
    fn start(pids: &[Option<u32>]) -> Self {
        Self {
            pids: pids.to_vec(),
            ticks_start: pids.iter().map(|p| p.and_then(cpu_ticks)).collect(),
            self_start: cpu_ticks(std::process::id()),
            machine_start: machine_ticks(),
        }
    }

    /// (each coordinator's CPU as % of one core, the load generator's, the machine's busy % of
    /// all cores) since [`Self::start`].
    fn finish(&self, secs: f64) -> (Vec<Option<f64>>, Option<f64>, Option<f64>) {
        let hz = clk_tck();
        let share = |a: Option<u64>, b: Option<u64>| {
            Some((b?.saturating_sub(a?)) as f64 / hz / secs * 100.0)
        };
        let coordinators = self
            .pids
            .iter()
            .zip(&self.ticks_start)
            .map(|(p, &a)| share(a, p.and_then(cpu_ticks)))
            .collect();
        let me = share(self.self_start, cpu_ticks(std::process::id()));
        let machine = self.machine_start.zip(machine_ticks()).map(|(a, b)| {
            100.0 * (b.0.saturating_sub(a.0)) as f64 / (b.1.saturating_sub(a.1)).max(1) as f64
        });
        (coordinators, me, machine)
    }
}

/// Highest values seen by [`sample`].
#[derive(Debug, Default, Clone)]
struct Samples {
    pg_max: Option<u64>,
    rss_max: Vec<Option<u64>>,
}

/// Samples Postgres connections and each coordinator's VmRSS every second of the window.
fn sample(
    db: Option<PgPool>,
    pids: Vec<Option<u32>>,
    window: Window,
) -> tokio::task::JoinHandle<Samples> {
    tokio::spawn(async move {
        let mut s = Samples {
            pg_max: None,
            rss_max: vec![None; pids.len()],
        };
        tokio::time::sleep_until(window.start.into()).await;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while Instant::now() < window.end {
            tick.tick().await;
            if let Some(db) = &db {
                if let Some(n) = pg_connections(db).await {
                    s.pg_max = Some(s.pg_max.unwrap_or(0).max(n));
                }
            }
            for (max, pid) in s.rss_max.iter_mut().zip(&pids) {
                if let Some(kib) = pid.and_then(|p| status_kib(p, "VmRSS:")) {
                    *max = Some(max.unwrap_or(0).max(kib));
                }
            }
        }
        s
    })
}

/// One coordinator's figures over the window.
#[derive(Debug, Clone)]
pub struct CoordinatorFigures {
    pub name: String,
    pub url: String,
    pub cpu_pct: Option<f64>,
    pub rss_max_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    pub hwm_kib: Option<u64>,
}

fn coordinator_figures(
    d: &Deployment,
    cpu: &[Option<f64>],
    rss_max: &[Option<u64>],
) -> Vec<CoordinatorFigures> {
    d.urls
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let pid = d.pids[i];
            CoordinatorFigures {
                name: coordinator_name(i),
                url: url.clone(),
                cpu_pct: cpu.get(i).copied().flatten(),
                rss_max_kib: rss_max.get(i).copied().flatten(),
                rss_end_kib: pid.and_then(|p| status_kib(p, "VmRSS:")),
                hwm_kib: pid.and_then(|p| status_kib(p, "VmHWM:")),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The fleet: simulated workers, the submitter, watchers.
// ---------------------------------------------------------------------------------------------

/// When a batch was sent and when ReportMetrics answered, per (job, batch).
type Answers = Mutex<HashMap<(String, u64), (Instant, Instant)>>;

/// A watcher seeing (a part of) a batch.
struct Sighting {
    job: String,
    batch: u64,
    seen: Instant,
    /// When the watcher's stream was open (its headers back): only batches sent after it are
    /// timed, so catching up is never counted.
    opened: Instant,
}

/// What every task of one fleet run shares.
struct Fleet {
    o: Options,
    run: usize,
    workers: usize,
    urls: Vec<String>,
    redis_url: String,
    ready_key: String,
    window: Window,
    busy: AtomicUsize,
    answers: Option<Answers>,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// WorkerHeartbeat every interval from the start, as `agent/fleet.rs` sends it.
async fn worker_heartbeats(
    f: Arc<Fleet>,
    mut client: WorkerServiceClient<Channel>,
    worker_id: String,
    busy: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    mut stop: Stop,
) {
    let instance_id = uuid::Uuid::new_v4().to_string();
    let host = host_name();
    let mut tick = tokio::time::interval(f.o.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = tick.tick() => {}
        }
        let request = v1::WorkerHeartbeatRequest {
            worker_id: worker_id.clone(),
            host: host.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            devices: vec![v1::WorkerDevice {
                name: "cpu".into(),
                memory_total_bytes: 0,
                memory_used_bytes: 0,
            }],
            slots_total: 1,
            slots_busy: u32::from(busy.load(Ordering::Relaxed)),
            queues: vec![QUEUE.into()],
            instance_id: instance_id.clone(),
        };
        // A failed report is counted; the next one goes on time, as the real worker's does.
        let _ = call(
            &tally,
            f.window,
            Method::WorkerHeartbeat,
            client.worker_heartbeat(request),
        )
        .await;
    }
}

/// The lease's Heartbeat every interval, the first at once, as `agent/heartbeat.rs` does; a
/// refusal marks the lease lost (unless the attempt is already `done`) and ends the task.
async fn lease_heartbeats(
    window: Window,
    period: Duration,
    mut client: WorkerServiceClient<Channel>,
    lease: v1::JobLease,
    lost: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let request = v1::HeartbeatRequest {
            lease: Some(lease.clone()),
        };
        let (answer, _) = call(&tally, window, Method::Heartbeat, client.heartbeat(request)).await;
        let gone = match answer {
            Ok(r) => !r.keep_running,
            Err(status) => refused(&status),
        };
        if gone {
            if !done.load(Ordering::SeqCst) && !lost.swap(true, Ordering::SeqCst) {
                lock(&tally).leases_lost += 1;
            }
            return;
        }
    }
}

fn mark_lost(lost: &AtomicBool, tally: &Mutex<Tally>) {
    if !lost.swap(true, Ordering::SeqCst) {
        lock(tally).leases_lost += 1;
    }
}

/// One simulated worker until `stop`; its tally.
async fn worker(
    f: Arc<Fleet>,
    i: usize,
    stop: Stop,
    current: watch::Sender<Option<String>>,
) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    if let Err(e) = run_worker(&f, i, stop, &current, &tally).await {
        lock(&tally).failures.push(format!("worker {i}: {e:#}"));
    }
    let mut t = lock(&tally);
    std::mem::take(&mut *t)
}

async fn run_worker(
    f: &Arc<Fleet>,
    i: usize,
    mut stop: Stop,
    current: &watch::Sender<Option<String>>,
    tally: &Arc<Mutex<Tally>>,
) -> anyhow::Result<()> {
    // Start spread over one heartbeat interval, as a fleet that did not start in step.
    let offset = f.o.heartbeat.mul_f64(i as f64 / f.workers as f64);
    tokio::select! {
        _ = stop.wait() => return Ok(()),
        _ = tokio::time::sleep(offset) => {}
    }
    let url = &f.urls[i % f.urls.len()];
    let client = WorkerServiceClient::new(channel(url).await?);
    let redis = redis::Client::open(f.redis_url.as_str())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Duration::from_secs(5))
        .set_response_timeout(POP_TIMEOUT + Duration::from_secs(5));
    let mut conn = redis
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("connecting to Redis")?;
    let worker_id = format!("loadgen-{}-{i}", f.run);
    let busy = Arc::new(AtomicBool::new(false));
    let fleet = tokio::spawn(worker_heartbeats(
        f.clone(),
        client.clone(),
        worker_id.clone(),
        busy.clone(),
        tally.clone(),
        stop.clone(),
    ));
    let mut rng = rand::rngs::StdRng::seed_from_u64(f.run as u64 * 1_000_003 + i as u64);
    let mut client = client;
    while !stop.is_set() {
        let popped: redis::RedisResult<Option<(String, String, f64)>> = redis::cmd("BZPOPMIN")
            .arg(&f.ready_key)
            .arg(POP_TIMEOUT.as_secs_f64())
            .query_async(&mut conn)
            .await;
        let id = match popped {
            Ok(Some((_, id, _))) => id,
            Ok(None) => continue,
            Err(_) => {
                lock(tally).redis_errors += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if stop.is_set() {
            // The id is gone from Redis; the coordinator's reconciler pushes it again.
            break;
        }
        let request = v1::ClaimJobRequest {
            job_id: id,
            worker_id: worker_id.clone(),
            device_kind: "cpu".into(),
            free_gpu_memory_mib: None,
        };
        // As the agent does: a transient error is retried for a while (the popped id is gone).
        let deadline = Instant::now() + CLAIM_PATIENCE;
        let mut backoff = Backoff::default();
        let (answer, started) = loop {
            let (answer, started) = call(
                tally,
                f.window,
                Method::ClaimJob,
                client.claim_job(request.clone()),
            )
            .await;
            match answer {
                Err(s) if transient(&s) && Instant::now() < deadline && !stop.is_set() => {
                    tokio::time::sleep(backoff.wait(&mut rng)).await;
                }
                answer => break (answer, started),
            }
        };
        let Ok(answer) = answer else { continue };
        let Some(lease) = answer.lease.filter(|_| answer.claimed) else {
            continue;
        };
        if f.window.contains(started) {
            lock(tally).claimed += 1;
        }
        busy.store(true, Ordering::Relaxed);
        f.busy.fetch_add(1, Ordering::Relaxed);
        current.send_replace(Some(lease.job_id.clone()));
        hold(f, &mut client, lease, &mut rng, &mut stop, tally).await;
        current.send_replace(None);
        f.busy.fetch_sub(1, Ordering::Relaxed);
        busy.store(false, Ordering::Relaxed);
    }
    let _ = fleet.await;
    Ok(())
}

/// The agent's retry waits (`client::retry`): from 50 ms, doubling, capped at 2.5 s, each
/// jittered up to twice its value.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(50))
    }
}

impl Backoff {
    fn wait(&mut self, rng: &mut rand::rngs::StdRng) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_millis(2_500));
        d.mul_f64(rng.random_range(1.0..2.0))
    }
}

/// The agent's transient errors (`agent/coordinator.rs`): worth retrying.
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// How long a claim is retried (the agent's CLAIM_PATIENCE).
const CLAIM_PATIENCE: Duration = Duration::from_secs(30);
/// How long the job's end is retried (the agent's FINAL_REPORT_PATIENCE); 30 s once stopping.
const FINAL_REPORT_PATIENCE: Duration = Duration::from_secs(300);

/// How sending the queued batches went.
enum Flush {
    Done,
    /// A transient error: the batches stay queued for the next try.
    Failed,
    /// The lease is gone.
    Lost,
}

/// Sends the queued batches in order until one fails, as the agent's outbox does: a batch
/// leaves the queue only once stored.
async fn flush(
    f: &Fleet,
    client: &mut WorkerServiceClient<Channel>,
    lease: &v1::JobLease,
    queued: &mut std::collections::VecDeque<u64>,
    tally: &Mutex<Tally>,
) -> Flush {
    while let Some(&batch) = queued.front() {
        let request = v1::ReportMetricsRequest {
            lease: Some(lease.clone()),
            points: points(batch, f.o.batch_points),
        };
        let (answer, sent) = call(
            tally,
            f.window,
            Method::ReportMetrics,
            client.report_metrics(request),
        )
        .await;
        let answered = Instant::now();
        match answer {
            Ok(r) => {
                {
                    let mut t = lock(tally);
                    t.stored_total += u64::from(r.stored);
                    t.conflicting_total += u64::from(r.conflicting);
                    if f.window.contains(sent) {
                        t.stored_window += u64::from(r.stored);
                    }
                }
                if let Some(answers) = &f.answers {
                    lock(answers).insert((lease.job_id.clone(), batch), (sent, answered));
                }
                queued.pop_front();
            }
            Err(status) if refused(&status) => return Flush::Lost,
            Err(_) => return Flush::Failed,
        }
    }
    Flush::Done
}

/// Holds one claimed job as the agent does: heartbeats on a task of their own, a batch queued
/// every `--batch-every-ms` and the queue sent (what fails is sent again at the next batch),
/// then the queue and CompleteJob retried on transient errors (also at `stop`, so no job is
/// left to the reaper); abandons the job when the lease is lost.
async fn hold(
    f: &Fleet,
    client: &mut WorkerServiceClient<Channel>,
    lease: v1::JobLease,
    rng: &mut rand::rngs::StdRng,
    stop: &mut Stop,
    tally: &Arc<Mutex<Tally>>,
) {
    let (lost, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let heartbeat = tokio::spawn(lease_heartbeats(
        f.window,
        f.o.heartbeat,
        client.clone(),
        lease.clone(),
        lost.clone(),
        done.clone(),
        tally.clone(),
    ));
    let now = Instant::now();
    let end = now + f.o.job.mul_f64(rng.random_range(0.5..1.5));
    // The first batch at a random point of the first interval, so batches are not in step.
    let mut next = now + f.o.batch_every.mul_f64(rng.random_range(0.0..1.0));
    let mut batches = 0u64;
    let mut queued = std::collections::VecDeque::new();
    loop {
        tokio::select! {
            _ = stop.wait() => break,
            _ = tokio::time::sleep_until(next.min(end).into()) => {}
        }
        if lost.load(Ordering::SeqCst) || Instant::now() >= end {
            break;
        }
        queued.push_back(batches);
        batches += 1;
        next += f.o.batch_every;
        if let Flush::Lost = flush(f, client, &lease, &mut queued, tally).await {
            mark_lost(&lost, tally);
        }
    }
    let mut deadline = Instant::now() + FINAL_REPORT_PATIENCE;
    let mut backoff = Backoff::default();
    while !lost.load(Ordering::SeqCst) {
        if stop.is_set() {
            deadline = deadline.min(Instant::now() + Duration::from_secs(30));
        }
        let failed = match flush(f, client, &lease, &mut queued, tally).await {
            Flush::Lost => {
                mark_lost(&lost, tally);
                break;
            }
            Flush::Failed => true,
            Flush::Done => {
                done.store(true, Ordering::SeqCst);
                let request = v1::CompleteJobRequest {
                    lease: Some(lease.clone()),
                    final_step: batches * u64::from(f.o.batch_points),
                };
                let (answer, _) = call(
                    tally,
                    f.window,
                    Method::CompleteJob,
                    client.complete_job(request),
                )
                .await;
                match answer {
                    Ok(_) => break,
                    Err(s) if refused(&s) => {
                        mark_lost(&lost, tally);
                        break;
                    }
                    Err(_) => true,
                }
            }
        };
        if failed && Instant::now() >= deadline {
            // The agent gives up here too; the lease expires and the reaper re-queues the job.
            break;
        }
        tokio::time::sleep(backoff.wait(rng)).await;
    }
    heartbeat.abort();
    let _ = heartbeat.await;
}

/// How many ids the submitter keeps in the queue when no `--submit-rate` is given.
fn queue_target(workers: usize) -> usize {
    (workers / 5).max(16)
}

/// Submits `n` jobs, at most 32 at a time, round-robin over `clients`.
async fn submit_many(
    clients: &[JobServiceClient<Channel>],
    n: usize,
    window: Window,
    tally: &Mutex<Tally>,
    run: usize,
    first: &mut usize,
) {
    let mut pending = futures::stream::FuturesUnordered::new();
    for j in 0..n {
        let k = *first + j;
        let mut client = clients[k % clients.len()].clone();
        pending.push(async move {
            let request = v1::SubmitJobRequest {
                spec: spec(&format!("loadgen-{run}-{k}")).ok(),
                request_id: String::new(),
            };
            let started = Instant::now();
            let answer = client.submit_job(request).await;
            (started, started.elapsed(), answer.is_ok())
        });
        if pending.len() >= 32 {
            if let Some((s, took, ok)) = futures::StreamExt::next(&mut pending).await {
                lock(tally).record(window, Method::SubmitJob, s, took, ok);
            }
        }
    }
    while let Some((s, took, ok)) = futures::StreamExt::next(&mut pending).await {
        lock(tally).record(window, Method::SubmitJob, s, took, ok);
    }
    *first += n;
}

async fn zcard(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> usize {
    redis::cmd("ZCARD")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap_or(0)
}

/// Most SubmitJob calls the submitter has in flight.
const SUBMITS_IN_FLIGHT: usize = 64;

/// Keeps the queue at [`queue_target`] ids (checked every 50 ms, counting the submits in
/// flight), or submits at `--submit-rate`, until `stop`; at most [`SUBMITS_IN_FLIGHT`] calls
/// at once, so a slow answer never holds the next submit back.
async fn submitter(
    f: Arc<Fleet>,
    clients: Vec<JobServiceClient<Channel>>,
    mut next: usize,
    mut stop: Stop,
) -> Tally {
    let mut tally = Tally::default();
    let mut conn = match redis::Client::open(f.redis_url.as_str()) {
        Ok(c) => match c.get_multiplexed_async_connection().await {
            Ok(conn) => conn,
            Err(e) => {
                tally.failures.push(format!("submitter: {e}"));
                return tally;
            }
        },
        Err(e) => {
            tally.failures.push(format!("submitter: {e}"));
            return tally;
        }
    };
    let every = match f.o.submit_rate {
        Some(rate) => Duration::from_secs_f64(1.0 / rate),
        None => Duration::from_millis(50),
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let target = queue_target(f.workers);
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.wait() => break,
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Ok((started, took, ok)) = done {
                    tally.record(f.window, Method::SubmitJob, started, took, ok);
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        let wanted = match f.o.submit_rate {
            Some(_) => 1,
            None => target
                .saturating_sub(zcard(&mut conn, &f.ready_key).await)
                .saturating_sub(in_flight.len()),
        };
        let room = SUBMITS_IN_FLIGHT.saturating_sub(in_flight.len());
        tally.submits_skipped += wanted.saturating_sub(room) as u64;
        for _ in 0..wanted.min(room) {
            let mut client = clients[next % clients.len()].clone();
            let name = format!("loadgen-{}-{next}", f.run);
            next += 1;
            in_flight.spawn(async move {
                let request = v1::SubmitJobRequest {
                    spec: spec(&name).ok(),
                    request_id: String::new(),
                };
                let started = Instant::now();
                let answer = client.submit_job(request).await;
                (started, started.elapsed(), answer.is_ok())
            });
        }
    }
    while let Some(done) = in_flight.join_next().await {
        if let Ok((started, took, ok)) = done {
            tally.record(f.window, Method::SubmitJob, started, took, ok);
        }
    }
    tally
}

/// One watcher: follows worker `w`'s job through coordinator `(w + 1) % n`, one WatchJob stream
/// per job, noting when it sees each batch.
async fn watcher(
    f: Arc<Fleet>,
    w: usize,
    mut current: watch::Receiver<Option<String>>,
    mut stop: Stop,
) -> (Tally, Vec<Sighting>) {
    let tally = Mutex::new(Tally::default());
    let mut seen = Vec::new();
    let url = &f.urls[(w + 1) % f.urls.len()];
    let mut client = match channel(url).await {
        Ok(c) => JobServiceClient::new(c),
        Err(e) => {
            lock(&tally)
                .failures
                .push(format!("watcher of worker {w}: {e:#}"));
            return (tally.into_inner().unwrap_or_default(), seen);
        }
    };
    let mut last: Option<String> = None;
    'jobs: loop {
        let job = loop {
            let now = current.borrow_and_update().clone();
            if let Some(job) = now.filter(|j| last.as_ref() != Some(j)) {
                break job;
            }
            tokio::select! {
                _ = stop.wait() => break 'jobs,
                changed = current.changed() => if changed.is_err() { break 'jobs },
            }
        };
        let request = v1::WatchJobRequest {
            job_id: job.clone(),
        };
        let (answer, _) = call(
            &tally,
            f.window,
            Method::WatchJob,
            client.watch_job(request),
        )
        .await;
        let opened = Instant::now();
        let Ok(mut stream) = answer else {
            // Opened again (while the job is still the worker's), as `trainq watch` does.
            tokio::select! {
                _ = stop.wait() => break 'jobs,
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
            }
        };
        last = Some(job.clone());
        loop {
            let message = tokio::select! {
                _ = stop.wait() => break 'jobs,
                m = stream.message() => m,
            };
            let at = Instant::now();
            match message {
                Ok(Some(v1::JobEvent {
                    event: Some(Event::Metrics(batch)),
                })) => {
                    let mut batches: Vec<u64> = batch
                        .points
                        .iter()
                        .map(|p| batch_of(p.step, f.o.batch_points))
                        .collect();
                    batches.dedup();
                    for b in batches {
                        seen.push(Sighting {
                            job: job.clone(),
                            batch: b,
                            seen: at,
                            opened,
                        });
                    }
                }
                Ok(Some(v1::JobEvent {
                    event: Some(Event::Job(j)),
                })) if j.state().is_terminal() => break,
                Ok(Some(_)) => {}
                // Broken before the job ended: open it again if it is still the worker's.
                Ok(None) | Err(_) => {
                    last = None;
                    tokio::select! {
                        _ = stop.wait() => break 'jobs,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => break,
                    }
                }
            }
        }
    }
    (tally.into_inner().unwrap_or_default(), seen)
}

/// Batch answered -> first seen by each watcher, for batches sent after the watcher's stream
/// was open and seen in the window; and how many were seen before their answer came back
/// (counted as zero).
fn watch_latencies(
    answers: &Answers,
    sightings: &[Sighting],
    window: Window,
) -> (Vec<Duration>, u64) {
    let answers = lock(answers);
    let mut out = Vec::new();
    let mut early = 0;
    let mut counted: std::collections::HashSet<(&str, u64, Instant)> = Default::default();
    for s in sightings {
        let Some(&(sent, answered)) = answers.get(&(s.job.clone(), s.batch)) else {
            continue;
        };
        if sent < s.opened
            || !window.contains(s.seen)
            || !counted.insert((&s.job, s.batch, s.opened))
        {
            continue;
        }
        if s.seen < answered {
            early += 1;
        }
        out.push(s.seen.saturating_duration_since(answered));
    }
    (out, early)
}

/// One fleet run's figures.
#[derive(Debug, Clone)]
pub struct FleetResult {
    pub workers: usize,
    pub watchers: usize,
    pub window_s: f64,
    pub tally: Tally,
    pub busy_at_end: usize,
    pub points_stored_window: Option<u64>,
    pub points_stored_run: Option<u64>,
    pub reaped: Option<u64>,
    pub claimed_again: Option<u64>,
    pub coordinators: Vec<CoordinatorFigures>,
    pub pg_max: Option<u64>,
    pub pg_end: Option<u64>,
    pub loadgen_cpu_pct: Option<f64>,
    pub machine_busy_pct: Option<f64>,
    pub watch: Vec<Duration>,
    pub watch_early: u64,
    pub stopped_cleanly: bool,
}

impl FleetResult {
    fn per_s(&self, n: u64) -> f64 {
        n as f64 / self.window_s
    }

    /// Heartbeat and WorkerHeartbeat all answered with p99 under [`HELD_P99`], no lease lost,
    /// no job reaped, every worker up.
    pub fn held(&self) -> bool {
        let beats = [Method::Heartbeat, Method::WorkerHeartbeat].map(|m| self.tally.method(m));
        beats
            .iter()
            .all(|s| s.calls > 0 && s.errors == 0 && s.p(0.99) < HELD_P99)
            && self.tally.leases_lost == 0
            && self.reaped.unwrap_or(0) == 0
            && self.tally.failures.is_empty()
    }

    fn points_per_s(&self) -> Option<f64> {
        self.points_stored_window.map(|n| self.per_s(n))
    }

    pub fn json(&self) -> Value {
        let methods: serde_json::Map<String, Value> = Method::ALL
            .iter()
            .map(|&m| {
                let s = self.tally.method(m);
                (m.name().to_string(), method_json(s, self.window_s))
            })
            .collect();
        json!({
            "workers": self.workers,
            "watchers": self.watchers,
            "window_s": self.window_s,
            "jobs_held_at_end": self.busy_at_end,
            "claims": self.tally.claimed,
            "claims_per_s": self.per_s(self.tally.claimed),
            "heartbeats_per_s": self.per_s(self.tally.method(Method::Heartbeat).calls),
            "worker_heartbeats_per_s": self.per_s(self.tally.method(Method::WorkerHeartbeat).calls),
            "points_stored_window": self.points_stored_window,
            "points_per_s_stored": self.points_per_s(),
            "points_reported_stored_window": self.tally.stored_window,
            "points_stored_run_sql": self.points_stored_run,
            "points_reported_stored_run": self.tally.stored_total,
            "points_conflicting_run": self.tally.conflicting_total,
            "leases_lost": self.tally.leases_lost,
            "jobs_reaped": self.reaped,
            "jobs_claimed_again": self.claimed_again,
            "redis_errors": self.tally.redis_errors,
            "submits_skipped": self.tally.submits_skipped,
            "failures": self.tally.failures,
            "methods": methods,
            "coordinators": self.coordinators.iter().map(|c| json!({
                "name": c.name, "url": c.url, "cpu_pct_of_one_core": c.cpu_pct,
                "vm_rss_max_kib": c.rss_max_kib, "vm_rss_end_kib": c.rss_end_kib,
                "vm_hwm_kib": c.hwm_kib,
            })).collect::<Vec<_>>(),
            "postgres_connections_max": self.pg_max,
            "postgres_connections_end": self.pg_end,
            "loadgen_cpu_pct_of_one_core": self.loadgen_cpu_pct,
            "machine_cpu_busy_pct": self.machine_busy_pct,
            "watch_latency": {
                "samples": self.watch.len(),
                "seen_before_answer": self.watch_early,
                "p50_ms": ms_f(quantile(&self.watch, 0.5)),
                "p99_ms": ms_f(quantile(&self.watch, 0.99)),
                "max_ms": ms_f(quantile(&self.watch, 1.0)),
            },
            "stopped_cleanly": self.stopped_cleanly,
            "held": self.held(),
        })
    }

    /// The run's row of the summary table.
    fn row(&self) -> Vec<String> {
        let hb = self.tally.method(Method::Heartbeat);
        let whb = self.tally.method(Method::WorkerHeartbeat);
        vec![
            self.workers.to_string(),
            self.busy_at_end.to_string(),
            format!("{:.1}", self.per_s(self.tally.claimed)),
            format!("{:.1}", self.per_s(hb.calls)),
            format!("{:.1}", self.per_s(whb.calls)),
            opt(self.points_per_s().map(|p| format!("{p:.0}"))),
            ms(hb.p(0.99)),
            ms(whb.p(0.99)),
            self.tally.leases_lost.to_string(),
            opt(self.reaped),
            yes_no(self.held()).into(),
        ]
    }

    /// The run's detail tables.
    fn details(&self, two: bool) -> String {
        let mut out = String::new();
        let rows: Vec<Vec<String>> = Method::ALL
            .iter()
            .map(|&m| {
                let s = self.tally.method(m);
                vec![
                    m.name().to_string(),
                    s.calls.to_string(),
                    s.errors.to_string(),
                    format!("{:.1}", self.per_s(s.calls)),
                    ms(s.p(0.5)),
                    ms(s.p(0.99)),
                    ms(s.p(1.0)),
                ]
            })
            .collect();
        let _ = writeln!(
            out,
            "RPCs started in the window (client side, {} workers):",
            self.workers
        );
        out += &table(
            &[
                "method", "calls", "errors", "calls/s", "p50 (ms)", "p99 (ms)", "max (ms)",
            ],
            &rows,
        );
        out += "\n";
        out += &coordinator_table(&self.coordinators);
        out += "\n";
        let watch_what = if two {
            "watch latency (ReportMetrics answered by A -> seen by a watcher of B)"
        } else {
            "watch latency (ReportMetrics answered -> seen by a watcher, one coordinator)"
        };
        let figures = vec![
            vec![
                "Postgres connections to the database, max / at end".into(),
                format!("{} / {}", opt(self.pg_max), opt(self.pg_end)),
            ],
            vec![
                "metric points stored in the window (SQL count)".into(),
                opt(self.points_stored_window),
            ],
            vec![
                "metric points stored in the window (ReportMetrics' answers)".into(),
                self.tally.stored_window.to_string(),
            ],
            vec![
                "metric points stored in the run: SQL count / ReportMetrics' answers".into(),
                format!(
                    "{} / {}",
                    opt(self.points_stored_run),
                    self.tally.stored_total
                ),
            ],
            vec![
                "leases lost (refused heartbeats or writes) / jobs reaped / jobs claimed again"
                    .into(),
                format!(
                    "{} / {} / {}",
                    self.tally.leases_lost,
                    opt(self.reaped),
                    opt(self.claimed_again)
                ),
            ],
            vec![
                format!("{watch_what}, p50 / p99 / max (ms), samples"),
                if self.watch.is_empty() {
                    format!("n/a ({} watchers)", self.watchers)
                } else {
                    format!(
                        "{} / {} / {}, {} ({} seen before the answer)",
                        ms(quantile(&self.watch, 0.5)),
                        ms(quantile(&self.watch, 0.99)),
                        ms(quantile(&self.watch, 1.0)),
                        self.watch.len(),
                        self.watch_early
                    )
                },
            ],
            vec![
                "loadgen CPU (% of one core) / machine CPU busy (% of all cores)".into(),
                format!(
                    "{} / {}",
                    pct(self.loadgen_cpu_pct),
                    pct(self.machine_busy_pct)
                ),
            ],
            vec![
                "Redis pop errors / workers that failed".into(),
                format!(
                    "{} / {}",
                    self.tally.redis_errors,
                    self.tally.failures.len()
                ),
            ],
        ];
        out += &table(&["figure", "value"], &figures);
        for f in self.tally.failures.iter().take(5) {
            let _ = writeln!(out, "failure: {f}");
        }
        if !self.stopped_cleanly {
            out += "warning: some tasks did not stop within 60 s and were aborted (the run totals may miss calls)\n";
        }
        out
    }
}

fn method_json(s: &MethodStats, window_s: f64) -> Value {
    json!({
        "calls": s.calls,
        "errors": s.errors,
        "per_s": s.calls as f64 / window_s,
        "p50_ms": ms_f(s.p(0.5)),
        "p99_ms": ms_f(s.p(0.99)),
        "max_ms": ms_f(s.p(1.0)),
    })
}

fn coordinator_table(c: &[CoordinatorFigures]) -> String {
    let rows: Vec<Vec<String>> = c
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.url.clone(),
                pct(c.cpu_pct),
                opt(c.rss_max_kib.map(mib)),
                opt(c.rss_end_kib.map(mib)),
                opt(c.hwm_kib.map(mib)),
            ]
        })
        .collect();
    table(
        &[
            "coordinator",
            "address",
            "CPU (% of one core)",
            "VmRSS max (MiB)",
            "VmRSS end (MiB)",
            "VmHWM (MiB)",
        ],
        &rows,
    )
}

const FLEET_HEADER: [&str; 11] = [
    "workers",
    "jobs held",
    "claims/s",
    "heartbeats/s",
    "worker heartbeats/s",
    "points/s stored",
    "Heartbeat p99 (ms)",
    "WorkerHeartbeat p99 (ms)",
    "leases lost",
    "jobs reaped",
    "held",
];

fn ms_f(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "n/a".into(), |v| v.to_string())
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.1}"))
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// A plain-text table with aligned columns (also valid Markdown).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c:<w$}"))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out += &line(widths.iter().map(|&w| "-".repeat(w)).collect());
    for row in rows {
        out += &line(row.clone());
    }
    out
}

/// One fleet run of `workers` simulated workers (run number `run`) on `d`.
pub async fn run_fleet(
    d: &Deployment,
    o: &Options,
    workers: usize,
    run: usize,
) -> anyhow::Result<FleetResult> {
    let reaped_before = d.lease_expired().await?;
    let again_before = d.claimed_again().await?;
    let run_before = d.points_stored().await?;
    let mut job_clients = Vec::new();
    for url in &d.urls {
        job_clients.push(JobServiceClient::new(channel(url).await?));
    }
    // Fill the queue so every worker finds a job at once.
    let mut redis = redis::Client::open(d.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;
    let queued = zcard(&mut redis, &d.ready_key()).await;
    let prefill = (workers + queue_target(workers)).saturating_sub(queued);
    eprintln!("run {run}: submitting {prefill} jobs, then {workers} workers start");
    let mut submit_tally = Tally::default();
    let mut next = 0;
    {
        // Before the window: none of these calls is counted.
        let now = Instant::now();
        let t = Mutex::new(Tally::default());
        submit_many(
            &job_clients,
            prefill,
            Window {
                start: now,
                end: now,
            },
            &t,
            run,
            &mut next,
        )
        .await;
        submit_tally.merge(t.into_inner().unwrap_or_default());
    }
    let started = Instant::now();
    let window = Window {
        start: started + o.warmup,
        end: started + o.warmup + o.duration,
    };
    let fleet = Arc::new(Fleet {
        o: o.clone(),
        run,
        workers,
        urls: d.urls.clone(),
        redis_url: d.redis_url.clone(),
        ready_key: d.ready_key(),
        window,
        busy: AtomicUsize::new(0),
        answers: (o.watchers > 0).then(Answers::default),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop = Stop(stop_rx);
    let mut worker_tasks = Vec::with_capacity(workers);
    let mut currents = Vec::with_capacity(workers);
    for i in 0..workers {
        let (tx, rx) = watch::channel(None);
        currents.push(rx);
        worker_tasks.push(tokio::spawn(worker(fleet.clone(), i, stop.clone(), tx)));
    }
    let watcher_tasks: Vec<_> = (0..o.watchers)
        .map(|k| {
            let w = k * workers / o.watchers;
            tokio::spawn(watcher(fleet.clone(), w, currents[w].clone(), stop.clone()))
        })
        .collect();
    drop(currents);
    let submit_task = tokio::spawn(submitter(fleet.clone(), job_clients, next, stop.clone()));
    let sampler = sample(d.db.clone(), d.pids.clone(), window);

    tokio::time::sleep_until(window.start.into()).await;
    eprintln!(
        "run {run}: warm-up over ({} workers holding jobs); measuring for {:.0} s",
        fleet.busy.load(Ordering::Relaxed),
        o.duration.as_secs_f64()
    );
    let probe = Probe::start(&d.pids);
    let points_start = d.points_stored().await?;
    tokio::time::sleep_until(window.end.into()).await;
    let busy_at_end = fleet.busy.load(Ordering::Relaxed);
    let (cpu, loadgen_cpu_pct, machine_busy_pct) = probe.finish(window.secs());
    let points_end = d.points_stored().await?;
    let pg_end = match &d.db {
        Some(db) => pg_connections(db).await,
        None => None,
    };
    let reaped = d.lease_expired().await?;
    let claimed_again = d.claimed_again().await?;
    let samples = sampler.await.unwrap_or_default();
    let coordinators = coordinator_figures(d, &cpu, &samples.rss_max);
    eprintln!("run {run}: window over; stopping the workers");

    let _ = stop_tx.send(true);
    let mut tally = submit_tally;
    let mut stopped_cleanly = true;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for task in worker_tasks {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(t)) => tally.merge(t),
            Ok(Err(e)) => tally.failures.push(format!("a worker task panicked: {e}")),
            Err(_) => stopped_cleanly = false,
        }
    }
    let mut sightings = Vec::new();
    for task in watcher_tasks {
        if let Ok(Ok((t, s))) = tokio::time::timeout_at(deadline, task).await {
            tally.merge(t);
            sightings.extend(s);
        }
    }
    if let Ok(Ok(t)) = tokio::time::timeout_at(deadline, submit_task).await {
        tally.merge(t);
    }
    let (watch_latency, watch_early) = match &fleet.answers {
        Some(answers) => watch_latencies(answers, &sightings, window),
        None => (Vec::new(), 0),
    };
    let run_after = d.points_stored().await?;
    let diff = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
    Ok(FleetResult {
        workers,
        watchers: o.watchers,
        window_s: window.secs(),
        tally,
        busy_at_end,
        points_stored_window: diff(points_start, points_end),
        points_stored_run: diff(run_before, run_after),
        reaped: diff(reaped_before, reaped),
        claimed_again: diff(again_before, claimed_again),
        coordinators,
        pg_max: samples.pg_max.max(pg_end),
        pg_end,
        loadgen_cpu_pct,
        machine_busy_pct,
        watch: watch_latency,
        watch_early,
        stopped_cleanly,
    })
}

// ---------------------------------------------------------------------------------------------
// Ingestion alone.
// ---------------------------------------------------------------------------------------------

/// One `--ingest-only` row.
#[derive(Debug, Clone)]
pub struct IngestResult {
    pub reporters: usize,
    pub window_s: f64,
    pub tally: Tally,
    pub points_stored_window: Option<u64>,
    pub coordinators: Vec<CoordinatorFigures>,
    pub pg_max: Option<u64>,
    pub machine_busy_pct: Option<f64>,
    pub loadgen_cpu_pct: Option<f64>,
}

impl IngestResult {
    fn points_per_s(&self) -> Option<f64> {
        self.points_stored_window.map(|n| n as f64 / self.window_s)
    }

    pub fn json(&self) -> Value {
        let s = self.tally.method(Method::ReportMetrics);
        json!({
            "reporters": self.reporters,
            "window_s": self.window_s,
            "points_stored_window": self.points_stored_window,
            "points_per_s_stored": self.points_per_s(),
            "points_reported_stored_window": self.tally.stored_window,
            "report_metrics": method_json(s, self.window_s),
            "leases_lost": self.tally.leases_lost,
            "failures": self.tally.failures,
            "coordinators": self.coordinators.iter().map(|c| json!({
                "name": c.name, "url": c.url, "cpu_pct_of_one_core": c.cpu_pct,
                "vm_rss_max_kib": c.rss_max_kib, "vm_hwm_kib": c.hwm_kib,
            })).collect::<Vec<_>>(),
            "postgres_connections_max": self.pg_max,
            "loadgen_cpu_pct_of_one_core": self.loadgen_cpu_pct,
            "machine_cpu_busy_pct": self.machine_busy_pct,
        })
    }

    fn row(&self) -> Vec<String> {
        let s = self.tally.method(Method::ReportMetrics);
        let cpu: Vec<String> = self.coordinators.iter().map(|c| pct(c.cpu_pct)).collect();
        let rss: Vec<String> = self
            .coordinators
            .iter()
            .map(|c| opt(c.rss_max_kib.map(mib)))
            .collect();
        vec![
            self.reporters.to_string(),
            opt(self.points_per_s().map(|p| format!("{p:.0}"))),
            format!("{:.1}", s.calls as f64 / self.window_s),
            s.errors.to_string(),
            ms(s.p(0.5)),
            ms(s.p(0.99)),
            cpu.join(" / "),
            rss.join(" / "),
            opt(self.pg_max),
            pct(self.machine_busy_pct),
        ]
    }
}

const INGEST_HEADER: [&str; 10] = [
    "reporters",
    "points/s stored",
    "ReportMetrics calls/s",
    "errors",
    "ReportMetrics p50 (ms)",
    "ReportMetrics p99 (ms)",
    "coordinator CPU (% of one core)",
    "coordinator VmRSS max (MiB)",
    "Postgres connections max",
    "machine CPU busy (%)",
];

/// One reporter: on its own connection, heartbeats its lease every interval and sends
/// `--batch-points` batches back to back until the window ends.
async fn reporter(
    url: String,
    lease: v1::JobLease,
    n: u32,
    period: Duration,
    window: Window,
) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut client = match channel(&url).await {
        Ok(c) => WorkerServiceClient::new(c),
        Err(e) => {
            lock(&tally).failures.push(format!("reporter: {e:#}"));
            return std::mem::take(&mut *lock(&tally));
        }
    };
    let (lost, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let heartbeat = tokio::spawn(lease_heartbeats(
        window,
        period,
        client.clone(),
        lease.clone(),
        lost.clone(),
        done.clone(),
        tally.clone(),
    ));
    let mut batch = 0u64;
    while Instant::now() < window.end && !lost.load(Ordering::SeqCst) {
        let request = v1::ReportMetricsRequest {
            lease: Some(lease.clone()),
            points: points(batch, n),
        };
        let (answer, sent) = call(
            &tally,
            window,
            Method::ReportMetrics,
            client.report_metrics(request),
        )
        .await;
        match answer {
            Ok(r) => {
                let mut t = lock(&tally);
                t.stored_total += u64::from(r.stored);
                if window.contains(sent) {
                    t.stored_window += u64::from(r.stored);
                }
            }
            Err(s) if refused(&s) => mark_lost(&lost, &tally),
            Err(_) => {}
        }
        batch += 1;
    }
    done.store(true, Ordering::SeqCst);
    let request = v1::CompleteJobRequest {
        lease: Some(lease),
        final_step: batch * u64::from(n),
    };
    let _ = call(
        &tally,
        window,
        Method::CompleteJob,
        client.complete_job(request),
    )
    .await;
    heartbeat.abort();
    let _ = heartbeat.await;
    let mut t = lock(&tally);
    std::mem::take(&mut *t)
}

/// `reporters` concurrent reporters (row `row`), each on a job of its own claimed for it.
pub async fn run_ingest(
    d: &Deployment,
    o: &Options,
    reporters: usize,
    row: usize,
) -> anyhow::Result<IngestResult> {
    let mut jobs = JobServiceClient::new(channel(&d.urls[0]).await?);
    let mut workers = WorkerServiceClient::new(channel(&d.urls[0]).await?);
    let mut leases = Vec::new();
    for r in 0..reporters {
        let id = crate::submit(&mut jobs, spec(&format!("loadgen-ingest-{row}-{r}"))?).await?;
        let claim = workers
            .claim_job(v1::ClaimJobRequest {
                job_id: id,
                worker_id: format!("loadgen-ingest-{row}-{r}"),
                device_kind: "cpu".into(),
                free_gpu_memory_mib: None,
            })
            .await?
            .into_inner();
        ensure!(claim.claimed, "could not claim the job of reporter {r}");
        leases.push(claim.lease.context("a claim without a lease")?);
    }
    let started = Instant::now();
    let window = Window {
        start: started + o.warmup,
        end: started + o.warmup + o.duration,
    };
    eprintln!(
        "ingest: {reporters} reporters, measuring {:.0} s after {:.0} s",
        o.duration.as_secs_f64(),
        o.warmup.as_secs_f64()
    );
    let tasks: Vec<_> = leases
        .into_iter()
        .enumerate()
        .map(|(r, lease)| {
            tokio::spawn(reporter(
                d.urls[r % d.urls.len()].clone(),
                lease,
                o.batch_points,
                o.heartbeat,
                window,
            ))
        })
        .collect();
    let sampler = sample(d.db.clone(), d.pids.clone(), window);
    tokio::time::sleep_until(window.start.into()).await;
    let probe = Probe::start(&d.pids);
    let points_start = d.points_stored().await?;
    tokio::time::sleep_until(window.end.into()).await;
    let (cpu, loadgen_cpu_pct, machine_busy_pct) = probe.finish(window.secs());
    let points_end = d.points_stored().await?;
    let mut tally = Tally::default();
    for t in tasks {
        match t.await {
            Ok(t) => tally.merge(t),
            Err(e) => tally.failures.push(format!("a reporter panicked: {e}")),
        }
    }
    let samples = sampler.await.unwrap_or_default();
    Ok(IngestResult {
        reporters,
        window_s: window.secs(),
        tally,
        points_stored_window: points_start
            .zip(points_end)
            .map(|(a, b)| b.saturating_sub(a)),
        coordinators: coordinator_figures(d, &cpu, &samples.rss_max),
        pg_max: samples.pg_max,
        machine_busy_pct,
        loadgen_cpu_pct,
    })
}

// ---------------------------------------------------------------------------------------------
// The whole run.
// ---------------------------------------------------------------------------------------------

fn settings_text(d: &Deployment, o: &Options, files: &str) -> (String, Value) {
    let mut rows: Vec<(String, String)> = d.settings.clone();
    if o.ingest_only {
        rows.push((
            "load".into(),
            format!(
                "--ingest-only: reporters {:?}, {}-point batches back to back, lease heartbeat every {} ms",
                o.reporters,
                o.batch_points,
                o.heartbeat.as_millis()
            ),
        ));
    } else {
        rows.push((
            "load".into(),
            format!(
                "workers {:?}, heartbeat {} ms, one {}-point batch every {} ms per held job, jobs held {:.1} s on average (0.5x..1.5x), submits: {}, watchers {}",
                o.fleet_sizes(),
                o.heartbeat.as_millis(),
                o.batch_points,
                o.batch_every.as_millis(),
                o.job.as_secs_f64(),
                o.submit_rate.map_or_else(
                    || "queue kept at max(16, workers / 5) ids, counting submits in flight".to_string(),
                    |r| format!("{r}/s")
                ),
                o.watchers
            ),
        ));
        rows.push((
            "connections".into(),
            "one gRPC connection and one Redis connection per worker, one gRPC connection per watcher, worker i on coordinator i % n, watchers on the next one".into(),
        ));
    }
    rows.push((
        "window".into(),
        format!(
            "{:.0} s after a {:.0} s warm-up",
            o.duration.as_secs_f64(),
            o.warmup.as_secs_f64()
        ),
    ));
    rows.push(("open files limit".into(), files.into()));
    rows.push((
        "held".into(),
        format!(
            "Heartbeat and WorkerHeartbeat p99 under {} ms with no errors, no lease lost, no job reaped",
            HELD_P99.as_millis()
        ),
    ));
    let json: serde_json::Map<String, Value> = rows
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let rows: Vec<Vec<String>> = rows.into_iter().map(|(k, v)| vec![k, v]).collect();
    (table(&["setting", "value"], &rows), Value::Object(json))
}

/// Runs what `o` asks and prints the tables (to stdout, or to stderr with `--json`, which puts
/// one JSON object on stdout). Ok(false) when a fleet run was not held.
pub async fn run(o: Options) -> anyhow::Result<bool> {
    let most = if o.ingest_only {
        o.reporters.iter().copied().max().unwrap_or(0) as u64 * 2
    } else {
        o.fleet_sizes().into_iter().max().unwrap_or(0) as u64 * 3 + o.watchers as u64 * 2
    };
    let files = raise_open_files(most + 1024);
    let d = Deployment::start(&o).await?;
    let (settings, settings_json) = settings_text(&d, &o, &files);
    let mut out = String::new();
    let emit = |text: &str, json: bool| {
        if json {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
    };
    out += "trainq-loadgen\n";
    out += &settings;
    out += "\n";
    emit(&out, o.json);
    let mut held_all = true;
    let result = if o.ingest_only {
        let mut results = Vec::new();
        for (row, &r) in o.reporters.iter().enumerate() {
            results.push(run_ingest(&d, &o, r, row).await?);
        }
        let rows: Vec<Vec<String>> = results.iter().map(IngestResult::row).collect();
        let mut text =
            String::from("Metric ingestion alone (points/s stored: SQL count over the window):\n");
        text += &table(&INGEST_HEADER, &rows);
        emit(&text, o.json);
        json!({"settings": settings_json, "ingest": results.iter().map(IngestResult::json).collect::<Vec<_>>()})
    } else {
        let mut results = Vec::new();
        for (run, workers) in o.fleet_sizes().into_iter().enumerate() {
            let r = run_fleet(&d, &o, workers, run).await?;
            emit(&r.details(d.urls.len() > 1), o.json);
            emit("\n", o.json);
            let held = r.held();
            held_all &= held;
            results.push(r);
            if !held && !o.find_max.is_empty() {
                break;
            }
        }
        let rows: Vec<Vec<String>> = results.iter().map(FleetResult::row).collect();
        let mut text = format!("Summary ({} coordinator(s)):\n", d.urls.len());
        text += &table(&FLEET_HEADER, &rows);
        if !o.find_max.is_empty() {
            let largest = results.iter().filter(|r| r.held()).map(|r| r.workers).max();
            let _ = writeln!(
                text,
                "largest held: {}",
                opt(largest.map(|w| format!("{w} workers")))
            );
        }
        let _ = writeln!(text, "held: {}", yes_no(held_all));
        emit(&text, o.json);
        json!({"settings": settings_json, "runs": results.iter().map(FleetResult::json).collect::<Vec<_>>(), "held": held_all})
    };
    if o.json {
        println!("{result}");
    }
    Ok(held_all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Option<Options>> {
        Options::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn flags_and_their_checks() {
        let o = parse(&[
            "--coordinators",
            "2",
            "--workers",
            "5",
            "--heartbeat-ms",
            "200",
            "--batch-points",
            "100",
            "--batch-every-ms",
            "300",
            "--duration-s",
            "3",
            "--watchers",
            "1",
            "--json",
        ])
        .expect("valid")
        .expect("not help");
        assert_eq!(o.coordinators, 2);
        assert_eq!(o.heartbeat, Duration::from_millis(200));
        assert_eq!(o.duration, Duration::from_secs(3));
        assert!(o.json);
        assert_eq!(o.fleet_sizes(), [5]);
        let o = parse(&["--find-max", "250,500"])
            .expect("valid")
            .expect("not help");
        assert_eq!(o.fleet_sizes(), [250, 500]);
        let o = parse(&["--addr", "http://a:1", "--addr", "http://b:2", "--pid", "7"])
            .expect("valid")
            .expect("not help");
        assert_eq!(o.coordinators, 2);
        assert!(parse(&["--help"]).expect("valid").is_none());
        assert!(parse(&["--batch-points", "10001"]).is_err());
        assert!(parse(&["--pid", "7"]).is_err(), "a pid needs its --addr");
        assert!(parse(&["--coordinators", "3", "--addr", "http://a:1"]).is_err());
        assert!(parse(&["--ingest-only", "--reporters", "0"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }

    #[test]
    fn proc_stat_fields_follow_the_last_parenthesis() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 5 1000 50";
        assert_eq!(stat_ticks(stat), Some(325));
        assert_eq!(stat_ticks("garbage"), None);
    }

    #[test]
    fn a_flag_default_from_clap_help() {
        let help = "      --db-max-connections <N>\n          Pool size\n\n          [env: X=]\n          [default: 16]\n\n      --other <O>\n          [default: 3]\n";
        assert_eq!(
            flag_default(help, "--db-max-connections").as_deref(),
            Some("16")
        );
        assert_eq!(flag_default(help, "--missing"), None);
        let no_default = "      --a <A>\n          x\n      --b <B>\n          [default: 3]\n";
        assert_eq!(flag_default(no_default, "--a"), None);
    }

    #[test]
    fn batches_have_distinct_increasing_steps() {
        let b0 = points(0, 3);
        let b1 = points(1, 3);
        let steps: Vec<u64> = b0.iter().chain(&b1).map(|p| p.step).collect();
        assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
        assert!(steps.iter().all(|&s| batch_of(s, 3) == (s - 1) / 3));
        assert_eq!(batch_of(4, 3), 1);
    }

    #[test]
    fn tables_are_aligned() {
        let t = table(
            &["a", "long header"],
            &[vec!["wide cell".into(), "1".into()]],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{t}");
        assert_eq!(lines[0], "| a         | long header |");
    }

    #[test]
    fn watch_latency_counts_batches_sent_after_the_stream_opened() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let answers = Answers::default();
        lock(&answers).insert(("j".into(), 0), (at(10), at(20)));
        lock(&answers).insert(("j".into(), 1), (at(110), at(120)));
        lock(&answers).insert(("j".into(), 2), (at(210), at(220)));
        let s = |batch, seen, opened| Sighting {
            job: "j".into(),
            batch,
            seen: at(seen),
            opened: at(opened),
        };
        let sightings = [
            s(0, 30, 15),  // sent before the stream opened: not counted
            s(1, 150, 15), // 30 ms
            s(1, 160, 15), // the same batch again on this stream: not counted twice
            s(2, 215, 15), // seen before the answer: 0, counted as early
        ];
        let window = Window {
            start: t0,
            end: at(1000),
        };
        let (lat, early) = watch_latencies(&answers, &sightings, window);
        assert_eq!(lat, [Duration::from_millis(30), Duration::ZERO]);
        assert_eq!(early, 1);
    }
}

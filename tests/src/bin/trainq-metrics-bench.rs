//! GetMetrics benchmark: latency and the coordinator's memory when a client reads a job with
//! about a million metric points, page after page or downsampled.
//!
//! It starts real coordinators (`trainq-server` next to this binary: build it in the same
//! profile) on a database and Redis prefix of its own on the machine's Postgres and Redis (the
//! system tests' [`tests::TestEnv`], dropped at the end), submits one job, and stores `--points`
//! points for it straight through SQL (`INSERT ... SELECT` over `generate_series`, split over
//! `--series` metric names, `job_metric_latest` kept consistent), then VACUUM ANALYZE. Then it
//! measures each mode `--runs` times, the modes taking turns:
//!
//! - `paged full read`: every point, following next_page_token with page_size 5000 (the
//!   largest);
//! - `paged full read, default pages`: the same with page_size 0 (1000 points a page);
//! - `max_points=1000`: each series downsampled to at most 1000 points, in pages of 5000 (one
//!   call for up to five series).
//!
//! A call can no longer answer a whole series at once (a page holds at most 5000 points), so
//! that old mode is gone; `--baseline-server PATH` adds it, measured against another
//! coordinator binary (for example one built from before paging), as `one call (baseline)`.
//!
//! Memory: every mode has a coordinator process of its own, started fresh, so its VmHWM (peak
//! resident set over the process's life, read from /proc/<pid>/status after all its runs) is
//! the peak of that mode's calls; its VmRSS is also sampled every 2 ms during each call,
//! and the table shows the median over runs of the highest sample, next to the idle VmRSS after
//! start-up and one warm-up call.
//!
//! Run: `cargo build --release -p server && cargo run --release -p tests --bin
//! trainq-metrics-bench -- [--points 1000000] [--series 1] [--runs 5] [--baseline-server PATH]`

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use prost::Message as _;
use proto::v1::{self, job_service_client::JobServiceClient};
use tests::bench::{channel, median, mib};
use tests::{free_port, mnist_spec_json, Coordinator, TestEnv};
use tonic::transport::Channel;

const NAMES: [&str; 4] = ["train/loss", "train/recon", "train/kl", "train/accuracy"];

struct Args {
    points: u64,
    series: usize,
    runs: usize,
    baseline: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        points: 1_000_000,
        series: 1,
        runs: 5,
        baseline: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--points" => a.points = value()?.parse()?,
            "--series" => a.series = value()?.parse()?,
            "--runs" => a.runs = value()?.parse()?,
            "--baseline-server" => a.baseline = Some(value()?.into()),
            "-h" | "--help" => {
                println!(
                    "trainq-metrics-bench [--points N] [--series 1..=4] [--runs N] [--baseline-server PATH]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if !(1..=NAMES.len()).contains(&a.series) || a.points < a.series as u64 || a.runs == 0 {
        bail!("need 1 <= --series <= 4, --points >= --series and --runs >= 1");
    }
    Ok(a)
}

/// How a mode reads the job's points.
#[derive(Clone, Copy)]
enum Mode {
    /// Pages of this size until next_page_token is empty.
    Paged(u32),
    /// max_points, in pages of 5000.
    Downsampled(u32),
    /// One call, no paging fields (the baseline coordinator answers everything).
    OneCall,
}

impl Mode {
    fn label(self) -> String {
        match self {
            Mode::Paged(0) => "paged full read, default pages (1000)".into(),
            Mode::Paged(n) => format!("paged full read (page_size {n})"),
            Mode::Downsampled(k) => format!("max_points={k} (page_size 5000)"),
            Mode::OneCall => "one call (baseline server)".into(),
        }
    }
}

/// What one read of a mode saw.
struct Read {
    took: Duration,
    calls: usize,
    points: usize,
    bytes: usize,
    peak_rss_kib: u64,
}

/// One mode's coordinator and its runs.
struct Bench {
    mode: Mode,
    coordinator: Coordinator,
    client: JobServiceClient<Channel>,
    idle_rss_kib: u64,
    reads: Vec<Read>,
}

/// A `/proc/<pid>/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    line.split_whitespace()
        .nth(1)
        .context("a number")?
        .parse()
        .context("a number")
}

/// Samples the process's VmRSS every 2 ms until `stop`; the highest sample in KiB.
fn sample_rss(
    pid: u32,
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(kib) = status_kib(pid, "VmRSS:") {
                peak.fetch_max(kib, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

/// Reads the job's points as `mode` says; returns calls, points and encoded bytes.
async fn read(
    client: &mut JobServiceClient<Channel>,
    job: &str,
    mode: Mode,
) -> anyhow::Result<(usize, usize, usize)> {
    let (mut calls, mut points, mut bytes) = (0, 0, 0);
    let mut page_token = String::new();
    loop {
        let (page_size, max_points) = match mode {
            Mode::Paged(n) => (n, 0),
            Mode::Downsampled(k) => (5000, k),
            Mode::OneCall => (0, 0),
        };
        let page = client
            .get_metrics(v1::GetMetricsRequest {
                job_id: job.to_owned(),
                names: vec![],
                page_size,
                page_token,
                max_points,
            })
            .await
            .with_context(|| format!("GetMetrics call {calls}"))?
            .into_inner();
        calls += 1;
        points += page.points.len();
        bytes += page.encoded_len();
        if page.next_page_token.is_empty() || matches!(mode, Mode::OneCall) {
            return Ok((calls, points, bytes));
        }
        page_token = page.next_page_token;
    }
}

impl Bench {
    async fn start(
        env: &TestEnv,
        i: usize,
        mode: Mode,
        server: Option<&PathBuf>,
    ) -> anyhow::Result<Self> {
        let name = format!("coordinator-{i}");
        let coordinator = match server {
            None => env.start_coordinator_at(&name, free_port(), &[]).await,
            Some(path) => {
                env.start_coordinator_binary(path, &name, free_port(), &[])
                    .await
            }
        };
        let channel = channel(&coordinator.url()).await?;
        // The baseline answers a million points in one message.
        let client = JobServiceClient::new(channel).max_decoding_message_size(1 << 30);
        Ok(Self {
            mode,
            coordinator,
            client,
            idle_rss_kib: 0,
            reads: Vec::new(),
        })
    }

    fn pid(&self) -> u32 {
        self.coordinator.proc.pid()
    }

    async fn run(&mut self, job: &str) -> anyhow::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = sample_rss(self.pid(), stop.clone(), peak.clone());
        let started = Instant::now();
        let result = read(&mut self.client, job, self.mode).await;
        let took = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        sampler.join().ok();
        let (calls, points, bytes) = result?;
        self.reads.push(Read {
            took,
            calls,
            points,
            bytes,
            peak_rss_kib: peak.load(Ordering::Relaxed),
        });
        Ok(())
    }
}

/// Submits the job and stores its points in bulk; returns its id.
async fn store_points(env: &TestEnv, url: &str, a: &Args) -> anyhow::Result<String> {
    let mut client = JobServiceClient::connect(url.to_owned()).await?;
    let spec: v1::JobSpec = serde_json::from_str(&mnist_spec_json("metrics-bench", 1, 256, 256))?;
    let id = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await?
        .into_inner()
        .job_id;
    let job = uuid::Uuid::parse_str(&id)?;
    let pool = env.pool().await;
    let per_series = (a.points / a.series as u64) as i64;
    let names: Vec<&str> = NAMES[..a.series].to_vec();
    let started = Instant::now();
    // A point every step, 1000 steps an epoch, a falling noisy curve.
    sqlx::query(
        "INSERT INTO metric_points (job_id, name, step, epoch, value)
         SELECT $1, n, s, (s - 1) / 1000 + 1, 1.0 / s + random() * 0.01
         FROM unnest($2::text[]) AS n, generate_series(1, $3::bigint) AS s",
    )
    .bind(job)
    .bind(&names)
    .bind(per_series)
    .execute(&pool)
    .await
    .context("inserting points")?;
    sqlx::query(
        "INSERT INTO job_metric_latest (job_id, name, step, epoch, value)
         SELECT DISTINCT ON (name) job_id, name, step, epoch, value FROM metric_points
         WHERE job_id = $1 ORDER BY name, step DESC",
    )
    .bind(job)
    .execute(&pool)
    .await
    .context("the latest-value summary")?;
    sqlx::query("VACUUM ANALYZE metric_points")
        .execute(&pool)
        .await?;
    eprintln!(
        "stored {} points ({} series of {per_series}) in {:.1} s",
        per_series * a.series as i64,
        a.series,
        started.elapsed().as_secs_f64()
    );
    Ok(id)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    let env = TestEnv::new();
    let mut modes = vec![Mode::Paged(5000), Mode::Paged(0), Mode::Downsampled(1000)];
    if a.baseline.is_some() {
        modes.push(Mode::OneCall);
    }
    let mut benches = Vec::new();
    for (i, &mode) in modes.iter().enumerate() {
        let server = matches!(mode, Mode::OneCall)
            .then_some(a.baseline.as_ref())
            .flatten();
        benches.push(Bench::start(&env, i, mode, server).await?);
    }
    let job = store_points(&env, &benches[0].coordinator.url(), &a).await?;
    // One warm-up read each (the database's cache, each coordinator's pool), then the idle RSS.
    for b in &mut benches {
        read(&mut b.client, &job, b.mode).await?;
        b.idle_rss_kib = status_kib(b.pid(), "VmRSS:")?;
    }
    for _ in 0..a.runs {
        for b in &mut benches {
            b.run(&job).await?;
        }
    }
    println!(
        "GetMetrics of one job with {} points ({} series), {} runs per mode taking turns, median; \
         client and coordinator on this machine; a fresh coordinator per mode",
        a.points, a.series, a.runs
    );
    println!(
        "| mode | calls | points | response MiB | median latency (ms) | coordinator peak VmRSS during a call, median (MiB) | coordinator VmHWM after all runs (MiB) | idle VmRSS (MiB) |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for b in &benches {
        let last = b.reads.last().context("a run")?;
        let took = median(&b.reads.iter().map(|r| r.took).collect::<Vec<_>>());
        let peak = median(&b.reads.iter().map(|r| r.peak_rss_kib).collect::<Vec<_>>());
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {} |",
            b.mode.label(),
            last.calls,
            last.points,
            last.bytes as f64 / (1024.0 * 1024.0),
            took.as_secs_f64() * 1e3,
            mib(peak),
            mib(status_kib(b.pid(), "VmHWM:")?),
            mib(b.idle_rss_kib),
        );
    }
    Ok(())
}

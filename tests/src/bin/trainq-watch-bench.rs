//! Watcher-load benchmark: how many WatchJob streams a coordinator holds open while GetJob
//! stays fast, idle and while the watched jobs report metrics.
//!
//! It starts the real coordinator (the machine's Postgres and Redis, a fresh database, as the
//! system tests do), stores `--jobs` queued jobs, then for each watcher count opens that many
//! WatchJob streams (spread over connections of at most 100 streams, the default
//! `--max-watchers-per-connection`), each watching one of the jobs, and reads them on
//! background tasks. Every watcher of a row watches one of `--active` jobs (fresh ones per row),
//! as a dashboard audience would. Two phases per count:
//! - idle: nothing changes (the jobs are queued);
//! - busy: a stand-in worker (plain WorkerService calls, no training) claims those jobs and
//!   reports a batch of `--points` metric points to each of them every 10 ms, which wakes
//!   every watcher each time.
//!
//! Meanwhile one more connection calls GetJob `--calls` times in a row; the table shows its
//! client-side p50 and p99, and how many events the watchers received per second. Finally it
//! opens one stream past the per-connection limit and one past `--max-watchers` and prints the
//! status codes they got.
//!
//! Run: `cargo build --release -p server -p tests --bins && cargo run --release -p tests --bin
//! trainq-watch-bench -- [--watchers 0,500,1000,2000] [--jobs 200] [--active 10] [--calls 500]`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use proto::v1::{
    self, job_service_client::JobServiceClient, worker_service_client::WorkerServiceClient,
};
use tests::bench::{channel, ms, quantile};
use tests::{mnist_spec_json, TestEnv};
use tokio_stream::StreamExt as _;

struct Options {
    watchers: Vec<usize>,
    jobs: usize,
    active: usize,
    points: usize,
    calls: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        watchers: vec![0, 500, 1000, 2000],
        jobs: 200,
        active: 10,
        points: 10,
        calls: 500,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--watchers" => {
                o.watchers = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--jobs" => o.jobs = value()?.parse()?,
            "--active" => o.active = value()?.parse()?,
            "--points" => o.points = value()?.parse()?,
            "--calls" => o.calls = value()?.parse()?,
            "-h" | "--help" => {
                println!(
                    "trainq-watch-bench [--watchers N,N,..] [--jobs J] [--active A] [--points P] [--calls C]"
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other:?} (see --help)"),
        }
    }
    anyhow::ensure!(
        o.jobs > 0 && o.calls > 0,
        "--jobs and --calls must be at least 1"
    );
    anyhow::ensure!(o.active > 0, "--active must be at least 1");
    anyhow::ensure!(
        o.active * o.watchers.len() <= o.jobs,
        "--jobs must hold --active fresh jobs for every row"
    );
    Ok(o)
}

/// Streams per connection: the coordinator's default `--max-watchers-per-connection`.
const PER_CONNECTION: usize = 100;

/// Opens `n` WatchJob streams, the i-th on job `i % jobs.len()`, and reads each on a task of its
/// own, counting events. Returns the tasks (abort them to close the streams).
async fn open_watchers(
    url: &str,
    jobs: &[String],
    n: usize,
    events: Arc<AtomicU64>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::with_capacity(n);
    let mut client = None;
    for i in 0..n {
        if i % PER_CONNECTION == 0 {
            client = Some(JobServiceClient::new(channel(url).await?));
        }
        let c = client.as_mut().expect("a connection");
        let mut stream = c
            .watch_job(v1::WatchJobRequest {
                job_id: jobs[i % jobs.len()].clone(),
            })
            .await
            .with_context(|| format!("opening watcher {i}"))?
            .into_inner();
        let events = events.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(_)) = stream.next().await {
                events.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    Ok(tasks)
}

/// Claims `jobs` as a stand-in worker and reports `points` points to each every 10 ms until
/// aborted.
async fn report_metrics(
    url: &str,
    jobs: Vec<String>,
    points: usize,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut workers = WorkerServiceClient::new(channel(url).await?);
    let mut leases = Vec::new();
    for job_id in jobs {
        let claim = workers
            .claim_job(v1::ClaimJobRequest {
                job_id,
                worker_id: "watch-bench".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        anyhow::ensure!(claim.claimed, "the stand-in worker could not claim a job");
        leases.push(claim.lease.context("a lease")?);
    }
    Ok(tokio::spawn(async move {
        let mut step = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tick.tick().await;
            for lease in &leases {
                let batch = (0..points)
                    .map(|k| v1::MetricPoint {
                        name: "train/loss".into(),
                        step: step + k as u64,
                        epoch: 1,
                        value: 1.0 / (1.0 + (step + k as u64) as f64),
                    })
                    .collect();
                let sent = workers
                    .report_metrics(v1::ReportMetricsRequest {
                        lease: Some(lease.clone()),
                        points: batch,
                    })
                    .await;
                if sent.is_err() {
                    return;
                }
                // Keep the lease alive for long runs.
                let _ = workers
                    .heartbeat(v1::HeartbeatRequest {
                        lease: Some(lease.clone()),
                    })
                    .await;
            }
            step += points as u64;
        }
    }))
}

/// GetJob latencies of `calls` sequential calls on a connection of its own.
async fn time_get_job(url: &str, jobs: &[String], calls: usize) -> anyhow::Result<Vec<Duration>> {
    let mut c = JobServiceClient::new(channel(url).await?);
    for _ in 0..10 {
        c.get_job(v1::GetJobRequest {
            job_id: jobs[0].clone(),
        })
        .await?;
    }
    let mut took = Vec::with_capacity(calls);
    for i in 0..calls {
        let started = Instant::now();
        c.get_job(v1::GetJobRequest {
            job_id: jobs[i % jobs.len()].clone(),
        })
        .await
        .with_context(|| format!("GetJob call {i}"))?;
        took.push(started.elapsed());
    }
    Ok(took)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let most = o.watchers.iter().copied().max().unwrap_or(0);
    let env = TestEnv::new();
    let max_watchers = most.max(1).to_string();
    let coordinator = env
        .start_coordinator(&["--max-watchers", &max_watchers])
        .await;
    let url = coordinator.url();
    let mut jobs = Vec::with_capacity(o.jobs);
    {
        let mut c = JobServiceClient::new(channel(&url).await?);
        for i in 0..o.jobs {
            let spec: v1::JobSpec =
                serde_json::from_str(&mnist_spec_json(&format!("watch-bench-{i}"), 1, 256, 256))?;
            jobs.push(
                c.submit_job(v1::SubmitJobRequest {
                    spec: Some(spec),
                    request_id: String::new(),
                })
                .await?
                .into_inner()
                .job_id,
            );
        }
    }

    println!(
        "{} jobs stored; busy: {} of them report {} points every 10 ms; {} sequential GetJob calls per row",
        o.jobs, o.active, o.points, o.calls
    );
    println!("| watchers open | phase | GetJob p50 (ms) | GetJob p99 (ms) | watcher events/s |");
    println!("| --- | --- | --- | --- | --- |");
    for (row, &n) in o.watchers.iter().enumerate() {
        let active = jobs[row * o.active..(row + 1) * o.active].to_vec();
        let events = Arc::new(AtomicU64::new(0));
        let watchers = open_watchers(&url, &active, n, events.clone()).await?;
        let mut reporter = None;
        for phase in ["idle", "busy"] {
            if phase == "busy" {
                reporter = Some(report_metrics(&url, active.clone(), o.points).await?);
            }
            let (seen, started) = (events.load(Ordering::Relaxed), Instant::now());
            let took = time_get_job(&url, &jobs, o.calls).await?;
            let rate =
                (events.load(Ordering::Relaxed) - seen) as f64 / started.elapsed().as_secs_f64();
            println!(
                "| {n} | {phase} | {} | {} | {rate:.0} |",
                ms(quantile(&took, 0.5)),
                ms(quantile(&took, 0.99))
            );
            if phase == "busy" {
                if let Some(r) = reporter.take() {
                    r.abort();
                }
            }
        }
        for w in watchers {
            w.abort();
        }
        // Let the coordinator see the streams go.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Past the limits.
    let mut c = JobServiceClient::new(channel(&url).await?);
    let mut held = Vec::new();
    let mut per_connection = None;
    for _ in 0..=PER_CONNECTION {
        match c
            .watch_job(v1::WatchJobRequest {
                job_id: jobs[0].clone(),
            })
            .await
        {
            Ok(stream) => held.push(stream.into_inner()),
            Err(status) => {
                per_connection = Some(status.code());
                break;
            }
        }
    }
    println!();
    println!(
        "stream {} on one connection: {:?}",
        held.len() + 1,
        per_connection
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // And one past --max-watchers, on a connection of its own.
    let all = most.max(1);
    let open = open_watchers(&url, &jobs, all, Arc::new(AtomicU64::new(0))).await?;
    let past = JobServiceClient::new(channel(&url).await?)
        .watch_job(v1::WatchJobRequest {
            job_id: jobs[0].clone(),
        })
        .await
        .err()
        .map(|status| status.code());
    println!("stream {} in all (--max-watchers {all}): {past:?}", all + 1);
    for w in open {
        w.abort();
    }
    Ok(())
}

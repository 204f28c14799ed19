//! Web UI benchmark: the real coordinator (its `Server-Timing` header is the server's time),
//! Postgres and headless Chromium.
//!
//! - The runs page with `jobs` jobs stored (submitted through SubmitJob; every job gets two
//!   latest metrics, written straight into `job_metric_latest` to save an hour of claims):
//!   the first page, a filtered page and the page 20 pages in, `requests` times each.
//! - The run page of one job with `points` metric points (4 series, reported through
//!   ReportMetrics as a worker does): server time and bytes sent (downsampled to 1000 points a
//!   series on the server).
//! - A point reported to the coordinator until it is drawn in an open run page (the page's
//!   `trainqLive.lastPointAt`, the same clock), 20 times: median and max.
//!
//! Run: `cargo build --release -p server -p tests --bins && cargo run --release -p tests --bin
//! trainq-ui-bench -- [jobs] [points] [requests]` (defaults 10000, 1000000, 50).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use proto::v1::worker_service_client::WorkerServiceClient;
use proto::v1::{self, job_service_client::JobServiceClient};
use tests::bench::{arg, channel, quantile};
use tests::browser::Browser;
use tests::*;

const SERIES: [&str; 4] = ["train/loss", "train/accuracy", "test/loss", "test/accuracy"];

/// (server ms, bytes) of a GET, from the Server-Timing header.
fn timed_get(agent: &ureq::Agent, url: &str) -> anyhow::Result<(f64, usize)> {
    let mut r = agent.get(url).call()?;
    anyhow::ensure!(r.status() == 200, "GET {url}: {}", r.status());
    let timing = r
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("dur=").nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no Server-Timing on {url}"))?;
    let body = r.body_mut().read_to_vec()?;
    Ok((timing, body.len()))
}

/// p50 and p99 of samples in ms (as micro-second integers for the shared quantile).
fn p(samples: &[f64]) -> (f64, f64) {
    let us: Vec<u64> = samples.iter().map(|ms| (ms * 1000.0) as u64).collect();
    (
        quantile(&us, 0.5) as f64 / 1000.0,
        quantile(&us, 0.99) as f64 / 1000.0,
    )
}

fn spec(i: usize) -> v1::JobSpec {
    serde_json::from_str(&mnist_spec_json(&format!("bench-run-{i:05}"), 1, 64, 64))
        .expect("spec JSON")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let jobs: usize = arg(1, 10_000)?;
    let points: u64 = arg(2, 1_000_000)?;
    let requests: usize = arg(3, 50)?;
    let env = TestEnv::new();
    let http = format!("127.0.0.1:{}", free_port());
    // The bench holds its lease without heartbeats: a lease that outlasts it.
    let coordinator = env
        .start_coordinator(&["--http-listen", &http, "--lease-timeout-ms", "3600000"])
        .await;
    let ch = channel(&coordinator.url()).await?;
    let client = JobServiceClient::new(ch.clone());
    let mut workers = WorkerServiceClient::new(ch);
    let base = format!("http://{http}");

    let t = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..jobs)
        .map(|i| {
            let mut c = client.clone();
            async move { submit(&mut c, spec(i)).await }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let pool = env.pool().await;
    sqlx::query(
        "INSERT INTO job_metric_latest (job_id, name, step, epoch, value)
         SELECT id, m.name, 100, 1, random() FROM jobs, (VALUES ('test/loss'), ('test/accuracy')) AS m(name)",
    )
    .execute(&pool)
    .await?;
    eprintln!(
        "stored {} jobs in {:.1} s",
        ids.len(),
        t.elapsed().as_secs_f64()
    );

    // The job with the points: claimed by the bench as a worker.
    let heavy = ids[0].clone();
    let lease = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: heavy.clone(),
            worker_id: "ui-bench".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .lease
        .ok_or_else(|| anyhow::anyhow!("the heavy job was not claimed"))?;
    let t = Instant::now();
    let per_series = points / SERIES.len() as u64;
    for name in SERIES {
        for start in (0..per_series).step_by(10_000) {
            workers
                .report_metrics(v1::ReportMetricsRequest {
                    lease: Some(lease.clone()),
                    points: (start..(start + 10_000).min(per_series))
                        .map(|s| v1::MetricPoint {
                            name: name.into(),
                            step: s,
                            epoch: (s / 1000) as u32,
                            value: 1.0 / (s as f64 + 1.0),
                        })
                        .collect(),
                })
                .await?;
        }
    }
    eprintln!(
        "reported {} points in {:.1} s",
        per_series * SERIES.len() as u64,
        t.elapsed().as_secs_f64()
    );

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    // Page 20 of the runs table: follow the next-page links.
    let mut deep = "/".to_string();
    for _ in 0..20 {
        let body = agent
            .get(format!("{base}{deep}"))
            .call()?
            .body_mut()
            .read_to_string()?;
        let href = body
            .split("id=\"next-page\" href=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .ok_or_else(|| anyhow::anyhow!("no next page after {deep}"))?;
        deep = href.replace("&amp;", "&");
    }
    let cases = [
        ("runs page 1", "/".to_string()),
        (
            "runs, state=queued&name=run-0",
            "/?state=queued&name=run-0".to_string(),
        ),
        ("runs page 21", deep),
        ("run page, 1M points", format!("/runs/{heavy}")),
    ];
    println!(
        "| page ({jobs} jobs stored) | server p50 ms | server p99 ms | bytes |\n|---|---:|---:|---:|"
    );
    for (label, path) in &cases {
        let url = format!("{base}{path}");
        timed_get(&agent, &url)?; // warm-up
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..requests {
            let (ms, b) = timed_get(&agent, &url)?;
            times.push(ms);
            bytes = b;
        }
        let (p50, p99) = p(&times);
        println!("| {label} | {p50:.2} | {p99:.2} | {bytes} |");
    }

    // Reported point -> drawn in the open page.
    let browser = Browser::start()?;
    browser.goto(&format!("{base}/runs/{heavy}"))?;
    browser.wait_until(
        "window.trainqLive && window.trainqLive.charts >= 4",
        Duration::from_secs(30),
    )?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    for i in 0..20u64 {
        let step = per_series + i;
        let sent = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64() * 1000.0;
        workers
            .report_metrics(v1::ReportMetricsRequest {
                lease: Some(lease.clone()),
                points: vec![v1::MetricPoint {
                    name: "train/loss".into(),
                    step,
                    epoch: 1000,
                    value: 0.5,
                }],
            })
            .await?;
        browser.wait_until(
            &format!("window.trainqLive.lastStep['train/loss'] === {step}"),
            Duration::from_secs(10),
        )?;
        let shown = browser
            .execute("return window.trainqLive.lastPointAt", vec![])?
            .as_f64()
            .ok_or_else(|| anyhow::anyhow!("no lastPointAt"))?;
        latencies.push(shown - sent);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (p50, _) = p(&latencies);
    let max = latencies.iter().cloned().fold(0.0, f64::max);
    println!(
        "\n| reported point -> drawn in the open page (20) | median ms | max ms |\n|---|---:|---:|"
    );
    println!("| run page over SSE | {p50:.1} | {max:.1} |");
    drop(coordinator);
    Ok(())
}

//! Claim-path benchmark: the real coordinator, Postgres and Redis, and a pool of simulated idle
//! worker slots (no training: each pops from four queues in order with BZPOPMIN, as a worker
//! does, claims over gRPC and completes at once). Jobs are submitted at a fixed rate, spread over
//! the four queues with random priorities; the table gives submit -> claimed as the client and
//! slot see it (p50, p99, max), the rate reached, and the coordinator's own dispatch-latency
//! histogram (`trainq_dispatch_latency_seconds`: ready -> claimed) as the share of claims under
//! each bucket.
//!
//! Run: `cargo build --release -p server -p tests --bins && cargo run --release -p tests --bin
//! trainq-claim-bench -- [jobs] [jobs per second] [slots]` (defaults 2000, 200, 16).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::queue::Keys;
use proto::v1::{self, worker_service_client::WorkerServiceClient};
use rand::Rng as _;
use tests::bench::{arg, channel, ms, quantile};
use tests::*;

const QUEUES: [&str; 4] = ["q0", "q1", "q2", "q3"];

type Times = Arc<Mutex<HashMap<String, Instant>>>;

/// One simulated slot: pop, claim, complete, until `stop`.
async fn slot(
    i: u64,
    redis_url: String,
    keys: Keys,
    mut workers: WorkerServiceClient<tonic::transport::Channel>,
    claimed: Times,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let sets: Vec<String> = QUEUES.iter().map(|q| keys.ready(q)).collect();
    let worker_id = format!("sim-{i}");
    while !stop.load(Ordering::Relaxed) {
        let popped: Option<(String, String, f64)> = redis::cmd("BZPOPMIN")
            .arg(&sets)
            .arg(0.2)
            .query_async(&mut conn)
            .await?;
        let Some((_, id, _)) = popped else { continue };
        let answer = workers
            .claim_job(v1::ClaimJobRequest {
                job_id: id.clone(),
                worker_id: worker_id.clone(),
                device_kind: "cpu".into(),
                free_gpu_memory_mib: None,
            })
            .await?
            .into_inner();
        if !answer.claimed {
            continue;
        }
        let at = Instant::now();
        lock(&claimed).insert(id, at);
        workers
            .complete_job(v1::CompleteJobRequest {
                lease: answer.lease,
                final_step: 1,
            })
            .await?;
    }
    Ok(())
}

/// Locks, ignoring poisoning (a panicking task has already failed the bench).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs: u64 = arg(1, 2000)?;
    let rate: u64 = arg(2, 200)?;
    let slots: u64 = arg(3, 16)?;
    let env = TestEnv::new();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let coordinator = env
        .start_coordinator(&["--metrics-listen", &metrics_addr])
        .await;
    let channel = channel(&coordinator.url()).await?;
    let keys = Keys::new(env.redis_prefix.clone());
    let claimed: Times = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut pool = Vec::new();
    for i in 0..slots {
        pool.push(tokio::spawn(slot(
            i,
            redis_url(),
            keys.clone(),
            WorkerServiceClient::new(channel.clone()),
            claimed.clone(),
            stop.clone(),
        )));
    }
    let client = v1::job_service_client::JobServiceClient::new(channel.clone());
    let submitted: Times = Arc::default();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = Vec::new();
    for j in 0..jobs {
        tick.tick().await;
        let mut v: serde_json::Value =
            serde_json::from_str(&mnist_spec_json(&format!("claim-{j}"), 1, 64, 64))?;
        v["queue"] = QUEUES[(j % 4) as usize].into();
        v["priority"] = rand::rng().random_range(-5..=5).into();
        let spec: v1::JobSpec = serde_json::from_value(v)?;
        let mut client = client.clone();
        let submitted = submitted.clone();
        sends.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let id = submit(&mut client, spec).await?;
            lock(&submitted).insert(id, t0);
            anyhow::Ok(())
        }));
    }
    for s in sends {
        s.await??;
    }
    let submit_s = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    while lock(&claimed).len() < jobs as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for p in pool {
        p.await??;
    }
    let (submitted, claimed) = (lock(&submitted).clone(), lock(&claimed).clone());
    let latencies: Vec<Duration> = submitted
        .iter()
        .filter_map(|(id, t0)| claimed.get(id).map(|t| t.saturating_duration_since(*t0)))
        .collect();
    println!(
        "{jobs} jobs submitted at {rate}/s ({:.0}/s reached) over {} queues with priorities -5..=5, {slots} idle simulated slots",
        jobs as f64 / submit_s,
        QUEUES.len()
    );
    println!();
    println!("| claimed | submit -> claimed p50 (ms) | p99 (ms) | max (ms) |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| {} of {jobs} | {} | {} | {} |",
        latencies.len(),
        ms(quantile(&latencies, 0.5)),
        ms(quantile(&latencies, 0.99)),
        ms(quantile(&latencies, 1.0)),
    );
    let (_, text) = http_get(&metrics_addr, "/metrics").await?;
    let count = prometheus_sample(&text, "trainq_dispatch_latency_seconds_count").unwrap_or(0.0);
    println!();
    println!("coordinator's dispatch latency (ready -> claimed), {count} claims:");
    println!();
    println!("| under | share |");
    println!("| --- | --- |");
    for le in ["0.005", "0.01", "0.025", "0.05", "0.1"] {
        let n = prometheus_sample(
            &text,
            &format!("trainq_dispatch_latency_seconds_bucket{{le=\"{le}\"}}"),
        )
        .unwrap_or(0.0);
        println!(
            "| {} ms | {:.1}% |",
            (le.parse::<f64>()? * 1000.0).round(),
            100.0 * n / count.max(1.0)
        );
    }
    anyhow::ensure!(
        latencies.len() == jobs as usize,
        "only {} of {jobs} jobs were claimed",
        latencies.len()
    );
    Ok(())
}

//! Chaos, slow link: a worker reaches the coordinator through a throttling proxy
//! (`tests::proxy::Throttle`) so slow that one epoch's uploads (a checkpoint and a training
//! state, about 7 MB for the classifier) take longer than the lease timeout. Heartbeats run beside
//! the uploads for the whole attempt, so no lease may expire: the job succeeds on its first
//! attempt, every metric point is stored once, and the reaper counts no expiry.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::v1;
use tests::proxy::Throttle;
use tests::*;

/// 1 MB/s each way: a 5 MB training state alone takes 5 s, the lease is 3 s.
const LINK_BYTES_PER_S: u64 = 1_000_000;
const LEASE_MS: &str = "3000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_slower_than_the_lease_never_lose_it_and_the_job_succeeds_once() {
    let _slot = training_lock();
    let env = TestEnv::new();
    let coordinator = env
        .start_coordinator(&[
            "--lease-timeout-ms",
            LEASE_MS,
            "--reconcile-interval-ms",
            "300",
        ])
        .await;
    let upstream: SocketAddr = coordinator.addr.parse().expect("coordinator address");
    let link = Throttle::start(upstream, LINK_BYTES_PER_S)
        .await
        .expect("proxy");
    let mut worker = env.start_worker_at(
        &link.url(),
        "slow-worker",
        &shared_data_dir(),
        &["--heartbeat-ms", "500", "--report-ms", "200"],
    );
    let mut client = coordinator.client().await;
    let spec: v1::JobSpec =
        serde_json::from_str(&mnist_spec_json("slow-link", 2, 1000, 500)).expect("spec");
    let id = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    let started = Instant::now();
    let job = wait_terminal(&mut client, &id, Duration::from_secs(600))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n--- worker ---\n{}", worker.log()));
    let took = started.elapsed();
    assert_eq!(
        job.state(),
        v1::JobState::Succeeded,
        "{job:?}\n--- worker ---\n{}\n--- coordinator ---\n{}",
        worker.log(),
        coordinator.proc.log()
    );
    assert_eq!(
        job.attempts.len(),
        1,
        "one attempt, no lease lost: {:?}\n--- worker ---\n{}",
        job.attempts,
        worker.log()
    );
    assert_eq!(job.failed_attempts, 0);
    let pool = env.pool().await;
    let (points, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (name, step)) FROM metric_points WHERE job_id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .expect("count points");
    assert!(points > 0);
    assert_eq!(points, distinct, "no point stored twice");
    // What the worker sent over the slow link: every upload (checkpoints and training states,
    // though a successful job keeps only its checkpoints), metric reports and heartbeats.
    let uploaded = link.bytes_sent_upstream();
    // The scenario only means something if the link was slower than the lease for an epoch.
    let lease_s: f64 = LEASE_MS.parse::<f64>().expect("ms") / 1000.0;
    assert!(
        uploaded as f64 / LINK_BYTES_PER_S as f64 / 2.0 > lease_s,
        "an epoch's uploads ({uploaded} bytes sent over two epochs) must take longer than the lease"
    );
    println!(
        "slow link {LINK_BYTES_PER_S} B/s, lease {LEASE_MS} ms: succeeded in {took:.1?}, 1 attempt, {points} points, {uploaded} bytes sent to the coordinator"
    );
    worker.kill();
}

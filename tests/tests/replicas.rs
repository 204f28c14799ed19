//! Several coordinators against one Postgres and one Redis: two replicas behind a TCP
//! balancer, two workers. A job submitted through replica A and watched on replica B streams
//! every state change and point to B's watcher (the change notifications travel through
//! Postgres); killing A mid-run loses nothing (the workers reconnect through the balancer to B,
//! B's watchers go on, every point is stored once); and the background loops (the reconciler,
//! the lease reaper) run on exactly one replica at a time: the one that holds the leadership.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use proto::v1::{self, job_event::Event, job_service_client::JobServiceClient};
use tests::proxy::Balancer;
use tests::*;
use tokio::time::Instant;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

/// Short timings, so that a lost leader or lease is noticed within seconds.
const COORDINATOR_FLAGS: &[&str] = &[
    "--lease-timeout-ms",
    "4000",
    "--reconcile-interval-ms",
    "300",
    "--retry-backoff-ms",
    "200",
];
const WORKER_FLAGS: &[&str] = &["--heartbeat-ms", "300", "--report-ms", "200"];

/// 4 epochs of 1,024 examples at batch 32: 128 steps, long enough to kill a replica mid-run.
fn spec(i: usize) -> v1::JobSpec {
    serde_json::from_value(serde_json::json!({
        "name": format!("replicas-{i}"),
        "labels": {"suite": "replicas"},
        "training": {
            "epochs": 4, "batchSize": 32, "learningRate": 0.001, "optimizer": "OPTIMIZER_ADAM",
            "seed": i, "maxTrainExamples": 1024, "maxTestExamples": 200, "logEverySteps": 4,
            "checkpointEverySteps": 16
        },
        "maxAttempts": 3,
        "mnistClassifier": {}
    }))
    .expect("a valid spec")
}

struct Replica {
    coordinator: Coordinator,
    metrics: String,
}

impl Replica {
    async fn start(env: &TestEnv, name: &str) -> Replica {
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut flags = vec!["--metrics-listen", metrics.as_str()];
        flags.extend_from_slice(COORDINATOR_FLAGS);
        let coordinator = env.start_coordinator_at(name, free_port(), &flags).await;
        Replica {
            coordinator,
            metrics,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.coordinator.addr.parse().expect("a socket address")
    }

    /// A sample of this replica's /metrics (`None` when it does not answer or lacks it).
    async fn sample(&self, series: &str) -> Option<f64> {
        let (status, body) = http_get(&self.metrics, "/metrics").await.ok()?;
        (status == 200).then_some(())?;
        prometheus_sample(&body, series)
    }

    async fn leads(&self) -> bool {
        self.sample("trainq_leader").await == Some(1.0)
    }

    /// Rounds of the lease reaper this replica ran.
    async fn reaper_rounds(&self) -> f64 {
        self.sample("trainq_background_rounds_total{loop=\"lease_reaper\"}")
            .await
            .expect("the reaper's round counter")
    }
}

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a watcher saw of one job.
#[derive(Debug, Default, Clone)]
struct Seen {
    states: Vec<v1::JobState>,
    points: BTreeSet<(String, u64)>,
    /// Points received more than once.
    repeated: usize,
}

/// Follows `id` on `jobs` until the stream ends, sharing what it saw.
fn watch(
    mut jobs: JobServiceClient<Channel>,
    id: String,
) -> (
    tokio::sync::watch::Receiver<Seen>,
    tokio::task::JoinHandle<Result<Seen, tonic::Status>>,
) {
    let (tx, rx) = tokio::sync::watch::channel(Seen::default());
    let task = tokio::spawn(async move {
        let mut stream = jobs
            .watch_job(v1::WatchJobRequest { job_id: id })
            .await?
            .into_inner();
        let mut seen = Seen::default();
        while let Some(event) = stream.next().await {
            match event?.event {
                Some(Event::Job(job)) if seen.states.last() != Some(&job.state()) => {
                    seen.states.push(job.state());
                }
                Some(Event::Job(_)) => {}
                Some(Event::Metrics(batch)) => {
                    for p in batch.points {
                        if !seen.points.insert((p.name, p.step)) {
                            seen.repeated += 1;
                        }
                    }
                }
                None => {}
            }
            tx.send_replace(seen.clone());
        }
        Ok(seen)
    });
    (rx, task)
}

/// Every stored point of a job, as (name, step).
async fn stored_points(jobs: &mut JobServiceClient<Channel>, id: &str) -> BTreeSet<(String, u64)> {
    all_points(jobs, id)
        .await
        .expect("GetMetrics")
        .into_iter()
        .map(|p| (p.name, p.step))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_to_one_replica_is_watched_whole_on_another_and_killing_the_first_loses_nothing(
) {
    let _guard = training_lock();
    let env = TestEnv::new();
    // A first, alone, so that it leads; B then follows.
    let mut a = Replica::start(&env, "coordinator-a").await;
    wait_for("A leads", WAIT, async || a.leads().await).await;
    let b = Replica::start(&env, "coordinator-b").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        b.sample("trainq_leader").await,
        Some(0.0),
        "B follows while A leads"
    );
    assert!(a.leads().await, "A still leads");
    let rounds = b.reaper_rounds().await;
    assert_eq!(rounds, 0.0, "the follower runs no reaper round");
    assert!(a.reaper_rounds().await > 0.0, "the leader reaps");

    // Workers reach the replicas through a balancer, as through a Kubernetes Service.
    let balancer = Balancer::start(vec![a.addr(), b.addr()])
        .await
        .expect("balancer");
    let data = shared_data_dir();
    let _w1 = env.start_worker_at(&balancer.url(), "worker-1", &data, WORKER_FLAGS);
    let _w2 = env.start_worker_at(&balancer.url(), "worker-2", &data, WORKER_FLAGS);

    let mut on_a = a.coordinator.client().await;
    let mut on_b = b.coordinator.client().await;
    let mut ids = Vec::new();
    let mut watchers = Vec::new();
    for i in 0..2 {
        let id = submit(&mut on_a, spec(i)).await.expect("submit through A");
        watchers.push(watch(on_b.clone(), id.clone()));
        ids.push(id);
    }

    // Both running with points seen on B (through Postgres: A stored them), then A dies.
    for (rx, _) in &watchers {
        let mut rx = rx.clone();
        tokio::time::timeout(
            Duration::from_secs(120),
            rx.wait_for(|s| s.states.contains(&v1::JobState::Running) && s.points.len() >= 3),
        )
        .await
        .expect("each job running, with points seen on B")
        .expect("the watcher is alive");
    }
    assert!(
        balancer.connections()[0] >= 1,
        "a worker talks to A: {:?}",
        balancer.connections()
    );
    // The CLI follows the first job through a balancer of its own, whose first connection goes
    // to A: when A dies, `trainq watch` opens the stream again, through B.
    let cli_balancer = Balancer::start(vec![a.addr(), b.addr()])
        .await
        .expect("balancer");
    let mut cli = std::process::Command::new(binary("trainq"));
    cli.args(["watch", &ids[0]])
        .env("TRAINQ_SERVER", cli_balancer.url())
        .env_remove("TRAINQ_TOKEN");
    let mut cli = Proc::spawn("trainq-watch", cli, env.dir.path()).expect("trainq watch");
    wait_for("the CLI watches through A", WAIT, async || {
        cli_balancer.connections()[0] >= 1 && cli.log().contains(" step ")
    })
    .await;
    a.coordinator.proc.kill();

    // B takes over the background loops and the workers; its watchers go on to the end.
    wait_for(
        "B leads after A died",
        Duration::from_secs(15),
        async || b.leads().await,
    )
    .await;
    for ((_, task), id) in watchers.into_iter().zip(&ids) {
        let seen = tokio::time::timeout(Duration::from_secs(180), task)
            .await
            .expect("the job finishes")
            .expect("the watcher task")
            .expect("B's stream stays up after A died");
        let job = wait_terminal(&mut on_b, id, WAIT)
            .await
            .expect("final state");
        assert_eq!(job.state(), v1::JobState::Succeeded, "{job:?}");
        assert_eq!(job.attempt, 1, "no attempt was lost with A: {job:?}");
        assert_eq!(
            seen.states.last(),
            Some(&v1::JobState::Succeeded),
            "{seen:?}"
        );
        let order = [
            v1::JobState::Queued,
            v1::JobState::Running,
            v1::JobState::Succeeded,
        ];
        let positions: Vec<usize> = seen
            .states
            .iter()
            .map(|s| {
                order
                    .iter()
                    .position(|o| o == s)
                    .expect("a state of a good run")
            })
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1])
                && seen.states.contains(&v1::JobState::Running),
            "states in order, running among them: {:?}",
            seen.states
        );
        let stored = stored_points(&mut on_b, id).await;
        let loss_steps: BTreeSet<u64> = stored
            .iter()
            .filter(|(n, _)| n == "train/loss")
            .map(|(_, s)| *s)
            .collect();
        let expected: BTreeSet<u64> = (1..=32).map(|k| k * 4).collect();
        assert_eq!(
            loss_steps, expected,
            "every train/loss point of 128 steps is stored"
        );
        assert_eq!(
            seen.points, stored,
            "B's watcher saw exactly the stored points"
        );
        assert_eq!(seen.repeated, 0, "and each once");
    }

    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = cli.try_exit_status() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "trainq watch still runs:\n{}",
            cli.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = cli.log();
    assert_eq!(status.code(), Some(0), "trainq watch:\n{log}");
    assert!(log.contains("the stream broke"), "it reconnected:\n{log}");
    assert!(log.contains("succeeded at step 128"), "{log}");
    assert!(
        cli_balancer.connections()[1] >= 1,
        "{:?}",
        cli_balancer.connections()
    );

    // Exactly one replica reaps: A comes back as a follower while B leads.
    let a_again = Replica::start(&env, "coordinator-a-again").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(b.leads().await, "B keeps the leadership");
    assert_eq!(a_again.sample("trainq_leader").await, Some(0.0));
    assert_eq!(
        a_again.reaper_rounds().await,
        0.0,
        "the follower runs no reaper round"
    );
    let before = b.reaper_rounds().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        b.reaper_rounds().await > before,
        "the leader's reaper goes on"
    );
    // Only the leader ever said it leads.
    let leads_logged = |log: &str| log.contains("now leads the background loops");
    assert!(leads_logged(&b.coordinator.proc.log()));
    assert!(
        !leads_logged(&a_again.coordinator.proc.log()),
        "{}",
        a_again.coordinator.proc.log()
    );
}

//! End-to-end tests of the walking skeleton: the real coordinator and worker binaries, the real
//! grpcurl, real Postgres and Redis, real MNIST and real libtorch training on CPU.

use std::time::{Duration, Instant};

use proto::v1::{self, JobState};
use tests::*;
use tokio_stream::StreamExt;

fn parse_spec(json: &str) -> v1::JobSpec {
    serde_json::from_str(json).expect("spec json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_the_services_through_reflection_and_health_says_serving() {
    let env = TestEnv::new();
    let coordinator = env.start_coordinator(&[]).await;

    let list = coordinator.grpcurl(None, &["list"]);
    assert!(list.success, "grpcurl list failed: {}", list.stderr);
    for service in [
        "trainq.v1.JobService",
        "trainq.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            list.stdout.lines().any(|l| l.trim() == service),
            "{service} missing from:\n{}",
            list.stdout
        );
    }
    let describe = coordinator.grpcurl(None, &["describe", "trainq.v1.JobSpec"]);
    assert!(
        describe.success && describe.stdout.contains("mnist_classifier"),
        "{describe:?}"
    );

    let health = coordinator
        .grpcurl(Some(r#"{"service":""}"#), &["grpc.health.v1.Health/Check"])
        .json();
    assert_eq!(health["status"], "SERVING");
    let health = coordinator
        .grpcurl(
            Some(r#"{"service":"trainq.v1.JobService"}"#),
            &["grpc.health.v1.Health/Check"],
        )
        .json();
    assert_eq!(health["status"], "SERVING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_from_grpcurl_is_invalid_argument_naming_the_field_and_writes_nothing() {
    let env = TestEnv::new();
    let coordinator = env.start_coordinator(&[]).await;
    let cases = [
        (
            r#"{"spec":{"name":"x","training":{"epochs":1,"batchSize":8,"learningRate":0.1}}}"#,
            "spec.experiment",
        ),
        (
            r#"{"spec":{"name":"x","training":{"epochs":0,"batchSize":8,"learningRate":0.1},"mnistClassifier":{}}}"#,
            "spec.training.epochs",
        ),
        (
            r#"{"spec":{"name":"x","training":{"epochs":1,"batchSize":9000,"learningRate":0.1},"mnistClassifier":{}}}"#,
            "spec.training.batch_size",
        ),
        (
            r#"{"spec":{"name":"x","training":{"epochs":1,"batchSize":8,"learningRate":-1},"mnistClassifier":{}}}"#,
            "spec.training.learning_rate",
        ),
        (
            r#"{"spec":{"name":"","training":{"epochs":1,"batchSize":8,"learningRate":0.1},"mnistClassifier":{}}}"#,
            "spec.name",
        ),
        (r#"{}"#, "spec"),
    ];
    for (data, field) in cases {
        let out = coordinator.grpcurl(Some(data), &["trainq.v1.JobService/SubmitJob"]);
        assert!(!out.success, "{data} was accepted");
        assert!(
            out.stderr.contains("InvalidArgument"),
            "{data}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains(&format!("{field}:")),
            "{data}: expected {field} in {}",
            out.stderr
        );
    }
    let unknown = coordinator.grpcurl(
        Some(r#"{"jobId":"6f1c1a52-1d1e-4c55-9a53-000000000000"}"#),
        &["trainq.v1.JobService/GetJob"],
    );
    assert!(unknown.stderr.contains("NotFound"), "{unknown:?}");

    let pool = env.pool().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 0, "rejected submissions must not write rows");
}

/// The acceptance run of the walking skeleton: one job through grpcurl, one through the Rust
/// client; 5,000 train and 1,000 test images, two epochs, Adam 1e-3, batch 64, seed 42, CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mnist_jobs_submitted_with_grpcurl_and_rust_train_to_ninety_percent_and_land_in_postgres() {
    let _guard = training_lock();
    let env = TestEnv::new();
    let coordinator = env.start_coordinator(&[]).await;
    let mut client = coordinator.client().await;

    let started = Instant::now();
    let spec = mnist_spec_json("mnist-grpcurl", 2, 5000, 1000);
    let submitted = coordinator
        .grpcurl(
            Some(&format!(r#"{{"spec":{spec}}}"#)),
            &["trainq.v1.JobService/SubmitJob"],
        )
        .json();
    let grpcurl_id = submitted["jobId"]
        .as_str()
        .expect("jobId in grpcurl output")
        .to_string();
    assert_eq!(submitted["state"], "JOB_STATE_QUEUED");

    let spec = parse_spec(&mnist_spec_json("mnist-rust", 2, 5000, 1000));
    let rust_id = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await
        .expect("submit from rust")
        .into_inner()
        .job_id;

    // Watch the first job from before the worker exists, so the stream sees every state.
    let mut watch = client
        .watch_job(v1::WatchJobRequest {
            job_id: grpcurl_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    let worker = env.start_worker(&coordinator, "worker-1", &[]);

    let mut states = Vec::new();
    let mut streamed_points = 0usize;
    let mut first_step_after = None;
    let watch_deadline = Duration::from_secs(900);
    while let Some(event) = tokio::time::timeout(watch_deadline, watch.next())
        .await
        .expect("watch stalled")
    {
        match event.expect("watch event").event {
            Some(v1::job_event::Event::Job(job)) if states.last() != Some(&job.state()) => {
                states.push(job.state());
            }
            Some(v1::job_event::Event::Job(_)) => {}
            Some(v1::job_event::Event::Metrics(batch)) => {
                if first_step_after.is_none() && !batch.points.is_empty() {
                    first_step_after = Some(started.elapsed());
                }
                streamed_points += batch.points.len();
            }
            None => {}
        }
    }
    assert_eq!(
        states.first(),
        Some(&JobState::Queued),
        "states seen: {states:?}"
    );
    assert!(
        states.contains(&JobState::Running),
        "states seen: {states:?}"
    );
    assert_eq!(
        states.last(),
        Some(&JobState::Succeeded),
        "states seen: {states:?}"
    );
    assert!(streamed_points > 0, "WatchJob streamed no metric points");

    let pool = env.pool().await;
    for id in [&grpcurl_id, &rust_id] {
        let job = wait_terminal(&mut client, id, Duration::from_secs(900))
            .await
            .expect("job ends");
        assert_eq!(job.state(), JobState::Succeeded, "job {id}: {}", job.error);
        assert_eq!(job.attempt, 1);
        assert_eq!(job.worker_id, "worker-1");
        assert!(job.started_at.is_some() && job.finished_at.is_some());
        let accuracy = latest(&job, "test/accuracy").expect("test/accuracy reported");
        assert!(
            accuracy >= 0.90,
            "job {id}: test accuracy {accuracy} < 0.90"
        );

        let uuid: uuid::Uuid = id.parse().expect("uuid");
        let (state, attempt): (String, i32) =
            sqlx::query_as("SELECT state, attempt FROM jobs WHERE id = $1")
                .bind(uuid)
                .fetch_one(&pool)
                .await
                .expect("job row");
        assert_eq!((state.as_str(), attempt), ("succeeded", 1));
        let per_name: Vec<(String, i64)> = sqlx::query_as(
            "SELECT name, count(*) FROM metric_points WHERE job_id = $1 GROUP BY name ORDER BY name",
        )
        .bind(uuid)
        .fetch_all(&pool)
        .await
        .expect("metric rows");
        let count = |n: &str| {
            per_name
                .iter()
                .find(|(name, _)| name == n)
                .map(|(_, c)| *c)
                .unwrap_or(0)
        };
        assert_eq!(
            count("test/accuracy"),
            2,
            "one test/accuracy per epoch: {per_name:?}"
        );
        assert_eq!(count("test/loss"), 2, "{per_name:?}");
        // 2 epochs x floor(5000/64) = 156 steps: a train/loss point every 20 steps, and one for
        // the last, partial window at step 156.
        assert_eq!(count("train/loss"), 156 / 20 + 1, "{per_name:?}");
        let last_step: i64 = sqlx::query_scalar(
            "SELECT max(step) FROM metric_points WHERE job_id = $1 AND name = 'test/accuracy'",
        )
        .bind(uuid)
        .fetch_one(&pool)
        .await
        .expect("max step");
        assert_eq!(last_step, 156, "epoch metrics sit at the epoch's last step");
    }

    let metrics = client
        .get_metrics(v1::GetMetricsRequest {
            job_id: rust_id.clone(),
            names: vec!["train/loss".into()],
            ..Default::default()
        })
        .await
        .expect("get metrics")
        .into_inner();
    assert_eq!(metrics.points.len(), 8);
    assert_eq!(metrics.points.last().map(|p| p.step), Some(156));
    assert!(metrics.points.windows(2).all(|w| w[0].step < w[1].step));

    let listed = client
        .list_jobs(v1::ListJobsRequest {
            states: vec![JobState::Succeeded as i32],
            labels: [("suite".to_string(), "system".to_string())].into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.jobs.len(), 1);
    assert!(!listed.next_page_token.is_empty(), "a second page exists");
    if let Some(t) = first_step_after {
        eprintln!("submit -> first metric batch streamed: {t:?}");
    }
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_stops_the_worker_which_then_takes_the_next_job() {
    let _guard = training_lock();
    let env = TestEnv::new();
    let coordinator = env.start_coordinator(&[]).await;
    let mut client = coordinator.client().await;
    // The default heartbeat (1 s), through which the worker learns of the cancellation.
    let _worker = env.start_worker(&coordinator, "worker-c", &[]);

    // Long enough that it cannot finish on its own during the test.
    let long = parse_spec(&mnist_spec_json("long", 50, 0, 1000));
    let long_id = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(long),
            request_id: String::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let job = client
            .get_job(v1::GetJobRequest {
                job_id: long_id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        if job.state() == JobState::Running && !job.latest_metrics.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "long job never started training: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cancelled = client
        .cancel_job(v1::CancelJobRequest {
            job_id: long_id.clone(),
            reason: "test".into(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    let cancelled_at = Instant::now();

    // The worker is free again only once it has stopped the cancelled job.
    let next = parse_spec(&mnist_spec_json("next", 1, 256, 256));
    let next_id = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(next),
            request_id: String::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let job = client
            .get_job(v1::GetJobRequest {
                job_id: next_id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        if job.state() != JobState::Queued {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not stop the cancelled job within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "cancel -> worker free for the next job: {:?}",
        cancelled_at.elapsed()
    );
    let next = wait_terminal(&mut client, &next_id, Duration::from_secs(300))
        .await
        .expect("next job ends");
    assert_eq!(next.state(), JobState::Succeeded, "{}", next.error);
    let long = client
        .get_job(v1::GetJobRequest { job_id: long_id })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        long.state(),
        JobState::Cancelled,
        "a cancelled job stays cancelled"
    );
}

#[test]
fn the_worker_runs_a_spec_file_standalone_and_rejects_a_bad_one_naming_the_field() {
    let _guard = training_lock();
    let dir = tempfile::tempdir().expect("tmp");
    let good = dir.path().join("good.json");
    std::fs::write(&good, mnist_spec_json("standalone", 1, 512, 256)).expect("write spec");
    let out = std::process::Command::new(binary("trainq-worker"))
        .arg("run")
        .arg(&good)
        .args([
            "--json",
            "--device",
            "cpu",
            "--torch-threads",
            "1",
            "--data-dir",
        ])
        .arg(shared_data_dir())
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .expect("run standalone");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "standalone run failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("test/accuracy"),
        "no test metrics printed:\n{stdout}"
    );
    assert!(
        dir.path().join("out/epoch-001.safetensors").exists(),
        "the standalone run wrote no checkpoint into --out"
    );

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"name":"b","training":{"epochs":1,"batchSize":0,"learningRate":0.1},"mnistClassifier":{}}"#)
        .expect("write spec");
    let out = std::process::Command::new(binary("trainq-worker"))
        .arg("run")
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec.training.batch_size"), "{stderr}");
}

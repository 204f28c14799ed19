//! Operations, end to end: the coordinator's and the worker's Prometheus endpoints after a real
//! job, and JSON log lines in which every line about a job carries its id and attempt.

use std::time::Duration;

use proto::v1::{self, JobState};
use tests::*;

/// Every JSON log line of `log` that names a job (in its fields or in one of its spans). Lines
/// that are not log records (libtorch writes some of its own) are skipped; a log record that is
/// not valid JSON panics.
fn job_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .filter(|line| line.to_string().contains("\"job_id\""))
        .collect()
}

/// Whether the line carries `attempt` next to each `job_id` it has: in its fields, its span or
/// one of its spans.
fn carries_attempt(line: &serde_json::Value) -> bool {
    let mut places = vec![&line["fields"], &line["span"]];
    if let Some(spans) = line["spans"].as_array() {
        places.extend(spans.iter());
    }
    places
        .into_iter()
        .filter(|p| p.get("job_id").is_some())
        .all(|p| p.get("attempt").is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoints_count_a_real_job_and_every_job_log_line_carries_id_and_attempt() {
    let _guard = training_lock();
    let env = TestEnv::new();
    let coordinator_metrics = format!("127.0.0.1:{}", free_port());
    let worker_metrics = format!("127.0.0.1:{}", free_port());
    let coordinator = env
        .start_coordinator(&[
            "--metrics-listen",
            &coordinator_metrics,
            "--log-format",
            "json",
        ])
        .await;
    let mut client = coordinator.client().await;
    let spec: v1::JobSpec =
        serde_json::from_str(&mnist_spec_json("observed", 2, 512, 256)).expect("spec");
    let id = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    let (status, text) = http_get(&coordinator_metrics, "/metrics")
        .await
        .expect("scrape the coordinator");
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        prometheus_sample(&text, "trainq_jobs{state=\"queued\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        prometheus_sample(&text, "trainq_queue_depth{queue=\"default\"}"),
        Some(1.0),
        "{text}"
    );

    let mut worker = env.start_worker(
        &coordinator,
        "observer",
        &["--metrics-listen", &worker_metrics, "--log-format", "json"],
    );
    let job = wait_terminal(&mut client, &id, Duration::from_secs(240))
        .await
        .expect("job ends");
    assert_eq!(job.state(), JobState::Succeeded, "{}", job.error);

    let (_, text) = http_get(&coordinator_metrics, "/metrics")
        .await
        .expect("scrape the coordinator");
    for (series, want) in [
        ("trainq_jobs{state=\"succeeded\"}", 1.0),
        ("trainq_jobs{state=\"queued\"}", 0.0),
        ("trainq_queue_depth{queue=\"default\"}", 0.0),
        ("trainq_dispatch_latency_seconds_count", 1.0),
        ("trainq_jobs_finished_total{state=\"succeeded\"}", 1.0),
        ("trainq_lease_expiries_total", 0.0),
    ] {
        assert_eq!(
            prometheus_sample(&text, series),
            Some(want),
            "{series}:\n{text}"
        );
    }
    let claims = prometheus_sample(
        &text,
        "trainq_rpc_duration_seconds_count{code=\"0\",method=\"ClaimJob\",service=\"trainq.v1.WorkerService\"}",
    );
    assert_eq!(claims, Some(1.0), "{text}");
    let reports = prometheus_sample(
        &text,
        "trainq_rpc_duration_seconds_count{code=\"0\",method=\"ReportMetrics\",service=\"trainq.v1.WorkerService\"}",
    )
    .unwrap_or(0.0);
    assert!(reports >= 1.0, "{text}");

    let (status, text) = http_get(&worker_metrics, "/metrics")
        .await
        .expect("scrape the worker");
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        prometheus_sample(&text, "trainq_worker_jobs_total{outcome=\"succeeded\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        prometheus_sample(&text, "trainq_worker_busy"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        prometheus_sample(&text, "trainq_worker_slots"),
        Some(1.0),
        "{text}"
    );
    let points = prometheus_sample(&text, "trainq_worker_metric_points_total").unwrap_or(0.0);
    // Per epoch at least test/loss, test/accuracy and train/images_per_s.
    assert!(points >= 6.0, "{text}");
    assert!(
        prometheus_sample(&text, "trainq_worker_gpu_metrics_available").is_some(),
        "{text}"
    );

    worker
        .terminate(Duration::from_secs(20))
        .expect("the worker stops on SIGTERM");
    let worker_log = worker.log();
    let lines = job_lines(&worker_log);
    let about_this_job: Vec<_> = lines
        .iter()
        .filter(|l| l.to_string().contains(&id))
        .collect();
    // Claimed, two epochs on the training thread, succeeded.
    let epochs = about_this_job
        .iter()
        .filter(|l| l["fields"]["message"] == "epoch finished")
        .count();
    assert_eq!(epochs, 2, "{worker_log}");
    assert!(about_this_job.len() >= 4, "{worker_log}");
    for line in &lines {
        assert!(
            carries_attempt(line),
            "a job log line without its attempt: {line}"
        );
    }
    let coordinator_log = coordinator.proc.log();
    let lines = job_lines(&coordinator_log);
    assert!(
        lines.iter().filter(|l| l.to_string().contains(&id)).count() >= 3,
        "submitted, claimed, succeeded: {coordinator_log}"
    );
    for line in &lines {
        assert!(
            carries_attempt(line),
            "a job log line without its attempt: {line}"
        );
    }
}

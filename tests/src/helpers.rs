//! What the scenarios share once a coordinator runs: polling a job to its end, reading metrics
//! (GetJob's latest values, a Prometheus scrape), running the real `trainq` CLI, and the spec of
//! the walking-skeleton MNIST run.
//!
//! Must not start services or binaries other than the CLI (that is [`crate::coordinator`]).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::bail;
use proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

use crate::coordinator::Coordinator;
use crate::locate::binary;

/// `GET path` over plain HTTP/1.0 (a Prometheus endpoint): the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("incomplete HTTP response: {response}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status line: {head}"))?;
    Ok((status, body.to_string()))
}

/// The value of the sample `series` (its name and labels exactly as exposed) in a Prometheus
/// text scrape.
pub fn prometheus_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Runs the real `trainq` CLI in `dir` against `coordinator`, with no token and no address
/// inherited from the environment.
pub fn trainq(coordinator: &Coordinator, dir: &Path, args: &[&str]) -> Output {
    Command::new(binary("trainq"))
        .args(args)
        .current_dir(dir)
        .env("TRAINQ_SERVER", coordinator.url())
        .env_remove("TRAINQ_TOKEN")
        .output()
        .expect("running trainq")
}

/// Asserts that a finished command exited with `code`, showing both streams when it did not;
/// returns its stdout.
pub fn expect_exit(out: &Output, code: i32, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Submits `spec` (no request id) and returns the new job's id.
pub async fn submit(
    client: &mut JobServiceClient<Channel>,
    spec: proto::v1::JobSpec,
) -> anyhow::Result<String> {
    let answer = client
        .submit_job(proto::v1::SubmitJobRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await?;
    Ok(answer.into_inner().job_id)
}

/// Polls GetJob until the job is in a terminal state or `timeout` passes.
pub async fn wait_terminal(
    client: &mut JobServiceClient<Channel>,
    job_id: &str,
    timeout: Duration,
) -> anyhow::Result<proto::v1::Job> {
    let deadline = Instant::now() + timeout;
    loop {
        let job = client
            .get_job(proto::v1::GetJobRequest {
                job_id: job_id.into(),
            })
            .await?
            .into_inner();
        if job.state().is_terminal() {
            return Ok(job);
        }
        if Instant::now() > deadline {
            bail!("job {job_id} still {:?} after {timeout:?}", job.state());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The latest value of a metric as GetJob reports it.
pub fn latest(job: &proto::v1::Job, name: &str) -> Option<f64> {
    job.latest_metrics
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.value)
}

/// The spec of the walking-skeleton classifier run: real MNIST subset, pinned hyper-parameters.
pub fn mnist_spec_json(name: &str, epochs: u32, train: u32, test: u32) -> String {
    serde_json::json!({
        "name": name,
        "labels": {"suite": "system"},
        "training": {
            "epochs": epochs, "batchSize": 64, "learningRate": 0.001, "optimizer": "OPTIMIZER_ADAM",
            "seed": 42, "maxTrainExamples": train, "maxTestExamples": test, "logEverySteps": 20
        },
        "mnistClassifier": {}
    })
    .to_string()
}

/// Every stored metric point of a job, in (name, step) order, following GetMetrics' pages.
pub async fn all_points(
    client: &mut JobServiceClient<Channel>,
    job_id: &str,
) -> anyhow::Result<Vec<proto::v1::MetricPoint>> {
    let mut points = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .get_metrics(proto::v1::GetMetricsRequest {
                job_id: job_id.into(),
                page_size: 5000,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        points.extend(page.points);
        if page.next_page_token.is_empty() {
            return Ok(points);
        }
        page_token = page.next_page_token;
    }
}

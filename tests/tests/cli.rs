//! System tests of the `trainq` CLI: the real binary against a real coordinator (and a real
//! worker where a job must train), through the harness in tests/src/lib.rs.

use std::process::{Command, Output};

use tests::*;

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("trainq printed no JSON ({e}): {}", stdout(out)))
}

const YAML_SPEC: &str = "\
# one tiny epoch of the seed's MNIST classifier
name: cli-mnist
labels:
  suite: cli
training:
  epochs: 1
  batchSize: 64
  learningRate: 0.001
  optimizer: OPTIMIZER_ADAM
  seed: 42
  maxTrainExamples: 256
  maxTestExamples: 256
  logEverySteps: 1
mnistClassifier: {}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yaml_spec_submitted_with_trainq_is_watched_to_success_and_its_metrics_artifacts_and_charts_can_be_read(
) {
    let _guard = training_lock();
    let env = TestEnv::new();
    let coordinator = env.start_coordinator(&[]).await;
    let _worker = env.start_worker(&coordinator, "cli-worker", &[]);
    let dir = env.dir.path();
    std::fs::write(dir.join("spec.yaml"), YAML_SPEC).expect("write spec");

    let out = trainq(&coordinator, dir, &["submit", "spec.yaml"]);
    expect_exit(&out, 0, "submit");
    let id = stdout(&out).trim().to_string();
    assert_eq!(id.len(), 36, "submit prints the job id: {id:?}");

    // stdout is a pipe here, so watch prints plain lines, and exits 0 on success.
    let out = trainq(&coordinator, dir, &["watch", &id]);
    expect_exit(&out, 0, "watch");
    let lines = stdout(&out);
    assert!(lines.contains("succeeded"), "{lines}");
    assert!(
        lines.contains("step "),
        "watch shows progress lines: {lines}"
    );

    let out = trainq(&coordinator, dir, &["get", &id, "--output", "json"]);
    expect_exit(&out, 0, "get");
    assert_eq!(json(&out)["state"], "JOB_STATE_SUCCEEDED");

    let out = trainq(&coordinator, dir, &["metrics", &id, "--output", "json"]);
    expect_exit(&out, 0, "metrics json");
    let points = json(&out);
    let losses = points
        .as_array()
        .expect("an array of points")
        .iter()
        .filter(|p| p["name"] == "train/loss")
        .count();
    assert!(losses >= 1, "train/loss points: {points}");

    let out = trainq(
        &coordinator,
        dir,
        &["metrics", &id, "--name", "train/loss", "--output", "csv"],
    );
    expect_exit(&out, 0, "metrics csv");
    let csv = stdout(&out);
    assert!(
        csv.starts_with("name,epoch,step,value\ntrain/loss,1,"),
        "{csv}"
    );

    let out = trainq(
        &coordinator,
        dir,
        &["artifacts", "list", &id, "--output", "json"],
    );
    expect_exit(&out, 0, "artifacts list");
    let listed = json(&out);
    let checkpoint = listed
        .as_array()
        .expect("an array of artifacts")
        .iter()
        .rfind(|a| a["kind"] == "checkpoint")
        .unwrap_or_else(|| panic!("a checkpoint artifact: {listed}"))
        .clone();
    let out = trainq(
        &coordinator,
        dir,
        &[
            "artifacts",
            "download",
            &id,
            "--kind",
            "checkpoint",
            "-o",
            "ckpt.safetensors",
        ],
    );
    expect_exit(&out, 0, "artifacts download");
    let size = std::fs::metadata(dir.join("ckpt.safetensors"))
        .expect("downloaded checkpoint")
        .len();
    assert_eq!(
        checkpoint["sizeBytes"].as_str().map(str::to_string),
        Some(size.to_string())
    );

    let out = trainq(
        &coordinator,
        dir,
        &[
            "plot",
            &id,
            "--metric",
            "train/loss",
            "--x",
            "step",
            "-o",
            "chart.png",
            "--svg",
        ],
    );
    expect_exit(&out, 0, "plot");
    let png = std::fs::read(dir.join("chart.png")).expect("chart.png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG file");
    let svg = std::fs::read_to_string(dir.join("chart.svg")).expect("chart.svg");
    assert!(svg.contains("<svg"), "an SVG file");
    assert!(svg.contains("cli-mnist"), "the legend names the job");
    assert!(svg.contains("train/loss per step"), "the chart has a title");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainq_exit_codes_tell_cancelled_jobs_unknown_ids_bad_files_and_absent_servers_apart() {
    let env = TestEnv::new();
    let coordinator = env.start_coordinator(&[]).await;
    let dir = env.dir.path();

    // No worker: the job stays queued until it is cancelled.
    std::fs::write(
        dir.join("spec.json"),
        mnist_spec_json("cli-cancel", 1, 256, 256),
    )
    .expect("write spec");
    let out = trainq(
        &coordinator,
        dir,
        &["submit", "spec.json", "--output", "json"],
    );
    expect_exit(&out, 0, "submit");
    let submitted = json(&out);
    assert_eq!(submitted["state"], "JOB_STATE_QUEUED");
    let id = submitted["jobId"].as_str().expect("jobId").to_string();

    let out = trainq(&coordinator, dir, &["list", "--state", "queued"]);
    expect_exit(&out, 0, "list");
    assert!(stdout(&out).contains(&id), "{}", stdout(&out));

    let out = trainq(&coordinator, dir, &["cancel", &id, "--output", "json"]);
    expect_exit(&out, 0, "cancel");
    assert_eq!(json(&out)["state"], "JOB_STATE_CANCELLED");
    let out = trainq(&coordinator, dir, &["watch", &id]);
    expect_exit(&out, 1, "watch of a cancelled job");

    let unknown = "00000000-0000-4000-8000-000000000000";
    let out = trainq(&coordinator, dir, &["get", unknown]);
    expect_exit(&out, 3, "get of an unknown id");

    std::fs::write(
        dir.join("typo.yaml"),
        YAML_SPEC.replace("learningRate", "lerning_rate"),
    )
    .expect("write spec");
    let out = trainq(&coordinator, dir, &["submit", "typo.yaml"]);
    expect_exit(&out, 2, "a misspelt field");
    assert!(
        stderr(&out).contains("typo.yaml:8:3: unknown field \"lerning_rate\""),
        "{}",
        stderr(&out)
    );

    let out = trainq(&coordinator, dir, &["frobnicate"]);
    expect_exit(&out, 2, "an unknown command");

    let out = Command::new(binary("trainq"))
        .args([
            "list",
            "--server",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .output()
        .expect("running trainq");
    expect_exit(&out, 4, "no coordinator");
}

/// Runs trainq against `url` off the runtime's threads (the proxy it talks to runs on them).
async fn trainq_at(url: &str, dir: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(binary("trainq"));
    cmd.args(args)
        .current_dir(dir)
        .env("TRAINQ_SERVER", url)
        .env_remove("TRAINQ_TOKEN");
    tokio::task::spawn_blocking(move || cmd.output().expect("running trainq"))
        .await
        .expect("trainq ran")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_whose_reply_is_lost_is_retried_with_its_request_id_and_creates_one_job_or_sweep()
{
    let env = TestEnv::new();
    let coordinator = env.start_coordinator(&[]).await;
    let dir = env.dir.path();
    std::fs::write(
        dir.join("spec.json"),
        mnist_spec_json("cli-retry", 1, 256, 256),
    )
    .expect("write spec");
    let lossy = tests::proxy::LoseFirstReply::start(&coordinator.url(), "SubmitJob")
        .await
        .expect("proxy");
    let out = trainq_at(&lossy.url(), dir, &["submit", "spec.json"]).await;
    let id = expect_exit(&out, 0, "submit through a lossy link")
        .trim()
        .to_string();
    assert_eq!(lossy.calls(), 2, "one lost reply, one retry");
    assert!(
        stderr(&out).contains("retrying in") && stderr(&out).contains("the reply was lost"),
        "{}",
        stderr(&out)
    );
    let mut client = coordinator.client().await;
    let listed = client
        .list_jobs(proto::v1::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .jobs;
    let ids: Vec<&str> = listed.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [id.as_str()], "the retry created no second job");

    // The same for a sweep (2 arms x 2 seeds + 2 sources).
    std::fs::write(dir.join("study.yaml"), STUDY_YAML).expect("write sweep");
    let lossy = tests::proxy::LoseFirstReply::start(&coordinator.url(), "SubmitSweep")
        .await
        .expect("proxy");
    let out = trainq_at(&lossy.url(), dir, &["sweep", "submit", "study.yaml"]).await;
    let sweep = expect_exit(&out, 0, "sweep submit through a lossy link")
        .trim()
        .to_string();
    assert_eq!(lossy.calls(), 2);
    let sweeps = client
        .list_sweeps(proto::v1::ListSweepsRequest::default())
        .await
        .expect("list sweeps")
        .into_inner()
        .sweeps;
    let ids: Vec<&str> = sweeps.iter().map(|s| s.sweep_id.as_str()).collect();
    assert_eq!(ids, [sweep.as_str()]);
    let jobs = client
        .list_jobs(proto::v1::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1 + 6);

    // An explicit --request-id used again with another spec is a usage error.
    let out = trainq(
        &coordinator,
        dir,
        &["submit", "spec.json", "--request-id", "mine-1"],
    );
    expect_exit(&out, 0, "submit with a request id");
    std::fs::write(
        dir.join("other.json"),
        mnist_spec_json("cli-retry-other", 1, 256, 256),
    )
    .expect("write spec");
    let out = trainq(
        &coordinator,
        dir,
        &["submit", "other.json", "--request-id", "mine-1"],
    );
    expect_exit(&out, 2, "a request id used for another spec");
    assert!(stderr(&out).contains("AlreadyExists"), "{}", stderr(&out));
}

const STUDY_YAML: &str = "\
name: cli-retry-study
source:
  name: src
  training: {epochs: 1, batchSize: 64, learningRate: 0.001, maxTrainExamples: 256}
  mnistClassifier: {}
base:
  name: cvae
  training: {epochs: 1, batchSize: 64, learningRate: 0.001, maxTrainExamples: 256}
  cifarCvae: {}
grid:
  - field: cifarCvae.init
    names: [random, lum]
    values:
      - random: {}
      - transfer: {conv1: CONV1_ADAPTATION_LUMINANCE, copyConv2: true}
seeds: [1, 2]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainq_metrics_pages_through_every_point_of_a_long_series_and_max_points_and_plot_ask_for_a_selection(
) {
    let env = TestEnv::new();
    let coordinator = env.start_coordinator(&[]).await;
    let dir = env.dir.path();
    std::fs::write(
        dir.join("spec.json"),
        mnist_spec_json("cli-long-series", 1, 256, 256),
    )
    .expect("write spec");
    let out = trainq(&coordinator, dir, &["submit", "spec.json"]);
    let id = expect_exit(&out, 0, "submit").trim().to_string();
    // 12,000 train/loss points (three of the CLI's 5000-point pages) and one test/loss point
    // per 1000 steps, stored straight into the coordinator's database.
    let pool = env.pool().await;
    let job = uuid::Uuid::parse_str(&id).expect("a job id");
    sqlx::query(
        "INSERT INTO metric_points (job_id, name, step, epoch, value)
         SELECT $1, 'train/loss', s, (s - 1) / 1000 + 1, 1.0 / s FROM generate_series(1, 12000) AS s
         UNION ALL
         SELECT $1, 'test/loss', s * 1000, s, s FROM generate_series(1, 12) AS s",
    )
    .bind(job)
    .execute(&pool)
    .await
    .expect("insert points");
    sqlx::query(
        "INSERT INTO job_metric_latest (job_id, name, step, epoch, value)
         VALUES ($1, 'train/loss', 12000, 12, 1.0 / 12000), ($1, 'test/loss', 12000, 12, 12)",
    )
    .bind(job)
    .execute(&pool)
    .await
    .expect("insert latest");

    let out = trainq(&coordinator, dir, &["metrics", &id, "--output", "json"]);
    expect_exit(&out, 0, "metrics json");
    let points = json(&out);
    let keys: Vec<(String, u64)> = points
        .as_array()
        .expect("an array of points")
        .iter()
        .map(|p| {
            let step = p["step"]
                .as_str()
                .expect("a step")
                .parse()
                .expect("a number");
            (p["name"].as_str().expect("a name").to_string(), step)
        })
        .collect();
    let want: Vec<(String, u64)> = (1..=12)
        .map(|s| ("test/loss".to_string(), s * 1000))
        .chain((1..=12_000).map(|s| ("train/loss".to_string(), s)))
        .collect();
    assert_eq!(keys, want, "every point once, in (name, step) order");

    let out = trainq(
        &coordinator,
        dir,
        &[
            "metrics",
            &id,
            "--name",
            "train/loss",
            "--max-points",
            "50",
            "--output",
            "csv",
        ],
    );
    let csv = expect_exit(&out, 0, "metrics --max-points");
    let steps: Vec<u64> = csv
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .nth(2)
                .expect("a step column")
                .parse()
                .expect("a step")
        })
        .collect();
    assert_eq!(steps.len(), 50, "{csv}");
    assert_eq!((steps[0], steps[49]), (1, 12_000), "first and last kept");
    assert!(steps.windows(2).all(|w| w[0] < w[1]));

    let out = trainq(&coordinator, dir, &["metrics", &id, "--max-points", "1"]);
    expect_exit(&out, 2, "max-points below 2");

    let out = trainq(
        &coordinator,
        dir,
        &[
            "plot",
            &id,
            "--metric",
            "train/loss",
            "--x",
            "step",
            "-o",
            "long.svg",
        ],
    );
    expect_exit(&out, 0, "plot of a long series");
    let svg = std::fs::read_to_string(dir.join("long.svg")).expect("long.svg");
    assert!(svg.contains("train/loss per step"), "a chart");
    // A marker per point the coordinator selected (one per pixel column at most, the chart is
    // 1024 wide), not 12,000.
    let markers = svg.matches("<circle").count();
    assert!((2..=1024).contains(&markers), "{markers} markers");
}

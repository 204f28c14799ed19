//! Sweeps: submit (sources and arms in order, transfer arms waiting on their seed's source),
//! validation, unknown ids, listing, cancel and WatchSweep. The builders here (`study_spec`,
//! `run_to_success`, ...) are shared with `summary.rs`.
//!
//! Must not check summary statistics (see `summary.rs`).

use proto::queue::DEFAULT_QUEUE;
use std::time::Duration;

use proto::v1::{
    self, job_service_client::JobServiceClient, worker_service_client::WorkerServiceClient,
};
use tests::WAIT;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic::Code;
use uuid::Uuid;

use crate::helpers::{claim, code_of, eventually, get, valid_spec, TestServer};

pub fn json_value(v: serde_json::Value) -> proto::Value {
    serde_json::from_value(v).expect("JSON is a google.protobuf.Value")
}

/// A CVAE sweep: random initialisation against a luminance transfer from a source stage.
pub fn study_spec(seeds: Vec<u64>) -> v1::SweepSpec {
    let base: v1::JobSpec = serde_json::from_value(serde_json::json!({
        "name": "ignored",
        "labels": {"team": "vision"},
        "training": {"epochs": 2, "batchSize": 64, "learningRate": 0.001},
        "cifarCvae": {}
    }))
    .expect("a JobSpec");
    v1::SweepSpec {
        name: "study".into(),
        labels: [("project".to_owned(), "transfer".to_owned())].into(),
        base: Some(base),
        grid: vec![v1::GridAxis {
            field: "cifarCvae.init".into(),
            values: vec![
                json_value(serde_json::json!({"random": {}})),
                json_value(
                    serde_json::json!({"transfer": {"conv1": "CONV1_ADAPTATION_LUMINANCE", "copyConv2": true}}),
                ),
            ],
            names: vec!["random".into(), "lum".into()],
        }],
        seeds,
        source: Some(valid_spec()),
    }
}

pub async fn submit_sweep(jobs: &mut JobServiceClient<Channel>, spec: v1::SweepSpec) -> v1::Sweep {
    jobs.submit_sweep(v1::SubmitSweepRequest {
        spec: Some(spec),
        request_id: String::new(),
    })
    .await
    .expect("submit sweep")
    .into_inner()
}

pub async fn get_sweep(jobs: &mut JobServiceClient<Channel>, id: &str) -> v1::Sweep {
    jobs.get_sweep(v1::GetSweepRequest {
        sweep_id: id.into(),
        ..Default::default()
    })
    .await
    .expect("get sweep")
    .into_inner()
}

pub fn run_of<'a>(sweep: &'a v1::Sweep, arm: &str, seed: u64) -> &'a v1::SweepRun {
    sweep
        .runs
        .iter()
        .find(|r| r.arm == arm && r.seed == seed)
        .unwrap_or_else(|| panic!("run {arm}/{seed}"))
}

pub fn transfer_source_of(job: &v1::Job) -> String {
    match job.spec.as_ref().and_then(|s| s.experiment.as_ref()) {
        Some(v1::job_spec::Experiment::CifarCvae(c)) => {
            match c.init.as_ref().and_then(|i| i.kind.as_ref()) {
                Some(v1::initialization::Kind::Transfer(t)) => t.source_job_id.clone(),
                _ => String::new(),
            }
        }
        _ => String::new(),
    }
}

/// Claims a job, reports `points` (name, step, epoch, value) and completes it.
pub async fn run_to_success(
    workers: &mut WorkerServiceClient<Channel>,
    id: &str,
    points: &[(&str, u64, u32, f64)],
) {
    let lease = claim(workers, id).await;
    if !points.is_empty() {
        workers
            .report_metrics(v1::ReportMetricsRequest {
                lease: Some(lease.clone()),
                points: points
                    .iter()
                    .map(|&(name, step, epoch, value)| v1::MetricPoint {
                        name: name.into(),
                        step,
                        epoch,
                        value,
                    })
                    .collect(),
            })
            .await
            .expect("report");
    }
    workers
        .complete_job(v1::CompleteJobRequest {
            lease: Some(lease),
            final_step: 20,
        })
        .await
        .expect("complete");
}

#[tokio::test]
async fn a_sweep_stores_sources_and_arms_in_order_and_transfer_arms_wait_on_their_seeds_source() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let sweep = submit_sweep(&mut jobs, study_spec(vec![7, 3])).await;
    assert_eq!(sweep.state(), v1::SweepState::Running);
    assert_eq!(sweep.arms, ["random", "lum"]);
    let order: Vec<(&str, u64, bool)> = sweep
        .runs
        .iter()
        .map(|r| (r.arm.as_str(), r.seed, r.source))
        .collect();
    assert_eq!(
        order,
        [
            ("source", 7, true),
            ("source", 3, true),
            ("random", 7, false),
            ("random", 3, false),
            ("lum", 7, false),
            ("lum", 3, false),
        ]
    );
    assert_eq!(server.job_rows().await, 6);
    for seed in [7, 3] {
        let source = run_of(&sweep, "source", seed);
        assert_eq!(source.state(), v1::JobState::Queued);
        assert_eq!(run_of(&sweep, "random", seed).state(), v1::JobState::Queued);
        let lum = run_of(&sweep, "lum", seed);
        assert_eq!(lum.state(), v1::JobState::Waiting);
        let job = get(&mut jobs, &lum.job_id).await;
        assert_eq!(transfer_source_of(&job), source.job_id);
        let spec = job.spec.expect("spec");
        assert_eq!(spec.name, format!("study/lum/s{seed}"));
        assert_eq!(spec.training.as_ref().expect("training").seed, seed);
        assert_eq!(spec.labels["sweep"], "study");
        assert_eq!(spec.labels["sweep_id"], sweep.sweep_id);
        assert_eq!(spec.labels["arm"], "lum");
        assert_eq!(spec.labels["seed"], seed.to_string());
        assert_eq!(spec.labels["project"], "transfer");
        assert_eq!(spec.labels["team"], "vision");
        let source_job = get(&mut jobs, &source.job_id).await;
        assert_eq!(
            source_job.spec.expect("spec").name,
            format!("study/source/s{seed}")
        );
    }
    let counts: Vec<(v1::JobState, u32)> = sweep
        .jobs_by_state
        .iter()
        .map(|c| (c.state(), c.count))
        .collect();
    assert_eq!(
        counts,
        [(v1::JobState::Waiting, 2), (v1::JobState::Queued, 4)]
    );
    // The queued jobs were pushed at once.
    let mut queued = server.queue.ready_ids(DEFAULT_QUEUE).await.expect("redis");
    queued.sort();
    queued.dedup();
    let mut expected: Vec<String> = sweep
        .runs
        .iter()
        .filter(|r| r.state() == v1::JobState::Queued)
        .map(|r| r.job_id.clone())
        .collect();
    expected.sort();
    assert_eq!(queued, expected);
    // Reads agree with the submit's answer; the spec comes back as submitted.
    let read = get_sweep(&mut jobs, &sweep.sweep_id).await;
    assert_eq!(read, sweep);
    assert_eq!(read.spec, Some(study_spec(vec![7, 3])));
    let listed = jobs
        .list_jobs(v1::ListJobsRequest {
            labels: [("sweep_id".to_owned(), sweep.sweep_id.clone())].into(),
            ..Default::default()
        })
        .await
        .expect("list jobs")
        .into_inner();
    assert_eq!(listed.jobs.len(), 6);
    server.stop().await;
}

#[tokio::test]
async fn an_invalid_sweep_is_rejected_naming_its_field_and_nothing_is_stored() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let mut repeated_seed = study_spec(vec![1, 2, 1]);
    let mut bad_value = study_spec(vec![1]);
    bad_value.grid.push(v1::GridAxis {
        field: "training.learningRate".into(),
        values: vec![
            json_value(serde_json::json!(0.01)),
            json_value(serde_json::json!(-1)),
        ],
        names: vec![],
    });
    let mut no_source_id = study_spec(vec![1]);
    no_source_id.source = None;
    // Valid on its own, but its source does not exist: the transaction rolls back every job
    // stored before it.
    let mut missing_source = study_spec(vec![1]);
    missing_source.source = None;
    missing_source.grid[0].values[1] = json_value(serde_json::json!({"transfer": {
        "conv1": "CONV1_ADAPTATION_LUMINANCE",
        "sourceJobId": "0190aaaa-0000-7000-8000-000000000000"
    }}));
    let mut no_spec = study_spec(vec![1]);
    no_spec.base = None;
    repeated_seed.name = "repeated".into();
    for (spec, field) in [
        (Some(repeated_seed), "spec.seeds[2]"),
        (Some(bad_value), "spec.grid[1].values[1]"),
        (Some(no_source_id), "spec.grid[0].values[1]"),
        (
            Some(missing_source),
            "spec.base.cifar_cvae.init.transfer.source_job_id",
        ),
        (Some(no_spec), "spec.base"),
        (None, "spec"),
    ] {
        let status = jobs
            .submit_sweep(v1::SubmitSweepRequest {
                spec,
                request_id: String::new(),
            })
            .await
            .expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{field}: {}",
            status.message()
        );
    }
    assert_eq!(server.job_rows().await, 0);
    let sweeps: i64 = sqlx::query_scalar("SELECT count(*) FROM sweeps")
        .fetch_one(&server.pool)
        .await
        .expect("count");
    assert_eq!(sweeps, 0);
    server.stop().await;
}

#[tokio::test]
async fn unknown_sweep_ids_are_not_found_and_malformed_ones_are_invalid() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let unknown = Uuid::now_v7().to_string();
    for id in [unknown.as_str(), "nope", ""] {
        let want = if id == unknown {
            Code::NotFound
        } else {
            Code::InvalidArgument
        };
        let get = jobs
            .get_sweep(v1::GetSweepRequest {
                sweep_id: id.into(),
                ..Default::default()
            })
            .await;
        assert_eq!(code_of(get), want, "get {id:?}");
        let cancel = jobs
            .cancel_sweep(v1::CancelSweepRequest {
                sweep_id: id.into(),
                reason: String::new(),
            })
            .await;
        assert_eq!(code_of(cancel), want, "cancel {id:?}");
        let watch = jobs
            .watch_sweep(v1::WatchSweepRequest {
                sweep_id: id.into(),
            })
            .await;
        assert_eq!(code_of(watch), want, "watch {id:?}");
        let summary = jobs
            .get_sweep_summary(v1::GetSweepSummaryRequest {
                sweep_id: id.into(),
                ..Default::default()
            })
            .await;
        assert_eq!(code_of(summary), want, "summary {id:?}");
    }
    let bad_token = jobs
        .list_sweeps(v1::ListSweepsRequest {
            page_size: 0,
            page_token: "garbage".into(),
        })
        .await;
    assert_eq!(code_of(bad_token), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn sweeps_are_listed_newest_first_page_by_page_with_their_job_counts() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit_sweep(&mut jobs, study_spec(vec![1])).await.sweep_id);
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = jobs
            .list_sweeps(v1::ListSweepsRequest {
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .expect("list")
            .into_inner();
        for s in &page.sweeps {
            assert!(s.runs.is_empty(), "listed without runs");
            let total: u32 = s.jobs_by_state.iter().map(|c| c.count).sum();
            assert_eq!(total, 3);
            seen.push(s.sweep_id.clone());
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);
    server.stop().await;
}

/// Collects the sweep states a watcher sees until its stream ends.
pub async fn watched_sweep(
    jobs: &mut JobServiceClient<Channel>,
    id: &str,
) -> JoinHandle<Vec<v1::Sweep>> {
    let mut stream = jobs
        .watch_sweep(v1::WatchSweepRequest {
            sweep_id: id.into(),
        })
        .await
        .expect("watch sweep")
        .into_inner();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let collect = async {
            while let Some(sweep) = stream.next().await {
                seen.push(sweep.expect("message"));
            }
        };
        tokio::time::timeout(WAIT, collect)
            .await
            .expect("the stream ends once every job ended");
        seen
    })
}

#[tokio::test]
async fn cancelling_a_sweep_cancels_its_unfinished_jobs_keeps_finished_ones_and_ends_its_watchers()
{
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let mut workers = server.workers();
    let sweep = submit_sweep(&mut jobs, study_spec(vec![1, 2])).await;
    let watcher = watched_sweep(&mut jobs, &sweep.sweep_id).await;
    // Seed 1's source succeeds, so its transfer run is queued; seed 1's random run is running.
    run_to_success(&mut workers, &run_of(&sweep, "source", 1).job_id, &[]).await;
    let running = run_of(&sweep, "random", 1).job_id.clone();
    claim(&mut workers, &running).await;
    let cancelled = jobs
        .cancel_sweep(v1::CancelSweepRequest {
            sweep_id: sweep.sweep_id.clone(),
            reason: "wrong learning rate".into(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.state(), v1::SweepState::Cancelled);
    for run in &cancelled.runs {
        let want = if run.source && run.seed == 1 {
            v1::JobState::Succeeded
        } else {
            v1::JobState::Cancelled
        };
        assert_eq!(run.state(), want, "{} s{}", run.arm, run.seed);
    }
    assert_eq!(get(&mut jobs, &running).await.error, "wrong learning rate");
    let seen = watcher.await.expect("watcher");
    let last = seen.last().expect("some message");
    assert_eq!(last.state(), v1::SweepState::Cancelled);
    assert_eq!(seen[0].state(), v1::SweepState::Running);
    // Cancelling again changes nothing and is not an error.
    let again = jobs
        .cancel_sweep(v1::CancelSweepRequest {
            sweep_id: sweep.sweep_id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancel again")
        .into_inner();
    assert_eq!(again.runs, cancelled.runs);
    server.stop().await;
}

#[tokio::test]
async fn a_sweep_watcher_sees_each_change_and_the_stream_ends_when_every_job_ended() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let mut workers = server.workers();
    let mut spec = study_spec(vec![5]);
    spec.source = None;
    spec.grid[0].values.truncate(1);
    spec.grid[0].names.truncate(1);
    let sweep = submit_sweep(&mut jobs, spec).await;
    assert_eq!(sweep.runs.len(), 1);
    let watcher = watched_sweep(&mut jobs, &sweep.sweep_id).await;
    let id = sweep.runs[0].job_id.clone();
    let lease = claim(&mut workers, &id).await;
    // Give the watcher a moment to see the running state before the job ends.
    eventually("the job runs", || {
        let mut jobs = jobs.clone();
        let id = id.clone();
        async move { get(&mut jobs, &id).await.state() == v1::JobState::Running }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    workers
        .fail_job(v1::FailJobRequest {
            lease: Some(lease),
            reason: "diverged".into(),
            permanent: true,
        })
        .await
        .expect("fail");
    let seen = watcher.await.expect("watcher");
    // Each message carries the counts (the runs are GetSweep's).
    let states: Vec<(v1::SweepState, Vec<(v1::JobState, u32)>)> =
        seen.iter().map(|s| (s.state(), counts(s))).collect();
    assert_eq!(
        states,
        [
            (v1::SweepState::Running, vec![(v1::JobState::Queued, 1)]),
            (v1::SweepState::Running, vec![(v1::JobState::Running, 1)]),
            (v1::SweepState::Partial, vec![(v1::JobState::Failed, 1)]),
        ]
    );
    server.stop().await;
}

fn counts(sweep: &v1::Sweep) -> Vec<(v1::JobState, u32)> {
    sweep
        .jobs_by_state
        .iter()
        .map(|c| (c.state(), c.count))
        .collect()
}

/// The next message of a WatchSweep stream, or `None` when none comes within `within`.
async fn next_within(
    stream: &mut tonic::Streaming<v1::Sweep>,
    within: Duration,
) -> Option<v1::Sweep> {
    match tokio::time::timeout(within, stream.next()).await {
        Ok(Some(message)) => Some(message.expect("a sweep")),
        Ok(None) => panic!("the stream ended"),
        Err(_) => None,
    }
}

#[tokio::test]
async fn a_sweep_watcher_gets_counts_without_runs_for_state_changes_and_nothing_for_metric_points()
{
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let mut workers = server.workers();
    let mut spec = study_spec(vec![5, 6]);
    spec.source = None;
    spec.grid[0].values.truncate(1);
    spec.grid[0].names.truncate(1);
    let sweep = submit_sweep(&mut jobs, spec).await;
    let mut stream = jobs
        .watch_sweep(v1::WatchSweepRequest {
            sweep_id: sweep.sweep_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = next_within(&mut stream, WAIT).await.expect("the sweep now");
    assert!(first.runs.is_empty() && first.next_page_token.is_empty());
    assert_eq!(first.arms, ["random"]);
    assert_eq!(first.spec, sweep.spec);
    assert_eq!(counts(&first), [(v1::JobState::Queued, 2)]);
    let id = sweep.runs[0].job_id.clone();
    let lease = claim(&mut workers, &id).await;
    let running = next_within(&mut stream, WAIT)
        .await
        .expect("a state change");
    assert_eq!(
        counts(&running),
        [(v1::JobState::Queued, 1), (v1::JobState::Running, 1)]
    );
    assert!(running.runs.is_empty());
    // Metric points are not changes of the sweep: no message, however many arrive.
    for step in 1..=20 {
        workers
            .report_metrics(v1::ReportMetricsRequest {
                lease: Some(lease.clone()),
                points: vec![crate::helpers::point("train/loss", step, 1.0 / step as f64)],
            })
            .await
            .expect("report");
    }
    assert_eq!(
        next_within(&mut stream, Duration::from_millis(1500)).await,
        None,
        "metric points sent a WatchSweep message"
    );
    workers
        .complete_job(v1::CompleteJobRequest {
            lease: Some(lease),
            final_step: 20,
        })
        .await
        .expect("complete");
    let done = next_within(&mut stream, WAIT)
        .await
        .expect("a state change");
    assert_eq!(
        counts(&done),
        [(v1::JobState::Queued, 1), (v1::JobState::Succeeded, 1)]
    );
    assert_eq!(done.state(), v1::SweepState::Running);
    server.stop().await;
}

#[tokio::test]
async fn get_sweep_pages_through_the_runs_and_submit_and_cancel_answer_with_the_first_page() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    // 11 arms x 91 seeds: 1001 jobs, one more than a page.
    let spec = v1::SweepSpec {
        name: "pages".into(),
        base: Some(valid_spec()),
        grid: vec![v1::GridAxis {
            field: "training.learningRate".into(),
            values: (1..=11)
                .map(|i| json_value(serde_json::json!(i as f64 * 1e-4)))
                .collect(),
            names: vec![],
        }],
        seeds: (100..191).collect(),
        ..Default::default()
    };
    let sweep = submit_sweep(&mut jobs, spec).await;
    assert_eq!(sweep.runs.len(), 1000);
    assert!(!sweep.next_page_token.is_empty());
    assert_eq!(counts(&sweep), [(v1::JobState::Queued, 1001)]);
    let page = |page_size: u32, page_token: String| v1::GetSweepRequest {
        sweep_id: sweep.sweep_id.clone(),
        page_size,
        page_token,
    };
    let rest = jobs
        .get_sweep(page(0, sweep.next_page_token.clone()))
        .await
        .expect("second page")
        .into_inner();
    assert_eq!(rest.runs.len(), 1);
    assert!(rest.next_page_token.is_empty());
    assert_eq!(
        (&rest.runs[0].arm, rest.runs[0].seed),
        (&sweep.arms[10], 190)
    );
    let mut all = sweep.runs.clone();
    all.extend(rest.runs);
    let mut paged = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    loop {
        let got = jobs
            .get_sweep(page(300, token))
            .await
            .expect("page")
            .into_inner();
        sizes.push(got.runs.len());
        paged.extend(got.runs);
        if got.next_page_token.is_empty() {
            break;
        }
        token = got.next_page_token;
    }
    assert_eq!(sizes, [300, 300, 300, 101]);
    assert_eq!(paged, all);
    let huge = jobs
        .get_sweep(page(1_000_000, String::new()))
        .await
        .expect("capped")
        .into_inner();
    assert_eq!(huge.runs.len(), 1000, "at most 1000 runs a page");
    let bad = jobs
        .get_sweep(page(0, "garbage".into()))
        .await
        .expect_err("bad token");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().starts_with("page_token: "),
        "{}",
        bad.message()
    );
    let cancelled = jobs
        .cancel_sweep(v1::CancelSweepRequest {
            sweep_id: sweep.sweep_id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.runs.len(), 1000);
    assert!(!cancelled.next_page_token.is_empty());
    assert_eq!(counts(&cancelled), [(v1::JobState::Cancelled, 1001)]);
    server.stop().await;
}

#[tokio::test]
async fn a_sweep_submit_repeated_with_its_request_id_returns_the_first_sweep_and_stores_nothing_more(
) {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let submit_with = |spec: v1::SweepSpec| v1::SubmitSweepRequest {
        spec: Some(spec),
        request_id: "sweep-try-1".into(),
    };
    let first = jobs
        .submit_sweep(submit_with(study_spec(vec![1, 2])))
        .await
        .expect("first")
        .into_inner();
    let again = jobs
        .submit_sweep(submit_with(study_spec(vec![1, 2])))
        .await
        .expect("repeat")
        .into_inner();
    assert_eq!(again, first);
    assert_eq!(server.job_rows().await, 6);
    let reused = jobs
        .submit_sweep(submit_with(study_spec(vec![1, 3])))
        .await
        .expect_err("another spec");
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
    assert!(
        reused.message().starts_with("request_id: ") && reused.message().contains(&first.sweep_id),
        "{}",
        reused.message()
    );
    assert_eq!(server.job_rows().await, 6);
    let sweeps: i64 = sqlx::query_scalar("SELECT count(*) FROM sweeps")
        .fetch_one(&server.pool)
        .await
        .expect("count");
    assert_eq!(sweeps, 1);
    server.stop().await;
}

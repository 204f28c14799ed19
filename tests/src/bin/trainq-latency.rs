//! Dispatch-latency benchmark: starts the real coordinator and a CPU worker (like the system
//! tests), warms the worker up with one job (data set loaded), then submits small MNIST jobs one
//! at a time and prints a table of submit -> running and submit -> first metric point, as seen
//! by a WatchJob client, then their p50 and p99 (nearest rank over the jobs after the warm-up).
//! Beside them, to tell where the time goes: created -> claimed on the coordinator's clock, when
//! the submit was answered, and whether the watch's first event already showed the job running.
//!
//! Then cancellation: a long job trains, is cancelled, and a small job is submitted at once; the
//! worker (default 1 s heartbeat) can claim the small job only once it has stopped the cancelled
//! one, so cancel -> small job running bounds how long a cancelled job kept training.
//!
//! Run: `cargo build --workspace --bins && cargo run -p tests --bin trainq-latency -- [jobs] [cancels]`

use std::time::{Duration, Instant};

use proto::v1::{self, JobState};
use tests::bench::quantile;
use tests::*;
use tokio_stream::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5);
    let cancels: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3);
    let env = TestEnv::new();
    let coordinator = env.start_coordinator(&[]).await;
    // Default heartbeat (1 s): cancellation is learnt from a heartbeat.
    let _worker = env.start_worker(&coordinator, "latency-worker", &[]);
    let mut client = coordinator.client().await;

    let spec_json = |name: &str| {
        let mut v: serde_json::Value =
            serde_json::from_str(&mnist_spec_json(name, 1, 256, 256)).expect("json");
        v["training"]["logEverySteps"] = 1.into();
        v.to_string()
    };
    println!(
        "| job | submit -> running, client (ms) | submit -> first step reported, client (ms) | created -> started, coordinator's clock (ms) | submit answered (ms) | first WatchJob state |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let (mut to_running, mut to_point, mut to_start, mut to_answer) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..=jobs {
        let spec: v1::JobSpec = serde_json::from_str(&spec_json(&format!("latency-{i}")))?;
        let t0 = Instant::now();
        let id = client
            .submit_job(v1::SubmitJobRequest {
                spec: Some(spec),
                request_id: String::new(),
            })
            .await?
            .into_inner()
            .job_id;
        let answered = t0.elapsed();
        let mut stream = client
            .watch_job(v1::WatchJobRequest { job_id: id.clone() })
            .await?
            .into_inner();
        let (mut running, mut first_point, mut first_state) = (None, None, None);
        while let Some(event) =
            tokio::time::timeout(Duration::from_secs(300), stream.next()).await?
        {
            let event = event?.event;
            if let Some(v1::job_event::Event::Job(job)) = &event {
                first_state.get_or_insert(job.state());
            }
            match event {
                Some(v1::job_event::Event::Job(job)) if job.state() == JobState::Running => {
                    running.get_or_insert(t0.elapsed());
                }
                Some(v1::job_event::Event::Metrics(b)) if !b.points.is_empty() => {
                    first_point.get_or_insert(t0.elapsed());
                }
                _ => {}
            }
        }
        let job = wait_terminal(&mut client, &id, Duration::from_secs(300)).await?;
        anyhow::ensure!(
            job.state() == JobState::Succeeded,
            "job failed: {}",
            job.error
        );
        let ms = |d: Option<Duration>| {
            d.map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
                .unwrap_or("-".into())
        };
        let label = if i == 0 {
            "warm-up (loads MNIST)".to_string()
        } else {
            i.to_string()
        };
        let started = server_wait(&job);
        println!(
            "| {label} | {} | {} | {} | {:.1} | {:?} |",
            ms(running),
            ms(first_point),
            ms(started),
            answered.as_secs_f64() * 1e3,
            first_state.unwrap_or_default()
        );
        if i > 0 {
            to_running.extend(running);
            to_point.extend(first_point);
            to_start.extend(started);
            to_answer.push(answered);
        }
    }
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        println!(
            "| {name} of {} | {:.1} | {:.1} | {:.1} | {:.1} | |",
            to_running.len(),
            quantile(&to_running, q).as_secs_f64() * 1e3,
            quantile(&to_point, q).as_secs_f64() * 1e3,
            quantile(&to_start, q).as_secs_f64() * 1e3,
            quantile(&to_answer, q).as_secs_f64() * 1e3,
        );
    }

    println!();
    println!("| cancel | cancel -> worker free (small job running) (ms) |");
    println!("| --- | --- |");
    for i in 1..=cancels {
        let long: v1::JobSpec =
            serde_json::from_str(&mnist_spec_json(&format!("long-{i}"), 50, 0, 1000))?;
        let long_id = client
            .submit_job(v1::SubmitJobRequest {
                spec: Some(long),
                request_id: String::new(),
            })
            .await?
            .into_inner()
            .job_id;
        wait_state(&mut client, &long_id, JobState::Running, true).await?;
        // Let it train for a moment past its first report.
        tokio::time::sleep(Duration::from_millis(300 * i as u64)).await;
        let t0 = Instant::now();
        client
            .cancel_job(v1::CancelJobRequest {
                job_id: long_id,
                reason: "latency benchmark".into(),
            })
            .await?;
        let small: v1::JobSpec = serde_json::from_str(&spec_json(&format!("after-cancel-{i}")))?;
        let small_id = client
            .submit_job(v1::SubmitJobRequest {
                spec: Some(small),
                request_id: String::new(),
            })
            .await?
            .into_inner()
            .job_id;
        wait_state(&mut client, &small_id, JobState::Running, false).await?;
        println!("| {i} | {:.0} |", t0.elapsed().as_secs_f64() * 1e3);
        wait_terminal(&mut client, &small_id, Duration::from_secs(300)).await?;
    }
    Ok(())
}

/// From the job's creation to its first claim, by the coordinator's clock (Postgres `now()`).
fn server_wait(job: &v1::Job) -> Option<Duration> {
    let (created, started) = (job.created_at.as_ref()?, job.started_at.as_ref()?);
    let nanos = (started.seconds - created.seconds) as i128 * 1_000_000_000
        + (started.nanos - created.nanos) as i128;
    Some(Duration::from_nanos(nanos.max(0) as u64))
}

/// Polls (every 10 ms) until the job is in `state` (or past it) and, with `with_metrics`, has
/// reported a metric.
async fn wait_state(
    client: &mut v1::job_service_client::JobServiceClient<tonic::transport::Channel>,
    id: &str,
    state: JobState,
    with_metrics: bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let job = client
            .get_job(v1::GetJobRequest { job_id: id.into() })
            .await?
            .into_inner();
        if (job.state() == state && (!with_metrics || !job.latest_metrics.is_empty()))
            || job.state().is_terminal()
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "job {id} never reached {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

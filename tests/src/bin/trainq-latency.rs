//! Dispatch-latency benchmark: starts the real coordinator and a CPU worker (like the system
//! tests), warms the worker up with one job (data set loaded), then submits small MNIST jobs one
//! at a time and prints a table of submit -> running and submit -> first metric point, as seen
//! by a WatchJob client.
//!
//! Run: `cargo build --workspace --bins && cargo run -p tests --bin trainq-latency -- [jobs]`

use std::time::{Duration, Instant};

use proto::v1::{self, JobState};
use tests::*;
use tokio_stream::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5);
    let env = TestEnv::new();
    let coordinator = env.start_coordinator(&[]).await;
    let _worker = env.start_worker(&coordinator, "latency-worker", &["--heartbeat-ms", "500"]);
    let mut client = coordinator.client().await;

    let spec_json = |name: &str| {
        let mut v: serde_json::Value =
            serde_json::from_str(&mnist_spec_json(name, 1, 256, 256)).expect("json");
        v["training"]["logEverySteps"] = 1.into();
        v.to_string()
    };
    println!("| job | submit -> running (ms) | submit -> first step reported (ms) |");
    println!("| --- | --- | --- |");
    for i in 0..=jobs {
        let spec: v1::JobSpec = serde_json::from_str(&spec_json(&format!("latency-{i}")))?;
        let t0 = Instant::now();
        let id = client
            .submit_job(v1::SubmitJobRequest { spec: Some(spec) })
            .await?
            .into_inner()
            .job_id;
        let mut stream = client
            .watch_job(v1::WatchJobRequest { job_id: id.clone() })
            .await?
            .into_inner();
        let (mut running, mut first_point) = (None, None);
        while let Some(event) =
            tokio::time::timeout(Duration::from_secs(300), stream.next()).await?
        {
            match event?.event {
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
        println!("| {label} | {} | {} |", ms(running), ms(first_point));
    }
    Ok(())
}

//! Packing benchmark: the same batch of CVAE jobs (generated CIFAR-100-format data) on one
//! worker with `--slots 2` and one torch thread per slot, against `--slots 1` with two torch
//! threads, taking turns, and the wall time of each batch from submit to the last job's end.
//! Prints one row per round, then the medians and their ratio (slots 1 / slots 2).
//!
//! Run: `cargo build --release --workspace --bins && cargo run --release -p tests --bin
//! trainq-slots-bench -- [jobs] [rounds] [train images] [epochs]` (defaults 8, 3, 5000, 2; batch 64).

use std::time::{Duration, Instant};

use proto::v1::{self, JobState};
use tests::bench::median;
use tests::*;

fn arg(n: usize, default: u32) -> anyhow::Result<u32> {
    Ok(std::env::args()
        .nth(n)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(default))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs = arg(1, 8)?;
    let rounds = arg(2, 3)?;
    let train = arg(3, 5000)?;
    let epochs = arg(4, 2)?;
    let env = TestEnv::new();
    let data = data_dir_with_cifar(&env.dir.path().join("data"), train, 1000, 11);
    let coordinator = env.start_coordinator(&[]).await;
    let mut client = coordinator.client().await;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{jobs} CVAE jobs x {epochs} epochs x {train} images, batch 64, on {cores} cores; wall time from submit to the last end"
    );
    println!();
    println!("| round | config | wall (s) | images/s in all |");
    println!("| --- | --- | --- | --- |");
    let configs: [(&str, u32, &str); 2] = [
        ("--slots 1, 2 torch threads", 2, "1"),
        ("--slots 2, 1 torch thread each", 1, "2"),
    ];
    let mut walls: Vec<Vec<Duration>> = vec![Vec::new(); configs.len()];
    let images = f64::from(jobs * epochs) * f64::from(train / 64 * 64);
    for round in 1..=rounds {
        for (c, (label, threads, slots)) in configs.iter().enumerate() {
            let name = format!("bench-{round}-{c}");
            let mut worker = env.start_worker_threads(
                &coordinator.url(),
                &name,
                &data,
                *threads,
                &["--slots", slots],
            );
            let started = Instant::now();
            let mut ids = Vec::new();
            for j in 0..jobs {
                let spec: v1::JobSpec = serde_json::from_value(serde_json::json!({
                    "name": format!("{name}-{j}"),
                    "training": {"epochs": epochs, "batchSize": 64, "learningRate": 0.001,
                                 "seed": j, "maxTestExamples": 500, "logEverySteps": 50},
                    "cifarCvae": {}
                }))?;
                let id = client
                    .submit_job(v1::SubmitJobRequest {
                        spec: Some(spec),
                        request_id: String::new(),
                    })
                    .await?
                    .into_inner()
                    .job_id;
                ids.push(id);
            }
            for id in &ids {
                let job = wait_terminal(&mut client, id, Duration::from_secs(3600)).await?;
                anyhow::ensure!(
                    job.state() == JobState::Succeeded,
                    "{id}: {}\n{}",
                    job.error,
                    worker.log()
                );
            }
            let wall = started.elapsed();
            worker.terminate(Duration::from_secs(30))?;
            println!(
                "| {round} | {label} | {:.1} | {:.0} |",
                wall.as_secs_f64(),
                images / wall.as_secs_f64()
            );
            walls[c].push(wall);
        }
    }
    let (one, two) = (median(&walls[0]), median(&walls[1]));
    println!();
    println!("| config | median wall (s) |");
    println!("| --- | --- |");
    for (c, (label, _, _)) in configs.iter().enumerate() {
        println!("| {label} | {:.1} |", median(&walls[c]).as_secs_f64());
    }
    println!();
    println!(
        "ratio (slots 1 / slots 2): {:.2}x",
        one.as_secs_f64() / two.as_secs_f64()
    );
    Ok(())
}

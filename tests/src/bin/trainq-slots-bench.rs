//! Packing benchmark: the same batch of CVAE jobs (generated CIFAR-100-format data) on one
//! worker with `--slots 2` and one torch thread per slot, against `--slots 1` with two torch
//! threads, taking turns, and the wall time of each batch from submit to the last job's end.
//! Prints one row per round, then the medians and their ratio (slots 1 / slots 2).
//!
//! Run: `cargo build --release --workspace --bins && cargo run --release -p tests --bin
//! trainq-slots-bench -- [jobs] [rounds] [train images] [epochs]` (defaults 8, 3, 5000, 2; batch 64).

use std::time::{Duration, Instant};

use proto::v1::{self, JobState};
use tests::bench::{arg, print_slot_medians, SLOTS_1_VS_2};
use tests::*;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs: u32 = arg(1, 8)?;
    let rounds: u32 = arg(2, 3)?;
    let train: u32 = arg(3, 5000)?;
    let epochs: u32 = arg(4, 2)?;
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
    let mut walls: Vec<Vec<Duration>> = vec![Vec::new(); SLOTS_1_VS_2.len()];
    let images = f64::from(jobs * epochs) * f64::from(train / 64 * 64);
    for round in 1..=rounds {
        for (c, config) in SLOTS_1_VS_2.iter().enumerate() {
            let name = format!("bench-{round}-{c}");
            let mut worker = env.start_worker_threads(
                &coordinator.url(),
                &name,
                &data,
                config.torch_threads,
                &["--slots", config.slots],
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
                ids.push(submit(&mut client, spec).await?);
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
                "| {round} | {} | {:.1} | {:.0} |",
                config.label,
                wall.as_secs_f64(),
                images / wall.as_secs_f64()
            );
            walls[c].push(wall);
        }
    }
    print_slot_medians(&walls);
    Ok(())
}

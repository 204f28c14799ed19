//! Study benchmark: a sweep file (default `examples/study-small.yaml`, the seed's study at CPU
//! size) submitted with `trainq sweep submit` and followed with `trainq sweep watch`, on one
//! worker with `--slots 1` (two torch threads) and with `--slots 2` (one each), taking turns.
//! For each run it prints the wall time (submit to the watch's end) beside the sum of the jobs'
//! pure training time (every attempt, claim to end, from GetJob): a ratio above 1 means jobs
//! overlapped. Then the medians.
//!
//! Run: `cargo build --release --workspace --bins && cargo run --release -p tests --bin
//! trainq-study-bench -- [rounds] [sweep file]` (defaults 3, examples/study-small.yaml; CIFAR
//! data: 1,000 generated training images and 200 test images, as the study test uses).

use std::time::{Duration, Instant};

use proto::v1;
use serde_json::Value;
use tests::bench::{arg, print_slot_medians, SLOTS_1_VS_2};
use tests::*;

fn seconds(t: &Option<proto::Timestamp>) -> f64 {
    t.as_ref()
        .map_or(0.0, |t| t.seconds as f64 + f64::from(t.nanos) * 1e-9)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: u32 = arg(1, 3)?;
    let file = std::env::args()
        .nth(2)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("examples/study-small.yaml"));
    let file = file.to_str().expect("a UTF-8 path").to_string();
    let env = TestEnv::new();
    let data = data_dir_with_cifar(&env.dir.path().join("data"), 1000, 200, 7);
    let coordinator = env.start_coordinator(&[]).await;
    let mut client = coordinator.client().await;
    let dir = env.dir.path();
    println!(
        "{file}, on {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!();
    println!("| round | config | jobs | wall (s) | sum of training time (s) | sum / wall |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut walls: Vec<Vec<Duration>> = vec![Vec::new(); SLOTS_1_VS_2.len()];
    for round in 1..=rounds {
        for (c, config) in SLOTS_1_VS_2.iter().enumerate() {
            let name = format!("study-{round}-{c}");
            let mut worker = env.start_worker_threads(
                &coordinator.url(),
                &name,
                &data,
                config.torch_threads,
                &["--slots", config.slots],
            );
            let started = Instant::now();
            let id = expect_exit(
                &trainq(&coordinator, dir, &["sweep", "submit", &file]),
                0,
                "sweep submit",
            )
            .trim()
            .to_string();
            expect_exit(
                &trainq(&coordinator, dir, &["sweep", "watch", &id]),
                0,
                "sweep watch",
            );
            let wall = started.elapsed();
            worker.terminate(Duration::from_secs(30))?;
            let sweep: Value = serde_json::from_str(&expect_exit(
                &trainq(
                    &coordinator,
                    dir,
                    &["sweep", "get", &id, "--output", "json"],
                ),
                0,
                "sweep get",
            ))?;
            let runs = sweep["runs"].as_array().cloned().unwrap_or_default();
            let mut training = 0.0;
            for run in &runs {
                let job_id = run["jobId"].as_str().unwrap_or_default().to_string();
                let job = client
                    .get_job(v1::GetJobRequest { job_id })
                    .await?
                    .into_inner();
                for a in &job.attempts {
                    training += (seconds(&a.ended_at) - seconds(&a.claimed_at)).max(0.0);
                }
            }
            let wall_s = wall.as_secs_f64();
            println!(
                "| {round} | {} | {} | {wall_s:.1} | {training:.1} | {:.2} |",
                config.label,
                runs.len(),
                training / wall_s
            );
            walls[c].push(wall);
        }
    }
    print_slot_medians(&walls);
    Ok(())
}

//! Sweep benchmark: how long SubmitSweep takes for a sweep at the job limit (10,000 jobs: 99 arms
//! x 100 seeds + 100 source jobs), and how big its answer is; with GetSweep and WatchSweep's
//! first message beside it, since those read the same sweep.
//!
//! By default it starts a real coordinator on a fresh database (the machine's Postgres and Redis,
//! as the system tests); with `--connect URL` it measures that coordinator instead (for example
//! one built from another commit, to compare before and after). Each of `--runs` sweeps (default
//! 5) is submitted on one connection after a warm-up sweep; the table shows the median, the
//! fastest and the slowest. `--seeds N` scales the sweep (99 x N + N jobs).
//!
//! Run: `cargo build -p server -p tests --bins && cargo run -p tests --bin trainq-sweep-bench --
//! [--seeds N] [--runs R] [--connect URL]`

use std::time::{Duration, Instant};

use anyhow::Context as _;
use prost::Message as _;
use proto::v1::{self, job_service_client::JobServiceClient};
use tests::bench::{channel, median, ms};
use tests::{mnist_spec_json, TestEnv};
use tokio_stream::StreamExt as _;

struct Options {
    seeds: u64,
    runs: usize,
    connect: Option<String>,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        seeds: 100,
        runs: 5,
        connect: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seeds" => o.seeds = value()?.parse()?,
            "--runs" => o.runs = value()?.parse()?,
            "--connect" => o.connect = Some(value()?),
            "-h" | "--help" => {
                println!("trainq-sweep-bench [--seeds N] [--runs R] [--connect URL]");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other:?} (see --help)"),
        }
    }
    anyhow::ensure!(o.runs > 0, "--runs must be at least 1");
    anyhow::ensure!((1..=100).contains(&o.seeds), "--seeds must be 1..=100");
    Ok(o)
}

/// 3 initialisations (random and two transfers from the source stage) x 33 learning rates = 99
/// arms, over `seeds` seeds, with a classifier source stage.
fn sweep_spec(name: &str, seeds: u64) -> anyhow::Result<v1::SweepSpec> {
    let value = |v: serde_json::Value| serde_json::from_value::<proto::Value>(v);
    let base: v1::JobSpec = serde_json::from_value(serde_json::json!({
        "name": "ignored",
        "training": {"epochs": 1, "batchSize": 64, "learningRate": 0.001,
                     "maxTrainExamples": 256, "maxTestExamples": 256},
        "cifarCvae": {}
    }))?;
    let inits = [
        serde_json::json!({"random": {}}),
        serde_json::json!({"transfer": {"conv1": "CONV1_ADAPTATION_LUMINANCE", "copyConv2": true}}),
        serde_json::json!({"transfer": {"conv1": "CONV1_ADAPTATION_REPLICATE_THIRD", "copyConv2": true}}),
    ];
    Ok(v1::SweepSpec {
        name: name.into(),
        labels: Default::default(),
        base: Some(base),
        grid: vec![
            v1::GridAxis {
                field: "cifarCvae.init".into(),
                values: inits.into_iter().map(value).collect::<Result<_, _>>()?,
                names: vec!["random".into(), "lum".into(), "rep".into()],
            },
            v1::GridAxis {
                field: "training.learningRate".into(),
                values: (1..=33)
                    .map(|i| value(serde_json::json!(f64::from(i) * 1e-4)))
                    .collect::<Result<_, _>>()?,
                names: (1..=33).map(|i| format!("lr{i}")).collect(),
            },
        ],
        seeds: (0..seeds).collect(),
        source: Some(serde_json::from_str(&mnist_spec_json(
            "source", 1, 256, 256,
        ))?),
    })
}

/// Times of one kind of call, and the size of its (last) answer.
struct Row {
    what: &'static str,
    times: Vec<Duration>,
    bytes: usize,
}

impl Row {
    fn median(&self) -> Duration {
        median(&self.times)
    }
}

async fn measure(url: &str, seeds: u64, runs: usize) -> anyhow::Result<(usize, Vec<Row>)> {
    let channel = channel(url).await?;
    let mut jobs = JobServiceClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    let mut submit = Row {
        what: "SubmitSweep",
        times: Vec::new(),
        bytes: 0,
    };
    let mut get = Row {
        what: "GetSweep (first page, default size)",
        times: Vec::new(),
        bytes: 0,
    };
    let mut watch = Row {
        what: "WatchSweep (first message)",
        times: Vec::new(),
        bytes: 0,
    };
    let mut job_count = 0;
    for i in 0..=runs {
        let spec = sweep_spec(&format!("sweep-bench-{i}"), seeds)?;
        let started = Instant::now();
        let sweep = jobs
            .submit_sweep(v1::SubmitSweepRequest {
                spec: Some(spec),
                // A coordinator without idempotent submission ignores it.
                request_id: uuid::Uuid::now_v7().to_string(),
            })
            .await
            .context("SubmitSweep")?
            .into_inner();
        let took = started.elapsed();
        job_count = sweep.jobs_by_state.iter().map(|c| c.count as usize).sum();
        let started = Instant::now();
        let got = jobs
            .get_sweep(v1::GetSweepRequest {
                sweep_id: sweep.sweep_id.clone(),
                ..Default::default()
            })
            .await
            .context("GetSweep")?
            .into_inner();
        let get_took = started.elapsed();
        let started = Instant::now();
        let mut stream = jobs
            .watch_sweep(v1::WatchSweepRequest {
                sweep_id: sweep.sweep_id.clone(),
            })
            .await
            .context("WatchSweep")?
            .into_inner();
        let first = stream
            .next()
            .await
            .context("WatchSweep ended")?
            .context("WatchSweep")?;
        let watch_took = started.elapsed();
        drop(stream);
        // The first sweep warms the caches and the connection pool.
        if i == 0 {
            continue;
        }
        submit.times.push(took);
        submit.bytes = sweep.encoded_len();
        get.times.push(get_took);
        get.bytes = got.encoded_len();
        watch.times.push(watch_took);
        watch.bytes = first.encoded_len();
    }
    Ok((job_count, vec![submit, get, watch]))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let env;
    let coordinator;
    let url = match &o.connect {
        Some(url) => url.clone(),
        None => {
            env = TestEnv::new();
            coordinator = env.start_coordinator(&[]).await;
            coordinator.url()
        }
    };
    let (jobs, rows) = measure(&url, o.seeds, o.runs).await?;
    println!(
        "sweeps of {jobs} jobs (99 arms x {} seeds + {} sources), {} runs after a warm-up, {url}",
        o.seeds, o.seeds, o.runs
    );
    println!("| call | median (ms) | min (ms) | max (ms) | answer (bytes) |");
    println!("| --- | --- | --- | --- | --- |");
    for r in &rows {
        let min = r.times.iter().min().copied().unwrap_or_default();
        let max = r.times.iter().max().copied().unwrap_or_default();
        println!(
            "| {} | {} | {} | {} | {} |",
            r.what,
            ms(r.median()),
            ms(min),
            ms(max),
            r.bytes
        );
    }
    Ok(())
}

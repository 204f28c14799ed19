//! RPC latency benchmark: client-side p50/p99 of every unary JobService RPC, against a
//! coordinator with about N jobs stored.
//!
//! By default it starts two real coordinators on one fresh database (the machine's Postgres and
//! Redis, as the system tests): one as configured by default (TCP_NODELAY on accepted
//! connections) and one with `--no-tcp-nodelay` (Nagle's algorithm on), stores the jobs, and
//! measures both, taking turns in five rounds, so the table shows the delayed-ACK stall (about
//! 40 ms) and its fix side by side. With `--connect URL` it measures that coordinator only
//! (`--token` for auth), storing the jobs there. Each RPC is called sequentially on one connection (the client sets
//! TCP_NODELAY, as tonic does by default). Submit -> running with a real worker is measured by
//! `trainq-latency`, not here.
//!
//! Run: `cargo build -p server -p tests --bins && cargo run -p tests --bin trainq-rpc-latency --
//! [--jobs N] [--calls M] [--connect URL] [--token T]`

use std::time::{Duration, Instant};

use anyhow::Context as _;
use proto::v1::{self, job_service_client::JobServiceClient};
use tests::bench::{channel, ms, quantile};
use tests::{mnist_spec_json, TestEnv};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Request;

struct Options {
    jobs: usize,
    calls: usize,
    connect: Option<String>,
    token: Option<String>,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        jobs: 1000,
        calls: 200,
        connect: None,
        token: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--jobs" => o.jobs = value()?.parse()?,
            "--calls" => o.calls = value()?.parse()?,
            "--connect" => o.connect = Some(value()?),
            "--token" => o.token = Some(value()?),
            "-h" | "--help" => {
                println!("trainq-rpc-latency [--jobs N] [--calls M] [--connect URL] [--token T]");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other:?} (see --help)"),
        }
    }
    anyhow::ensure!(o.calls > 0, "--calls must be at least 1");
    Ok(o)
}

/// A JobService client on its own connection, sending the token if there is one.
struct Client {
    jobs: JobServiceClient<Channel>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Client {
    async fn connect(url: &str, token: Option<&str>) -> anyhow::Result<Self> {
        let channel = channel(url).await?;
        let token = token
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .context("the token is not ASCII")?;
        Ok(Self {
            jobs: JobServiceClient::new(channel),
            token,
        })
    }

    fn req<T>(&self, message: T) -> Request<T> {
        let mut r = Request::new(message);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }
}

fn job_spec(name: &str) -> anyhow::Result<v1::JobSpec> {
    Ok(serde_json::from_str(&mnist_spec_json(name, 1, 256, 256))?)
}

fn sweep_spec(name: &str) -> anyhow::Result<v1::SweepSpec> {
    let value = |v: serde_json::Value| serde_json::from_value::<proto::Value>(v);
    Ok(v1::SweepSpec {
        name: name.into(),
        base: Some(job_spec("ignored")?),
        grid: vec![v1::GridAxis {
            field: "training.learningRate".into(),
            values: vec![value(0.001.into())?, value(0.002.into())?],
            names: vec!["lr1".into(), "lr2".into()],
        }],
        seeds: vec![1, 2],
        ..Default::default()
    })
}

/// Stores `n` jobs, one submit after another.
async fn store_jobs(url: &str, token: Option<&str>, n: usize) -> anyhow::Result<Vec<String>> {
    let mut c = Client::connect(url, token).await?;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let r = c.req(v1::SubmitJobRequest {
            spec: Some(job_spec(&format!("rpc-latency-{i}"))?),
            request_id: String::new(),
        });
        ids.push(c.jobs.submit_job(r).await?.into_inner().job_id);
    }
    Ok(ids)
}

/// One RPC's client-side latencies.
struct Row {
    rpc: &'static str,
    took: Vec<Duration>,
}

impl Row {
    fn quantile(&self, q: f64) -> Duration {
        quantile(&self.took, q)
    }
}

/// Rounds in which the two coordinators take turns.
const ROUNDS: usize = 5;

/// Adds a round's samples to the rows so far (the same RPCs in the same order).
fn merge(into: &mut Vec<Row>, round: Vec<Row>) {
    if into.is_empty() {
        *into = round;
        return;
    }
    for (row, more) in into.iter_mut().zip(round) {
        row.took.extend(more.took);
    }
}

/// Times `calls` sequential calls of every unary JobService RPC on one connection.
async fn measure(
    url: &str,
    token: Option<&str>,
    jobs: &[String],
    calls: usize,
) -> anyhow::Result<Vec<Row>> {
    let mut c = Client::connect(url, token).await?;
    let mut rows = Vec::new();
    macro_rules! time {
        ($rpc:literal, $i:ident, $call:expr) => {{
            let mut took = Vec::with_capacity(calls);
            for $i in 0..calls {
                let started = Instant::now();
                $call
                    .await
                    .with_context(|| format!("{} call {}", $rpc, $i))?;
                took.push(started.elapsed());
            }
            rows.push(Row { rpc: $rpc, took });
        }};
    }
    let job = |i: usize| jobs[i % jobs.len()].clone();
    // Warm up the connection (and the server's pool).
    for _ in 0..10 {
        c.jobs
            .get_job(c.req(v1::GetJobRequest { job_id: job(0) }))
            .await?;
    }
    time!("SubmitJob", i, {
        let r = c.req(v1::SubmitJobRequest {
            spec: Some(job_spec(&format!("rpc-latency-submit-{i}"))?),
            request_id: String::new(),
        });
        c.jobs.submit_job(r)
    });
    time!("GetJob", i, {
        let r = c.req(v1::GetJobRequest { job_id: job(i) });
        c.jobs.get_job(r)
    });
    time!("ListJobs", _i, {
        let r = c.req(v1::ListJobsRequest {
            page_size: 50,
            ..Default::default()
        });
        c.jobs.list_jobs(r)
    });
    time!("GetMetrics", i, {
        let r = c.req(v1::GetMetricsRequest {
            job_id: job(i),
            ..Default::default()
        });
        c.jobs.get_metrics(r)
    });
    time!("ListArtifacts", i, {
        let r = c.req(v1::ListArtifactsRequest {
            job_id: job(i),
            kind: String::new(),
        });
        c.jobs.list_artifacts(r)
    });
    // Each cancel takes a job of its own (the newest ones, stored by this measurement).
    let mut fresh = Vec::with_capacity(calls);
    for i in 0..calls {
        let r = c.req(v1::SubmitJobRequest {
            spec: Some(job_spec(&format!("rpc-latency-cancel-{i}"))?),
            request_id: String::new(),
        });
        fresh.push(c.jobs.submit_job(r).await?.into_inner().job_id);
    }
    time!("CancelJob", i, {
        let r = c.req(v1::CancelJobRequest {
            job_id: fresh[i].clone(),
            reason: "rpc latency bench".into(),
        });
        c.jobs.cancel_job(r)
    });
    let mut sweeps = Vec::with_capacity(calls);
    {
        let mut took = Vec::with_capacity(calls);
        for i in 0..calls {
            let r = c.req(v1::SubmitSweepRequest {
                spec: Some(sweep_spec(&format!("rpc-latency-{i}"))?),
                request_id: String::new(),
            });
            let started = Instant::now();
            let sweep = c.jobs.submit_sweep(r).await.context("SubmitSweep")?;
            took.push(started.elapsed());
            sweeps.push(sweep.into_inner().sweep_id);
        }
        rows.push(Row {
            rpc: "SubmitSweep",
            took,
        });
    }
    time!("GetSweep", i, {
        let r = c.req(v1::GetSweepRequest {
            sweep_id: sweeps[i].clone(),
            ..Default::default()
        });
        c.jobs.get_sweep(r)
    });
    time!("ListSweeps", _i, {
        let r = c.req(v1::ListSweepsRequest {
            page_size: 50,
            ..Default::default()
        });
        c.jobs.list_sweeps(r)
    });
    time!("GetSweepSummary", i, {
        let r = c.req(v1::GetSweepSummaryRequest {
            sweep_id: sweeps[i].clone(),
            baseline_arm: "lr1".into(),
            ..Default::default()
        });
        c.jobs.get_sweep_summary(r)
    });
    time!("CancelSweep", i, {
        let r = c.req(v1::CancelSweepRequest {
            sweep_id: sweeps[i].clone(),
            reason: "rpc latency bench".into(),
        });
        c.jobs.cancel_sweep(r)
    });
    Ok(rows)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let token = o.token.as_deref();
    if let Some(url) = &o.connect {
        let jobs = store_jobs(url, token, o.jobs).await?;
        let rows = measure(url, token, &jobs, o.calls).await?;
        println!("{} jobs stored, {} calls per RPC, {url}", o.jobs, o.calls);
        println!("| RPC | p50 (ms) | p99 (ms) |");
        println!("| --- | --- | --- |");
        for r in &rows {
            println!(
                "| {} | {} | {} |",
                r.rpc,
                ms(r.quantile(0.5)),
                ms(r.quantile(0.99))
            );
        }
        return Ok(());
    }
    let env = TestEnv::new();
    let nodelay = env.start_coordinator(&[]).await;
    let nagle = env
        .start_coordinator_at(
            "coordinator-nagle",
            tests::free_port(),
            &["--no-tcp-nodelay"],
        )
        .await;
    let jobs = store_jobs(&nodelay.url(), None, o.jobs).await?;
    // The two coordinators take turns, a fifth of the calls each time, so that whatever else
    // the machine does falls on both alike.
    let (mut fixed, mut before) = (Vec::new(), Vec::new());
    let per_round = o.calls.div_ceil(ROUNDS).max(1);
    for _ in 0..ROUNDS {
        merge(
            &mut fixed,
            measure(&nodelay.url(), None, &jobs, per_round).await?,
        );
        merge(
            &mut before,
            measure(&nagle.url(), None, &jobs, per_round).await?,
        );
    }
    println!(
        "{} jobs stored, {} sequential calls per RPC on one connection, client TCP_NODELAY on, \
         the two coordinators taking turns ({ROUNDS} rounds of {per_round})",
        o.jobs,
        per_round * ROUNDS
    );
    println!(
        "| RPC | p50 TCP_NODELAY (ms) | p99 TCP_NODELAY (ms) | p50 --no-tcp-nodelay (ms) | p99 --no-tcp-nodelay (ms) |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (a, b) in fixed.iter().zip(&before) {
        println!(
            "| {} | {} | {} | {} | {} |",
            a.rpc,
            ms(a.quantile(0.5)),
            ms(a.quantile(0.99)),
            ms(b.quantile(0.5)),
            ms(b.quantile(0.99))
        );
    }
    Ok(())
}

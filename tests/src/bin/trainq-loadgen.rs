//! Load generator: N simulated workers (no training) that claim, heartbeat at the real
//! interval, report metric batches at a set rate and complete, plus clients that submit and
//! watch, against one or more real coordinators (started here on a fresh database and Redis
//! prefix, or `--addr`). Prints the settings, per-RPC client-side p50/p99, the coordinators'
//! CPU and memory, Postgres connections, the points stored, leases lost and jobs reaped, the
//! watch latency across replicas, and a last line `held: yes/no`. `--ingest-only` measures
//! metric ingestion alone with R concurrent reporters; `--find-max` steps the worker count.
//! What a simulated worker does and how each figure is taken: `tests/src/loadgen.rs`.
//!
//! Run: `cargo build --release -p server -p tests --bin trainq-loadgen && target/release/trainq-loadgen
//! [--coordinators 1] [--workers 100] [--duration-s 30] [--heartbeat-ms 1000] [--batch-points 1000]
//! [--batch-every-ms 5000] [--watchers K] [--ingest-only --reporters 4,16] [--json]` (`--help`
//! lists every flag). Whether a run held is printed, not the exit status (0 unless it broke).

use tests::loadgen::{run, Options, USAGE};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some(options) = Options::parse(std::env::args().skip(1))? else {
        print!("{USAGE}");
        return Ok(());
    };
    run(options).await?;
    Ok(())
}

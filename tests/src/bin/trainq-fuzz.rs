//! The RPC fuzzer's long mode, for a closing note: starts a coordinator on a database of its
//! own, sends `--requests N` fuzzed calls (default 20,000) and prints requests sent, statuses by
//! code, time, and the invariant check. Exits 1 when any call was answered INTERNAL or UNKNOWN,
//! the coordinator died or logged a panic, or an invariant broke.
//!
//! `cargo build --workspace --bins && target/debug/trainq-fuzz --requests 20000 --seed 1`

use tests::{fuzz, TestEnv};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut requests: u64 = 20_000;
    let mut seed: u64 = 1;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().and_then(|v| v.parse().ok());
        match a.as_str() {
            "--requests" => requests = value().ok_or_else(|| anyhow::anyhow!("--requests N"))?,
            "--seed" => seed = value().ok_or_else(|| anyhow::anyhow!("--seed N"))?,
            other => anyhow::bail!("unknown argument {other:?} (--requests N, --seed N)"),
        }
    }
    let env = TestEnv::new();
    let mut coordinator = env.start_coordinator(&[]).await;
    let channel = tonic::transport::Endpoint::from_shared(coordinator.url())?
        .connect()
        .await?;
    let fixture = fuzz::Fixture::make(channel.clone()).await?;
    let report = fuzz::run(channel, &fixture, requests, seed).await;
    print!("{}", report.table());
    let broken = fuzz::check_invariants(&env.pool().await, &env.artifacts_dir()).await;
    let alive = coordinator.proc.is_running();
    let panicked = coordinator.proc.log().contains("panicked");
    println!(
        "INTERNAL/UNKNOWN/unanswered: {}; coordinator alive: {alive}; panic in log: {panicked}; invariants: {}",
        report.failures.len(),
        if broken.is_empty() { "intact".to_owned() } else { broken.join("; ") }
    );
    for f in report.failures.iter().take(20) {
        println!("  {f}");
    }
    if !report.failures.is_empty() || !alive || panicked || !broken.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

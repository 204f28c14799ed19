//! What the bench binaries (`src/bin/trainq-*-bench.rs`, `trainq-latency`, `trainq-rpc-latency`)
//! share: one quantile rule, the number formats of their tables, and how they connect.
//!
//! Must not time anything itself or decide what a bench measures.

use std::time::Duration;

use anyhow::Context as _;
use tonic::transport::{Channel, Endpoint};

/// The nearest-rank `q`-quantile: the smallest sample with at least a fraction `q` of all
/// samples at or below it (so the median of an even count is the lower middle sample, and p99
/// of 50 samples is the largest). `T::default()` for no samples.
pub fn quantile<T: Ord + Copy + Default>(samples: &[T], q: f64) -> T {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (sorted.len() as f64 * q).ceil() as usize;
    match sorted.len() {
        0 => T::default(),
        n => sorted[rank.clamp(1, n) - 1],
    }
}

/// [`quantile`] at one half.
pub fn median<T: Ord + Copy + Default>(samples: &[T]) -> T {
    quantile(samples, 0.5)
}

/// Milliseconds with two decimals, as the tables print them.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// KiB (as /proc reports them) in MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// A connection to the coordinator at `url` with TCP_NODELAY, as every client of trainq's has.
pub async fn channel(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// The `n`th command-line argument parsed as `T`, or `default` when absent.
pub fn arg<T: std::str::FromStr>(n: usize, default: T) -> anyhow::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match std::env::args().nth(n) {
        Some(text) => text
            .parse()
            .with_context(|| format!("argument {n} ({text:?})")),
        None => Ok(default),
    }
}

/// A worker set-up the packing benches compare: its label, torch threads per slot, `--slots`.
pub struct SlotConfig {
    pub label: &'static str,
    pub torch_threads: u32,
    pub slots: &'static str,
}

/// One slot with the machine's two threads against two slots with one thread each.
pub const SLOTS_1_VS_2: [SlotConfig; 2] = [
    SlotConfig {
        label: "--slots 1, 2 torch threads",
        torch_threads: 2,
        slots: "1",
    },
    SlotConfig {
        label: "--slots 2, 1 torch thread each",
        torch_threads: 1,
        slots: "2",
    },
];

/// Prints each [`SLOTS_1_VS_2`] set-up's median wall time (`walls[c]`: its rounds) and the
/// ratio of the first median to the second.
pub fn print_slot_medians(walls: &[Vec<Duration>]) {
    println!();
    println!("| config | median wall (s) |");
    println!("| --- | --- |");
    for (config, w) in SLOTS_1_VS_2.iter().zip(walls) {
        println!("| {} | {:.1} |", config.label, median(w).as_secs_f64());
    }
    println!();
    println!(
        "ratio (slots 1 / slots 2): {:.2}x",
        median(&walls[0]).as_secs_f64() / median(&walls[1]).as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<u32> = (1..=50).rev().collect();
        assert_eq!(median(&v), 25, "lower middle of an even count");
        assert_eq!(quantile(&v, 0.99), 50);
        assert_eq!(quantile(&v, 0.0), 1);
        assert_eq!(quantile(&v, 0.9), 45);
        assert_eq!(median(&[7u32, 1, 4]), 4);
        assert_eq!(quantile::<Duration>(&[], 0.5), Duration::ZERO);
    }
}

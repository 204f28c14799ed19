//! Command-line and environment configuration of the worker binary (clap derive).
//!
//! One struct per subcommand; [`TrainerArgs`] is shared by every subcommand that trains.
//! Must not do any work beyond parsing: `main` turns these into the config of each module. The
//! subcommands' modules (`standalone`, `bench`) depend on this one, never the other way round.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::train::trainer::TrainerConfig;

/// trainq worker: trains experiment jobs with libtorch.
#[derive(Debug, Parser)]
#[command(
    name = "trainq-worker",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings for `serve`, also accepted without the subcommand.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Claim jobs from the coordinator and train them (the default).
    Serve(ServeArgs),
    /// Run one job spec (JSON, the proto's JSON mapping) by itself, with no coordinator or Redis,
    /// printing its metrics as it goes.
    Run(RunArgs),
    /// Measure training throughput of the seed models on random data (prints JSON lines in the
    /// format of bench/torch_reference.py, the PyTorch reference in this repository).
    Bench(BenchArgs),
    /// Write a synthetic CIFAR-100 set in the official binary format, with learnable class
    /// structure, to `<OUT>/cifar-100-binary/` (for tests and machines without the real set).
    GenCifar(crate::data::synth::GenArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The coordinator's gRPC address.
    #[arg(
        long,
        env = "TRAINQ_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// Redis, which carries job ids from the coordinator to workers.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Prefix of every Redis key; must match the coordinator's.
    #[arg(long, env = "TRAINQ_REDIS_PREFIX", default_value = proto::queue::DEFAULT_PREFIX)]
    pub redis_prefix: String,
    /// Identifies this worker in job records; default: host name and process id.
    #[arg(long, env = "TRAINQ_WORKER_ID")]
    pub worker_id: Option<String>,
    /// How often a running job's lease is renewed (and cancellation noticed), in milliseconds.
    #[arg(long, env = "TRAINQ_HEARTBEAT_MS", default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Metric points are sent to the coordinator at least this often, in milliseconds.
    #[arg(long, env = "TRAINQ_REPORT_MS", default_value_t = 1000)]
    pub report_ms: u64,
    /// Log format: text or json.
    #[arg(long, env = "TRAINQ_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Worker token, sent as `authorization: Bearer <token>` on every call to the coordinator;
    /// needed when the coordinator has auth on (one of its TRAINQ_WORKER_TOKENS). Never logged.
    #[arg(long, env = "TRAINQ_WORKER_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// CA certificate (PEM) that signed the coordinator's TLS certificate; needed for an
    /// `https://` coordinator address.
    #[arg(long, env = "TRAINQ_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Where Prometheus scrapes this worker's `GET /metrics` (HTTP), or `off`. Two workers on
    /// one host need different addresses.
    #[arg(long, env = "TRAINQ_METRICS_LISTEN", default_value = "0.0.0.0:9092")]
    pub metrics_listen: MetricsListen,
    /// The queues this worker serves, comma-separated, in order: a free slot takes the next job
    /// of the first queue that has one (names of 1..=32 characters of a-z 0-9 -).
    #[arg(long, env = "TRAINQ_QUEUES", default_value = proto::queue::DEFAULT_QUEUE)]
    pub queues: Queues,
    /// Jobs this worker trains at once, one training thread each (1..=64). Default: 1 on CPU; on
    /// CUDA, one per `--slot-memory-mib` of the GPU's memory, at most 8.
    #[arg(long, env = "TRAINQ_SLOTS", value_parser = clap::value_parser!(u32).range(1..=MAX_SLOTS as i64))]
    pub slots: Option<u32>,
    /// GPU memory set aside per slot when `--slots` is not given, in MiB.
    #[arg(long, env = "TRAINQ_SLOT_MEMORY_MIB", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(256..))]
    pub slot_memory_mib: u64,
    #[command(flatten)]
    pub trainer: TrainerArgs,
}

/// Most slots one worker runs.
pub const MAX_SLOTS: u32 = 64;
/// Most slots a CUDA worker gives itself when `--slots` is not set.
pub const MAX_DEFAULT_CUDA_SLOTS: u64 = 8;

impl ServeArgs {
    /// How many slots to run: `--slots`, else 1 on CPU and, on CUDA, one per
    /// `--slot-memory-mib` of `gpu_memory_mib` (the device's total, when known), at most 8.
    pub fn slot_count(&self, cuda: bool, gpu_memory_mib: Option<u64>) -> u32 {
        if let Some(n) = self.slots {
            return n;
        }
        match (cuda, gpu_memory_mib) {
            (true, Some(total)) => {
                (total / self.slot_memory_mib).clamp(1, MAX_DEFAULT_CUDA_SLOTS) as u32
            }
            _ => 1,
        }
    }

    /// libtorch intra-op threads per slot: `--torch-threads` when set; with one slot, 0 (leave
    /// libtorch's default, every core); otherwise the cores split evenly, at least 1 each.
    pub fn threads_per_slot(&self, slots: u32) -> i32 {
        if self.trainer.torch_threads > 0 || slots <= 1 {
            return self.trainer.torch_threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        (cores / slots).max(1) as i32
    }
}

/// The queues a worker serves, in order (`--queues gpu-large,default`): checked names, no
/// repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queues(pub Vec<String>);

impl std::str::FromStr for Queues {
    type Err = String;

    fn from_str(list: &str) -> Result<Self, Self::Err> {
        proto::queue::parse_queue_list("--queues", list)
            .map(Queues)
            .map_err(|e| e.description)
    }
}

pub use proto::ops::{MetricsListen, Secret};

/// `trainq-worker run`: one spec with no coordinator.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The job spec: trainq.v1.JobSpec in the proto's JSON mapping (`-` reads standard input).
    pub spec: PathBuf,
    /// Print one JSON object per metric point, and a JSON summary, instead of table lines.
    #[arg(long)]
    pub json: bool,
    /// Artifacts (checkpoints `epoch-NNN.safetensors`, `samples.png`, ...) are written here.
    #[arg(long, default_value = "./trainq-run")]
    pub out: PathBuf,
    /// The source checkpoint (safetensors) of a transfer spec: an MNIST classifier's
    /// `epoch-NNN.safetensors`.
    #[arg(long)]
    pub source_checkpoint: Option<PathBuf>,
    /// Resume from a training state (`step-NNNNNNNNN.safetensors`, written into --out by an
    /// earlier run of the same spec, or downloaded as a job's `resume` artifact).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub trainer: TrainerArgs,
}

/// `trainq-worker bench`: throughput of a seed model on random data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchModel {
    /// The seed's MNISTClassifier on 1x28x28 images.
    Mnist,
    /// The seed's CVAE_CIFAR100 (latent 20, beta 1, random init) on 3x32x32 images with one of
    /// 100 labels.
    Cvae,
}

impl BenchModel {
    pub fn name(self) -> &'static str {
        match self {
            BenchModel::Mnist => "mnist",
            BenchModel::Cvae => "cvae",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which seed model to train.
    #[arg(long, value_enum, default_value = "mnist")]
    pub model: BenchModel,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,256")]
    pub batch_sizes: Vec<i64>,
    /// Timed optimiser steps per batch size.
    #[arg(long, default_value_t = 30)]
    pub steps: u32,
    /// Untimed steps first (allocator, kernel selection, and a CUDA graph's warm-up and capture).
    #[arg(long, default_value_t = 10)]
    pub warmup: u32,
    /// Step plans to measure, comma-separated: `auto` (what a job with `precision: auto` gets on
    /// this device), or `eager`/`graph` with optional `-bf16` then `-cl` (channels_last), as in
    /// `eager,graph-bf16,graph-bf16-cl`.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub variants: Vec<String>,
    #[command(flatten)]
    pub trainer: TrainerArgs,
}

/// Where and how training runs. Shared by `serve`, `run` and `bench`.
#[derive(Debug, Clone, Args)]
pub struct TrainerArgs {
    /// Training device: auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, env = "TRAINQ_DEVICE", default_value = "auto")]
    pub device: String,
    /// Data sets live here (`mnist/`, `cifar-100-binary/`); missing ones are downloaded.
    #[arg(long, env = "TRAINQ_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Base URLs tried in order when MNIST is missing from the data dir.
    #[arg(
        long,
        env = "TRAINQ_MNIST_MIRRORS",
        value_delimiter = ',',
        default_value = "https://ossci-datasets.s3.amazonaws.com/mnist/,http://yann.lecun.com/exdb/mnist/"
    )]
    pub mnist_mirrors: Vec<String>,
    /// Base URLs tried in order when CIFAR-100 is missing from the data dir (each must serve
    /// `cifar-100-binary.tar.gz`).
    #[arg(
        long,
        env = "TRAINQ_CIFAR_MIRRORS",
        value_delimiter = ',',
        default_values_t = crate::data::CIFAR100_MIRRORS.iter().map(|m| m.to_string()).collect::<Vec<String>>()
    )]
    pub cifar_mirrors: Vec<String>,
    /// libtorch intra-op threads (0: libtorch's default, every core).
    #[arg(long, env = "TRAINQ_TORCH_THREADS", default_value_t = 0)]
    pub torch_threads: i32,
}

impl TrainerArgs {
    pub fn trainer_config(&self) -> anyhow::Result<TrainerConfig> {
        Ok(TrainerConfig {
            device: crate::train::parse_device(&self.device)?,
            data_dir: self.data_dir.clone(),
            mnist_mirrors: self.mnist_mirrors.clone(),
            cifar_mirrors: self.cifar_mirrors.clone(),
        })
    }

    /// Applies process-wide libtorch settings; call once before training.
    pub fn apply_threads(&self) {
        if self.torch_threads > 0 {
            tch::set_num_threads(self.torch_threads);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let argv = std::iter::once("trainq-worker").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|cli| cli.serve)
    }

    #[test]
    fn slots_and_queues_out_of_range_are_start_up_errors_naming_the_flag() {
        for bad in [
            &["--slots", "0"][..],
            &["--slots", "65"],
            &["--queues", "GPU"],
        ] {
            let e = serve(bad).expect_err("refused").to_string();
            assert!(e.contains(bad[0]), "{bad:?}: {e}");
        }
        let e = serve(&["--queues", "a,a"])
            .expect_err("a repeat")
            .to_string();
        assert!(e.contains("listed twice"), "{e}");
        let ok = serve(&["--slots", "4", "--queues", "gpu-large,default"]).expect("valid");
        assert_eq!(ok.slots, Some(4));
        assert_eq!(ok.queues.0, ["gpu-large", "default"]);
        assert_eq!(serve(&[]).expect("defaults").queues.0, ["default"]);
    }

    #[test]
    fn slot_count_defaults_to_one_on_cpu_and_to_the_memory_budget_on_cuda() {
        let args = serve(&[]).expect("defaults");
        assert_eq!(args.slot_count(false, None), 1);
        assert_eq!(args.slot_count(true, None), 1, "CUDA without NVML: one");
        assert_eq!(
            args.slot_count(true, Some(81_559)),
            8,
            "an 80 GB GPU: capped at 8"
        );
        assert_eq!(args.slot_count(true, Some(16_384)), 4);
        assert_eq!(args.slot_count(true, Some(2_000)), 1);
        let pinned = serve(&["--slots", "3"]).expect("valid");
        assert_eq!(pinned.slot_count(true, Some(81_559)), 3);
        assert_eq!(args.threads_per_slot(1), 0, "one slot: libtorch's default");
        assert!(args.threads_per_slot(2) >= 1);
        let threads = serve(&["--torch-threads", "3"]).expect("valid");
        assert_eq!(threads.threads_per_slot(4), 3);
    }
}

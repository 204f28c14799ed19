//! The `trainq` command line: every clap type (the commands, their arguments, the options every
//! command takes) and the long help with the exit codes.
//!
//! Declarations only: what a command does is in [`crate::commands`]; this module must not
//! talk to the coordinator or read files.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use proto::metric::TEST_NEG_ELBO_NATS;

use crate::output::Output;
use crate::specfile;

const LONG_ABOUT: &str = "\
trainq: submit and follow ML training jobs on a trainq coordinator.

Spec files are JSON, TOML or YAML in the schema of the trainq.v1.JobSpec JSON mapping (camelCase or
snake_case field names, enum names as strings). Unknown fields are errors naming file:line:column.

Sweep files (`trainq sweep submit`) are trainq.v1.SweepSpec in the same three formats: a base job
spec, a grid of fields and values, random seeds and an optional source stage (examples/study.yaml).
`trainq report SWEEP --out DIR` writes a sweep's statistics, learning curves, sample grids and
verdicts as report.md.

Submits are safe to retry: `submit` and `sweep submit` send a request id (a new UUID v7 per
invocation, or --request-id) and retry UNAVAILABLE and DEADLINE_EXCEEDED a few times with it, so
a reply lost on the way never creates a second job or sweep.

Exit codes:
  0  success
  1  a watched job or sweep job failed or was cancelled (watch, submit --wait, sweep watch)
  2  bad usage or a bad spec file (also the coordinator's INVALID_ARGUMENT, and ALREADY_EXISTS for
     a --request-id used before with another spec)
  3  not found (job, artifact, metric)
  4  coordinator unreachable, unauthenticated, or another server error

`trainq health` exits 0 when the coordinator reports SERVING, 1 when it answers anything else
(NOT_SERVING, UNKNOWN), 4 when it cannot be reached: a container healthcheck.

TLS: an https:// server address (or any address with --tls-ca / TRAINQ_TLS_CA) is reached over
TLS, trusting the --tls-ca certificate when given and the webpki (Mozilla) roots otherwise.";

/// The `trainq` command line.
#[derive(Debug, Parser)]
#[command(name = "trainq", version, about = "Submit and follow ML training jobs on a trainq coordinator", long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// The coordinator's gRPC address.
    #[arg(
        long,
        env = "TRAINQ_SERVER",
        default_value = "http://localhost:50051",
        global = true
    )]
    pub server: String,
    /// PEM file of the CA (or self-signed certificate) to trust for TLS. Turns TLS on: a bare
    /// host:port becomes https://. Without it, https:// addresses use the webpki roots.
    #[arg(long, env = "TRAINQ_TLS_CA", global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Bearer token sent as `authorization: Bearer <token>` on every call (never printed).
    #[arg(long, env = "TRAINQ_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// How read commands print: `table` for people, `json` (the proto JSON mapping) for
    /// scripts, `csv` for spreadsheets (tabular commands).
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a job from a JSON, TOML or YAML spec file; prints the job id.
    Submit(SubmitArgs),
    /// List jobs, newest first.
    List(ListArgs),
    /// Show one job: state, timestamps, latest metrics.
    Get {
        /// Job id (UUID).
        job: String,
    },
    /// Cancel a waiting, queued or running job.
    Cancel {
        /// Job id (UUID).
        job: String,
        /// Stored as the job's error.
        #[arg(long, default_value = "cancelled with trainq cancel")]
        reason: String,
    },
    /// Follow jobs until they end: a progress bar per job (plain lines when stdout is not a
    /// terminal). Exits 0 when all succeeded, 1 when any failed or was cancelled.
    ///
    /// Total steps come from the spec: epochs x floor(train examples / batch size), where the
    /// train examples are maxTrainExamples or the whole set (60000 MNIST, 50000 CIFAR-100).
    Watch {
        /// Job ids (UUIDs).
        #[arg(required = true)]
        jobs: Vec<String>,
    },
    /// A job's metric series as a table, CSV (--output csv) or JSON: every point (read page
    /// after page), or with --max-points a selection made by the coordinator.
    Metrics {
        /// Job id (UUID).
        job: String,
        /// Only these metrics (repeatable), for example train/loss.
        #[arg(long = "name", short = 'n')]
        names: Vec<String>,
        /// At most this many points per series (2 to 10000): its first and last points and
        /// evenly spaced ones between them, chosen by the coordinator. Default: every point.
        #[arg(long, value_parser = clap::value_parser!(u32).range(2..=10_000))]
        max_points: Option<u32>,
    },
    /// List or download a job's artifacts (checkpoints, image grids).
    #[command(subcommand)]
    Artifacts(ArtifactsCommand),
    /// Chart one metric of one or more jobs (PNG, or SVG by extension or --svg).
    Plot(PlotArgs),
    /// Sweeps: a base spec run at every point of a grid with every random seed.
    #[command(subcommand)]
    Sweep(SweepCommand),
    /// Write a sweep's report into a folder: report.md (statistics per arm and metric, paired
    /// differences from the baseline, convergence, verdicts, missing runs), learning curves
    /// (curves/*.png and *.svg: mean over seeds ± 1 sd), one sample grid per arm
    /// (samples/<arm>.png) and summary.json (the SweepSummary as proto JSON).
    ///
    /// Verdicts: a non-baseline arm beats the baseline (random init) on a metric when the 95%
    /// interval of its difference paired by seed lies entirely on the better side of 0 (lower is
    /// better except for accuracies), is worse when it lies entirely on the other side, and shows
    /// no difference beyond the noise otherwise; with fewer than 2 paired seeds there is no
    /// interval and the report says so. Works on a sweep in progress (over the runs that
    /// succeeded so far).
    Report(ReportArgs),
    /// The fleet: every worker seen in the last hour (live first), its slots, queues, devices and
    /// the jobs it runs now; or one worker with --worker.
    Workers {
        /// Only this worker (by its --worker-id).
        #[arg(long)]
        worker: Option<String>,
        /// Also workers silent for more than an hour.
        #[arg(long)]
        all: bool,
    },
    /// Ask the coordinator's gRPC health service (grpc.health.v1 Health/Check); prints the
    /// status. Exits 0 when SERVING, 1 otherwise, 4 when unreachable (a container healthcheck).
    Health {
        /// The service to ask about; empty means the whole server.
        #[arg(long, default_value = "")]
        service: String,
        /// Seconds to wait for the connection and for the answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Spec file: .json, .toml, .yaml or .yml.
    pub file: PathBuf,
    /// The file's format when its extension does not tell.
    #[arg(long, value_enum)]
    pub format: Option<specfile::Format>,
    /// Validate the file locally and print the spec as JSON without submitting.
    #[arg(long)]
    pub dry_run: bool,
    /// Watch the job until it ends; exit 1 when it fails or is cancelled.
    #[arg(long)]
    pub wait: bool,
    /// The submit's idempotency key: 1..=128 characters of [A-Za-z0-9_.:-]. Submitting again
    /// with the same key and spec answers with the first job instead of creating another (the
    /// same key with another spec is exit code 2). Default: a new UUID v7 for this invocation.
    #[arg(long)]
    pub request_id: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SweepCommand {
    /// Submit a sweep from a JSON, TOML or YAML file (trainq.v1.SweepSpec: name, labels, base,
    /// grid, seeds, source); prints the sweep id. Unknown fields are errors naming
    /// file:line:column; every arm's spec is validated locally first.
    Submit(SweepSubmitArgs),
    /// Show one sweep: state, arms, seeds, and every job with its arm, seed and state.
    Get {
        /// Sweep id (UUID).
        sweep: String,
    },
    /// List sweeps, newest first, with their jobs by state.
    List {
        /// Sweeps per page (at most 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Follow page tokens to list every sweep.
        #[arg(long)]
        all: bool,
    },
    /// Cancel every job of the sweep that has not ended (ended jobs keep their results).
    Cancel {
        /// Sweep id (UUID).
        sweep: String,
        /// Stored as each cancelled job's error.
        #[arg(long, default_value = "cancelled with trainq sweep cancel")]
        reason: String,
    },
    /// Follow a sweep until every job has ended: ended jobs out of all and the jobs by state
    /// (plain lines when stdout is not a terminal). Exits 0 when every job succeeded, 1 when any
    /// failed or was cancelled.
    Watch {
        /// Sweep id (UUID).
        sweep: String,
    },
}

#[derive(Debug, Args)]
pub struct SweepSubmitArgs {
    /// Sweep file: .json, .toml, .yaml or .yml.
    pub file: PathBuf,
    /// The file's format when its extension does not tell.
    #[arg(long, value_enum)]
    pub format: Option<specfile::Format>,
    /// Validate the file locally and print the sweep spec as JSON without submitting.
    #[arg(long)]
    pub dry_run: bool,
    /// Watch the sweep until every job has ended; exit 1 when any failed or was cancelled.
    #[arg(long)]
    pub wait: bool,
    /// The submit's idempotency key, as for `trainq submit --request-id`. Default: a new
    /// UUID v7 for this invocation.
    #[arg(long)]
    pub request_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Sweep id (UUID).
    pub sweep: String,
    /// The folder to write into (created when missing; existing report files are replaced).
    #[arg(long = "out", short = 'o')]
    pub out: PathBuf,
    /// Metrics to summarise (repeatable or comma-separated). Default: the coordinator's
    /// (test/neg_elbo_nats, test/bits_per_dim, test/recon, test/kl for CVAE sweeps).
    #[arg(long = "metrics", short = 'm', value_delimiter = ',')]
    pub metrics: Vec<String>,
    /// The arm the others are compared with. Default: the one arm with random initialisation.
    #[arg(long)]
    pub baseline: Option<String>,
    /// The metric convergence is measured on (lower is better). Default: test/neg_elbo_nats
    /// for CVAE sweeps.
    #[arg(long)]
    pub convergence_metric: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only jobs in this state (repeatable): waiting, queued, running, succeeded, failed,
    /// cancelled.
    #[arg(long = "state", short = 's')]
    pub states: Vec<String>,
    /// Only jobs with this label (repeatable): key=value.
    #[arg(long = "label", short = 'l')]
    pub labels: Vec<String>,
    /// Only jobs of this experiment kind (repeatable): mnist_classifier, cifar_cvae.
    #[arg(long = "kind", short = 'k')]
    pub kinds: Vec<String>,
    /// Only jobs whose name contains this text, ignoring case.
    #[arg(long)]
    pub name: Option<String>,
    /// Jobs per page (at most 1000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Follow page tokens to list every matching job.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// List a job's artifacts, oldest first.
    List {
        /// Job id (UUID).
        job: String,
        /// Only this kind (checkpoint, samples, reconstructions, resume, ...).
        #[arg(long)]
        kind: Option<String>,
    },
    /// Download an artifact by id, or a job's newest artifact of a kind (with --kind); the
    /// size and SHA-256 are checked.
    Download {
        /// Artifact id, or a job id with --kind.
        id: String,
        /// Treat the id as a job id and fetch its newest artifact of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Where to save it (a file or an existing folder); default: the artifact's name in
        /// the current folder.
        #[arg(long = "out", short = 'o')]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Job ids (UUIDs) whose series go on the chart.
    #[arg(required = true)]
    pub jobs: Vec<String>,
    /// The metric to plot.
    #[arg(long, short = 'm', default_value = TEST_NEG_ELBO_NATS)]
    pub metric: String,
    /// The x axis.
    #[arg(long, value_enum, default_value_t = XAxis::Epoch)]
    pub x: XAxis,
    /// Output file: .png or .svg.
    #[arg(long = "out", short = 'o', default_value = "chart.png")]
    pub out: PathBuf,
    /// Also write an SVG next to the PNG (same name, .svg).
    #[arg(long)]
    pub svg: bool,
    /// Legend labels in job order (default: the jobs' names).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Chart title (default: "<metric> per <x>").
    #[arg(long)]
    pub title: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XAxis {
    Epoch,
    Step,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent_and_documents_exit_codes() {
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes"), "{help}");
        assert!(help.contains("TRAINQ_SERVER"), "{help}");
    }

    #[test]
    fn output_and_server_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "trainq", "list", "--output", "json", "--server", "q:1", "--state", "running",
        ])
        .expect("parses");
        assert_eq!(cli.global.output, Output::Json);
        assert_eq!(cli.global.server, "q:1");
    }

    #[test]
    fn health_and_tls_ca_parse_and_are_documented() {
        let cli = Cli::try_parse_from([
            "trainq",
            "health",
            "--tls-ca",
            "/etc/ca.pem",
            "--server",
            "https://q:1",
            "--timeout",
            "2",
        ])
        .expect("parses");
        assert_eq!(cli.global.tls_ca.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert!(matches!(
            cli.command,
            Command::Health { timeout: 2, ref service } if service.is_empty()
        ));
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("TRAINQ_TLS_CA"), "{help}");
        assert!(help.contains("trainq health"), "{help}");
    }

    #[test]
    fn sweep_and_report_commands_parse_with_their_options() {
        let cli = Cli::try_parse_from([
            "trainq",
            "report",
            "0190c0de-0000-7000-8000-000000000000",
            "--out",
            "r",
            "--metrics",
            "test/neg_elbo_nats,test/kl",
            "--metrics",
            "test/recon",
            "--baseline",
            "random",
        ])
        .expect("parses");
        let Command::Report(args) = cli.command else {
            panic!("not a report")
        };
        assert_eq!(
            args.metrics,
            ["test/neg_elbo_nats", "test/kl", "test/recon"]
        );
        assert_eq!(args.baseline.as_deref(), Some("random"));
        let cli = Cli::try_parse_from(["trainq", "sweep", "watch", "x", "--output", "json"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Sweep(SweepCommand::Watch { .. })
        ));
        assert_eq!(cli.global.output, Output::Json);
        let cli = Cli::try_parse_from(["trainq", "sweep", "submit", "s.yaml", "--dry-run"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Sweep(SweepCommand::Submit(SweepSubmitArgs { dry_run: true, .. }))
        ));
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("trainq report SWEEP --out DIR"), "{help}");
    }
}

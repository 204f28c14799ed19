//! `trainq`, the user CLI of the trainq coordinator: submit spec files (JSON, TOML or YAML),
//! list, get, cancel and watch jobs, read metrics and artifacts, and plot metric series.
//!
//! - [`specfile`]: reading and validating spec files, with file:line:column errors.
//! - [`client`]: the connection, the bearer token, and exit codes.
//! - [`output`]: tables, CSV and the proto JSON mapping.
//! - [`watch`]: progress bars (or plain lines) from the WatchJob stream.
//! - [`plot`]: PNG and SVG charts with an embedded font.
//! - [`report`]: a sweep's Markdown report, learning curves and verdicts (pure functions).
//!
//! Talks to the coordinator's JobService only; must not depend on the server or the worker
//! (only the worker links libtorch).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use proto::v1;
use sha2::Digest;
use tokio_stream::StreamExt;

pub mod client;
pub mod output;
pub mod plot;
pub mod report;
pub mod specfile;
pub mod watch;

use client::{exit, CliError, Client};
use output::Output;

const LONG_ABOUT: &str = "\
trainq: submit and follow ML training jobs on a trainq coordinator.

Spec files are JSON, TOML or YAML in the schema of the trainq.v1.JobSpec JSON mapping (camelCase or
snake_case field names, enum names as strings). Unknown fields are errors naming file:line:column.

Sweep files (`trainq sweep submit`) are trainq.v1.SweepSpec in the same three formats: a base job
spec, a grid of fields and values, random seeds and an optional source stage (examples/study.yaml).
`trainq report SWEEP --out DIR` writes a sweep's statistics, learning curves, sample grids and
verdicts as report.md.

Exit codes:
  0  success
  1  a watched job or sweep job failed or was cancelled (watch, submit --wait, sweep watch)
  2  bad usage or a bad spec file (also the coordinator's INVALID_ARGUMENT)
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
    /// A job's metric series as a table, CSV (--output csv) or JSON.
    Metrics {
        /// Job id (UUID).
        job: String,
        /// Only these metrics (repeatable), for example train/loss.
        #[arg(long = "name", short = 'n')]
        names: Vec<String>,
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
    #[arg(long, short = 'm', default_value = "test/neg_elbo_nats")]
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

/// Runs a parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> u8 {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("trainq: {}", e.message);
            e.code
        }
    }
}

fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe (`trainq list | head`) is not an error worth a panic.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

async fn dispatch(cli: Cli) -> Result<u8, CliError> {
    let g = &cli.global;
    // Commands that need no coordinator.
    if let Command::Submit(args) = &cli.command {
        if args.dry_run {
            let spec = load_spec(args)?;
            print(&output::json(&spec.to_proto()));
            return Ok(exit::OK);
        }
    }
    if let Command::Sweep(SweepCommand::Submit(args)) = &cli.command {
        if args.dry_run {
            let spec = specfile::load_sweep(&args.file, args.format)
                .map_err(|e| CliError::usage(e.to_string()))?;
            print(&output::json(&spec));
            return Ok(exit::OK);
        }
    }
    let target = client::Target {
        server: &g.server,
        tls_ca: g.tls_ca.as_deref(),
    };
    let connect = || client::connect(target, g.token.as_deref());
    match cli.command {
        Command::Health { service, timeout } => {
            let timeout = std::time::Duration::from_secs(timeout.max(1));
            let status = client::health(target, g.token.as_deref(), &service, timeout).await?;
            let name = status.as_str_name();
            if g.output == Output::Json {
                print(&format!("{}\n", serde_json::json!({ "status": name })));
            } else {
                print(&format!("{name}\n"));
            }
            Ok(health_exit_code(status))
        }
        Command::Submit(args) => submit(&connect().await?, &args, g.output).await,
        Command::List(args) => list(&connect().await?, &args, g.output).await,
        Command::Get { job } => {
            let mut c = connect().await?;
            let job = c
                .get_job(v1::GetJobRequest {
                    job_id: job.clone(),
                })
                .await
                .map_err(|s| CliError::from_status(&format!("get {job}"), &s))?
                .into_inner();
            print(&render(g.output, &job, || output::job_table(&job)));
            Ok(exit::OK)
        }
        Command::Cancel { job, reason } => {
            let mut c = connect().await?;
            let job = c
                .cancel_job(v1::CancelJobRequest {
                    job_id: job.clone(),
                    reason,
                })
                .await
                .map_err(|s| CliError::from_status(&format!("cancel {job}"), &s))?
                .into_inner();
            print(&render(g.output, &job, || output::job_table(&job)));
            Ok(exit::OK)
        }
        Command::Watch { jobs } => {
            let c = connect().await?;
            let display = match g.output {
                Output::Json => watch::Display::Quiet,
                _ => watch::Display::auto(),
            };
            let done = watch::watch(&c, &jobs, display).await?;
            if g.output == Output::Json {
                print(&output::json(&done));
            }
            Ok(watch::exit_code(&done))
        }
        Command::Metrics { job, names } => {
            let mut c = connect().await?;
            let points = c
                .get_metrics(v1::GetMetricsRequest {
                    job_id: job.clone(),
                    names,
                })
                .await
                .map_err(|s| CliError::from_status(&format!("metrics {job}"), &s))?
                .into_inner()
                .points;
            let exact = g.output == Output::Csv;
            print(&render(g.output, &points, || {
                output::metrics_table(&points, exact)
            }));
            Ok(exit::OK)
        }
        Command::Artifacts(cmd) => artifacts(&connect().await?, cmd, g.output).await,
        Command::Plot(args) => plot(&connect().await?, &args).await,
        Command::Sweep(cmd) => sweep(&connect().await?, cmd, g.output).await,
        Command::Report(args) => report(&connect().await?, &args, g.output).await,
    }
}

/// The display of a watch: none for JSON (only the result is printed).
fn display_for(out: Output) -> watch::Display {
    match out {
        Output::Json => watch::Display::Quiet,
        _ => watch::Display::auto(),
    }
}

/// One sweep for people: its fields, a blank line, its jobs (CSV: the jobs only).
fn render_sweep(out: Output, sweep: &v1::Sweep) -> String {
    match out {
        Output::Json => output::json(sweep),
        Output::Csv => output::sweep_runs_table(sweep).to_csv(),
        Output::Table => format!(
            "{}\n{}",
            output::sweep_table(sweep).to_text(),
            output::sweep_runs_table(sweep).to_text()
        ),
    }
}

async fn sweep(c: &Client, cmd: SweepCommand, out: Output) -> Result<u8, CliError> {
    let mut client = c.clone();
    match cmd {
        SweepCommand::Submit(args) => {
            let spec = specfile::load_sweep(&args.file, args.format)
                .map_err(|e| CliError::usage(e.to_string()))?;
            let what = format!("sweep submit {}", args.file.display());
            let sweep = client
                .submit_sweep(v1::SubmitSweepRequest {
                    spec: Some(spec.clone()),
                })
                .await
                .map_err(|s| CliError::from_status(&what, &s))?
                .into_inner();
            if out == Output::Json {
                print(&output::json(&sweep));
            } else {
                eprintln!(
                    "submitted sweep {} ({} arms x {} seeds, {} jobs) as {}",
                    spec.name,
                    sweep.arms.len(),
                    spec.seeds.len(),
                    sweep.runs.len(),
                    sweep.sweep_id
                );
                print(&format!("{}\n", sweep.sweep_id));
            }
            if !args.wait {
                return Ok(exit::OK);
            }
            let done = watch::watch_sweep(c, &sweep.sweep_id, display_for(out)).await?;
            Ok(watch::sweep_exit_code(&done))
        }
        SweepCommand::Get { sweep } => {
            let got = client
                .get_sweep(v1::GetSweepRequest {
                    sweep_id: sweep.clone(),
                })
                .await
                .map_err(|s| CliError::from_status(&format!("sweep get {sweep}"), &s))?
                .into_inner();
            print(&render_sweep(out, &got));
            Ok(exit::OK)
        }
        SweepCommand::List { limit, all } => {
            let mut sweeps = Vec::new();
            let mut page_token = String::new();
            loop {
                let resp = client
                    .list_sweeps(v1::ListSweepsRequest {
                        page_size: limit,
                        page_token: page_token.clone(),
                    })
                    .await
                    .map_err(|s| CliError::from_status("sweep list", &s))?
                    .into_inner();
                sweeps.extend(resp.sweeps);
                if !all || resp.next_page_token.is_empty() {
                    break;
                }
                page_token = resp.next_page_token;
            }
            print(&render(out, &sweeps, || output::sweeps_table(&sweeps)));
            Ok(exit::OK)
        }
        SweepCommand::Cancel { sweep, reason } => {
            let got = client
                .cancel_sweep(v1::CancelSweepRequest {
                    sweep_id: sweep.clone(),
                    reason,
                })
                .await
                .map_err(|s| CliError::from_status(&format!("sweep cancel {sweep}"), &s))?
                .into_inner();
            print(&render_sweep(out, &got));
            Ok(exit::OK)
        }
        SweepCommand::Watch { sweep } => {
            let done = watch::watch_sweep(c, &sweep, display_for(out)).await?;
            if out == Output::Json {
                print(&output::json(&done));
            }
            Ok(watch::sweep_exit_code(&done))
        }
    }
}

/// `trainq report`: fetches the sweep, its summary, every succeeded run's series and one
/// sample grid per arm, and writes the report folder (see [`report`]).
async fn report(c: &Client, args: &ReportArgs, out: Output) -> Result<u8, CliError> {
    let id = &args.sweep;
    let what = format!("report {id}");
    let mut client = c.clone();
    let sweep = client
        .get_sweep(v1::GetSweepRequest {
            sweep_id: id.clone(),
        })
        .await
        .map_err(|s| CliError::from_status(&what, &s))?
        .into_inner();
    let summary = client
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: id.clone(),
            metrics: args.metrics.clone(),
            baseline_arm: args.baseline.clone().unwrap_or_default(),
            convergence_metric: args.convergence_metric.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| CliError::from_status(&what, &s))?
        .into_inner();
    let mut metrics: Vec<String> = Vec::new();
    for arm in &summary.arms {
        for m in &arm.metrics {
            if !metrics.contains(&m.name) {
                metrics.push(m.name.clone());
            }
        }
    }
    let mut runs = Vec::new();
    for r in sweep
        .runs
        .iter()
        .filter(|r| !r.source && r.state() == v1::JobState::Succeeded)
    {
        let points = client
            .get_metrics(v1::GetMetricsRequest {
                job_id: r.job_id.clone(),
                names: metrics.clone(),
            })
            .await
            .map_err(|s| CliError::from_status(&format!("{what}: metrics of {}", r.job_id), &s))?
            .into_inner()
            .points;
        runs.push(report::RunSeries {
            arm: r.arm.clone(),
            seed: r.seed,
            job_id: r.job_id.clone(),
            points,
        });
    }
    let dir = &args.out;
    let io = |path: &Path, e: std::io::Error| {
        CliError::usage(format!("{what}: writing {}: {e}", path.display()))
    };
    for sub in ["curves", "samples"] {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).map_err(|e| io(&p, e))?;
    }
    let name = sweep.spec.as_ref().map_or("", |s| s.name.as_str());
    let mut figures = Vec::new();
    for metric in &metrics {
        let curves = report::mean_curves(metric, &sweep.arms, &runs);
        if curves.is_empty() {
            continue;
        }
        let chart = report::curves_chart(name, metric, &curves);
        let (png, svg) = report::figure_paths(metric);
        for rel in [png, svg] {
            let path = dir.join(rel);
            plot::draw(&chart, &path)
                .map_err(|e| CliError::usage(format!("{what}: {}: {e:#}", path.display())))?;
        }
        figures.push(metric.clone());
    }
    let mut samples = Vec::new();
    for (arm, seed, job_id) in report::sample_runs(&sweep) {
        let rel = format!("samples/{}.png", report::file_stem(&arm));
        let req = v1::DownloadArtifactRequest {
            job_id: job_id.clone(),
            kind: "samples".into(),
            ..Default::default()
        };
        let path = match download(c, req, Some(&dir.join(&rel)), &what).await {
            Ok(_) => Some(rel),
            Err(e) if e.code == exit::NOT_FOUND => None,
            Err(e) => return Err(e),
        };
        samples.push(report::SampleGrid {
            arm,
            seed,
            job_id,
            path,
        });
    }
    let summary_path = dir.join("summary.json");
    std::fs::write(&summary_path, output::json(&summary)).map_err(|e| io(&summary_path, e))?;
    let md = report::markdown(&sweep, &summary, &figures, &samples);
    let md_path = dir.join("report.md");
    std::fs::write(&md_path, &md).map_err(|e| io(&md_path, e))?;
    if out == Output::Json {
        print(&output::json(&summary));
    } else {
        eprintln!(
            "wrote {} ({} arms, {} runs with results, {} figures, {} sample grids)",
            md_path.display(),
            summary.arms.len(),
            runs.len(),
            figures.len() * 2,
            samples.iter().filter(|s| s.path.is_some()).count()
        );
        print(&format!("{}\n", md_path.display()));
    }
    Ok(exit::OK)
}

/// `trainq health`'s exit code: 0 for SERVING, 1 for any other answer.
pub fn health_exit_code(status: tonic_health::pb::health_check_response::ServingStatus) -> u8 {
    use tonic_health::pb::health_check_response::ServingStatus;
    if status == ServingStatus::Serving {
        exit::OK
    } else {
        exit::JOB_FAILED
    }
}

/// JSON as the proto mapping, or the table in the chosen text format.
fn render<T: serde::Serialize>(
    out: Output,
    value: &T,
    table: impl FnOnce() -> output::Table,
) -> String {
    match out {
        Output::Json => output::json(value),
        other => table().render(other),
    }
}

fn load_spec(args: &SubmitArgs) -> Result<proto::spec::JobSpec, CliError> {
    specfile::load(&args.file, args.format).map_err(|e| CliError::usage(e.to_string()))
}

async fn submit(c: &Client, args: &SubmitArgs, out: Output) -> Result<u8, CliError> {
    let spec = load_spec(args)?;
    let what = format!("submit {}", args.file.display());
    let resp = c
        .clone()
        .submit_job(v1::SubmitJobRequest {
            spec: Some(spec.to_proto()),
        })
        .await
        .map_err(|s| CliError::from_status(&what, &s))?
        .into_inner();
    if out == Output::Json {
        print(&output::json(&resp));
    } else {
        eprintln!(
            "submitted {} ({}) as {}",
            spec.name,
            proto::state_name(resp.state()),
            resp.job_id
        );
        print(&format!("{}\n", resp.job_id));
    }
    if !args.wait {
        return Ok(exit::OK);
    }
    let display = match out {
        Output::Json => watch::Display::Quiet,
        _ => watch::Display::auto(),
    };
    let done = watch::watch(c, std::slice::from_ref(&resp.job_id), display).await?;
    Ok(watch::exit_code(&done))
}

async fn list(c: &Client, args: &ListArgs, out: Output) -> Result<u8, CliError> {
    let mut states = Vec::new();
    for s in &args.states {
        let state = proto::state_from_name(&s.to_ascii_lowercase()).ok_or_else(|| {
            CliError::usage(format!(
                "unknown state {s:?}: use waiting, queued, running, succeeded, failed or cancelled"
            ))
        })?;
        states.push(state as i32);
    }
    let mut labels = HashMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| CliError::usage(format!("label {l:?} is not key=value")))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let resp = c
            .clone()
            .list_jobs(v1::ListJobsRequest {
                states: states.clone(),
                labels: labels.clone(),
                page_size: args.limit,
                page_token: page_token.clone(),
            })
            .await
            .map_err(|s| CliError::from_status("list", &s))?
            .into_inner();
        jobs.extend(resp.jobs);
        if !args.all || resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    print(&render(out, &jobs, || output::jobs_table(&jobs)));
    Ok(exit::OK)
}

async fn artifacts(c: &Client, cmd: ArtifactsCommand, out: Output) -> Result<u8, CliError> {
    match cmd {
        ArtifactsCommand::List { job, kind } => {
            let list = c
                .clone()
                .list_artifacts(v1::ListArtifactsRequest {
                    job_id: job.clone(),
                    kind: kind.unwrap_or_default(),
                })
                .await
                .map_err(|s| CliError::from_status(&format!("artifacts {job}"), &s))?
                .into_inner()
                .artifacts;
            print(&render(out, &list, || output::artifacts_table(&list)));
            Ok(exit::OK)
        }
        ArtifactsCommand::Download {
            id,
            kind,
            out: dest,
        } => {
            let req = match kind {
                Some(kind) => v1::DownloadArtifactRequest {
                    job_id: id.clone(),
                    kind,
                    ..Default::default()
                },
                None => v1::DownloadArtifactRequest {
                    artifact_id: id.clone(),
                    ..Default::default()
                },
            };
            let what = format!("download {id}");
            let artifact = download(c, req, dest.as_deref(), &what).await?;
            if out == Output::Json {
                print(&output::json(&artifact.0));
            } else {
                eprintln!(
                    "saved {} ({} bytes, sha256 {} checked)",
                    artifact.1.display(),
                    artifact.0.size_bytes,
                    artifact.0.sha256
                );
                print(&format!("{}\n", artifact.1.display()));
            }
            Ok(exit::OK)
        }
    }
}

/// Streams an artifact to a file and checks its size and SHA-256; a mismatch removes the file.
async fn download(
    c: &Client,
    req: v1::DownloadArtifactRequest,
    dest: Option<&Path>,
    what: &str,
) -> Result<(v1::Artifact, PathBuf), CliError> {
    let io = |path: &Path, e: std::io::Error| {
        CliError::usage(format!("{what}: writing {}: {e}", path.display()))
    };
    let mut stream = c
        .clone()
        .download_artifact(req)
        .await
        .map_err(|s| CliError::from_status(what, &s))?
        .into_inner();
    let mut artifact: Option<v1::Artifact> = None;
    let mut file: Option<(PathBuf, std::fs::File)> = None;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| CliError::from_status(what, &s))?;
        if let Some(a) = chunk.artifact {
            let path = match dest {
                Some(d) if d.is_dir() => d.join(&a.name),
                Some(d) => d.to_path_buf(),
                None => PathBuf::from(&a.name),
            };
            let f = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
            file = Some((path, f));
            artifact = Some(a);
        }
        let Some((path, f)) = file.as_mut() else {
            return Err(CliError::new(
                exit::SERVER,
                format!("{what}: data before the artifact record"),
            ));
        };
        f.write_all(&chunk.data).map_err(|e| io(path, e))?;
        hasher.update(&chunk.data);
        size += chunk.data.len() as u64;
    }
    let (Some(artifact), Some((path, f))) = (artifact, file) else {
        return Err(CliError::new(
            exit::SERVER,
            format!("{what}: the stream was empty"),
        ));
    };
    drop(f);
    let sha = hex::encode(hasher.finalize());
    if size != artifact.size_bytes || sha != artifact.sha256 {
        let _ = std::fs::remove_file(&path);
        return Err(CliError::new(
            exit::SERVER,
            format!(
                "{what}: got {size} bytes with sha256 {sha}, expected {} bytes with {}",
                artifact.size_bytes, artifact.sha256
            ),
        ));
    }
    Ok((artifact, path))
}

async fn plot(c: &Client, args: &PlotArgs) -> Result<u8, CliError> {
    if !args.labels.is_empty() && args.labels.len() != args.jobs.len() {
        return Err(CliError::usage(format!(
            "{} --label values for {} jobs: give one per job or none",
            args.labels.len(),
            args.jobs.len()
        )));
    }
    let by_epoch = args.x == XAxis::Epoch;
    let mut named = Vec::new();
    for id in &args.jobs {
        let mut c = c.clone();
        let job = c
            .get_job(v1::GetJobRequest { job_id: id.clone() })
            .await
            .map_err(|s| CliError::from_status(&format!("plot {id}"), &s))?
            .into_inner();
        let points = c
            .get_metrics(v1::GetMetricsRequest {
                job_id: id.clone(),
                names: vec![args.metric.clone()],
            })
            .await
            .map_err(|s| CliError::from_status(&format!("plot {id}"), &s))?
            .into_inner()
            .points;
        let name = job.spec.map(|s| s.name).unwrap_or_else(|| id.clone());
        named.push((id.clone(), name, plot::series_points(&points, by_epoch)));
    }
    let mut series = Vec::new();
    for (i, (id, name, points)) in named.iter().enumerate() {
        let label = match args.labels.get(i) {
            Some(l) => l.clone(),
            // Two jobs of the same name get their short ids to tell them apart.
            None if named.iter().filter(|(_, n, _)| n == name).count() > 1 => {
                format!("{name} ({})", &id[..8.min(id.len())])
            }
            None => name.clone(),
        };
        if points.is_empty() {
            eprintln!("trainq: job {id} ({name}) has no {} points", args.metric);
        }
        series.push(plot::Series {
            label,
            points: points.clone(),
            band: Vec::new(),
        });
    }
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!("no job has points of metric {}", args.metric),
        ));
    }
    let x = if by_epoch { "epoch" } else { "step" };
    let chart = plot::Chart {
        title: args
            .title
            .clone()
            .unwrap_or_else(|| format!("{} per {x}", args.metric)),
        x_desc: x.into(),
        y_desc: args.metric.clone(),
        series,
    };
    let mut paths = vec![args.out.clone()];
    if args.svg && args.out.extension().and_then(|e| e.to_str()) != Some("svg") {
        paths.push(args.out.with_extension("svg"));
    }
    for path in paths {
        plot::draw(&chart, &path)
            .map_err(|e| CliError::usage(format!("plot {}: {e:#}", path.display())))?;
        print(&format!("{}\n", path.display()));
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn only_serving_is_healthy() {
        use tonic_health::pb::health_check_response::ServingStatus;
        assert_eq!(health_exit_code(ServingStatus::Serving), exit::OK);
        assert_ne!(health_exit_code(ServingStatus::NotServing), exit::OK);
        assert_ne!(health_exit_code(ServingStatus::Unknown), exit::OK);
        assert_ne!(health_exit_code(ServingStatus::ServiceUnknown), exit::OK);
    }
}

//! `trainq`, the user CLI of the trainq coordinator: submit spec files (JSON, TOML or YAML),
//! list, get, cancel and watch jobs, read metrics and artifacts, plot metric series, run sweeps
//! and write their reports.
//!
//! - [`args`]: the command line (every clap type) and its long help.
//! - [`commands`]: what each command does, one module per command group.
//! - [`specfile`]: reading and validating spec files, with file:line:column errors.
//! - [`client`]: the connection, the bearer token, and exit codes.
//! - [`output`]: tables, CSV and the proto JSON mapping; [`format`]: the numbers, timestamps and
//!   state names they share with the rest (a leaf).
//! - [`watch`]: progress bars (or plain lines) from the WatchJob and WatchSweep streams.
//! - [`plot`]: PNG and SVG charts with an embedded font.
//! - [`report`]: a sweep's learning curves and verdicts; [`markdown`]: its report.md (pure).
//!
//! This file only dispatches a parsed command line to [`commands`]. Talks to the coordinator's
//! JobService only; must not depend on the server or the worker (only the worker links
//! libtorch).

pub mod args;
pub mod client;
pub mod commands;
#[cfg(test)]
mod fixtures;
pub mod format;
pub mod markdown;
pub mod output;
pub mod plot;
pub mod report;
pub mod specfile;
pub mod watch;

pub use args::Cli;

use args::{Command, SweepCommand};
use client::CliError;
use commands::{artifacts, health, jobs, metrics, report as report_cmd, sweeps};

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

async fn dispatch(cli: Cli) -> Result<u8, CliError> {
    let g = &cli.global;
    // Commands that need no coordinator.
    match &cli.command {
        Command::Submit(args) if args.dry_run => return jobs::dry_run(args),
        Command::Sweep(SweepCommand::Submit(args)) if args.dry_run => return sweeps::dry_run(args),
        _ => {}
    }
    let target = client::Target {
        server: &g.server,
        tls_ca: g.tls_ca.as_deref(),
    };
    let token = g.token.as_deref();
    let out = g.output;
    let connect = || client::connect(target, token);
    match cli.command {
        // The health check makes its own connection, with its own timeout.
        Command::Health { service, timeout } => {
            health::run(target, token, &service, timeout, out).await
        }
        Command::Submit(args) => jobs::submit(&connect().await?, &args, out).await,
        Command::List(args) => jobs::list(&connect().await?, &args, out).await,
        Command::Get { job } => jobs::get(&connect().await?, &job, out).await,
        Command::Cancel { job, reason } => jobs::cancel(&connect().await?, &job, reason, out).await,
        Command::Watch { jobs } => commands::watch::run(&connect().await?, &jobs, out).await,
        Command::Metrics {
            job,
            names,
            max_points,
        } => metrics::metrics(&connect().await?, &job, &names, max_points, out).await,
        Command::Artifacts(cmd) => artifacts::run(&connect().await?, cmd, out).await,
        Command::Plot(args) => metrics::plot(&connect().await?, &args).await,
        Command::Sweep(cmd) => sweeps::run(&connect().await?, cmd, out).await,
        Command::Report(args) => report_cmd::run(&connect().await?, &args, out).await,
        Command::Workers { worker, all } => {
            jobs::workers(&connect().await?, worker.as_deref(), all, out).await
        }
    }
}

//! `trainq sweep submit`, `get`, `list`, `cancel` and `watch`.
//!
//! The coordinator answers with one page of a sweep's runs at a time; `get`, `cancel` and the
//! JSON outputs read every page ([`read_all_runs`]) before printing.
//!
//! Sweep files go through the same parser as job specs and are checked with the coordinator's own
//! `proto::sweep::SweepPlan` ([`crate::specfile::load_sweep`]) before they are sent; `sweep
//! watch` exits as `watch` does. Glue only: the tables are [`crate::output`]'s and the stream is
//! [`crate::watch`]'s.

use proto::v1;

use crate::args::{SweepCommand, SweepSubmitArgs};
use crate::client::{exit, new_request_id, retry_submit, CliError, Client};
use crate::output::{self, print, render, Output};
use crate::specfile;
use crate::watch;

/// `trainq sweep submit --dry-run`: the validated sweep spec as JSON, without a coordinator.
pub fn dry_run(args: &SweepSubmitArgs) -> Result<u8, CliError> {
    let spec = specfile::load_sweep(&args.file, args.format)
        .map_err(|e| CliError::usage(e.to_string()))?;
    print(&output::json(&spec));
    Ok(exit::OK)
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

/// Reads the rest of a sweep's runs (after the page it came with) with GetSweep, page by page,
/// so that `sweep` holds every run; its next_page_token ends empty.
pub async fn read_all_runs(c: &Client, sweep: &mut v1::Sweep, what: &str) -> Result<(), CliError> {
    let mut client = c.clone();
    while !sweep.next_page_token.is_empty() {
        let page = client
            .get_sweep(v1::GetSweepRequest {
                sweep_id: sweep.sweep_id.clone(),
                page_size: 0,
                page_token: std::mem::take(&mut sweep.next_page_token),
            })
            .await
            .map_err(|s| CliError::from_status(what, &s))?
            .into_inner();
        sweep.runs.extend(page.runs);
        sweep.next_page_token = page.next_page_token;
    }
    Ok(())
}

/// The sweep with every one of its runs.
pub async fn get_whole_sweep(c: &Client, id: &str, what: &str) -> Result<v1::Sweep, CliError> {
    let mut sweep = c
        .clone()
        .get_sweep(v1::GetSweepRequest {
            sweep_id: id.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|s| CliError::from_status(what, &s))?
        .into_inner();
    read_all_runs(c, &mut sweep, what).await?;
    Ok(sweep)
}

pub async fn run(c: &Client, cmd: SweepCommand, out: Output) -> Result<u8, CliError> {
    let mut client = c.clone();
    match cmd {
        SweepCommand::Submit(args) => {
            let spec = specfile::load_sweep(&args.file, args.format)
                .map_err(|e| CliError::usage(e.to_string()))?;
            let what = format!("sweep submit {}", args.file.display());
            let request = v1::SubmitSweepRequest {
                spec: Some(spec.clone()),
                request_id: args.request_id.clone().unwrap_or_else(new_request_id),
            };
            let mut sweep = retry_submit(&what, || {
                let mut client = c.clone();
                let request = request.clone();
                async move { client.submit_sweep(request).await }
            })
            .await
            .map_err(|s| CliError::from_status(&what, &s))?
            .into_inner();
            if out == Output::Json {
                read_all_runs(c, &mut sweep, &what).await?;
                print(&output::json(&sweep));
            } else {
                eprintln!(
                    "submitted sweep {} ({} arms x {} seeds, {} jobs) as {}",
                    spec.name,
                    sweep.arms.len(),
                    spec.seeds.len(),
                    watch::sweep_jobs(&sweep),
                    sweep.sweep_id
                );
                print(&format!("{}\n", sweep.sweep_id));
            }
            if !args.wait {
                return Ok(exit::OK);
            }
            let done =
                watch::watch_sweep(c, &sweep.sweep_id, watch::Display::for_output(out)).await?;
            Ok(watch::sweep_exit_code(&done))
        }
        SweepCommand::Get { sweep } => {
            let got = get_whole_sweep(c, &sweep, &format!("sweep get {sweep}")).await?;
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
            let what = format!("sweep cancel {sweep}");
            let mut got = client
                .cancel_sweep(v1::CancelSweepRequest {
                    sweep_id: sweep.clone(),
                    reason,
                })
                .await
                .map_err(|s| CliError::from_status(&what, &s))?
                .into_inner();
            read_all_runs(c, &mut got, &what).await?;
            print(&render_sweep(out, &got));
            Ok(exit::OK)
        }
        SweepCommand::Watch { sweep } => {
            let done = watch::watch_sweep(c, &sweep, watch::Display::for_output(out)).await?;
            if out == Output::Json {
                // WatchSweep messages carry counts only; the JSON shows the runs too.
                let whole = get_whole_sweep(c, &sweep, &format!("sweep watch {sweep}")).await?;
                print(&output::json(&whole));
            }
            Ok(watch::sweep_exit_code(&done))
        }
    }
}

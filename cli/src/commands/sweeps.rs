//! `trainq sweep submit`, `get`, `list`, `cancel` and `watch`.
//!
//! Sweep files go through the same parser as job specs and are checked with the coordinator's own
//! `proto::sweep::SweepPlan` ([`crate::specfile::load_sweep`]) before they are sent; `sweep
//! watch` exits as `watch` does. Glue only: the tables are [`crate::output`]'s and the stream is
//! [`crate::watch`]'s.

use proto::v1;

use crate::args::{SweepCommand, SweepSubmitArgs};
use crate::client::{exit, CliError, Client};
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

pub async fn run(c: &Client, cmd: SweepCommand, out: Output) -> Result<u8, CliError> {
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
            let done =
                watch::watch_sweep(c, &sweep.sweep_id, watch::Display::for_output(out)).await?;
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
            let done = watch::watch_sweep(c, &sweep, watch::Display::for_output(out)).await?;
            if out == Output::Json {
                print(&output::json(&done));
            }
            Ok(watch::sweep_exit_code(&done))
        }
    }
}

//! `trainq submit`, `list`, `get` and `cancel`: one job at a time, or a page of them.
//!
//! Spec files are read and validated by [`crate::specfile`] before anything is sent; this module
//! must not validate specs itself.

use std::collections::HashMap;

use proto::v1;

use crate::args::{ListArgs, SubmitArgs};
use crate::client::{exit, new_request_id, retry_submit, CliError, Client};
use crate::output::{self, print, render, Output};
use crate::specfile;
use crate::watch;

fn load_spec(args: &SubmitArgs) -> Result<proto::spec::JobSpec, CliError> {
    specfile::load(&args.file, args.format).map_err(|e| CliError::usage(e.to_string()))
}

/// `trainq submit --dry-run`: the validated spec as JSON, without a coordinator.
pub fn dry_run(args: &SubmitArgs) -> Result<u8, CliError> {
    let spec = load_spec(args)?;
    print(&output::json(&spec.to_proto()));
    Ok(exit::OK)
}

/// `trainq submit`: prints the job id; with `--wait`, watches the job to its end. The submit
/// carries a request id and is retried with it while the coordinator is unavailable, so it
/// creates one job however often it is sent.
pub async fn submit(c: &Client, args: &SubmitArgs, out: Output) -> Result<u8, CliError> {
    let spec = load_spec(args)?;
    let what = format!("submit {}", args.file.display());
    let request = v1::SubmitJobRequest {
        spec: Some(spec.to_proto()),
        request_id: args.request_id.clone().unwrap_or_else(new_request_id),
    };
    let resp = retry_submit(&what, || {
        let mut client = c.clone();
        let request = request.clone();
        async move { client.submit_job(request).await }
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
    let display = watch::Display::for_output(out);
    let done = watch::watch(c, std::slice::from_ref(&resp.job_id), display).await?;
    Ok(watch::exit_code(&done))
}

/// `unknown state "x": use waiting, queued, running, succeeded, failed or cancelled`
fn unknown_state(given: &str) -> CliError {
    let names: Vec<&str> = proto::JobState::ALL.iter().map(|s| s.as_str()).collect();
    let (last, rest) = names.split_last().expect("there are job states");
    CliError::usage(format!(
        "unknown state {given:?}: use {} or {last}",
        rest.join(", ")
    ))
}

/// `trainq list`: one page, or every page with `--all`.
pub async fn list(c: &Client, args: &ListArgs, out: Output) -> Result<u8, CliError> {
    let mut states = Vec::new();
    for s in &args.states {
        let state =
            proto::state_from_name(&s.to_ascii_lowercase()).ok_or_else(|| unknown_state(s))?;
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
                kinds: args.kinds.clone(),
                name_contains: args.name.clone().unwrap_or_default(),
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

/// `trainq get`: one job's fields and latest metrics.
pub async fn get(c: &Client, job: &str, out: Output) -> Result<u8, CliError> {
    let job = c
        .clone()
        .get_job(v1::GetJobRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(|s| CliError::from_status(&format!("get {job}"), &s))?
        .into_inner();
    print(&render(out, &job, || output::job_table(&job)));
    Ok(exit::OK)
}

/// `trainq cancel`: prints the job as the cancellation left it.
pub async fn cancel(c: &Client, job: &str, reason: String, out: Output) -> Result<u8, CliError> {
    let job = c
        .clone()
        .cancel_job(v1::CancelJobRequest {
            job_id: job.to_string(),
            reason,
        })
        .await
        .map_err(|s| CliError::from_status(&format!("cancel {job}"), &s))?
        .into_inner();
    print(&render(out, &job, || output::job_table(&job)));
    Ok(exit::OK)
}

/// `trainq workers`: the fleet as a table (or JSON).
pub async fn workers(
    c: &Client,
    worker: Option<&str>,
    all: bool,
    out: Output,
) -> Result<u8, CliError> {
    let workers = match worker {
        Some(id) => vec![c
            .clone()
            .get_worker(v1::GetWorkerRequest {
                worker_id: id.to_string(),
            })
            .await
            .map_err(|s| CliError::from_status(&format!("worker {id}"), &s))?
            .into_inner()],
        None => {
            c.clone()
                .list_workers(v1::ListWorkersRequest { include_lost: all })
                .await
                .map_err(|s| CliError::from_status("workers", &s))?
                .into_inner()
                .workers
        }
    };
    print(&render(out, &workers, || output::workers_table(&workers)));
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_state_names_every_state() {
        let err = unknown_state("done");
        assert_eq!(err.code, exit::USAGE);
        assert_eq!(
            err.message,
            "unknown state \"done\": use waiting, queued, running, succeeded, failed or cancelled"
        );
    }
}

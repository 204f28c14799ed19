//! `trainq watch`: follows jobs to their end and exits 0 only when every one succeeded.
//!
//! Glue only: the stream and the progress display are [`crate::watch`]'s.

use crate::client::{CliError, Client};
use crate::output::{self, print, Output};
use crate::watch;

/// Watches the jobs; with `--output json`, prints them as they ended.
pub async fn run(c: &Client, jobs: &[String], out: Output) -> Result<u8, CliError> {
    let done = watch::watch(c, jobs, watch::Display::for_output(out)).await?;
    if out == Output::Json {
        print(&output::json(&done));
    }
    Ok(watch::exit_code(&done))
}

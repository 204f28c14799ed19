//! trainq-worker: thin main. Parses the command line, sets up logging and hands over to the
//! module that does the work: `agent` (serve), `standalone` (run) or `bench`.
//!
//! Must not hold logic of its own: signal and logging set-up come from the `client` crate.

use clap::Parser;

use client::logging::{Format, Output};
use worker::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
    // Before any tensor exists: training steps reuse freed memory instead of faulting it in anew.
    worker::shim::keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Run(args)) => worker::standalone::run(args),
        Some(Command::Bench(args)) => worker::bench::run(args),
        Some(Command::GenCifar(args)) => worker::data::synth::run(args),
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

fn serve(args: worker::config::ServeArgs) -> anyhow::Result<()> {
    // Anything but `json` is text, as before.
    let format = args.log_format.parse().unwrap_or(Format::Text);
    client::logging::init(format, Output::Stderr);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = client::shutdown::on_signal()?;
        worker::agent::serve(args, shutdown).await
    })
}

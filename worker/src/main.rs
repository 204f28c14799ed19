//! trainq-worker: thin main. Parses the command line, sets up logging and hands over to the
//! module that does the work: `agent` (serve), `standalone` (run) or `bench`.

use clap::Parser;

use worker::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
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
    worker::logging::init(&args.log_format);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(worker::agent::serve(args, worker::agent::shutdown_signal()))
}

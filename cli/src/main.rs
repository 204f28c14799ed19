//! The `trainq` binary: parses the command line and runs it (see the `cli` library).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    std::process::ExitCode::from(cli::run(cli).await)
}

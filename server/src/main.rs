//! `trainq-server`: parses the configuration, sets up logging, binds the listener and runs the
//! coordinator until SIGINT or SIGTERM. Everything else lives in the library (`server::run`).
//!
//! Must not hold logic of its own: signal and logging set-up come from the `client` crate.

use anyhow::Context as _;
use clap::Parser as _;
use client::logging::{Format, Output};
use server::config::{Config, LogFormat};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let format = match config.log_format {
        LogFormat::Text => Format::Text,
        LogFormat::Json => Format::Json,
    };
    client::logging::init(format, Output::Stdout);
    let shutdown = client::shutdown::on_signal().context("installing the signal handlers")?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "trainq-server listening");
    server::run(config, listener, shutdown.cancelled_owned()).await
}

//! `switchyard`: runs the broker until Ctrl-C or SIGTERM.
//!
//! This file only parses arguments, sets up logging, loads the configuration and
//! waits for a signal; everything else is in `switchyard-server`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod cluster_local;
mod ctl;
use switchyard_server::Config;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// One broker for AMQP 0-9-1, MQTT and STOMP.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about)]
struct Cli {
    /// Configuration file (default: the built-in copy of config.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Once every listener is bound, write their addresses here as JSON
    /// (`{"amqp":"127.0.0.1:5672"}`); the file appears atomically.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a RabbitMQ-format password hash (random salt) for config.toml.
    HashPassword { password: String },
    /// Administer a running broker over its HTTP management API (like rabbitmqadmin).
    Ctl(Box<ctl::CtlArgs>),
    /// Start a local cluster of N nodes (own ports each, printed) until Ctrl-C.
    ClusterLocal {
        /// How many nodes (n1..nN).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Where the nodes' configs, data and logs live (reused on restart).
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `switchyard ctl` promises scripts exit code 64 for bad usage (sysexits);
            // the broker itself keeps clap's usual 2.
            let is_ctl = std::env::args().nth(1).as_deref() == Some("ctl");
            let usage = e.use_stderr();
            let _ = e.print();
            return match (usage, is_ctl) {
                (false, _) => ExitCode::SUCCESS,
                (true, true) => ExitCode::from(ctl::exit::USAGE),
                (true, false) => ExitCode::from(2),
            };
        }
    };
    match cli.command {
        Some(Command::HashPassword { password }) => {
            let salt = switchyard_core::auth::random_salt();
            println!("{}", switchyard_core::auth::hash_password(&password, salt));
            return ExitCode::SUCCESS;
        }
        Some(Command::Ctl(args)) => return ExitCode::from(ctl::run(*args)),
        Some(Command::ClusterLocal { nodes, dir }) => {
            return match cluster_local::run(nodes, &dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("switchyard cluster-local: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        None => {}
    }

    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn")),
        )
        .init();

    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the causes joined, as `anyhow`'s alternate format does.
            eprintln!("switchyard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::embedded()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config, cli.ready_file.as_deref()))
}

async fn serve(config: Config, ready_file: Option<&Path>) -> anyhow::Result<()> {
    // Install the handlers before announcing readiness, so a SIGTERM sent by whoever
    // reads the ready file is never missed.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let server = switchyard_server::start(config).await?;
    if let Some(path) = ready_file {
        write_ready_file(path, &server.local_addrs())?;
    }
    info!("switchyard is running");

    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                r.context("cannot handle Ctrl-C")?;
                break;
            }
            _ = sigterm.recv() => break,
            // SIGHUP: reload the TLS certificates for new connections.
            _ = sighup.recv() => match server.reload_tls() {
                Ok(true) => info!("TLS certificates reloaded (SIGHUP)"),
                Ok(false) => info!("SIGHUP: no TLS listener, nothing to reload"),
                Err(e) => warn!(error = %e, "SIGHUP: TLS certificates do not load; keeping the previous ones"),
            },
        }
    }
    info!("shutting down");
    if server.shutdown().await {
        info!("stopped");
    }
    Ok(())
}

/// Writes `{"amqp":"127.0.0.1:40123"}` to `<path>.tmp`, then renames it to `<path>`,
/// so a reader never sees half a file.
fn write_ready_file(path: &Path, addrs: &BTreeMap<&'static str, SocketAddr>) -> anyhow::Result<()> {
    // Keys are fixed protocol names and values socket addresses: neither can hold a
    // character JSON would need escaped.
    let body = addrs
        .iter()
        .map(|(name, addr)| format!("\"{name}\":\"{addr}\""))
        .collect::<Vec<_>>()
        .join(",");
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{{{body}}}\n"))
        .with_context(|| format!("cannot write ready file {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot write ready file {}", path.display()))?;
    Ok(())
}

//! `switchyard ctl cluster status|join|leave`: talks to a node's inter-node
//! port (`[cluster] listen`), not the management API.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use switchyard_cluster::{Cookie, Link, NodeTls};

use clap::Subcommand;

use super::client::{exit, CtlError};

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Show a node's view of the cluster: its Raft state, term, leader, members.
    Status {
        /// The node's `[cluster] listen` address.
        #[arg(long, default_value = "127.0.0.1:25672")]
        node: String,
    },
    /// Add a started node (not among the seeds) as a voting member.
    Join {
        /// The new node as `name@host:port` (its `[cluster] listen`).
        member: String,
        /// Any member of the cluster (`[cluster] listen`).
        #[arg(long, default_value = "127.0.0.1:25672")]
        via: String,
    },
    /// Remove a node from the membership by name.
    Leave {
        name: String,
        #[arg(long, default_value = "127.0.0.1:25672")]
        via: String,
    },
}

const TIMEOUT: Duration = Duration::from_secs(15);

fn runtime() -> Result<tokio::runtime::Runtime, CtlError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CtlError::new(exit::IO, format!("cannot start the runtime: {e}")))
}

fn unavailable(what: &str, e: std::io::Error) -> CtlError {
    CtlError::new(exit::UNAVAILABLE, format!("{what}: {e}"))
}

/// How ctl reaches nodes: with the `[tls]` files and `[cluster] cookie` of the
/// node config given with `--config`; plain TCP without one.
fn link(config: Option<&Path>) -> Result<Link, CtlError> {
    let Some(path) = config else {
        return Ok(Link::client(None, None));
    };
    let config = switchyard_server::config::Config::load(path)
        .map_err(|e| CtlError::new(exit::USAGE, e.to_string()))?;
    let cookie = config
        .cluster
        .as_ref()
        .and_then(|c| c.cookie.as_deref())
        .map(Cookie::new);
    let tls = match config.tls_settings() {
        None => None,
        Some(settings) => Some(
            NodeTls::load(&settings)
                .map_err(|e| CtlError::new(exit::USAGE, format!("[tls]: {e}")))?,
        ),
    };
    Ok(Link::client(tls, cookie))
}

pub fn run(
    cmd: &ClusterCmd,
    config: Option<&Path>,
    json: bool,
    out: &mut impl Write,
) -> Result<u8, CtlError> {
    let rt = runtime()?;
    let link = link(config)?;
    let io = |e: std::io::Error| CtlError::new(exit::IO, e.to_string());
    match cmd {
        ClusterCmd::Status { node } => {
            let status = rt
                .block_on(switchyard_cluster::remote_status(node, &link, TIMEOUT))
                .map_err(|e| unavailable(node, e))?;
            if json {
                let text = serde_json::to_string_pretty(&status)
                    .map_err(|e| CtlError::new(exit::DATA, e.to_string()))?;
                writeln!(out, "{text}").map_err(io)?;
            } else {
                write!(out, "{}", status.render()).map_err(io)?;
            }
        }
        ClusterCmd::Join { member, via } => {
            let m = switchyard_cluster::parse_member(member)
                .map_err(|e| CtlError::new(exit::USAGE, e))?;
            rt.block_on(switchyard_cluster::remote_membership(
                via, &link, m, false, TIMEOUT,
            ))
            .map_err(|e| unavailable("join", e))?;
            writeln!(out, "{member} joined").map_err(io)?;
        }
        ClusterCmd::Leave { name, via } => {
            let m = switchyard_cluster::Member {
                name: name.clone(),
                addr: String::new(),
            };
            rt.block_on(switchyard_cluster::remote_membership(
                via, &link, m, true, TIMEOUT,
            ))
            .map_err(|e| unavailable("leave", e))?;
            writeln!(out, "{name} left").map_err(io)?;
        }
    }
    Ok(exit::OK)
}

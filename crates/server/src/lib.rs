//! Switchyard's server shell: reads the configuration, builds the [`Broker`] from it,
//! binds one TCP listener per configured protocol, caps the connections open at once,
//! hands every accepted connection to its protocol adapter in its own task, and shuts
//! everything down on request.
//!
//! It must not speak any protocol itself (that is the adapters' job), route or store
//! messages (the core's), or print, parse arguments or install signal handlers (the
//! binary's): it is a library, so tests can run a broker in-process on port 0.

pub mod config;
mod listener;
pub mod ws;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use switchyard_amqp::AmqpSettings;
use switchyard_core::Broker;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::{Config, ConfigError};

use listener::{Listener, Protocol};

/// How long [`RunningServer::shutdown`] waits for connections to close.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create data_dir {path}: {error}")]
    DataDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot listen for {protocol} on {addr}: {error}")]
    Bind {
        protocol: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// A started server. Dropping it stops the listeners and tells every connection
/// to close, without waiting; [`RunningServer::shutdown`] also waits.
pub struct RunningServer {
    broker: Arc<Broker>,
    addrs: BTreeMap<&'static str, SocketAddr>,
    shutdown: CancellationToken,
    accept_loops: Vec<JoinHandle<()>>,
    connections: TaskTracker,
    limit: Arc<Semaphore>,
    max_connections: usize,
    /// Cancels `shutdown` when the server is dropped without `shutdown()`.
    _cancel_on_drop: DropGuard,
}

/// The AMQP adapter's settings from `[limits]`.
pub fn amqp_settings(config: &Config) -> AmqpSettings {
    let l = &config.limits;
    AmqpSettings {
        frame_max: l.frame_max,
        // Both were range-checked by `Config::validate`; saturate rather than trust it.
        channel_max: u16::try_from(l.channel_max).unwrap_or(u16::MAX),
        heartbeat: u16::try_from(l.heartbeat_secs).unwrap_or(u16::MAX),
        max_message_size: l.max_message_size,
        handshake_timeout: l.handshake_timeout(),
    }
}

/// Builds the broker from `config`, creates `data_dir` and binds every configured
/// listener. Must be called inside a tokio runtime; the accept loops run on it.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|error| ServerError::DataDir {
        path: config.data_dir.clone(),
        error,
    })?;

    let auth = config.auth()?;
    let broker = Broker::new(
        auth,
        &config.vhost_names(),
        config.limits.memory_high_watermark_bytes,
    );

    let mut wanted: Vec<(Protocol, SocketAddr)> = Vec::new();
    if let Some(addr) = config.listeners.amqp {
        wanted.push((Protocol::Amqp(Arc::new(amqp_settings(&config))), addr));
    }
    if wanted.is_empty() {
        warn!("no listener is configured: nobody can connect");
    }

    // Bind everything before accepting anything, so a failure leaves nothing running.
    let mut bound = Vec::new();
    for (protocol, addr) in wanted {
        let (tcp, local) = listener::bind(addr)
            .await
            .map_err(|error| ServerError::Bind {
                protocol: protocol.name(),
                addr,
                error,
            })?;
        bound.push((protocol, tcp, local));
    }

    let shutdown = CancellationToken::new();
    let connections = TaskTracker::new();
    // One cap for all listeners: it guards the process's file descriptors and memory.
    let limit = Arc::new(Semaphore::new(config.limits.max_connections));
    let mut addrs = BTreeMap::new();
    let mut accept_loops = Vec::new();
    for (protocol, tcp, local) in bound {
        info!(protocol = protocol.name(), addr = %local, "listening");
        addrs.insert(protocol.name(), local);
        let l = Listener {
            protocol,
            listener: tcp,
            limit: limit.clone(),
            broker: broker.clone(),
            shutdown: shutdown.clone(),
            connections: connections.clone(),
        };
        accept_loops.push(tokio::spawn(l.run()));
    }

    Ok(RunningServer {
        broker,
        addrs,
        _cancel_on_drop: shutdown.clone().drop_guard(),
        shutdown,
        accept_loops,
        connections,
        limit,
        max_connections: config.limits.max_connections,
    })
}

impl RunningServer {
    /// The address each listener is bound to, by protocol name (`"amqp"`).
    pub fn local_addrs(&self) -> BTreeMap<&'static str, SocketAddr> {
        self.addrs.clone()
    }

    /// The broker every connection shares.
    pub fn broker(&self) -> Arc<Broker> {
        self.broker.clone()
    }

    /// Connections open now, over all listeners.
    pub fn open_connections(&self) -> usize {
        self.max_connections
            .saturating_sub(self.limit.available_permits())
    }

    /// A token cancelled when the server shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, tells every connection to close, and waits up to
    /// [`SHUTDOWN_GRACE`] for them. Returns whether all of them finished in time.
    pub async fn shutdown(self) -> bool {
        self.shutdown_within(SHUTDOWN_GRACE).await
    }

    /// [`RunningServer::shutdown`] with a chosen wait.
    pub async fn shutdown_within(self, grace: Duration) -> bool {
        self.shutdown.cancel();
        for accept_loop in self.accept_loops {
            // An accept loop that panicked has nothing left to stop.
            let _ = accept_loop.await;
        }
        // No new connection task can be spawned now.
        self.connections.close();
        let open = self.connections.len();
        if open > 0 {
            info!(connections = open, "waiting for connections to close");
        }
        let finished = tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_ok();
        if !finished {
            warn!(
                connections = self.connections.len(),
                ?grace,
                "connections still open after the shutdown grace period"
            );
        }
        finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_config(dir: &std::path::Path) -> Config {
        let mut c = Config::embedded().unwrap();
        c.listeners.amqp = Some("127.0.0.1:0".parse().unwrap());
        c.data_dir = dir.join("data");
        c
    }

    #[tokio::test]
    async fn binds_port_zero_creates_data_dir_and_shuts_down() {
        let dir = std::env::temp_dir().join(format!("switchyard-server-{}", std::process::id()));
        let server = start(local_config(&dir)).await.unwrap();
        assert!(dir.join("data").is_dir());
        let addr = server.local_addrs()["amqp"];
        assert_ne!(addr.port(), 0);
        // Whether a connection ends in time on shutdown is the adapter's business;
        // here the listener must stop.
        drop(tokio::net::TcpStream::connect(addr).await.unwrap());
        assert!(server.broker().has_vhost("/"));
        server.shutdown_within(Duration::from_secs(1)).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_at_once() {
        use tokio::io::AsyncReadExt;
        let dir = std::env::temp_dir().join(format!("switchyard-cap-{}", std::process::id()));
        let mut c = local_config(&dir);
        c.limits.max_connections = 1;
        let server = start(c).await.unwrap();
        let addr = server.local_addrs()["amqp"];
        // Take the only permit here rather than with a first connection: the adapter
        // may end that one at once (it is a placeholder while it is being written).
        let permit = server.limit.clone().try_acquire_owned().unwrap();
        assert_eq!(server.open_connections(), 1);
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "over-cap connection must be closed");
        drop(permit);
        server.shutdown().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_taken_port_is_a_bind_error_naming_the_protocol() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = std::env::temp_dir().join(format!("switchyard-bind-{}", std::process::id()));
        let mut c = local_config(&dir);
        c.listeners.amqp = Some(taken.local_addr().unwrap());
        let e = start(c).await.err().unwrap().to_string();
        assert!(e.starts_with("cannot listen for amqp on 127.0.0.1:"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

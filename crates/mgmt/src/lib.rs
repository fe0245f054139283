//! Switchyard's management surface, all over HTTP on axum:
//! - `api`: the RabbitMQ-compatible HTTP API under `/api` (MANAGEMENT.md §0-§6), which
//!   rabbitmqadmin, KEDA, Terraform, pyrabbit2 and the web UI use;
//! - `prometheus`: `/metrics` and `/metrics/per-object` in rabbitmq_prometheus's names
//!   (MANAGEMENT.md §7), on their own listener;
//! - `ui`: the web UI's static assets, embedded in the binary, served at `/`.
//!
//! It reads and changes the broker only through the core's public API (the admin
//! commands, the connection registry, the statistics counters); it never names a
//! protocol adapter's internals, and it owns no state a restart must keep.

pub mod api;
pub mod prometheus;
pub mod ui;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use switchyard_core::Broker;

/// What every handler needs: the broker, plus facts about the node that the
/// core does not know (listeners, start time).
#[derive(Clone)]
pub struct Management {
    pub broker: Arc<Broker>,
    pub node: Arc<NodeInfo>,
}

/// One listener of the node, as `/api/overview` and the health checks show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    /// RabbitMQ's listener protocol name: `amqp`, `mqtt`, `stomp`,
    /// `http/web-mqtt`, `http/web-stomp`, `http`, `http/prometheus`.
    pub protocol: String,
    pub addr: SocketAddr,
}

/// Facts about this node that only the server knows.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// RabbitMQ-style node name, `switchyard@<host>`.
    pub name: String,
    pub cluster_name: String,
    /// When the node started, in ms since the Unix epoch.
    pub started_ms: u64,
    pub listeners: Vec<ListenerInfo>,
    /// Free-disk alarm threshold in bytes (0: no disk alarm).
    pub disk_free_limit: u64,
    /// Where the broker keeps its data: free disk space is measured there.
    pub data_dir: Option<std::path::PathBuf>,
}

impl NodeInfo {
    /// A node named after this host, started now, with no listeners known.
    pub fn local() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
                    .filter(|h| !h.is_empty())
            })
            .unwrap_or_else(|| "localhost".to_owned());
        let name = format!("switchyard@{host}");
        NodeInfo {
            cluster_name: name.clone(),
            name,
            started_ms: api::now_ms(),
            listeners: Vec::new(),
            disk_free_limit: 0,
            data_dir: None,
        }
    }
}

impl Management {
    /// Management of `broker` on a node described by `node`.
    pub fn new(broker: Arc<Broker>, node: NodeInfo) -> Self {
        Management {
            broker,
            node: Arc::new(node),
        }
    }
}

/// The router of the management listener (15672): the API and the UI.
pub fn management_router(state: Management) -> axum::Router {
    api::router(state.clone()).merge(ui::router())
}

/// The router of the Prometheus listener (15692).
pub fn prometheus_router(state: Management) -> axum::Router {
    prometheus::router(state)
}

/// Serves `router` on the connections the transport layer establishes (TCP or
/// TLS, after their handshake deadlines) until `shutdown` completes. The peer
/// address is available to handlers (guest may log in from loopback only).
pub async fn serve(
    incoming: switchyard_transport::HttpIncoming,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // `tap_io` gives any listener with a SocketAddr the ConnectInfo that axum
    // otherwise offers only to a TcpListener.
    axum::serve(
        Incoming(incoming).tap_io(|_| {}),
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// The transport's established connections as axum's listener.
struct Incoming(switchyard_transport::HttpIncoming);

impl axum::serve::Listener for Incoming {
    type Io = switchyard_transport::Stream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.0.next().await {
            Some(conn) => conn,
            // The accept loop stopped (shutdown): nothing more comes, and the
            // graceful shutdown future ends the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.0.local_addr())
    }
}

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
    /// This node's cluster, when `[cluster]` is set: `/api/nodes` lists every
    /// member and Prometheus shows the metadata group's Raft figures.
    pub cluster: Option<switchyard_cluster::ClusterView>,
}

impl NodeInfo {
    /// A node named after this host, started now, with no listeners known.
    pub fn local() -> Self {
        let name = switchyard_core::stats::process::node_name();
        NodeInfo {
            cluster_name: name.clone(),
            name,
            started_ms: api::now_ms(),
            listeners: Vec::new(),
            disk_free_limit: 0,
            data_dir: None,
            cluster: None,
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

/// How long connections still open at shutdown may take to finish their
/// requests.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `router` over HTTP/1.1 on the connections the transport layer
/// establishes (TCP or TLS, after their handshake deadlines) until `shutdown`
/// completes, then lets open connections finish (at most [`SHUTDOWN_GRACE`]).
/// A client must send each request's headers within `header_timeout` of their
/// first byte, or its connection is closed: a slow-loris client cannot hold
/// connections open. The peer address is available to handlers as
/// `ConnectInfo<SocketAddr>` (guest may log in from loopback only).
pub async fn serve(
    mut incoming: switchyard_transport::HttpIncoming,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    header_timeout: std::time::Duration,
) -> std::io::Result<()> {
    use axum::extract::ConnectInfo;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    // Dropped at shutdown: every connection then shuts down gracefully.
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(());
    // Each connection holds a clone; recv() ends once all are gone.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            next = incoming.next() => match next {
                Some(conn) => conn,
                // The accept loop stopped (shutdown).
                None => break,
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(
            router
                .clone()
                .layer(axum::Extension(ConnectInfo::<SocketAddr>(peer))),
        );
        let mut closing = closing_rx.clone();
        let open = open_tx.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        tracing::trace!(%peer, error = %e, "HTTP connection ended");
                    }
                }
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(open);
        });
    }
    drop(closing_tx);
    drop(open_tx);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, open_rx.recv()).await;
    Ok(())
}

//! The TCP accept loop, one per listener (after mini-redis `server.rs`).
//!
//! - A semaphore caps the connections open at once. Over the cap a connection is
//!   accepted and closed at once, with a warning: leaving it in the kernel's backlog
//!   would make the client hang instead of failing fast.
//! - An accept error (EMFILE, ENOBUFS, a connection reset before accept) backs off
//!   exponentially from 1 ms to 1 s and tries again; it never ends the listener.
//! - Each connection runs in its own task with a child cancellation token; whatever
//!   happens to it (error or panic) stays in that task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_amqp::AmqpSettings;
use switchyard_core::connections::{Accepted, ACCEPTED};
use switchyard_core::Broker;
use switchyard_mqtt::{MqttSettings, MqttState};
use switchyard_stomp::StompSettings;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

const BACKOFF_START: Duration = Duration::from_millis(1);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What a listener serves; one variant per protocol adapter.
#[derive(Clone)]
pub(crate) enum Protocol {
    Amqp(Arc<AmqpSettings>),
    /// MQTT 3.1/3.1.1/5.0: the settings and the broker-wide MQTT state.
    Mqtt(Arc<MqttSettings>, Arc<MqttState>),
    /// MQTT over WebSocket: the upgrade, then the same MQTT session.
    MqttWs(Arc<MqttSettings>, Arc<MqttState>, Arc<crate::ws::WsOptions>),
    Stomp(Arc<StompSettings>),
    /// STOMP over WebSocket: the upgrade, then the same STOMP session.
    StompWs(Arc<StompSettings>, Arc<crate::ws::WsOptions>),
}

impl Protocol {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Protocol::Amqp(_) => "amqp",
            Protocol::Mqtt(..) => "mqtt",
            Protocol::MqttWs(..) => "mqtt_ws",
            Protocol::Stomp(_) => "stomp",
            Protocol::StompWs(..) => "stomp_ws",
        }
    }
}

/// One bound listener and what its connections share.
pub(crate) struct Listener {
    pub(crate) protocol: Protocol,
    pub(crate) listener: TcpListener,
    /// The address the listener is bound to.
    pub(crate) local: SocketAddr,
    pub(crate) limit: Arc<Semaphore>,
    pub(crate) broker: Arc<Broker>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) connections: TaskTracker,
}

impl Listener {
    /// Accepts until `shutdown` is cancelled.
    pub(crate) async fn run(self) {
        let name = self.protocol.name();
        let mut backoff = BACKOFF_START;
        loop {
            let accepted = tokio::select! {
                () = self.shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (socket, peer) = match accepted {
                Ok(accepted) => {
                    backoff = BACKOFF_START;
                    accepted
                }
                Err(e) => {
                    warn!(protocol = name, error = %e, ?backoff, "accept failed; retrying");
                    tokio::select! {
                        () = self.shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                warn!(protocol = name, %peer, "connection limit reached; closing new connection");
                drop(socket);
                continue;
            };
            if let Err(e) = socket.set_nodelay(true) {
                // Not fatal: the connection works, only small writes may wait.
                debug!(protocol = name, %peer, error = %e, "cannot set TCP_NODELAY");
            }
            debug!(protocol = name, %peer, "connection accepted");
            let token = self.shutdown.child_token();
            let broker = self.broker.clone();
            let span = tracing::info_span!("conn", protocol = name, %peer);
            // What the session reports to the connection registry: the socket's
            // own local address (the listener's may be 0.0.0.0).
            let facts = Accepted {
                local: socket.local_addr().unwrap_or(self.local),
                tls: false,
                websocket: matches!(self.protocol, Protocol::MqttWs(..) | Protocol::StompWs(..)),
            };
            match &self.protocol {
                Protocol::Mqtt(settings, state) => {
                    let (settings, state) = (settings.clone(), state.clone());
                    self.connections.spawn(
                        ACCEPTED
                            .scope(facts, async move {
                                switchyard_mqtt::serve(
                                    socket, peer, broker, state, settings, token,
                                )
                                .await;
                                drop(permit);
                                debug!("connection ended");
                            })
                            .instrument(span),
                    );
                }
                Protocol::MqttWs(settings, state, ws) => {
                    let (settings, state, ws) = (settings.clone(), state.clone(), ws.clone());
                    self.connections.spawn(
                        ACCEPTED
                            .scope(facts, async move {
                                // The upgrade counts against the handshake timeout too.
                                let upgrade = tokio::time::timeout(
                                    settings.handshake_timeout,
                                    crate::ws::accept(socket, &ws),
                                );
                                match upgrade.await {
                                    Ok(Ok(stream)) => {
                                        switchyard_mqtt::serve(
                                            stream, peer, broker, state, settings, token,
                                        )
                                        .await;
                                    }
                                    Ok(Err(e)) => debug!(error = %e, "WebSocket upgrade failed"),
                                    Err(_) => debug!("WebSocket upgrade timed out"),
                                }
                                drop(permit);
                                debug!("connection ended");
                            })
                            .instrument(span),
                    );
                }
                Protocol::Amqp(settings) => {
                    let settings = settings.clone();
                    self.connections.spawn(
                        ACCEPTED
                            .scope(facts, async move {
                                switchyard_amqp::serve(socket, peer, broker, settings, token).await;
                                drop(permit);
                                debug!("connection ended");
                            })
                            .instrument(span),
                    );
                }
                Protocol::Stomp(settings) => {
                    let settings = settings.clone();
                    self.connections.spawn(
                        ACCEPTED
                            .scope(facts, async move {
                                switchyard_stomp::serve(socket, peer, broker, settings, token)
                                    .await;
                                drop(permit);
                                debug!("connection ended");
                            })
                            .instrument(span),
                    );
                }
                Protocol::StompWs(settings, ws) => {
                    let (settings, ws) = (settings.clone(), ws.clone());
                    self.connections.spawn(
                        ACCEPTED
                            .scope(facts, async move {
                                // The upgrade counts against the handshake timeout too.
                                let upgrade = tokio::time::timeout(
                                    settings.handshake_timeout,
                                    crate::ws::accept(socket, &ws),
                                );
                                match upgrade.await {
                                    Ok(Ok(stream)) => {
                                        switchyard_stomp::serve(
                                            stream, peer, broker, settings, token,
                                        )
                                        .await;
                                    }
                                    Ok(Err(e)) => debug!(error = %e, "WebSocket upgrade failed"),
                                    Err(_) => debug!("WebSocket upgrade timed out"),
                                }
                                drop(permit);
                                debug!("connection ended");
                            })
                            .instrument(span),
                    );
                }
            }
        }
        info!(protocol = name, "listener stopped");
    }
}

/// Binds `addr`; port 0 picks a free port.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

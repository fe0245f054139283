//! The registry of live client connections, whatever their protocol: what the
//! management API lists, what limits count, and how the broker asks a connection
//! to close (a user or vhost deleted, an operator's request).
//!
//! A protocol adapter registers its connection once the client has logged in and
//! chosen a vhost ([`crate::Broker::register_connection`]) and keeps the returned
//! [`ConnectionGuard`]; dropping the guard unregisters. The registry's lock is
//! taken only to register, unregister, list and close: the per-message path
//! touches only the connection's own atomics ([`Connection::recv_oct`] ...).
//!
//! Closing is a request, not an action: [`Registry::close`] records the reason
//! and wakes the connection through the outbox it already waits on; the session
//! sees [`ConnectionGuard::take_close_request`] when it drains its outbox and
//! closes the protocol's way (AMQP `connection.close` 320, MQTT 5 DISCONNECT
//! 0x98, STOMP ERROR). No connection task loop needs to know about the registry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};

use crate::consumer::Outbox;
use crate::error::CoreResult;
use crate::field::FieldTable;

/// RabbitMQ 4's protocol strings, as the management API shows them.
pub mod protocol {
    pub const AMQP_091: &str = "AMQP 0-9-1";
    pub const MQTT_31: &str = "MQTT 3-1";
    pub const MQTT_311: &str = "MQTT 3-1-1";
    pub const MQTT_50: &str = "MQTT 5-0";
    pub const STOMP_10: &str = "STOMP 1-0";
    pub const STOMP_11: &str = "STOMP 1-1";
    pub const STOMP_12: &str = "STOMP 1-2";
    /// The RabbitMQ Stream protocol (RabbitMQ lists these connections apart).
    pub const STREAM: &str = "stream";
}

/// Where the connection served by the current task was accepted. The server
/// sets it around each connection task ([`ACCEPTED`]`.scope(...)`), so that a
/// session learns its local address without every adapter's `serve` taking one
/// more argument (those loops are being merged into one driver; this keeps the
/// registry out of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub local: SocketAddr,
    pub tls: bool,
    pub websocket: bool,
    /// The user name a certificate login takes (SASL EXTERNAL, MQTT and STOMP
    /// without credentials): set on a TLS listener with `verify_peer` when the
    /// client presented a verified certificate that names a user (per
    /// `[auth] ssl_cert_login_from`).
    pub cert_login: Option<std::sync::Arc<str>>,
}

tokio::task_local! {
    /// The [`Accepted`] facts of the connection this task serves.
    pub static ACCEPTED: Accepted;
}

/// The [`Accepted`] facts of the current task's connection, if the server set
/// them (a session built in a unit test has none).
pub fn accepted() -> Option<Accepted> {
    ACCEPTED.try_with(Accepted::clone).ok()
}

/// What an adapter tells the registry about a connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// One of [`protocol`]'s strings.
    pub protocol: &'static str,
    pub user: String,
    pub vhost: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// ms since the Unix epoch.
    pub connected_at: u64,
    /// AMQP's client properties (`product`, `capabilities`...); MQTT and STOMP
    /// put what they know (the MQTT client id) in a small table, or nothing.
    pub client_properties: FieldTable,
    /// Whether it arrived over TLS / WebSocket, for display.
    pub tls: bool,
    pub websocket: bool,
    /// What was negotiated, as RabbitMQ lists it: AMQP's `channel_max` and
    /// `frame_max` (0 for the other protocols), and the heartbeat or MQTT
    /// keep-alive in seconds (0: none).
    pub channel_max: u16,
    pub frame_max: u32,
    pub timeout: u16,
    /// How the client logged in: `PLAIN`, `AMQPLAIN` or `EXTERNAL`
    /// (a certificate).
    pub auth_mechanism: &'static str,
}

impl ConnectionInfo {
    /// The facts common to every protocol, with the local address from
    /// [`accepted`] (unspecified when unknown) and no client properties.
    pub fn new(
        protocol: &'static str,
        user: &str,
        vhost: &str,
        peer: SocketAddr,
        connected_at: u64,
    ) -> Self {
        let accepted = accepted();
        let local = accepted
            .as_ref()
            .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |a| a.local);
        ConnectionInfo {
            protocol,
            user: user.to_owned(),
            vhost: vhost.to_owned(),
            peer,
            local,
            connected_at,
            client_properties: FieldTable::new(),
            tls: accepted.as_ref().is_some_and(|a| a.tls),
            websocket: accepted.as_ref().is_some_and(|a| a.websocket),
            channel_max: 0,
            frame_max: 0,
            timeout: 0,
            auth_mechanism: "PLAIN",
        }
    }

    /// RabbitMQ's name: `"127.0.0.1:54321 -> 127.0.0.1:5672"`. Built when
    /// asked (listing, closing by name), not kept: an idle connection saves
    /// the string.
    pub fn name(&self) -> String {
        Self::name_for(self.peer, self.local)
    }

    /// Whether [`Self::name`] is `name`, without building it.
    pub fn is_named(&self, name: &str) -> bool {
        use std::fmt::Write;
        struct Cmp<'a>(&'a str, bool);
        impl Write for Cmp<'_> {
            fn write_str(&mut self, s: &str) -> std::fmt::Result {
                match self.0.strip_prefix(s) {
                    Some(rest) => self.0 = rest,
                    None => self.1 = false,
                }
                Ok(())
            }
        }
        let mut c = Cmp(name, true);
        let _ = write!(c, "{} -> {}", self.peer, self.local);
        c.1 && c.0.is_empty()
    }

    /// RabbitMQ's connection name for a peer and a local address.
    pub fn name_for(peer: SocketAddr, local: SocketAddr) -> String {
        format!("{peer} -> {local}")
    }
}

/// A registered connection: its fixed facts and counters anyone may bump.
#[derive(Debug)]
pub struct Connection {
    /// The adapter's broker-wide id (AMQP: the owner id of its exclusive queues).
    pub id: u64,
    pub info: ConnectionInfo,
    /// Open channels (AMQP); MQTT and STOMP connections count 1.
    pub channels: AtomicU32,
    pub recv_oct: AtomicU64,
    pub send_oct: AtomicU64,
    pub recv_cnt: AtomicU64,
    pub send_cnt: AtomicU64,
    close_requested: AtomicBool,
    close_reason: Mutex<Option<String>>,
    outbox: Arc<Outbox>,
}

impl Connection {
    /// Asks the connection to close with `reason`; it closes the next time its
    /// task drains its outbox, which this wakes.
    pub fn request_close(&self, reason: impl Into<String>) {
        {
            let mut slot = self.close_reason.lock();
            if slot.is_none() {
                *slot = Some(reason.into());
            }
        }
        self.close_requested.store(true, Ordering::Release);
        self.outbox.wake();
    }

    /// Whether a close was requested (and not yet taken).
    pub fn close_requested(&self) -> bool {
        self.close_requested.load(Ordering::Acquire)
    }

    /// The identity of the outbox this connection drains: equal to
    /// [`crate::consumer::Consumer::outbox_id`] of its consumers.
    pub fn outbox_id(&self) -> usize {
        Arc::as_ptr(&self.outbox) as usize
    }

    pub fn channel_count(&self) -> u32 {
        self.channels.load(Ordering::Relaxed)
    }
}

/// Every live connection, by id.
///
/// Connections opened and closed are counted by the statistics
/// ([`crate::stats::NodeStats::open_connection`], from the first byte on, as
/// RabbitMQ counts them), not here: the registry holds logged-in connections only.
#[derive(Debug, Default)]
pub struct Registry {
    connections: RwLock<HashMap<u64, Arc<Connection>>>,
}

/// Held by a connection while it is registered; unregisters on drop.
#[derive(Debug)]
pub struct ConnectionGuard {
    connection: Arc<Connection>,
    registry: Weak<Registry>,
}

impl ConnectionGuard {
    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }

    /// The reason of a close request, once: the session then closes its way.
    /// One atomic load when there is none (called on every outbox drain).
    pub fn take_close_request(&self) -> Option<String> {
        if !self.connection.close_requested.load(Ordering::Acquire) {
            return None;
        }
        self.connection
            .close_requested
            .store(false, Ordering::Release);
        Some(
            self.connection
                .close_reason
                .lock()
                .take()
                .unwrap_or_else(|| "Closed via management plugin".to_owned()),
        )
    }

    /// Counts a frame/packet received (`bytes` long).
    pub fn received(&self, bytes: usize) {
        let c = &self.connection;
        c.recv_oct.fetch_add(bytes as u64, Ordering::Relaxed);
        c.recv_cnt.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a frame/packet sent (`bytes` long).
    pub fn sent(&self, bytes: usize) {
        let c = &self.connection;
        c.send_oct.fetch_add(bytes as u64, Ordering::Relaxed);
        c.send_cnt.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_channels(&self, n: u32) {
        self.connection.channels.store(n, Ordering::Relaxed);
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.connections.write().remove(&self.connection.id);
        }
    }
}

/// How many connections a vhost and a user have now, for limit checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub vhost: usize,
    pub user: usize,
}

impl Registry {
    pub fn new() -> Arc<Self> {
        Arc::new(Registry::default())
    }

    /// Registers a connection if `admit` allows it, given how many connections
    /// its vhost and user already have. Counting and inserting happen under one
    /// lock, so two connections cannot both take the last slot.
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        info: ConnectionInfo,
        outbox: Arc<Outbox>,
        admit: impl FnOnce(Counts) -> CoreResult<()>,
    ) -> CoreResult<ConnectionGuard> {
        let connection = Arc::new(Connection {
            id,
            info,
            channels: AtomicU32::new(0),
            recv_oct: AtomicU64::new(0),
            send_oct: AtomicU64::new(0),
            recv_cnt: AtomicU64::new(0),
            send_cnt: AtomicU64::new(0),
            close_requested: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            outbox,
        });
        let mut map = self.connections.write();
        let mut counts = Counts::default();
        for c in map.values() {
            counts.vhost += usize::from(c.info.vhost == connection.info.vhost);
            counts.user += usize::from(c.info.user == connection.info.user);
        }
        admit(counts)?;
        map.insert(id, connection.clone());
        drop(map);
        Ok(ConnectionGuard {
            connection,
            registry: Arc::downgrade(self),
        })
    }

    /// Every live connection (a snapshot).
    pub fn list(&self) -> Vec<Arc<Connection>> {
        self.connections.read().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.connections.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.read().is_empty()
    }

    pub fn get(&self, id: u64) -> Option<Arc<Connection>> {
        self.connections.read().get(&id).cloned()
    }

    /// The connection with RabbitMQ's `name` (what `DELETE /api/connections/{name}` names).
    pub fn by_name(&self, name: &str) -> Option<Arc<Connection>> {
        self.connections
            .read()
            .values()
            .find(|c| c.info.is_named(name))
            .cloned()
    }

    /// Asks one connection to close. Returns false if it is not registered.
    pub fn close(&self, id: u64, reason: &str) -> bool {
        match self.get(id) {
            Some(c) => {
                c.request_close(reason);
                true
            }
            None => false,
        }
    }

    /// Asks every connection matching `which` to close; returns how many.
    pub fn close_where(&self, which: impl Fn(&Connection) -> bool, reason: &str) -> usize {
        let doomed: Vec<Arc<Connection>> = self
            .connections
            .read()
            .values()
            .filter(|c| which(c))
            .cloned()
            .collect();
        for c in &doomed {
            c.request_close(reason);
        }
        doomed.len()
    }

    /// Channels open over all of `user`'s connections.
    pub fn user_channels(&self, user: &str) -> u64 {
        self.connections
            .read()
            .values()
            .filter(|c| c.info.user == user)
            .map(|c| u64::from(c.channel_count()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(user: &str, vhost: &str) -> ConnectionInfo {
        let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:5672".parse().unwrap();
        ConnectionInfo {
            local,
            ..ConnectionInfo::new(protocol::AMQP_091, user, vhost, peer, 1)
        }
    }

    #[test]
    fn guard_unregisters_and_close_request_is_taken_once() {
        let r = Registry::new();
        let outbox = Outbox::new(4);
        let g = r
            .register(1, info("bob", "/"), outbox.clone(), |_| Ok(()))
            .unwrap();
        assert_eq!(
            g.connection().info.name(),
            "127.0.0.1:50000 -> 127.0.0.1:5672"
        );
        let i = &g.connection().info;
        assert!(i.is_named("127.0.0.1:50000 -> 127.0.0.1:5672"));
        assert!(!i.is_named("127.0.0.1:50000 -> 127.0.0.1:567"));
        assert!(!i.is_named("127.0.0.1:50000 -> 127.0.0.1:56720"));
        assert!(!i.is_named(""));
        assert_eq!(r.len(), 1);
        assert!(g.take_close_request().is_none());
        assert_eq!(r.close_where(|c| c.info.user == "bob", "user deleted"), 1);
        assert_eq!(g.take_close_request().as_deref(), Some("user deleted"));
        assert!(g.take_close_request().is_none());
        drop(g);
        assert!(r.is_empty());
    }

    #[test]
    fn admit_sees_the_counts_of_vhost_and_user() {
        let r = Registry::new();
        let o = Outbox::new(4);
        let _a = r
            .register(1, info("bob", "/"), o.clone(), |_| Ok(()))
            .unwrap();
        let _b = r
            .register(2, info("ann", "/"), o.clone(), |_| Ok(()))
            .unwrap();
        let mut seen = Counts::default();
        let _c = r
            .register(3, info("bob", "v"), o.clone(), |c| {
                seen = c;
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, Counts { vhost: 0, user: 1 });
        let refused = r.register(4, info("bob", "/"), o, |c| {
            if c.vhost >= 2 {
                Err(crate::CoreError::not_allowed("full"))
            } else {
                Ok(())
            }
        });
        assert!(refused.is_err());
        assert_eq!(r.len(), 3);
    }
}

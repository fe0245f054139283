//! A protocol-neutral window onto session state that lives in a protocol
//! adapter (MQTT's sessions and retained messages), for the management API.
//!
//! The core keeps no such state itself and must not name a protocol, and the
//! management crate must not depend on an adapter: so an adapter implements
//! [`SessionDirectory`] and registers it with the broker
//! ([`crate::Broker::session_directories`]), and the API reads whatever is
//! registered. Reads are snapshots; the one change offered (deleting a retained
//! message) goes through the adapter's own code path, store included.

use std::sync::Arc;

use parking_lot::RwLock;

use crate::message::Message;
use crate::Broker;

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionView {
    /// The filter as the client wrote it (a shared one without its
    /// `$share/<group>/` prefix).
    pub filter: String,
    pub qos: u8,
    /// The shared-subscription group, if any.
    pub share: Option<String>,
    /// The queue its messages wait in.
    pub queue: String,
}

/// A session as the management API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    pub vhost: String,
    pub client_id: String,
    /// Whether a connection is attached now.
    pub connected: bool,
    /// Persistent: it outlives its connection (expiry > 0); clean otherwise.
    pub persistent: bool,
    /// Session expiry interval in seconds (`u32::MAX`: never).
    pub expiry_secs: u32,
    /// For a detached persistent session: ms until it expires (`None`: attached,
    /// or never).
    pub expires_in_ms: Option<u64>,
    /// The protocol version of its last connection, as RabbitMQ names it
    /// (`MQTT 3-1-1`...).
    pub protocol: &'static str,
    pub subscriptions: Vec<SubscriptionView>,
    /// Messages waiting in its queues.
    pub queued: usize,
    /// Messages sent and not yet acknowledged by the client (QoS 1/2).
    pub in_flight: usize,
}

/// A retained message.
#[derive(Debug, Clone)]
pub struct RetainedView {
    pub vhost: String,
    pub topic: String,
    pub message: Arc<Message>,
}

/// What an adapter with sessions offers the management API.
pub trait SessionDirectory: Send + Sync + std::fmt::Debug {
    /// Which adapter this is (`"mqtt"`): the API's path segment.
    fn protocol(&self) -> &'static str;
    /// Every session known (attached or waiting for expiry).
    fn sessions(&self, broker: &Broker) -> Vec<SessionView>;
    /// Retained messages of one vhost, or of all.
    fn retained(&self, vhost: Option<&str>) -> Vec<RetainedView>;
    /// Deletes one retained message (from the store too). `Ok(false)`: there
    /// was none.
    fn delete_retained(&self, vhost: &str, topic: &str) -> std::io::Result<bool>;
}

/// The directories adapters registered.
#[derive(Debug, Default)]
pub struct SessionDirectories(RwLock<Vec<Arc<dyn SessionDirectory>>>);

impl SessionDirectories {
    /// Registers an adapter's directory (one per protocol: a second one for the
    /// same protocol replaces the first).
    pub fn register(&self, directory: Arc<dyn SessionDirectory>) {
        let mut all = self.0.write();
        all.retain(|d| d.protocol() != directory.protocol());
        all.push(directory);
    }

    /// The directory of `protocol`, if its adapter registered one.
    pub fn get(&self, protocol: &str) -> Option<Arc<dyn SessionDirectory>> {
        self.0
            .read()
            .iter()
            .find(|d| d.protocol() == protocol)
            .cloned()
    }
}

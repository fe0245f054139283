//! The one canonical message every protocol converts to and from.
//!
//! The AMQP 0-9-1 basic properties are the superset of what the three protocols
//! carry; protocol-only facts that must survive a hop (MQTT retain flag, response
//! topic, user properties) live in `headers` as INTEROP.md says. The body is a
//! `Bytes`, shared by every queue and subscriber a message is routed to.

use std::sync::Arc;

use bytes::Bytes;

use crate::field::FieldTable;

/// AMQP `delivery-mode` 2: the message should survive a broker restart when it
/// sits in a durable queue.
pub const DELIVERY_MODE_PERSISTENT: u8 = 2;

/// The basic properties of a message, all optional.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Properties {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub headers: Option<FieldTable>,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// Per-message TTL in milliseconds, as a decimal string (AMQP's choice).
    pub expiration: Option<String>,
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// AMQP's `type` property.
    pub kind: Option<String>,
    pub user_id: Option<String>,
    pub app_id: Option<String>,
    /// Deprecated in 0-9-1 but still on the wire.
    pub cluster_id: Option<String>,
}

impl Properties {
    pub fn is_persistent(&self) -> bool {
        self.delivery_mode == Some(DELIVERY_MODE_PERSISTENT)
    }

    /// The per-message TTL in milliseconds, if the `expiration` property holds a
    /// valid one. An invalid value is refused at publish time by the adapters.
    pub fn expiration_ms(&self) -> Option<u64> {
        self.expiration.as_deref().and_then(|s| s.parse().ok())
    }
}

/// A message as published: where it was sent and what it carries. Immutable once
/// built; shared as `Arc<Message>` by every queue it is routed to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// The exchange it was published to (`""` is the default exchange).
    pub exchange: String,
    pub routing_key: String,
    pub properties: Properties,
    pub body: Bytes,
    /// An adapter-defined id of the session that published it (MQTT's no-local
    /// option needs to know a message came from the subscriber itself). `None`
    /// when the adapter does not track it.
    pub origin: Option<u64>,
    /// When the broker received it, in milliseconds since the Unix epoch, if the
    /// adapter recorded it: lets an adapter tell how much of a per-message
    /// expiry is left (MQTT 5 Message Expiry Interval). The core takes no time
    /// itself.
    pub received_ms: Option<u64>,
    /// The name the publisher gave the destination in its own protocol, when
    /// the routing key cannot give it back (an MQTT topic with a `.` inside a
    /// level: `v1.2/x` and `v1/2/x` are both key `v1.2.x`). An internal
    /// annotation: only the adapter of that protocol reads it, to hand its
    /// subscribers exactly what was published; no converter shows it to AMQP or
    /// STOMP clients. It is stored with the message and kept by dead-lettering.
    /// Last in the struct so that records written before it existed still
    /// decode ([`Message::decode_stored`]).
    pub topic: Option<String>,
}

/// The stored layout of [`Message`] before `topic` existed, to read logs and
/// records written then. Postcard is not self-describing: an old record fails
/// to decode as a [`Message`] (it ends where `topic` would start), so readers
/// try [`Message`] first and this layout second.
#[derive(Debug, serde::Deserialize)]
pub struct MessageV1 {
    exchange: String,
    routing_key: String,
    properties: Properties,
    body: Bytes,
    origin: Option<u64>,
    received_ms: Option<u64>,
}

impl From<MessageV1> for Message {
    fn from(m: MessageV1) -> Self {
        Message {
            exchange: m.exchange,
            routing_key: m.routing_key,
            properties: m.properties,
            body: m.body,
            origin: m.origin,
            received_ms: m.received_ms,
            topic: None,
        }
    }
}

impl Message {
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        properties: Properties,
        body: Bytes,
    ) -> Arc<Self> {
        Arc::new(Message {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            properties,
            body,
            origin: None,
            received_ms: None,
            topic: None,
        })
    }

    /// The MQTT topic an MQTT client published this message on, when it rides
    /// along ([`Message::topic`]) and the routing key is still the one RabbitMQ's
    /// mapping made of it (`/` -> `.`): routing then matches MQTT subscriptions
    /// on it with MQTT's rules (exchange.rs). A dead-lettered copy with another
    /// routing key is routed by its key alone.
    pub fn mqtt_routing_topic(&self) -> Option<&str> {
        let topic = self.topic.as_deref()?;
        let same = topic.len() == self.routing_key.len()
            && topic
                .bytes()
                .zip(self.routing_key.bytes())
                .all(|(t, k)| t == k || (t == b'/' && k == b'.'));
        same.then_some(topic)
    }

    /// Bytes this message accounts for in queue length limits and memory: the body
    /// (RabbitMQ's `x-max-length-bytes` counts bodies only).
    pub fn body_size(&self) -> usize {
        self.body.len()
    }
}

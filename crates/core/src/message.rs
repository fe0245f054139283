//! The one canonical message every protocol converts to and from.
//!
//! The AMQP 0-9-1 basic properties are the superset of what the three protocols
//! carry; protocol-only facts that must survive a hop (MQTT retain flag, response
//! topic, user properties) live in `headers` as INTEROP.md says. The body is a
//! `Bytes`, shared by every queue and subscriber a message is routed to.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use bytes::Bytes;

use crate::field::FieldTable;

/// The exchange name and routing key of a message: a string kept inline up to
/// 24 bytes (the size of a `String`), so the usual names cost no allocation
/// of their own per message (an MQTT message's `amq.topic` and topic key, a
/// queue name as key). Serialised as a string, exactly as `String` was.
pub type ShortStr = compact_str::CompactString;

/// AMQP `delivery-mode` 2: the message should survive a broker restart when it
/// sits in a durable queue.
pub const DELIVERY_MODE_PERSISTENT: u8 = 2;

/// Bodies up to this size are copied out of the read buffer when an adapter
/// makes them a message ([`own_if_small`]).
pub const OWN_BODY_MAX: usize = 1024;

/// A body cut from a connection's read buffer, given an allocation of its own
/// if it is small. The slice shares the whole buffer (up to 64 KiB, read with
/// many frames), so one small message left in a queue, a retained store or a
/// mandatory-return clone would keep that buffer alive: copying up to
/// [`OWN_BODY_MAX`] bytes is cheaper, and a backlog of small messages then
/// costs what their bodies are, not what their frames were. Larger bodies stay
/// shared (a copy would cost more than the part of the buffer they pin).
/// Each adapter calls it once, where it turns a frame's body into a
/// [`Message`]'s (AMQP content assembly, MQTT PUBLISH, STOMP SEND).
pub fn own_if_small(body: Bytes) -> Bytes {
    if !body.is_empty() && body.len() <= OWN_BODY_MAX {
        Bytes::copy_from_slice(&body)
    } else {
        body
    }
}

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

/// Properties with every field absent, what an empty [`Props`] reads as.
static NO_PROPERTIES: Properties = Properties {
    content_type: None,
    content_encoding: None,
    headers: None,
    delivery_mode: None,
    priority: None,
    correlation_id: None,
    reply_to: None,
    expiration: None,
    message_id: None,
    timestamp: None,
    kind: None,
    user_id: None,
    app_id: None,
    cluster_id: None,
};

impl Properties {
    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        self == &NO_PROPERTIES
    }

    pub fn is_persistent(&self) -> bool {
        self.delivery_mode == Some(DELIVERY_MODE_PERSISTENT)
    }

    /// The per-message TTL in milliseconds, if the `expiration` property holds a
    /// valid one. An invalid value is refused at publish time by the adapters.
    pub fn expiration_ms(&self) -> Option<u64> {
        self.expiration.as_deref().and_then(|s| s.parse().ok())
    }
}

/// A message's [`Properties`], boxed, and absent when none is set: inline they
/// would be 288 of a message's bytes, most of what a small queued message costs
/// (issue 11), while most messages carry none or two or three. Reads through
/// `Deref` (an absent box reads as all-`None`); a write through `DerefMut`
/// allocates the box. Serialises exactly as `Properties`, so stored records are
/// unchanged.
#[derive(Clone, Default)]
pub struct Props(Option<Box<Properties>>);

impl Props {
    /// The properties, unboxed.
    pub fn into_inner(self) -> Properties {
        self.0.map(|b| *b).unwrap_or_default()
    }
}

impl From<Properties> for Props {
    /// Every adapter's properties become a message's here, so this is where
    /// the header table is trimmed: decoded or built entry by entry it grew
    /// by doubling (room for 4 entries, a 272-byte allocation, for MQTT's one
    /// `x-mqtt-publish-qos`), and a queued message keeps it for as long as it
    /// waits. Shrinking in place costs no copy with glibc.
    fn from(mut p: Properties) -> Self {
        if p.is_empty() {
            return Props(None);
        }
        if let Some(headers) = &mut p.headers {
            headers.0.shrink_to_fit();
        }
        Props(Some(Box::new(p)))
    }
}

impl Deref for Props {
    type Target = Properties;
    fn deref(&self) -> &Properties {
        self.0.as_deref().unwrap_or(&NO_PROPERTIES)
    }
}

impl DerefMut for Props {
    fn deref_mut(&mut self) -> &mut Properties {
        self.0.get_or_insert_with(Box::default)
    }
}

impl PartialEq for Props {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Props {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl serde::Serialize for Props {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Props {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Properties::deserialize(d).map(Props::from)
    }
}

/// An optional `u64` stamped on a message ([`Message::origin`],
/// [`Message::received_ms`]) in 8 bytes instead of `Option<u64>`'s 16 (issue 11):
/// `u64::MAX` stands for `None`. Both values can be 0 (a random session id; a
/// clock before the epoch reads as 0), so 0 cannot be the sentinel, while
/// `u64::MAX` is one no producer makes: receive times saturate there only some
/// 584 million years from now, and MQTT session origins are drawn below it.
/// `Some(u64::MAX)` (a record written before this type existed) saturates to
/// `Some(u64::MAX - 1)`. Serialises exactly as `Option<u64>`, so stored records
/// are unchanged.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp(u64);

impl Stamp {
    pub const NONE: Stamp = Stamp(u64::MAX);

    /// The value; `None` when none was stamped.
    pub fn get(self) -> Option<u64> {
        (self.0 != u64::MAX).then_some(self.0)
    }

    pub fn is_none(self) -> bool {
        self.0 == u64::MAX
    }
}

impl Default for Stamp {
    fn default() -> Self {
        Stamp::NONE
    }
}

impl From<Option<u64>> for Stamp {
    fn from(v: Option<u64>) -> Self {
        v.map_or(Stamp::NONE, |v| Stamp(v.min(u64::MAX - 1)))
    }
}

impl std::fmt::Debug for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

impl serde::Serialize for Stamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.get().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Stamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<u64>::deserialize(d).map(Stamp::from)
    }
}

/// A message as published: where it was sent and what it carries. Immutable once
/// built; shared as `Arc<Message>` by every queue it is routed to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// The exchange it was published to (`""` is the default exchange).
    pub exchange: ShortStr,
    pub routing_key: ShortStr,
    pub properties: Props,
    pub body: Bytes,
    /// An adapter-defined id of the session that published it (MQTT's no-local
    /// option needs to know a message came from the subscriber itself). `None`
    /// when the adapter does not track it.
    pub origin: Stamp,
    /// When the broker received it, in milliseconds since the Unix epoch, if the
    /// adapter recorded it: lets an adapter tell how much of a per-message
    /// expiry is left (MQTT 5 Message Expiry Interval). The core takes no time
    /// itself.
    pub received_ms: Stamp,
    /// The name the publisher gave the destination in its own protocol, when
    /// the routing key cannot give it back (an MQTT topic with a `.` inside a
    /// level: `v1.2/x` and `v1/2/x` are both key `v1.2.x`). An internal
    /// annotation: only the adapter of that protocol reads it, to hand its
    /// subscribers exactly what was published; no converter shows it to AMQP or
    /// STOMP clients. It is stored with the message and kept by dead-lettering.
    /// Last in the struct so that records written before it existed still
    /// decode (as [`MessageV1`]). A `Box<str>`, not a `String`:
    /// 8 bytes less, and serialised the same.
    pub topic: Option<Box<str>>,
}

/// The stored layout of [`Message`] before `topic` existed, to read logs and
/// records written then. Postcard is not self-describing: an old record fails
/// to decode as a [`Message`] (it ends where `topic` would start), so readers
/// try [`Message`] first and this layout second.
#[derive(Debug, serde::Deserialize)]
pub struct MessageV1 {
    exchange: String,
    routing_key: String,
    properties: Props,
    body: Bytes,
    origin: Stamp,
    received_ms: Stamp,
}

impl From<MessageV1> for Message {
    fn from(m: MessageV1) -> Self {
        Message {
            exchange: m.exchange.into(),
            routing_key: m.routing_key.into(),
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
        exchange: impl Into<ShortStr>,
        routing_key: impl Into<ShortStr>,
        properties: Properties,
        body: Bytes,
    ) -> Arc<Self> {
        Arc::new(Message {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            properties: properties.into(),
            body,
            origin: Stamp::NONE,
            received_ms: Stamp::NONE,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What one queued message costs starts here (issue 11): keep it small.
    #[test]
    fn message_and_properties_stay_small() {
        assert_eq!(std::mem::size_of::<Props>(), 8);
        assert_eq!(std::mem::size_of::<Stamp>(), 8);
        // An `Arc<Message>` (16 bytes of counts + this) fits glibc's 144-byte chunk.
        assert!(std::mem::size_of::<Message>() <= 120);
    }

    #[test]
    fn props_box_only_what_is_set_and_store_as_properties() {
        let empty = Props::from(Properties::default());
        assert!(empty.0.is_none());
        assert_eq!(empty.delivery_mode, None);
        // A write through DerefMut allocates the box.
        let mut set = Props::default();
        set.headers.get_or_insert_with(FieldTable::new);
        assert!(set.0.is_some());
        // The stored form is the unboxed one: records written before are read.
        let full = Properties {
            content_type: Some("text/plain".into()),
            delivery_mode: Some(2),
            ..Properties::default()
        };
        let bytes = postcard::to_allocvec(&full).unwrap();
        assert_eq!(
            postcard::to_allocvec(&Props::from(full.clone())).unwrap(),
            bytes
        );
        let back: Props = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.into_inner(), full);
        let none: Props =
            postcard::from_bytes(&postcard::to_allocvec(&Properties::default()).unwrap()).unwrap();
        assert!(none.0.is_none());
    }

    /// The stored layouts of `Message` and `MessageV1` with the field types
    /// they had before [`Stamp`] and `Box<str>`.
    #[derive(serde::Serialize)]
    struct OldMessage {
        exchange: String,
        routing_key: String,
        properties: Properties,
        body: Bytes,
        origin: Option<u64>,
        received_ms: Option<u64>,
        topic: Option<String>,
    }

    #[derive(serde::Serialize)]
    struct OldMessageV1 {
        exchange: String,
        routing_key: String,
        properties: Properties,
        body: Bytes,
        origin: Option<u64>,
        received_ms: Option<u64>,
    }

    #[test]
    fn stored_encoding_is_unchanged_by_the_compact_fields() {
        let stamps = [
            (None, None),
            (Some(0), Some(0)),
            (Some(1), Some(1_700_000_000_000)),
            (Some(u64::MAX - 1), None),
            (None, Some(u64::MAX - 1)),
        ];
        for (origin, received_ms) in stamps {
            for topic in [None, Some("v1.2/x".to_owned()), Some(String::new())] {
                let old = OldMessage {
                    exchange: "amq.topic".into(),
                    routing_key: "v1.2.x".into(),
                    properties: Properties {
                        delivery_mode: Some(2),
                        ..Properties::default()
                    },
                    body: Bytes::from_static(b"payload"),
                    origin,
                    received_ms,
                    topic: topic.clone(),
                };
                let bytes = postcard::to_allocvec(&old).unwrap();
                let m: Message = postcard::from_bytes(&bytes).unwrap();
                assert_eq!(
                    (m.origin.get(), m.received_ms.get(), m.topic.as_deref()),
                    (origin, received_ms, topic.as_deref())
                );
                assert_eq!(
                    (&m.exchange[..], &m.routing_key[..], &m.body[..]),
                    ("amq.topic", "v1.2.x", &b"payload"[..])
                );
                assert_eq!(m.properties.delivery_mode, Some(2));
                assert_eq!(postcard::to_allocvec(&m).unwrap(), bytes);
            }

            let v1 = OldMessageV1 {
                exchange: "".into(),
                routing_key: "q".into(),
                properties: Properties::default(),
                body: Bytes::from_static(b"x"),
                origin,
                received_ms,
            };
            let bytes = postcard::to_allocvec(&v1).unwrap();
            let m: MessageV1 = postcard::from_bytes(&bytes).unwrap();
            let m = Message::from(m);
            assert_eq!((m.origin.get(), m.received_ms.get()), (origin, received_ms));
            assert_eq!(m.topic, None);
            // Re-encoded, it is the V1 record plus an absent topic.
            let mut again = bytes.clone();
            again.push(0);
            assert_eq!(postcard::to_allocvec(&m).unwrap(), again);
        }
    }

    #[test]
    fn a_stamp_holds_any_value_but_the_sentinel() {
        assert_eq!(Stamp::default().get(), None);
        assert!(Stamp::NONE.is_none());
        assert_eq!(Stamp::from(Some(0)).get(), Some(0));
        assert_eq!(Stamp::from(None).get(), None);
        // The sentinel's own value saturates rather than reading as absent.
        let bytes = postcard::to_allocvec(&Some(u64::MAX)).unwrap();
        let s: Stamp = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(s.get(), Some(u64::MAX - 1));
        assert_eq!(format!("{:?}", Stamp::from(Some(3))), "Some(3)");
    }

    #[test]
    fn small_bodies_get_their_own_allocation() {
        let frame = Bytes::from(vec![7u8; 4096]);
        let body = own_if_small(frame.slice(10..26));
        assert_eq!(&body[..], &[7u8; 16]);
        // The frame's buffer is no longer shared by the body.
        assert!(frame.is_unique());
        // A large body stays a slice of it.
        let large = own_if_small(frame.slice(..OWN_BODY_MAX + 1));
        assert!(!frame.is_unique());
        drop(large);
    }
}

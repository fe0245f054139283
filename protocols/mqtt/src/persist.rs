//! What MQTT keeps in the broker's store (the core's protocol-neutral record
//! API, `Store::save_record`): retained messages and persistent sessions, as
//! postcard-encoded records of this module's own types. The core never reads
//! them; [`crate::state`] writes them through and reads them back at start.
//!
//! Postcard is not self-describing: a change to these types needs a new record
//! kind (`mqtt.session.2`) or a migration, never a silent reinterpretation.
//!
//! Must not: decide when to write (that is [`crate::state`]'s job), or speak
//! the protocol.

use std::io;

use serde::{Deserialize, Serialize};
use switchyard_core::message::MessageV1;
use switchyard_core::Message;

use crate::codec::{QoS, SubOptions};
use crate::state::{SessionData, Subscription};

/// Record kind of retained messages; key `vhost \0 topic`.
pub const RETAINED: &str = "mqtt.retained";
/// Record kind of persistent sessions; key `vhost \0 client id`.
pub const SESSION: &str = "mqtt.session";

/// The record key of (vhost, name). The value repeats both, so loading never
/// has to split a key (a vhost name could in theory contain `\0`).
pub fn key(vhost: &str, name: &str) -> String {
    format!("{vhost}\0{name}")
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// A retained message as stored (borrowed to write, owned to read).
#[derive(Debug, Serialize, Deserialize)]
pub struct RetainedRecord<M> {
    pub vhost: String,
    pub topic: String,
    pub message: M,
}

pub fn encode_retained(vhost: &str, topic: &str, message: &Message) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(&RetainedRecord {
        vhost: vhost.to_owned(),
        topic: topic.to_owned(),
        message,
    })
    .map_err(io_err)
}

pub fn decode_retained(bytes: &[u8]) -> io::Result<RetainedRecord<Message>> {
    postcard::from_bytes(bytes)
        .or_else(|_| {
            // Written before `Message::topic` existed.
            postcard::from_bytes::<RetainedRecord<MessageV1>>(bytes).map(|r| RetainedRecord {
                vhost: r.vhost,
                topic: r.topic,
                message: Message::from(r.message),
            })
        })
        .map_err(io_err)
}

/// One subscription as stored (the codec's types stay free of serde).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    /// The filter as the client wrote it (`$share/...` included): the map key.
    pub raw: String,
    pub filter: String,
    pub share: Option<String>,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub id: Option<u32>,
    pub queue: String,
    pub key: String,
}

/// What a persistent session needs to be resumed after a restart. In-flight
/// QoS 1/2 messages are not here: they are in the session's durable queues,
/// where the core recovers them (redelivered, so they go out with DUP).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub vhost: String,
    pub client_id: String,
    /// The protocol level the client last connected with (3, 4, 5), for
    /// inspection: a resuming CONNECT brings its own.
    pub protocol_level: u8,
    /// Stamped on what the session publishes: kept so that no-local still
    /// recognises its own messages recovered from its queues.
    pub origin: u64,
    pub expiry_secs: u32,
    pub subscriptions: Vec<SubscriptionRecord>,
    pub own_queues: Vec<String>,
}

impl SessionRecord {
    pub fn of(data: &SessionData) -> Self {
        SessionRecord {
            vhost: data.key.vhost.clone(),
            client_id: data.key.client_id.clone(),
            protocol_level: data.protocol_level,
            origin: data.origin,
            expiry_secs: data.expiry_secs,
            subscriptions: data
                .subscriptions
                .iter()
                .map(|(raw, s)| SubscriptionRecord {
                    raw: raw.clone(),
                    filter: s.filter.clone(),
                    share: s.share.clone(),
                    qos: s.options.qos.as_u8(),
                    no_local: s.options.no_local,
                    retain_as_published: s.options.retain_as_published,
                    retain_handling: s.options.retain_handling,
                    id: s.id,
                    queue: s.queue.clone(),
                    key: s.key.clone(),
                })
                .collect(),
            own_queues: data.own_queues.clone(),
        }
    }

    pub fn encode(&self) -> io::Result<Vec<u8>> {
        postcard::to_stdvec(self).map_err(io_err)
    }

    pub fn decode(bytes: &[u8]) -> io::Result<Self> {
        postcard::from_bytes(bytes).map_err(io_err)
    }
}

impl SubscriptionRecord {
    pub fn subscription(&self) -> Subscription {
        Subscription {
            filter: self.filter.clone(),
            share: self.share.clone(),
            options: SubOptions {
                // Only valid QoS values were ever stored.
                qos: QoS::from_u8(self.qos).unwrap_or(QoS::AtLeastOnce),
                no_local: self.no_local,
                retain_as_published: self.retain_as_published,
                retain_handling: self.retain_handling,
            },
            id: self.id,
            queue: self.queue.clone(),
            key: self.key.clone(),
        }
    }
}

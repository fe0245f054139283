//! What MQTT keeps in the broker's store (the core's protocol-neutral record
//! API, `Store::save_record`): retained messages and persistent sessions, as
//! postcard-encoded records of this module's own types. The core never reads
//! them; [`crate::state`] writes them through and reads them back at start.
//!
//! Postcard is not self-describing: a change to these types needs a new record
//! kind (`mqtt.session.2`) or a migration, never a silent reinterpretation.
//! Fields are only ever appended, and the reader of each record falls back to
//! the layout before (a record of it ends early, so the newer layout fails).
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
/// where the core recovers them (redelivered, so they go out with DUP). The
/// QoS 2 handshakes that outlive their message's time in a queue are:
/// `incoming_qos2` (client PUBLISHes we sent PUBREC for, PUBREL not yet
/// received) and `pubrel_owed` (our PUBLISHes the client sent PUBREC for,
/// PUBCOMP not yet received). Both were added after the first layout: records
/// without them are read as [`SessionRecordV1`].
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
    pub incoming_qos2: Vec<u16>,
    pub pubrel_owed: Vec<u16>,
}

/// The first layout of [`SessionRecord`] (postcard: a record of it ends where
/// the newer fields would start, so it fails to decode as the newer one).
#[derive(Debug, Deserialize)]
pub struct SessionRecordV1 {
    vhost: String,
    client_id: String,
    protocol_level: u8,
    origin: u64,
    expiry_secs: u32,
    subscriptions: Vec<SubscriptionRecord>,
    own_queues: Vec<String>,
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
            incoming_qos2: data.confirmed_incoming(),
            pubrel_owed: data.pubrel_owed(),
        }
    }

    pub fn encode(&self) -> io::Result<Vec<u8>> {
        postcard::to_stdvec(self).map_err(io_err)
    }

    pub fn decode(bytes: &[u8]) -> io::Result<Self> {
        postcard::from_bytes(bytes)
            .or_else(|_| {
                postcard::from_bytes::<SessionRecordV1>(bytes).map(|r| SessionRecord {
                    vhost: r.vhost,
                    client_id: r.client_id,
                    protocol_level: r.protocol_level,
                    origin: r.origin,
                    expiry_secs: r.expiry_secs,
                    subscriptions: r.subscriptions,
                    own_queues: r.own_queues,
                    incoming_qos2: Vec::new(),
                    pubrel_owed: Vec::new(),
                })
            })
            .map_err(io_err)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The first layout, as it was written.
    #[derive(Serialize)]
    struct V1<'a> {
        vhost: &'a str,
        client_id: &'a str,
        protocol_level: u8,
        origin: u64,
        expiry_secs: u32,
        subscriptions: Vec<SubscriptionRecord>,
        own_queues: Vec<String>,
    }

    #[test]
    fn session_records_of_the_first_layout_still_decode() {
        let old = postcard::to_stdvec(&V1 {
            vhost: "/",
            client_id: "dev",
            protocol_level: 5,
            origin: 42,
            expiry_secs: 600,
            subscriptions: Vec::new(),
            own_queues: vec!["mqtt-subscription-devqos1".into()],
        })
        .unwrap();
        let r = SessionRecord::decode(&old).unwrap();
        assert_eq!(
            (&r.client_id[..], r.origin, r.expiry_secs),
            ("dev", 42, 600)
        );
        assert!(r.incoming_qos2.is_empty() && r.pubrel_owed.is_empty());

        let new = SessionRecord {
            incoming_qos2: vec![7],
            pubrel_owed: vec![3, 9],
            ..r
        };
        assert_eq!(SessionRecord::decode(&new.encode().unwrap()).unwrap(), new);
    }
}

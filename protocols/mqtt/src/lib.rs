//! MQTT 3.1, 3.1.1 and 5.0 for Switchyard, over TCP and WebSocket.
//!
//! - [`codec`]: bytes <-> packets. Pure: no I/O, no async, no core calls.
//! - [`mapping`]: MQTT topics and properties <-> the core's message model
//!   (INTEROP.md's rules, written above the code).
//! - [`session`]: the per-connection state machine: packets in, core calls and
//!   packets out. No sockets, no clock.
//! - [`state`]: broker-wide MQTT state shared by all connections: the client-id
//!   registry and persistent sessions, retained messages, delayed wills.
//! - [`persist`]: the stored form of retained messages and persistent sessions
//!   (records in the broker's store, when it has one).
//! - [`sys`]: `$SYS` topics (broker facts and counters), published every few
//!   seconds.
//! - [`conn`]: the one async part: owns the socket, feeds the session.
//!
//! Must not: depend on another protocol crate, or keep anything the core should
//! own (queues, bindings and routing are the core's; this crate only names them).

pub mod codec;
pub mod conn;
pub mod mapping;
pub mod persist;
pub mod session;
pub mod state;
pub mod sys;

use std::time::Duration;

pub use conn::serve;
pub use state::MqttState;

/// MQTT settings, from the config's `[mqtt]` section.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// The topic exchange PUBLISH goes to and subscriptions bind from.
    pub exchange: String,
    /// The vhost used when the user name names none (`vhost:user`).
    pub default_vhost: String,
    /// Vhosts in lossless topic mode (see [`mapping`]).
    pub lossless_vhosts: Vec<String>,
    /// Whether a CONNECT without a user name logs in as `anonymous_user`.
    pub allow_anonymous: bool,
    pub anonymous_user: String,
    /// Largest packet accepted once logged in (bytes, whole packet).
    pub max_packet_size: usize,
    /// Largest packet accepted before login (bounds the CONNECT).
    pub max_packet_size_unauthenticated: usize,
    /// Highest keep-alive allowed (s); higher or 0 is lowered to it through the
    /// MQTT 5 Server Keep Alive. 0 = no limit.
    pub max_keep_alive_secs: u16,
    /// Highest session expiry interval granted (s); also bounds 3.1.1
    /// persistent sessions.
    pub max_session_expiry_secs: u32,
    /// Our Receive Maximum: unacknowledged QoS 2 PUBLISHes a client may send.
    pub receive_maximum: u16,
    /// Unacknowledged QoS 1/2 messages we send to one client at most (the
    /// client's Receive Maximum may lower it).
    pub max_inflight: u16,
    /// QoS 1/2 messages held for one client beyond those in flight (its own
    /// subscription queues' `x-max-length`, oldest dropped); 0 = no limit.
    pub max_queued: u32,
    /// Topic aliases a client may set up towards us.
    pub topic_alias_maximum: u16,
    /// Time allowed from accept to CONNECT.
    pub handshake_timeout: Duration,
    /// How often `$SYS` topics are published (zero: never).
    pub sys_interval: Duration,
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            exchange: "amq.topic".into(),
            default_vhost: "/".into(),
            lossless_vhosts: Vec::new(),
            allow_anonymous: true,
            anonymous_user: "guest".into(),
            max_packet_size: 268_435_455,
            max_packet_size_unauthenticated: 65_536,
            max_keep_alive_secs: 0,
            max_session_expiry_secs: 86_400,
            receive_maximum: 1024,
            max_inflight: 20,
            max_queued: 1000,
            topic_alias_maximum: 16,
            handshake_timeout: Duration::from_secs(10),
            sys_interval: Duration::from_secs(10),
        }
    }
}

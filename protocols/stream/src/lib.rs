//! The RabbitMQ Stream protocol (port 5552) for Switchyard, on the core's
//! stream queues (the same streams AMQP 0-9-1 and STOMP read and write).
//!
//! - [`codec`]: frames and their field types. Pure.
//! - [`amqp10`]: AMQP 1.0 messages to and from the core's message model (it
//!   lives in the core, which converts stored AMQP 1.0 entries for AMQP 0-9-1,
//!   STOMP and MQTT consumers; re-exported here).
//! - [`session`]: the per-connection state machine: handshake, publishers with
//!   confirms after the stream's sync and deduplication, subscriptions with
//!   chunk credit, stored offsets, stream management. No sockets.
//! - [`conn`]: the session run by the shared connection driver, with its
//!   timers (handshake deadline, heartbeats).
//!
//! Not implemented: single active consumer, super streams (Route and
//! Partitions answer that no such stream exists), compressed sub-entry batches.

pub use switchyard_core::amqp10;
pub mod codec;
pub mod conn;
pub mod session;

pub use conn::{serve, StreamSettings};

//! AMQP 0-9-1 for Switchyard.
//!
//! - [`codec`]: bytes <-> frames. Pure: no I/O, no async, no core calls.
//! - [`session`]: the per-connection state machine (connection and channels): takes
//!   decoded frames, calls the core, produces frames to send. No sockets, no clock.
//! - [`conn`]: the one async part: owns the socket, feeds the session, writes what
//!   it produced, waits on deliveries, heartbeats and shutdown.
//!
//! The core's message model is AMQP 0-9-1's (basic properties, field tables), so
//! this adapter needs no property mapping: frames decode straight into core types.

pub mod codec;
pub mod conn;
pub mod session;

pub use conn::{serve, AmqpSettings};

//! STOMP 1.0, 1.1 and 1.2 for Switchyard.
//!
//! - [`codec`]: bytes <-> frames, for all three versions' framing rules. Pure: no
//!   I/O, no async, no core calls.
//! - [`mapping`]: INTEROP.md's contract: destinations <-> exchanges and queues, STOMP
//!   headers <-> the core's message properties. Pure functions, no core state.
//! - [`session`]: the per-connection state machine: takes decoded frames, calls the
//!   core, produces frames to send. No sockets, no clock (the caller passes `now`
//!   where time matters).
//! - [`conn`]: the one async part: owns the byte stream (TCP or WebSocket, the
//!   same code), feeds the session, writes what it produced, waits on deliveries,
//!   heart-beats and shutdown.
//!
//! This crate must not know any other protocol, open listeners (the server does)
//! or touch files.

pub mod codec;
pub mod conn;
pub mod mapping;
pub mod session;

pub use conn::{serve, StompSettings};

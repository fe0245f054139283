//! AMQP 0-9-1 for Switchyard.
//!
//! - [`codec`]: bytes <-> frames. Pure: no I/O, no async, no core calls.
pub mod codec;

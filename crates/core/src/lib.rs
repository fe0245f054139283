//! Switchyard's routing core: vhosts, exchanges (direct, fanout, topic, headers),
//! queues, bindings, consumers, acknowledgements and the memory alarm.
//!
//! It must not know any protocol, open a socket or touch a file: protocol adapters
//! convert their frames into calls on [`vhost::VHost`] and [`queue::Queue`], and
//! take deliveries from a [`consumer::Outbox`]. Everything here is synchronous and
//! holds locks only briefly, so it can be called from any async task.

pub mod admin;
pub mod amqp10;
pub mod auth;
pub mod authn;
pub mod broker;
pub mod connections;
pub mod consumer;
pub mod deadletter;
pub mod error;
pub mod exchange;
pub mod field;
pub mod flow;
pub mod memory;
pub mod message;
pub mod persist;
pub mod policy;
pub mod queue;
pub mod quorum;
pub mod quorum_link;
pub mod ratelimit;
pub mod scopes;
pub mod sessions;
pub mod stats;
pub mod stream;
pub mod stream_queue;
pub mod timer;
pub mod topic;
pub mod vhost;

pub use broker::{Broker, MetaLog, MetaLogCell};
pub use error::{CoreError, CoreResult, ErrorKind};
pub use field::{FieldTable, FieldValue};
pub use message::{Message, Properties, Props, Stamp};

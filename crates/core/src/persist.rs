//! What the core asks of durable storage, as a trait: the core decides *what* must
//! survive a restart (durable exchanges, queues and bindings; persistent messages
//! in durable queues), a store decides *how* (crates/store writes files).
//!
//! Metadata calls are rare and synchronous: they return once the change is on
//! disk. Message calls only append to the store's buffer and return at once; a
//! message is durable when the store's synced position ([`Store::synced`]) has
//! passed the position its append returned. Publisher confirms (and MQTT PUBACK,
//! STOMP RECEIPT) wait for that, so one fsync covers every message that arrived
//! while the previous one ran (group commit).

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use tokio::sync::watch;

use crate::admin::MetaWrite;
use crate::exchange::{DestinationName, ExchangeOptions};
use crate::field::FieldTable;
use crate::message::Message;
use crate::queue::QueueOptions;

/// A durable exchange as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExchangeRecord {
    pub vhost: String,
    pub name: String,
    pub kind: String,
    pub options: ExchangeOptions,
}

/// A durable queue as stored. `id` names it in the message log: a queue deleted
/// and declared again gets a new id, so records of the old one are ignored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueueRecord {
    pub vhost: String,
    pub name: String,
    pub id: u64,
    pub options: QueueOptions,
}

/// A binding between durable ends, as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BindingRecord {
    pub vhost: String,
    pub source: String,
    pub destination: DestinationName,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// Where a persisted message is: its id in the log and the segment holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredRef {
    pub id: u64,
    pub segment: u32,
    /// Byte offset of the record in its segment, to read the body back. A
    /// record starts within its segment's size (at most 4 GiB, `MessageLog`
    /// clamps it): 32 bits keep the queue entry that holds this small.
    pub offset: u32,
}

/// A message recovered for one queue, in queue order.
///
/// Recovery keeps whole messages in memory only up to a budget of body bytes
/// (`DiskStore::open_with`); every further message is handed to its queue as a
/// compact entry, what a message paged out at run time is: where it is in the
/// store and the few facts the queue needs while it waits. It is read (decoded)
/// from the store only when it is about to be delivered, peeked at or
/// dead-lettered (issue 11: a recovered backlog of millions of messages must
/// not cost a decoded message each).
#[derive(Debug, Clone)]
pub struct RecoveredMessage {
    pub stored: StoredRef,
    /// What recovery kept of the message: all of it while the budget lasts
    /// (`on_disk` is `None`); for a message left on disk, a copy without its
    /// body only if the queue reads its properties while it waits (see
    /// [`crate::queue::read_while_paged`]: a per-message TTL, a priority, an
    /// `x-delay`), and otherwise nothing.
    pub message: Option<Arc<Message>>,
    /// When the broker received it (ms since the Unix epoch), where a queue's
    /// TTL and a delay count from after a restart; kept apart from `message`
    /// because a compact entry has none.
    pub received_ms: Option<u64>,
    /// It had been delivered before the restart (and not acknowledged).
    pub redelivered: bool,
    /// The body was left on disk: this is its length.
    pub on_disk: Option<u32>,
}

/// Everything a store recovered at start.
#[derive(Debug, Default)]
pub struct Recovered {
    pub exchanges: Vec<ExchangeRecord>,
    pub queues: Vec<QueueRecord>,
    pub bindings: Vec<BindingRecord>,
    /// By queue id.
    pub messages: HashMap<u64, Vec<RecoveredMessage>>,
}

/// Durable storage for the core.
pub trait Store: Send + Sync + std::fmt::Debug {
    fn save_exchange(&self, record: &ExchangeRecord) -> io::Result<()>;
    /// Deletes the exchange and every stored binding from or to it.
    fn delete_exchange(&self, vhost: &str, name: &str) -> io::Result<()>;
    fn save_queue(&self, record: &QueueRecord) -> io::Result<()>;
    /// Deletes the queue and every stored binding to it.
    fn delete_queue(&self, vhost: &str, name: &str) -> io::Result<()>;
    fn save_binding(&self, record: &BindingRecord) -> io::Result<()>;
    fn delete_binding(&self, record: &BindingRecord) -> io::Result<()>;
    /// A fresh queue id, never handed out before.
    fn new_queue_id(&self) -> io::Result<u64>;

    /// Appends a persistent message for the given durable queues. Returns where it
    /// is and the log position after it (durable once [`Store::synced`] reaches it).
    fn append_message(&self, queues: &[u64], message: &Message) -> (StoredRef, u64);
    /// The message left the queue for good (acked, dropped, dead-lettered).
    fn append_ack(&self, queue: u64, stored: StoredRef);
    /// The message was handed to a consumer: after a restart it comes back with
    /// `redelivered` set.
    fn append_delivered(&self, queue: u64, stored: StoredRef);
    /// The log position known to be on disk.
    fn synced(&self) -> watch::Receiver<u64>;
    /// Reads a stored message back (for queues that keep bodies on disk only).
    /// The record must have been synced.
    fn read_message(&self, stored: StoredRef) -> io::Result<Message>;

    /// Stores (or replaces) an adapter's own record: state the core does not
    /// model but that must survive a restart (MQTT retained messages and
    /// persistent sessions). `kind` names the adapter's table (`"mqtt.retained"`),
    /// `key` the record within it; the adapter owns the encoding of `value`.
    /// Synchronous like the other metadata calls: on disk when it returns.
    /// Records that belong to a vhost are keyed `vhost \0 ...`: deleting the
    /// vhost deletes them in the same transaction.
    fn save_record(&self, kind: &str, key: &str, value: &[u8]) -> io::Result<()>;
    /// Deletes an adapter record (no error if there is none).
    fn delete_record(&self, kind: &str, key: &str) -> io::Result<()>;
    /// Every record of `kind`, as (key, value), in key order: read once at start.
    fn records(&self, kind: &str) -> io::Result<Vec<(String, Vec<u8>)>>;

    /// Commits the writes of one metadata command ([`crate::admin::MetaCommand`])
    /// in one transaction: all of them are on disk when it returns, or none.
    fn apply_meta(&self, writes: &[MetaWrite]) -> io::Result<()>;

    /// Runs `work` with the metadata writes it makes on this thread committed
    /// without waiting for the disk, then makes all of them durable with one
    /// sync before returning. For bulk changes (a definitions import of 10,000
    /// queues): one fsync instead of two per object. A crash before this
    /// returns may lose any of `work`'s writes, so nothing `work` does may be
    /// acknowledged to a client before it returns; writes of other threads in
    /// the meantime stay durable when they return, as always.
    fn bulk_metadata(&self, work: &mut dyn FnMut()) -> io::Result<()>;

    /// Opens (creating it if new) the log of the stream queue with this id.
    fn open_stream(
        &self,
        queue_id: u64,
        config: crate::stream::StreamConfig,
    ) -> io::Result<Arc<dyn crate::stream::StreamLog>>;
}

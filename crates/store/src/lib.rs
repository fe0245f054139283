//! Switchyard's durable storage, behind the core's [`Store`] trait.
//!
//! - [`meta`]: exchanges, queues, bindings, counters and adapters' own records
//!   (kind, key, opaque value) in an embedded ACID database (redb), one
//!   committed transaction per change.
//! - [`log`]: persistent messages in append-only segment files with group commit
//!   and checksummed records, recovered (torn tail truncated) at start.
//!
//! Everything lives under one directory (`data_dir`). This crate must not route,
//! know protocols or decide what is durable: the core decides, the store keeps.

pub mod log;
pub mod meta;
pub mod stream;

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::Arc;

use switchyard_core::admin::MetaWrite;
use switchyard_core::message::Message;
use switchyard_core::persist::{
    BindingRecord, ExchangeRecord, QueueRecord, Recovered, Store, StoredRef,
};
use switchyard_core::stream::{StreamConfig, StreamLog};
use tokio::sync::watch;

use log::MessageLog;
use meta::MetaStore;

/// Segment files roll at this size.
pub const SEGMENT_SIZE: u64 = 64 * 1024 * 1024;

/// Bytes of message bodies recovery keeps in memory by default.
pub const DEFAULT_RESIDENT_BUDGET: usize = 256 * 1024 * 1024;

/// The store on disk.
#[derive(Debug)]
pub struct DiskStore {
    dir: std::path::PathBuf,
    meta: MetaStore,
    log: MessageLog,
}

/// What opening found, for the log.
#[derive(Debug, Clone, Copy)]
pub struct OpenReport {
    pub exchanges: usize,
    pub queues: usize,
    pub bindings: usize,
    pub messages: usize,
    pub records: usize,
    pub truncated_segments: usize,
}

impl DiskStore {
    /// Opens (or creates) the store in `dir` and recovers its contents.
    pub fn open(dir: &Path) -> io::Result<(Arc<DiskStore>, Recovered, OpenReport)> {
        Self::open_with(dir, SEGMENT_SIZE, DEFAULT_RESIDENT_BUDGET)
    }

    pub fn open_with_segment_size(
        dir: &Path,
        segment_size: u64,
    ) -> io::Result<(Arc<DiskStore>, Recovered, OpenReport)> {
        Self::open_with(dir, segment_size, DEFAULT_RESIDENT_BUDGET)
    }

    /// Opens with a segment size and a budget of body bytes that recovery keeps in
    /// memory (the bodies of further messages stay on disk until delivered).
    pub fn open_with(
        dir: &Path,
        segment_size: u64,
        resident_budget: usize,
    ) -> io::Result<(Arc<DiskStore>, Recovered, OpenReport)> {
        std::fs::create_dir_all(dir)?;
        let meta = MetaStore::open(&dir.join("metadata.redb"))?;
        let (exchanges, queues, bindings) = meta.load()?;
        let ids: HashSet<u64> = queues.iter().map(|q| q.id).collect();
        let (log, found) =
            MessageLog::open(&dir.join("messages"), segment_size, &ids, resident_budget)?;
        let report = OpenReport {
            exchanges: exchanges.len(),
            queues: queues.len(),
            bindings: bindings.len(),
            messages: found.messages.values().map(Vec::len).sum(),
            records: found.records,
            truncated_segments: found.truncated,
        };
        let recovered = Recovered {
            exchanges,
            queues,
            bindings,
            messages: found.messages,
        };
        Ok((
            Arc::new(DiskStore {
                dir: dir.to_owned(),
                meta,
                log,
            }),
            recovered,
            report,
        ))
    }

    /// Syncs what is pending and stops the writer (also done on drop).
    pub fn close(&self) {
        self.log.close();
    }
}

impl Store for DiskStore {
    fn save_exchange(&self, record: &ExchangeRecord) -> io::Result<()> {
        self.meta.save_exchange(record)
    }
    fn delete_exchange(&self, vhost: &str, name: &str) -> io::Result<()> {
        self.meta.delete_exchange(vhost, name)
    }
    fn save_queue(&self, record: &QueueRecord) -> io::Result<()> {
        self.meta.save_queue(record)
    }
    fn delete_queue(&self, vhost: &str, name: &str) -> io::Result<()> {
        self.meta.delete_queue(vhost, name)
    }
    fn save_binding(&self, record: &BindingRecord) -> io::Result<()> {
        self.meta.save_binding(record)
    }
    fn delete_binding(&self, record: &BindingRecord) -> io::Result<()> {
        self.meta.delete_binding(record)
    }
    fn new_queue_id(&self) -> io::Result<u64> {
        self.meta.next("queue_id")
    }
    fn append_message(&self, queues: &[u64], message: &Message) -> (StoredRef, u64) {
        self.log.append_message(queues, message)
    }
    fn append_ack(&self, queue: u64, stored: StoredRef) {
        self.log.append_ack(queue, stored);
    }
    fn append_delivered(&self, queue: u64, stored: StoredRef) {
        self.log.append_delivered(queue, stored);
    }
    fn synced(&self) -> watch::Receiver<u64> {
        self.log.synced()
    }
    fn read_message(&self, stored: StoredRef) -> io::Result<Message> {
        self.log.read_message(stored)
    }
    fn save_record(&self, kind: &str, key: &str, value: &[u8]) -> io::Result<()> {
        self.meta.save_record(kind, key, value)
    }
    fn delete_record(&self, kind: &str, key: &str) -> io::Result<()> {
        self.meta.delete_record(kind, key)
    }
    fn records(&self, kind: &str) -> io::Result<Vec<(String, Vec<u8>)>> {
        self.meta.records(kind)
    }
    fn apply_meta(&self, writes: &[MetaWrite]) -> io::Result<()> {
        self.meta.apply(writes)
    }
    fn bulk_metadata(&self, work: &mut dyn FnMut()) -> io::Result<()> {
        self.meta.bulk(work)
    }
    fn open_stream(&self, queue_id: u64, config: StreamConfig) -> io::Result<Arc<dyn StreamLog>> {
        let dir = self.dir.join("streams").join(queue_id.to_string());
        let stream: Arc<dyn StreamLog> = stream::DiskStream::open(&dir, config)?;
        stream.on_commit(Box::new(self.log.waker()));
        Ok(stream)
    }
}

//! The shared write-ahead log of every quorum group on a node, with group
//! commit.
//!
//! One redb file (`<dir>/quorum.redb`) holds, for every group, its log entries
//! keyed by `(group, index)`, its vote, committed and purged positions, its
//! last snapshot and its record (members). All writes of all groups go through
//! ONE writer thread: it takes every operation queued while the previous batch
//! was being made durable, writes them in one redb write transaction and
//! commits it with `Durability::Immediate` (one fsync, whatever the number of
//! groups and appends in it), then completes every operation of the batch: it
//! fires each appending group's openraft `LogFlushed` callback (storage-v2
//! allows firing it after `append` returned) and wakes whoever waits for a
//! vote, a snapshot or a group record.
//!
//! Operations are applied in the order they were queued, so a truncate or a
//! purge is durable no later than the appends queued after it. A vote is
//! awaited (it must be on disk before the node answers the candidate); a
//! truncate, a purge and the committed position are not (losing one on a crash
//! leaves a state Raft already tolerates: conflicting entries not yet
//! truncated are truncated again; a purge is redone after the next snapshot).
//!
//! Reads never touch the file: each group keeps its unpurged entries in memory
//! (like Ra's mem tables), filled at `append` before the entry is durable (the
//! storage-v2 contract: readable on return, durable at the callback). The log
//! is kept short by snapshots and purges, so this is bounded by the snapshot
//! policy (see `group.rs`).
//!
//! Every stored value carries a CRC-32 of its bytes (CLUSTER.md §2.2: if the
//! disk lies, openraft's behaviour is undefined): a mismatch on reopen
//! quarantines that group on this node (see [`RecoveredGroup::damaged`])
//! instead of feeding Raft a corrupted entry.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::{QEntry, QLogId, QStorageError, QVote, QueueTypeConfig};

const LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("qq_log");
const META: TableDefinition<(u64, u8), &[u8]> = TableDefinition::new("qq_meta");
const GROUPS: TableDefinition<u64, &[u8]> = TableDefinition::new("qq_groups");

const K_VOTE: u8 = 1;
const K_COMMITTED: u8 = 2;
const K_PURGED: u8 = 3;
const K_SNAPSHOT: u8 = 4;

/// Most operations in one batch (a bound on one transaction's size).
const MAX_BATCH: usize = 4096;

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// `crc32 (LE) ++ bytes`.
fn seal(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn unseal(v: &[u8]) -> io::Result<&[u8]> {
    let Some((crc, body)) = v.split_first_chunk::<4>() else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short record"));
    };
    if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "checksum mismatch in the quorum WAL",
        ));
    }
    Ok(body)
}

pub(crate) fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(io_err)
}

fn decode<T: DeserializeOwned>(v: &[u8]) -> io::Result<T> {
    postcard::from_bytes(unseal(v)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Who to tell when an operation is durable.
pub(crate) enum Done {
    Log(LogFlushed<QueueTypeConfig>),
    Chan(oneshot::Sender<Result<(), String>>),
}

impl Done {
    fn complete(self, result: &Result<(), String>) {
        match self {
            Done::Log(cb) => cb.log_io_completed(result.clone().map_err(io::Error::other)),
            Done::Chan(tx) => {
                let _ = tx.send(result.clone());
            }
        }
    }
}

enum Op {
    Append {
        group: u64,
        entries: Vec<(u64, Vec<u8>)>,
    },
    Truncate {
        group: u64,
        from: u64,
    },
    Purge {
        group: u64,
        upto: u64,
        purged: Vec<u8>,
    },
    Meta {
        group: u64,
        key: u8,
        value: Vec<u8>,
    },
    /// Records a new group (clearing anything left under its id).
    PutGroup {
        group: u64,
        record: Vec<u8>,
    },
    DeleteGroup {
        group: u64,
    },
    /// Stops the writer after the operations queued before it.
    Close,
}

struct Queued {
    op: Op,
    done: Option<Done>,
}

/// Counts of the writer (group commit shows as `appends` > `batches`).
#[derive(Debug, Default)]
pub struct WalStats {
    /// Durable commits (fsyncs).
    pub batches: AtomicU64,
    /// Operations written.
    pub ops: AtomicU64,
    /// `append` calls (of any group) written.
    pub appends: AtomicU64,
    /// Entries written.
    pub entries: AtomicU64,
}

/// A group as found on disk by [`Wal::open`].
#[derive(Debug, Default)]
pub struct RecoveredGroup {
    /// The group's record (`group.rs` encodes it).
    pub record: Vec<u8>,
    pub entries: BTreeMap<u64, QEntry>,
    pub vote: Option<QVote>,
    pub committed: Option<QLogId>,
    pub purged: Option<QLogId>,
    /// The last snapshot (`sm.rs` encodes it).
    pub snapshot: Option<Vec<u8>>,
    /// Why the group could not be read back (a checksum mismatch, an
    /// undecodable record): such a group is not started. Truncating the bad
    /// suffix and rejoining would be unsafe: this replica may have acknowledged
    /// those entries, and voting without them could elect a leader that lacks
    /// committed ones. Two healthy replicas of three carry on; the replica is
    /// repaired by deleting and re-adding it.
    pub damaged: Option<String>,
}

/// The handle to the shared log: cheap to clone, one writer behind it.
#[derive(Clone)]
pub struct Wal {
    tx: mpsc::UnboundedSender<Queued>,
    stats: Arc<WalStats>,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Wal {
    /// Opens (creating) the log at `path`, reads every group back, and starts
    /// the writer thread.
    pub fn open(path: &Path) -> io::Result<(Wal, BTreeMap<u64, RecoveredGroup>)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let db = Database::create(path).map_err(io_err)?;
        {
            let txn = db.begin_write().map_err(io_err)?;
            txn.open_table(LOG).map_err(io_err)?;
            txn.open_table(META).map_err(io_err)?;
            txn.open_table(GROUPS).map_err(io_err)?;
            txn.commit().map_err(io_err)?;
        }
        let groups = recover(&db)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(WalStats::default());
        let s = stats.clone();
        let writer = std::thread::Builder::new()
            .name("quorum-wal".to_owned())
            .spawn(move || run(db, rx, &s))?;
        Ok((
            Wal {
                tx,
                stats,
                writer: Arc::new(Mutex::new(Some(writer))),
            },
            groups,
        ))
    }

    pub fn stats(&self) -> &WalStats {
        &self.stats
    }

    fn send(&self, op: Op, done: Option<Done>) -> Result<(), String> {
        self.tx.send(Queued { op, done }).map_err(|e| {
            if let Some(d) = e.0.done {
                d.complete(&Err("the quorum WAL is closed".to_owned()));
            }
            "the quorum WAL is closed".to_owned()
        })
    }

    /// Queues `op` and waits until it is durable.
    async fn durable(&self, op: Op) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.send(op, Some(Done::Chan(tx)));
        match rx.await {
            Ok(r) => r.map_err(io::Error::other),
            Err(_) => Err(io::Error::other("the quorum WAL is closed")),
        }
    }

    /// Appends pre-encoded entries of `group`; `done` fires when durable.
    pub(crate) fn append_raw(
        &self,
        group: u64,
        entries: Vec<(u64, Vec<u8>)>,
        done: Option<Done>,
    ) -> Result<(), String> {
        self.send(Op::Append { group, entries }, done)
    }

    pub async fn put_group(&self, group: u64, record: Vec<u8>) -> io::Result<()> {
        self.durable(Op::PutGroup {
            group,
            record: seal(record),
        })
        .await
    }

    pub async fn delete_group(&self, group: u64) -> io::Result<()> {
        self.durable(Op::DeleteGroup { group }).await
    }

    pub async fn put_snapshot(&self, group: u64, snapshot: Vec<u8>) -> io::Result<()> {
        self.durable(Op::Meta {
            group,
            key: K_SNAPSHOT,
            value: seal(snapshot),
        })
        .await
    }

    /// Stops the writer after what is queued and waits for it (the file is
    /// closed when this returns).
    pub async fn close(&self) {
        let _ = self.send(Op::Close, None);
        let handle = match self.writer.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

fn recover(db: &Database) -> io::Result<BTreeMap<u64, RecoveredGroup>> {
    let txn = db.begin_read().map_err(io_err)?;
    let groups_t = txn.open_table(GROUPS).map_err(io_err)?;
    let log_t = txn.open_table(LOG).map_err(io_err)?;
    let meta_t = txn.open_table(META).map_err(io_err)?;
    let mut out = BTreeMap::new();
    for item in groups_t.iter().map_err(io_err)? {
        let (k, v) = item.map_err(io_err)?;
        let group = k.value();
        let mut g = RecoveredGroup::default();
        // A damaged record quarantines its group only (the others start).
        if let Err(e) = recover_group(&mut g, v.value(), group, &log_t, &meta_t) {
            tracing::error!(group, error = %e, "quorum group damaged on disk: not started");
            g = RecoveredGroup {
                damaged: Some(e.to_string()),
                ..Default::default()
            };
        }
        out.insert(group, g);
    }
    Ok(out)
}

fn recover_group(
    g: &mut RecoveredGroup,
    record: &[u8],
    group: u64,
    log_t: &redb::ReadOnlyTable<(u64, u64), &[u8]>,
    meta_t: &redb::ReadOnlyTable<(u64, u8), &[u8]>,
) -> io::Result<()> {
    g.record = unseal(record)?.to_vec();
    for item in log_t
        .range((group, 0)..=(group, u64::MAX))
        .map_err(io_err)?
    {
        let (k, v) = item.map_err(io_err)?;
        let entry: QEntry = decode(v.value())?;
        g.entries.insert(k.value().1, entry);
    }
    let meta = |key: u8| -> io::Result<Option<Vec<u8>>> {
        Ok(meta_t
            .get((group, key))
            .map_err(io_err)?
            .map(|v| v.value().to_vec()))
    };
    if let Some(v) = meta(K_VOTE)? {
        g.vote = Some(decode(&v)?);
    }
    if let Some(v) = meta(K_COMMITTED)? {
        g.committed = decode(&v)?;
    }
    if let Some(v) = meta(K_PURGED)? {
        g.purged = Some(decode(&v)?);
    }
    if let Some(v) = meta(K_SNAPSHOT)? {
        g.snapshot = Some(unseal(&v)?.to_vec());
    }
    Ok(())
}

/// The writer thread: one durable transaction per batch of queued operations.
fn run(db: Database, mut rx: mpsc::UnboundedReceiver<Queued>, stats: &WalStats) {
    let mut closing = false;
    while !closing {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        closing = batch.iter().any(|q| matches!(q.op, Op::Close));
        let result = write_batch(&db, &batch).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, "quorum WAL write failed");
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.ops.fetch_add(batch.len() as u64, Ordering::Relaxed);
        for q in &batch {
            if let Op::Append { entries, .. } = &q.op {
                stats.appends.fetch_add(1, Ordering::Relaxed);
                stats
                    .entries
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
            }
        }
        for q in batch {
            if let Some(d) = q.done {
                d.complete(&result);
            }
        }
    }
    // Anything queued after Close fails.
    rx.close();
    while let Ok(q) = rx.try_recv() {
        if let Some(d) = q.done {
            d.complete(&Err("the quorum WAL is closed".to_owned()));
        }
    }
}

fn write_batch(db: &Database, batch: &[Queued]) -> io::Result<()> {
    let mut txn = db.begin_write().map_err(io_err)?;
    txn.set_durability(Durability::Immediate).map_err(io_err)?;
    {
        let mut log = txn.open_table(LOG).map_err(io_err)?;
        let mut meta = txn.open_table(META).map_err(io_err)?;
        let mut groups = txn.open_table(GROUPS).map_err(io_err)?;
        for q in batch {
            match &q.op {
                Op::Append { group, entries } => {
                    for (index, bytes) in entries {
                        log.insert((*group, *index), bytes.as_slice())
                            .map_err(io_err)?;
                    }
                }
                Op::Truncate { group, from } => {
                    log.retain_in((*group, *from)..=(*group, u64::MAX), |_, _| false)
                        .map_err(io_err)?;
                }
                Op::Purge {
                    group,
                    upto,
                    purged,
                } => {
                    log.retain_in((*group, 0)..=(*group, *upto), |_, _| false)
                        .map_err(io_err)?;
                    meta.insert((*group, K_PURGED), purged.as_slice())
                        .map_err(io_err)?;
                }
                Op::Meta { group, key, value } => {
                    meta.insert((*group, *key), value.as_slice())
                        .map_err(io_err)?;
                }
                Op::PutGroup { group, record } => {
                    // A new group: nothing of an earlier group with this id
                    // (a late write after its deletion) may leak into it.
                    log.retain_in((*group, 0)..=(*group, u64::MAX), |_, _| false)
                        .map_err(io_err)?;
                    meta.retain_in((*group, 0)..=(*group, u8::MAX), |_, _| false)
                        .map_err(io_err)?;
                    groups.insert(*group, record.as_slice()).map_err(io_err)?;
                }
                Op::DeleteGroup { group } => {
                    log.retain_in((*group, 0)..=(*group, u64::MAX), |_, _| false)
                        .map_err(io_err)?;
                    meta.retain_in((*group, 0)..=(*group, u8::MAX), |_, _| false)
                        .map_err(io_err)?;
                    groups.remove(*group).map_err(io_err)?;
                }
                Op::Close => {}
            }
        }
    }
    txn.commit().map_err(io_err)
}

/// What a group keeps in memory of its log.
#[derive(Debug, Default)]
struct LogMem {
    entries: BTreeMap<u64, QEntry>,
    purged: Option<QLogId>,
    vote: Option<QVote>,
    committed: Option<QLogId>,
}

/// One group's view of the shared log: openraft's `RaftLogStorage`.
#[derive(Clone)]
pub struct GroupLog {
    group: u64,
    wal: Wal,
    mem: Arc<Mutex<LogMem>>,
}

fn st_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: io::Error) -> QStorageError {
    QStorageError::from_io_error(subject, verb, e)
}

impl GroupLog {
    /// The group's log, starting from what was recovered (if anything).
    pub fn new(group: u64, wal: Wal, recovered: Option<&mut RecoveredGroup>) -> Self {
        let mut mem = LogMem::default();
        if let Some(r) = recovered {
            mem.entries = std::mem::take(&mut r.entries);
            mem.purged = r.purged;
            mem.vote = r.vote;
            mem.committed = r.committed;
        }
        GroupLog {
            group,
            wal,
            mem: Arc::new(Mutex::new(mem)),
        }
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, LogMem> {
        match self.mem.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The first and last index held (tests, metrics).
    pub fn bounds(&self) -> (Option<u64>, Option<u64>) {
        let m = self.mem();
        (
            m.entries.keys().next().copied(),
            m.entries.keys().next_back().copied(),
        )
    }
}

impl RaftLogReader<QueueTypeConfig> for GroupLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<QEntry>, QStorageError> {
        Ok(self
            .mem()
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<QueueTypeConfig> for GroupLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<QueueTypeConfig>, QStorageError> {
        let m = self.mem();
        let last = m.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: m.purged,
            last_log_id: last.or(m.purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &QVote) -> Result<(), QStorageError> {
        let write = |e| st_err(ErrorSubject::Vote, ErrorVerb::Write, e);
        let value = seal(encode(vote).map_err(write)?);
        self.mem().vote = Some(*vote);
        self.wal
            .durable(Op::Meta {
                group: self.group,
                key: K_VOTE,
                value,
            })
            .await
            .map_err(write)
    }

    async fn read_vote(&mut self) -> Result<Option<QVote>, QStorageError> {
        Ok(self.mem().vote)
    }

    async fn save_committed(&mut self, committed: Option<QLogId>) -> Result<(), QStorageError> {
        let write = |e| st_err(ErrorSubject::Store, ErrorVerb::Write, e);
        let value = seal(encode(&committed).map_err(write)?);
        self.mem().committed = committed;
        // Not awaited: a committed position lost in a crash is recomputed.
        self.wal
            .send(
                Op::Meta {
                    group: self.group,
                    key: K_COMMITTED,
                    value,
                },
                None,
            )
            .map_err(|e| write(io::Error::other(e)))
    }

    async fn read_committed(&mut self) -> Result<Option<QLogId>, QStorageError> {
        Ok(self.mem().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<QueueTypeConfig>,
    ) -> Result<(), QStorageError>
    where
        I: IntoIterator<Item = QEntry> + Send,
        I::IntoIter: Send,
    {
        let write = |e| st_err(ErrorSubject::Logs, ErrorVerb::Write, e);
        let mut encoded = Vec::new();
        {
            let mut m = self.mem();
            for e in entries {
                encoded.push((e.log_id.index, seal(encode(&e).map_err(write)?)));
                m.entries.insert(e.log_id.index, e);
            }
        }
        // Readable now; durable when the writer fires the callback.
        self.wal
            .append_raw(self.group, encoded, Some(Done::Log(callback)))
            .map_err(|e| write(io::Error::other(e)))
    }

    async fn truncate(&mut self, log_id: QLogId) -> Result<(), QStorageError> {
        drop(self.mem().entries.split_off(&log_id.index));
        self.wal
            .send(
                Op::Truncate {
                    group: self.group,
                    from: log_id.index,
                },
                None,
            )
            .map_err(|e| st_err(ErrorSubject::Logs, ErrorVerb::Write, io::Error::other(e)))
    }

    async fn purge(&mut self, log_id: QLogId) -> Result<(), QStorageError> {
        let write = |e| st_err(ErrorSubject::Logs, ErrorVerb::Write, e);
        let purged = seal(encode(&log_id).map_err(write)?);
        {
            let mut m = self.mem();
            let keep = m.entries.split_off(&(log_id.index + 1));
            m.entries = keep;
            m.purged = Some(log_id);
        }
        self.wal
            .send(
                Op::Purge {
                    group: self.group,
                    upto: log_id.index,
                    purged,
                },
                None,
            )
            .map_err(|e| write(io::Error::other(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};
    use switchyard_core::quorum::QueueCommand;

    fn entry(group: u64, index: u64) -> QEntry {
        QEntry {
            log_id: QLogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(vec![QueueCommand::Enqueue {
                enqueuer: group,
                seq: index,
                body: vec![index as u8; 16],
            }]),
        }
    }

    async fn append(wal: &Wal, group: u64, index: u64) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        let e = entry(group, index);
        wal.append_raw(
            group,
            vec![(index, seal(encode(&e).unwrap()))],
            Some(Done::Chan(tx)),
        )
        .unwrap();
        rx
    }

    #[tokio::test]
    async fn many_groups_appending_share_fsyncs_and_everything_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quorum.redb");
        let (wal, groups) = Wal::open(&path).unwrap();
        assert!(groups.is_empty());
        for g in 1..=50u64 {
            wal.put_group(g, vec![g as u8]).await.unwrap();
        }
        let before = wal.stats().batches.load(Ordering::Relaxed);
        // 50 groups x 20 appends, all in flight at once (as 50 Raft cores
        // would have them), then wait for every flush.
        let mut waits = Vec::new();
        for index in 1..=20u64 {
            for g in 1..=50u64 {
                waits.push(append(&wal, g, index).await);
            }
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
        let batches = wal.stats().batches.load(Ordering::Relaxed) - before;
        let appends = wal.stats().appends.load(Ordering::Relaxed);
        assert_eq!(appends, 1000);
        assert!(
            batches * 4 < appends,
            "{batches} fsync batches for {appends} appends: no group commit"
        );

        // Truncate, purge, vote, snapshot; then reopen.
        let mut log = GroupLog::new(3, wal.clone(), None);
        log.truncate(QLogId::new(CommittedLeaderId::new(1, 1), 15))
            .await
            .unwrap();
        log.purge(QLogId::new(CommittedLeaderId::new(1, 1), 4))
            .await
            .unwrap();
        log.save_vote(&QVote::new(5, 9)).await.unwrap();
        wal.put_snapshot(3, b"snap".to_vec()).await.unwrap();
        wal.delete_group(7).await.unwrap();
        wal.close().await;

        let (wal, mut groups) = Wal::open(&path).unwrap();
        assert_eq!(groups.len(), 49);
        assert!(!groups.contains_key(&7));
        let g3 = groups.get_mut(&3).unwrap();
        assert_eq!(g3.record, vec![3]);
        assert_eq!(g3.vote, Some(QVote::new(5, 9)));
        assert_eq!(g3.purged.unwrap().index, 4);
        assert_eq!(g3.snapshot.as_deref(), Some(&b"snap"[..]));
        let mut log = GroupLog::new(3, wal.clone(), Some(g3));
        assert_eq!(log.bounds(), (Some(5), Some(14)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.unwrap().index, 14);
        let got = log.try_get_log_entries(5..7).await.unwrap();
        assert_eq!(got, vec![entry(3, 5), entry(3, 6)]);
        assert_eq!(groups[&50].entries.len(), 20);
        wal.close().await;
    }

    #[tokio::test]
    async fn a_corrupted_entry_quarantines_its_group_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quorum.redb");
        let (wal, _) = Wal::open(&path).unwrap();
        for g in [1u64, 2] {
            wal.put_group(g, vec![g as u8]).await.unwrap();
            for i in 1..=3 {
                append(&wal, g, i).await.await.unwrap().unwrap();
            }
        }
        wal.close().await;
        {
            // The disk lies about one entry of group 1.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(LOG).unwrap();
                let mut v = t.get((1, 2)).unwrap().unwrap().value().to_vec();
                let last = v.len() - 1;
                v[last] ^= 0x40;
                t.insert((1, 2), v.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let (wal, groups) = Wal::open(&path).unwrap();
        assert!(groups[&1].damaged.as_deref().unwrap().contains("checksum"));
        assert!(groups[&1].entries.is_empty());
        assert!(groups[&2].damaged.is_none());
        assert_eq!(groups[&2].entries.len(), 3);
        wal.close().await;
    }

    #[test]
    fn a_flipped_bit_is_caught() {
        let mut v = seal(b"hello".to_vec());
        assert_eq!(unseal(&v).unwrap(), b"hello");
        v[6] ^= 1;
        assert!(unseal(&v).is_err());
    }
}

//! Durable Raft storage of the metadata group, in one redb file
//! (`<data_dir>/cluster/raft.redb`): the log, the vote, the committed and
//! purged positions, and the state machine's applied position and membership.
//! Every write is one redb transaction, which is on disk (fsynced) when its
//! commit returns: a vote or an appended entry is never acknowledged before.

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub(crate) const KEY_VOTE: &str = "vote";
pub(crate) const KEY_COMMITTED: &str = "committed";
pub(crate) const KEY_PURGED: &str = "purged";
pub(crate) const KEY_APPLIED: &str = "applied";
pub(crate) const KEY_MEMBERSHIP: &str = "membership";
pub(crate) const KEY_SNAPSHOT: &str = "snapshot";
/// The clustered quorum queues' group placements (sm.rs).
pub(crate) const KEY_QUORUM: &str = "quorum_groups";

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn st_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: io::Error) -> StorageError {
    StorageError::from_io_error(subject, verb, e)
}

/// The redb database shared by the log store and the state machine.
#[derive(Debug, Clone)]
pub struct RaftDb {
    db: Arc<Database>,
}

impl RaftDb {
    /// Opens (creating) `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let db = Database::create(path).map_err(io_err)?;
        let txn = db.begin_write().map_err(io_err)?;
        txn.open_table(LOG).map_err(io_err)?;
        txn.open_table(META).map_err(io_err)?;
        txn.commit().map_err(io_err)?;
        Ok(RaftDb { db: Arc::new(db) })
    }

    pub(crate) fn get<T: DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let t = txn.open_table(META).map_err(io_err)?;
        match t.get(key).map_err(io_err)? {
            Some(v) => postcard::from_bytes(v.value()).map(Some).map_err(io_err),
            None => Ok(None),
        }
    }

    /// Writes several meta keys in one durable transaction.
    pub(crate) fn put_all(&self, items: &[(&str, Vec<u8>)]) -> io::Result<()> {
        let txn = self.db.begin_write().map_err(io_err)?;
        {
            let mut t = txn.open_table(META).map_err(io_err)?;
            for (k, v) in items {
                t.insert(*k, v.as_slice()).map_err(io_err)?;
            }
        }
        txn.commit().map_err(io_err)
    }

    pub(crate) fn put<T: Serialize>(&self, key: &str, value: &T) -> io::Result<()> {
        self.put_all(&[(key, encode(value)?)])
    }

    fn entries<RB: RangeBounds<u64>>(&self, range: RB) -> io::Result<Vec<Entry>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let t = txn.open_table(LOG).map_err(io_err)?;
        let mut out = Vec::new();
        for item in t.range(range).map_err(io_err)? {
            let (_, v) = item.map_err(io_err)?;
            out.push(postcard::from_bytes(v.value()).map_err(io_err)?);
        }
        Ok(out)
    }

    fn last_entry(&self) -> io::Result<Option<Entry>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let t = txn.open_table(LOG).map_err(io_err)?;
        let last = t.last().map_err(io_err)?;
        let entry = match last {
            Some((_, v)) => postcard::from_bytes(v.value()).map(Some).map_err(io_err),
            None => Ok(None),
        };
        entry
    }

    fn append(&self, entries: Vec<Entry>) -> io::Result<()> {
        let txn = self.db.begin_write().map_err(io_err)?;
        {
            let mut t = txn.open_table(LOG).map_err(io_err)?;
            for e in &entries {
                t.insert(e.log_id.index, encode(e)?.as_slice())
                    .map_err(io_err)?;
            }
        }
        txn.commit().map_err(io_err)
    }

    /// Deletes the entries with index in `range`; with `purged`, records it in
    /// the same transaction.
    fn delete_range<RB: RangeBounds<u64>>(
        &self,
        range: RB,
        purged: Option<&LogId>,
    ) -> io::Result<()> {
        let txn = self.db.begin_write().map_err(io_err)?;
        {
            let mut t = txn.open_table(LOG).map_err(io_err)?;
            t.retain_in(range, |_, _| false).map_err(io_err)?;
            if let Some(p) = purged {
                let mut m = txn.open_table(META).map_err(io_err)?;
                m.insert(KEY_PURGED, encode(p)?.as_slice())
                    .map_err(io_err)?;
            }
        }
        txn.commit().map_err(io_err)
    }
}

pub(crate) fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(io_err)
}

/// openraft's log storage over [`RaftDb`].
#[derive(Debug, Clone)]
pub struct LogStore {
    db: RaftDb,
}

impl LogStore {
    pub fn new(db: RaftDb) -> Self {
        LogStore { db }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.db
            .entries(range)
            .map_err(|e| st_err(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let read = |e| st_err(ErrorSubject::Logs, ErrorVerb::Read, e);
        let purged: Option<LogId> = self.db.get(KEY_PURGED).map_err(read)?;
        let last = self.db.last_entry().map_err(read)?.map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.db
            .put(KEY_VOTE, vote)
            .map_err(|e| st_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.db
            .get(KEY_VOTE)
            .map_err(|e| st_err(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.db
            .put(KEY_COMMITTED, &committed)
            .map_err(|e| st_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let c: Option<Option<LogId>> = self
            .db
            .get(KEY_COMMITTED)
            .map_err(|e| st_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
        Ok(c.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        // The transaction's commit is durable: the callback fires after it.
        let result = self.db.append(entries.into_iter().collect());
        let reported = result
            .as_ref()
            .map(|_| ())
            .map_err(|e| io::Error::new(e.kind(), e.to_string()));
        callback.log_io_completed(reported);
        result.map_err(|e| st_err(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.db
            .delete_range(log_id.index.., None)
            .map_err(|e| st_err(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.db
            .delete_range(..=log_id.index, Some(&log_id))
            .map_err(|e| st_err(ErrorSubject::Logs, ErrorVerb::Write, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Command;
    use openraft::{CommittedLeaderId, EntryPayload};
    use switchyard_core::admin::MetaCommand;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Command::Meta(MetaCommand::DeleteVhost {
                name: format!("v{index}"),
            })),
        }
    }

    #[tokio::test]
    async fn log_vote_truncate_and_purge_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        {
            let db = RaftDb::open(&path).unwrap();
            let mut log = LogStore::new(db.clone());
            db.append((1..=5).map(|i| entry(1, i)).collect()).unwrap();
            log.save_vote(&Vote::new(3, 1)).await.unwrap();
            log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 4))
                .await
                .unwrap();
            log.purge(LogId::new(CommittedLeaderId::new(1, 1), 1))
                .await
                .unwrap();
        }
        let mut log = LogStore::new(RaftDb::open(&path).unwrap());
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.unwrap().index, 1);
        assert_eq!(state.last_log_id.unwrap().index, 3);
        let got: Vec<u64> = log
            .try_get_log_entries(0..10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(got, vec![2, 3]);
    }
}

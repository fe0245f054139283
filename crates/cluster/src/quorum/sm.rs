//! openraft's `RaftStateMachine` for a quorum queue: the in-memory
//! [`QueueState`] plus the applied position and membership.
//!
//! Persistence is by snapshot (openraft's "persistent snapshot" option):
//! `apply` changes memory only; a snapshot (the whole dehydrated state, built
//! every `snapshot_every` applied entries by openraft's `SnapshotPolicy`) is
//! written durably to the shared WAL before openraft may purge the log up to
//! it. On reopen the state is the last snapshot, and openraft re-applies the
//! committed entries after it from the log.

use std::io::Cursor;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, Snapshot};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use super::machine::{Outcome, QueueCommand, QueueState};
use super::wal::{encode, Wal};
use super::{QEntry, QLogId, QSnapshotMeta, QStorageError, QStoredMembership, QueueTypeConfig};

/// What a group's subscribers hear, in log order.
#[derive(Debug, Clone)]
pub enum GroupEvent {
    /// A command was applied at `index` with this outcome.
    Applied {
        index: u64,
        command: QueueCommand,
        outcome: Outcome,
    },
    /// The state was replaced by a snapshot (up to `index`): re-read it with
    /// `GroupHandle::ready_messages`.
    Reset { index: u64 },
}

/// A snapshot as stored in the WAL: meta and body (a postcard [`QueueState`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredSnapshot {
    pub meta: QSnapshotMeta,
    pub data: Vec<u8>,
}

fn write_err(e: std::io::Error) -> QStorageError {
    QStorageError::from_io_error(ErrorSubject::StateMachine, ErrorVerb::Write, e)
}

fn read_err(e: impl std::fmt::Display) -> QStorageError {
    QStorageError::from_io_error(
        ErrorSubject::StateMachine,
        ErrorVerb::Read,
        std::io::Error::other(e.to_string()),
    )
}

/// The state shared between the state machine and the group's handles.
pub(crate) type Shared = Arc<Mutex<QueueState>>;

pub(crate) fn lock(s: &Shared) -> MutexGuard<'_, QueueState> {
    match s.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

pub struct QueueSm {
    group: u64,
    wal: Wal,
    state: Shared,
    applied: Option<QLogId>,
    membership: QStoredMembership,
    /// The last snapshot, shared with the builders (which replace it).
    snapshot: Arc<Mutex<Option<StoredSnapshot>>>,
    applied_tx: watch::Sender<u64>,
    events: broadcast::Sender<GroupEvent>,
}

impl QueueSm {
    /// A state machine starting from the stored snapshot, if any.
    pub(crate) fn open(
        group: u64,
        wal: Wal,
        snapshot: Option<&[u8]>,
        events: broadcast::Sender<GroupEvent>,
    ) -> std::io::Result<(QueueSm, Shared, watch::Receiver<u64>)> {
        let mut sm_state = QueueState::default();
        let mut applied = None;
        let mut membership = QStoredMembership::default();
        let mut stored = None;
        if let Some(bytes) = snapshot {
            let s: StoredSnapshot = postcard::from_bytes(bytes).map_err(std::io::Error::other)?;
            sm_state = postcard::from_bytes(&s.data).map_err(std::io::Error::other)?;
            applied = s.meta.last_log_id;
            membership = s.meta.last_membership.clone();
            stored = Some(s);
        }
        let state = Arc::new(Mutex::new(sm_state));
        let (applied_tx, applied_rx) = watch::channel(applied.map_or(0, |l| l.index));
        Ok((
            QueueSm {
                group,
                wal,
                state: state.clone(),
                applied,
                membership,
                snapshot: Arc::new(Mutex::new(stored)),
                applied_tx,
                events,
            },
            state,
            applied_rx,
        ))
    }
}

pub struct SnapshotBuilder {
    group: u64,
    wal: Wal,
    state: QueueState,
    applied: Option<QLogId>,
    membership: QStoredMembership,
    slot: Arc<Mutex<Option<StoredSnapshot>>>,
}

fn slot(s: &Mutex<Option<StoredSnapshot>>) -> MutexGuard<'_, Option<StoredSnapshot>> {
    match s.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl RaftSnapshotBuilder<QueueTypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<QueueTypeConfig>, QStorageError> {
        let data = encode(&self.state).map_err(write_err)?;
        let last = self.applied;
        let meta = QSnapshotMeta {
            last_log_id: last,
            last_membership: self.membership.clone(),
            snapshot_id: format!(
                "{}-{}-{}",
                self.group,
                last.map_or(0, |l| l.leader_id.term),
                last.map_or(0, |l| l.index)
            ),
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        // Durable before openraft learns of it (it purges the log up to it).
        self.wal
            .put_snapshot(self.group, encode(&stored).map_err(write_err)?)
            .await
            .map_err(write_err)?;
        let data = stored.data.clone();
        *slot(&self.slot) = Some(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<QueueTypeConfig> for QueueSm {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<QLogId>, QStoredMembership), QStorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, QStorageError>
    where
        I: IntoIterator<Item = QEntry> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut events = Vec::new();
        {
            let mut state = lock(&self.state);
            for e in entries {
                self.applied = Some(e.log_id);
                let outcome = match e.payload {
                    EntryPayload::Blank => Outcome::Noop,
                    EntryPayload::Normal(cmd) => {
                        let outcome = state.apply(e.log_id.index, &cmd);
                        events.push(GroupEvent::Applied {
                            index: e.log_id.index,
                            command: cmd,
                            outcome,
                        });
                        outcome
                    }
                    EntryPayload::Membership(m) => {
                        self.membership = QStoredMembership::new(Some(e.log_id), m);
                        Outcome::Noop
                    }
                };
                out.push(outcome);
            }
        }
        if self.events.receiver_count() > 0 {
            for ev in events {
                let _ = self.events.send(ev);
            }
        }
        self.applied_tx
            .send_replace(self.applied.map_or(0, |l| l.index));
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            group: self.group,
            wal: self.wal.clone(),
            state: lock(&self.state).clone(),
            applied: self.applied,
            membership: self.membership.clone(),
            slot: self.snapshot.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, QStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &QSnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), QStorageError> {
        let data = snapshot.into_inner();
        let new_state: QueueState = postcard::from_bytes(&data).map_err(read_err)?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.wal
            .put_snapshot(self.group, encode(&stored).map_err(write_err)?)
            .await
            .map_err(write_err)?;
        *lock(&self.state) = new_state;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        *slot(&self.snapshot) = Some(stored);
        let index = self.applied.map_or(0, |l| l.index);
        let _ = self.events.send(GroupEvent::Reset { index });
        self.applied_tx.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<QueueTypeConfig>>, QStorageError> {
        Ok(slot(&self.snapshot).as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

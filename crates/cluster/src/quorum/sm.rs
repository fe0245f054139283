//! openraft's `RaftStateMachine` for a quorum queue: the core's
//! [`QueueMachine`] (the one state machine of a quorum queue) plus the applied
//! position and membership.
//!
//! Persistence is by snapshot (openraft's "persistent snapshot" option):
//! `apply` changes memory only; a snapshot (the whole machine, built every
//! `snapshot_every` applied entries by openraft's `SnapshotPolicy`) is written
//! durably to the shared WAL before openraft may purge the log up to it. On
//! reopen the machine is the last snapshot, and openraft re-applies the
//! committed entries after it from the log.
//!
//! What the machine assigns to this node goes to the broker ([`Deliver`]), but
//! only while the node's incarnation announced in the log is the one this
//! process runs as: entries re-applied after a restart were assigned to the
//! previous incarnation, whose local queue is gone (its `NodeUp` returns them).
//! A link that was marked down without restarting rejoins under the next
//! incarnation (`QuorumLink::marked_down`), so "this process's" incarnations
//! are `incarnation..incarnation + REJOINS`; the machine holds the one the
//! link announced last, and the link only asks for credit under that one.

use std::io::Cursor;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, Snapshot};
use serde::{Deserialize, Serialize};
use switchyard_core::quorum::{Assigned, QueueMachine};
use tokio::sync::watch;

use super::wal::{encode, Wal};
use super::{
    Outcome, QEntry, QLogId, QSnapshotMeta, QStorageError, QStoredMembership, QueueTypeConfig,
};

/// Where a group hands what its machine assigned to this node (the broker's
/// `VHost::quorum_assigned` on a cluster node).
pub trait Deliver: Send + Sync {
    /// `assigned`, in log order, all for this node's current incarnation.
    fn assigned(&self, vhost: &str, queue: &str, assigned: Vec<Assigned>);
    /// The machine marks this node down (`NodeDown`) while it announced
    /// `incarnation`; called once per time it is marked down, in apply order
    /// (the broker's link rejoins: `QuorumLink::marked_down`).
    fn marked_down(&self, _vhost: &str, _queue: &str, _incarnation: u64) {}
}

/// Who a group's state machine serves: its queue and this node.
#[derive(Clone)]
pub(crate) struct Owner {
    pub vhost: String,
    pub queue: String,
    pub node: String,
    pub incarnation: u64,
    pub deliver: Option<Arc<dyn Deliver>>,
}

/// A snapshot as stored in the WAL: meta and body (a postcard [`QueueMachine`]).
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

/// The machine shared between the state machine and the group's handles.
pub(crate) type Shared = Arc<Mutex<QueueMachine>>;

pub(crate) fn lock(s: &Shared) -> MutexGuard<'_, QueueMachine> {
    match s.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

pub struct QueueSm {
    group: u64,
    wal: Wal,
    owner: Owner,
    state: Shared,
    applied: Option<QLogId>,
    membership: QStoredMembership,
    /// The last snapshot, shared with the builders (which replace it).
    snapshot: Arc<Mutex<Option<StoredSnapshot>>>,
    applied_tx: watch::Sender<u64>,
    /// This node was marked down and [`Deliver::marked_down`] told so (until
    /// the next time the machine has it up).
    down_told: bool,
}

impl QueueSm {
    /// Whether the incarnation the machine has for this node is one of this
    /// process's (see the module doc).
    fn ours(&self, m: &QueueMachine) -> bool {
        m.incarnation_of(&self.owner.node).is_some_and(|i| {
            i.wrapping_sub(self.owner.incarnation) < switchyard_core::quorum_link::REJOINS
        })
    }

    /// A state machine starting from the stored snapshot, if any.
    pub(crate) fn open(
        group: u64,
        wal: Wal,
        owner: Owner,
        snapshot: Option<&[u8]>,
    ) -> std::io::Result<(QueueSm, Shared, watch::Receiver<u64>)> {
        let mut machine = QueueMachine::default();
        let mut applied = None;
        let mut membership = QStoredMembership::default();
        let mut stored = None;
        if let Some(bytes) = snapshot {
            let s: StoredSnapshot = postcard::from_bytes(bytes).map_err(std::io::Error::other)?;
            machine = postcard::from_bytes(&s.data).map_err(std::io::Error::other)?;
            applied = s.meta.last_log_id;
            membership = s.meta.last_membership.clone();
            stored = Some(s);
        }
        let state = Arc::new(Mutex::new(machine));
        let (applied_tx, applied_rx) = watch::channel(applied.map_or(0, |l| l.index));
        Ok((
            QueueSm {
                group,
                wal,
                owner,
                state: state.clone(),
                applied,
                membership,
                snapshot: Arc::new(Mutex::new(stored)),
                applied_tx,
                down_told: false,
            },
            state,
            applied_rx,
        ))
    }
}

pub struct SnapshotBuilder {
    group: u64,
    wal: Wal,
    state: QueueMachine,
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
        let mut mine: Vec<Assigned> = Vec::new();
        let mut marked_down = None;
        {
            let mut m = lock(&self.state);
            let mut assigned = Vec::new();
            for e in entries {
                self.applied = Some(e.log_id);
                let outcome = match e.payload {
                    EntryPayload::Blank => Vec::new(),
                    EntryPayload::Normal(batch) => {
                        let mut answers = Vec::with_capacity(batch.len());
                        for cmd in batch {
                            // A message's index is the machine's own running
                            // count, not the Raft index: one entry carries a
                            // batch of commands, each enqueue needs its own
                            // identity, and every member counts the same.
                            let index = m.applied_index() + 1;
                            answers.push(m.apply(index, cmd, &mut assigned));
                        }
                        // Checked per entry: a later entry may announce a new
                        // incarnation that took back what this one assigned.
                        if self.ours(&m) {
                            mine.extend(assigned.drain(..).filter(|a| a.node == self.owner.node));
                        } else {
                            assigned.clear();
                        }
                        answers
                    }
                    EntryPayload::Membership(mem) => {
                        self.membership = QStoredMembership::new(Some(e.log_id), mem);
                        Vec::new()
                    }
                };
                out.push(outcome);
            }
            let down = m.is_down(&self.owner.node);
            if down && !self.down_told && self.ours(&m) {
                marked_down = m.incarnation_of(&self.owner.node);
            }
            self.down_told = down;
        }
        // Outside the machine's lock: the broker takes its own locks.
        if let Some(d) = &self.owner.deliver {
            if !mine.is_empty() {
                d.assigned(&self.owner.vhost, &self.owner.queue, mine);
            }
            if let Some(incarnation) = marked_down {
                d.marked_down(&self.owner.vhost, &self.owner.queue, incarnation);
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
        let new_state: QueueMachine = postcard::from_bytes(&data).map_err(read_err)?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.wal
            .put_snapshot(self.group, encode(&stored).map_err(write_err)?)
            .await
            .map_err(write_err)?;
        // What the snapshot has checked out to this node's current
        // incarnation that the state it replaces had not: assigned in the
        // entries the snapshot skips, so never handed to the broker. What
        // both have was handed when it was applied (it may sit in the local
        // queue, delivered and unacked) and is not handed again.
        // A snapshot that has this node marked down is told like an applied
        // `NodeDown` (the link rejoins; it ignores an incarnation not its own).
        let node = &self.owner.node;
        let down = new_state.is_down(node);
        let ours = self.ours(&new_state);
        let told = (down && !self.down_told && ours)
            .then(|| new_state.incarnation_of(node))
            .flatten();
        self.down_told = down;
        let skipped: Vec<Assigned> = {
            let mut state = lock(&self.state);
            let handed: std::collections::HashSet<u64> = if self.ours(&state) {
                state.checked_out_to(node).iter().map(|a| a.index).collect()
            } else {
                Default::default()
            };
            let skipped = if ours && !down {
                new_state
                    .checked_out_to(node)
                    .into_iter()
                    .filter(|a| !handed.contains(&a.index))
                    .collect()
            } else {
                Vec::new()
            };
            *state = new_state;
            skipped
        };
        if let Some(d) = &self.owner.deliver {
            if let Some(incarnation) = told {
                d.marked_down(&self.owner.vhost, &self.owner.queue, incarnation);
            }
            if !skipped.is_empty() {
                d.assigned(&self.owner.vhost, &self.owner.queue, skipped);
            }
        }
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        *slot(&self.snapshot) = Some(stored);
        let index = self.applied.map_or(0, |l| l.index);
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

//! Quorum queues' replication machinery: one openraft group per queue.
//!
//! - [`wal`]: every group on a node appends through one shared log with group
//!   commit (one fsync per batch of appends from all groups).
//! - [`machine`]: the queue's deterministic state machine (enqueue with
//!   deduplication, settle, return, discard, purge) and its snapshot.
//! - [`sm`]: openraft's `RaftStateMachine` over it, with the snapshot policy.
//! - [`network`]: the groups' RPCs between two nodes, multiplexed over one
//!   pipelined connection per peer.
//! - [`group`]: the per-node manager ([`QuorumGroups`]) and the per-queue
//!   handle ([`GroupHandle`]) the broker uses.
//!
//! Not wired into the broker yet: the broker-side queue on the leader,
//! forwarding publishes, remote consumers and confirms build on this API.

pub mod group;
pub mod machine;
pub mod network;
pub mod sm;
pub mod wal;

#[cfg(test)]
mod tests;

use std::io::Cursor;

pub use group::{GroupEvent, GroupHandle, ProposeError, QuorumGroups, QuorumSettings};
pub use machine::{Outcome, QueueCommand, QueueState, ReadyMessage};

use crate::types::{Member, NodeId};

openraft::declare_raft_types!(
    /// A quorum queue group's types.
    pub QueueTypeConfig:
        D = QueueCommand,
        R = Outcome,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<QueueTypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type QRaft = openraft::Raft<QueueTypeConfig>;
pub type QEntry = openraft::Entry<QueueTypeConfig>;
pub type QLogId = openraft::LogId<NodeId>;
pub type QVote = openraft::Vote<NodeId>;
pub type QStoredMembership = openraft::StoredMembership<NodeId, Member>;
pub type QSnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
pub type QStorageError = openraft::StorageError<NodeId>;
pub type QMetrics = openraft::RaftMetrics<NodeId, Member>;

//! Quorum queues' replication machinery: one openraft group per queue.
//!
//! - [`wal`]: every group on a node appends through one shared log with group
//!   commit (one fsync per batch of appends from all groups).
//! - [`sm`]: openraft's `RaftStateMachine` over the core's queue machine
//!   (`switchyard_core::quorum::QueueMachine`), with the snapshot policy; what
//!   the machine assigns to this node goes to the broker through [`Deliver`].
//! - [`network`]: the groups' RPCs between two nodes, multiplexed over one
//!   pipelined connection per peer, dialled through the node's authenticated
//!   `Link` and accepted on the cluster port.
//! - [`quiesce`]: idle groups go quiet (no timer, no heartbeat) and wake on
//!   use or on a node event; liveness is then watched per node, by pings.
//! - [`detector`]: the per-node failure detector that proposes `NodeDown`
//!   for members silent too long in the groups the node leads.
//! - [`group`]: the per-node manager ([`QuorumGroups`]) and the per-queue
//!   handle ([`GroupHandle`]).
//!
//! The metadata log decides which groups exist: applying a quorum queue's
//! declare creates its group on the members (`crate::sm`), deleting the
//! queue deletes it.

pub mod detector;
pub mod group;
pub mod network;
pub mod quiesce;
pub mod sm;
pub mod wal;

#[cfg(test)]
mod tests;

use std::io::Cursor;

pub use group::{GroupHandle, Placement, ProposeError, QuorumGroups, QuorumSettings};
pub use sm::Deliver;
use switchyard_core::quorum::{QueueApplied, QueueCommand};

use crate::types::{Member, NodeId};

/// One log entry of a queue's group: the commands one proposal batched, applied
/// in order (what `QuorumLog::propose` hands over).
pub type Batch = Vec<QueueCommand>;

/// What applying a [`Batch`] answered, one per command.
pub type Outcome = Vec<QueueApplied>;

openraft::declare_raft_types!(
    /// A quorum queue group's types.
    pub QueueTypeConfig:
        D = Batch,
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

//! The openraft type configuration of the metadata group and the values its log
//! carries.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};
use switchyard_core::admin::MetaCommand;
use switchyard_core::{CoreError, ErrorKind};

/// A node's Raft id: a stable 64-bit hash (FNV-1a) of its configured name, so
/// every node derives the same id for the same name without coordination.
pub type NodeId = u64;

/// What the membership records about a node: its name and inter-node address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// `host:port` of its `[cluster] listen`.
    pub addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// The id of a node name (FNV-1a, 64 bits).
pub fn node_id(name: &str) -> NodeId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A command of the replicated log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A metadata change, applied on every node by `Broker::apply_local`.
    /// (Quorum queues' commands go to their own groups: `crate::quorum`.)
    Meta(MetaCommand),
}

/// The outcome of applying a command: the core's error, if it refused it. Every
/// node computes the same outcome (the command is deterministic).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Applied {
    pub error: Option<WireError>,
}

/// A [`CoreError`] across the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub kind: String,
    pub text: String,
}

impl WireError {
    pub fn from_core(e: &CoreError) -> Self {
        WireError {
            kind: e.kind.name().to_owned(),
            text: e.text.clone(),
        }
    }

    pub fn into_core(self) -> CoreError {
        let kind = match self.kind.as_str() {
            "NOT_FOUND" => ErrorKind::NotFound,
            "ACCESS_REFUSED" => ErrorKind::AccessRefused,
            "RESOURCE_LOCKED" => ErrorKind::ResourceLocked,
            "PRECONDITION_FAILED" => ErrorKind::PreconditionFailed,
            "COMMAND_INVALID" => ErrorKind::CommandInvalid,
            "NOT_ALLOWED" => ErrorKind::NotAllowed,
            "NOT_IMPLEMENTED" => ErrorKind::NotImplemented,
            _ => ErrorKind::ResourceError,
        };
        CoreError::new(kind, self.text)
    }
}

openraft::declare_raft_types!(
    /// The metadata group's types.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
pub type StorageError = openraft::StorageError<NodeId>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_and_distinct() {
        assert_eq!(node_id("n1"), node_id("n1"));
        assert_ne!(node_id("n1"), node_id("n2"));
        assert_ne!(node_id("n2"), node_id("n3"));
    }

    #[test]
    fn errors_keep_their_kind_across_the_wire() {
        let e = CoreError::not_found("no vhost 'x'");
        let back = WireError::from_core(&e).into_core();
        assert_eq!(back, e);
    }
}

//! openraft's network over [`crate::transport`].

use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::transport::{CallError, Peer, Peers, Request, Response};
use crate::types::{Member, NodeId, TypeConfig};

/// Makes a client per target node, sharing connections through [`Peers`].
#[derive(Debug, Clone)]
pub struct Network {
    pub peers: Peers,
}

pub struct Client {
    target: NodeId,
    peer: Arc<Peer>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Client;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Client {
        Client {
            target,
            peer: self.peers.get(&node.addr),
        }
    }
}

pub(crate) type Rpc<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, Member, RaftError<NodeId, E>>>;

pub(crate) fn transport_err<E: std::error::Error>(
    e: CallError,
) -> RPCError<NodeId, Member, RaftError<NodeId, E>> {
    if e.sent {
        RPCError::Network(NetworkError::new(&e.error))
    } else {
        // Not even connected: openraft backs off from an unreachable node.
        RPCError::Unreachable(Unreachable::new(&e.error))
    }
}

fn unexpected<E: std::error::Error>() -> RPCError<NodeId, Member, RaftError<NodeId, E>> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(
        "unexpected response type",
    )))
}

impl RaftNetwork<TypeConfig> for Client {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<NodeId>> {
        match self
            .peer
            .call(&Request::AppendEntries(rpc), option.hard_ttl())
            .await
            .map_err(transport_err)?
        {
            Response::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self
            .peer
            .call(&Request::InstallSnapshot(rpc), option.hard_ttl())
            .await
            .map_err(transport_err)?
        {
            Response::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(unexpected()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Rpc<VoteResponse<NodeId>> {
        match self
            .peer
            .call(&Request::Vote(rpc), option.hard_ttl())
            .await
            .map_err(transport_err)?
        {
            Response::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(unexpected()),
        }
    }
}

//! The quorum groups' RPCs between nodes, multiplexed.
//!
//! Why one pipelined connection per peer rather than the metadata transport's
//! one-request-at-a-time connection, or a pool: with a queue per group, a node
//! sends `groups x followers` heartbeats every interval. On a serial connection
//! they would wait behind each other (and behind any large AppendEntries), so a
//! round trip per group per heartbeat would stack up to the election timeout. A
//! pool would need as many connections as concurrent RPCs. Instead every frame
//! carries a request id and the group id; the client keeps the pending requests
//! in a map and a reader task completes them as responses arrive, in any order;
//! the server runs each request in its own task and writes the responses as
//! they finish. One writer task per connection side drains its queue into one
//! buffer and one `write_all`, so the heartbeats of many groups leave in one
//! TCP segment (the "batch heartbeats" of CLUSTER.md §2.3, at the syscall
//! level). Head-of-line blocking remains only at the byte level: a large
//! AppendEntries delays the frames queued behind it by its transfer time
//! (`max_payload_entries` bounds it).
//!
//! A connection is dialled by the node that sends requests on it, so between
//! two nodes there are two connections, one per direction. Timeouts drop the
//! pending request, not the connection (a paused peer answers late; its stale
//! responses are ignored); a read or write error drops the connection, fails
//! everything pending on it, and the next call dials again.
//!
//! Frames are the metadata transport's (4-byte length, postcard), and so is
//! the way in: a connection is dialled through the node's [`Link`] (mutual TLS
//! with `[tls]`, the cookie challenge with `[cluster] cookie`) to the peer's
//! cluster port, and its first frame is `Request::QuorumMux`; the cluster's
//! accept loop then hands the rest of the connection to [`serve`]. So quorum
//! traffic is authenticated exactly like the metadata traffic, on one port.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::group::{ProposeError, Registry};
use super::{Batch, Outcome, QueueTypeConfig};
use crate::network::{transport_err, Rpc};
use crate::transport::{
    encode_frame, read_frame, write_frame, CallError, Link, NodeStream, Request,
};
use crate::types::{Member, NodeId};

/// A request to one group on a peer.
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum GroupRpc {
    AppendEntries(AppendEntriesRequest<QueueTypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<QueueTypeConfig>),
    /// Commands proposed elsewhere, for the leader to write as one entry.
    Propose(Batch),
    /// Node liveness (group 0): answered with the node's incarnation.
    Ping,
    /// The group's leader in `term` asks its follower to stop its election
    /// timer until woken (see `quiesce.rs`).
    Quiesce {
        leader: NodeId,
        term: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum GroupReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Propose(Result<(u64, Outcome), ProposeError>),
    /// The peer has no such group (not created yet, or deleted).
    NoGroup,
    Pong {
        incarnation: u64,
    },
    /// Whether the follower went quiet (it follows that leader in that term).
    Quiesce(bool),
}

#[derive(Debug, Serialize, Deserialize)]
struct RequestFrame {
    id: u64,
    group: u64,
    rpc: GroupRpc,
}

#[derive(Debug, Serialize, Deserialize)]
struct ReplyFrame {
    id: u64,
    reply: GroupReply,
}

/// Writes every queued frame, coalescing what is queued into one write.
async fn write_loop(
    mut w: tokio::io::WriteHalf<NodeStream>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    closed: Arc<AtomicBool>,
) {
    use tokio::io::AsyncWriteExt;
    let mut buf = Vec::new();
    while let Some(first) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(&first);
        while buf.len() < 1 << 20 {
            match rx.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if w.write_all(&buf).await.is_err() {
            break;
        }
    }
    closed.store(true, Ordering::Relaxed);
    let _ = w.shutdown().await;
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<GroupReply>>>>;

fn pending_map(
    p: &Pending,
) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<GroupReply>>> {
    match p.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

/// One outgoing multiplexed connection.
struct Conn {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    closed: Arc<AtomicBool>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Milliseconds since this process first asked (a monotonic clock that fits
/// an atomic); never 0 once a reply came.
pub fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Conn {
    fn start(stream: NodeStream, last_reply: Arc<AtomicU64>, lost: Arc<AtomicBool>) -> Conn {
        let (mut r, w) = tokio::io::split(stream);
        let (tx, rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn(write_loop(w, rx, closed.clone()));
        let (p, c) = (pending.clone(), closed.clone());
        let reader = tokio::spawn(async move {
            while let Ok(Some(f)) = read_frame::<_, ReplyFrame>(&mut r).await {
                last_reply.store(now_ms(), Ordering::Relaxed);
                if let Some(tx) = pending_map(&p).remove(&f.id) {
                    let _ = tx.send(f.reply);
                }
            }
            c.store(true, Ordering::Relaxed);
            lost.store(true, Ordering::Relaxed);
            // Fail everything pending: their senders drop.
            pending_map(&p).clear();
        });
        Conn {
            tx,
            pending,
            closed,
            tasks: [writer, reader],
        }
    }
}

/// The multiplexed connection to one peer.
pub struct MuxPeer {
    addr: String,
    link: Link,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    next_id: AtomicU64,
    /// When the peer last answered anything ([`now_ms`]; 0: never): the
    /// failure detector's and the quiescer's signal. Pings (`quiesce.rs`)
    /// keep it fresh when no group has anything to say.
    last_reply: Arc<AtomicU64>,
    /// The last connection ended, or the last dial failed: the peer is gone
    /// without waiting for its silence to last.
    lost: Arc<AtomicBool>,
    /// The incarnation its last pong gave (0: none yet).
    incarnation: AtomicU64,
    /// A ping is in flight.
    pinging: AtomicBool,
}

impl MuxPeer {
    fn new(addr: String, link: Link) -> Self {
        MuxPeer {
            addr,
            link,
            conn: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            last_reply: Arc::new(AtomicU64::new(0)),
            lost: Arc::new(AtomicBool::new(false)),
            incarnation: AtomicU64::new(0),
            pinging: AtomicBool::new(false),
        }
    }

    /// Whether the peer answered within `silent_after_ms` of `now` on a
    /// connection that is still up.
    pub fn alive(&self, now: u64, silent_after_ms: u64) -> bool {
        !self.lost.load(Ordering::Relaxed)
            && self
                .last_reply_ms()
                .is_some_and(|t| now.saturating_sub(t) < silent_after_ms)
    }

    /// The incarnation the peer's last pong gave.
    pub fn incarnation(&self) -> Option<u64> {
        match self.incarnation.load(Ordering::Relaxed) {
            0 => None,
            i => Some(i),
        }
    }

    /// Pings the peer unless it answered within `every_ms` of `now` or a ping
    /// is in flight; the answer lands in `last_reply` and `incarnation`.
    pub fn ping_if_quiet(self: &Arc<Self>, now: u64, every_ms: u64, timeout: Duration) {
        let fresh = self
            .last_reply_ms()
            .is_some_and(|t| now.saturating_sub(t) < every_ms);
        if (fresh && !self.lost.load(Ordering::Relaxed))
            || self.pinging.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let peer = self.clone();
        tokio::spawn(async move {
            if let Ok(GroupReply::Pong { incarnation }) =
                peer.call(0, GroupRpc::Ping, timeout).await
            {
                peer.incarnation
                    .store(incarnation.max(1), Ordering::Relaxed);
            }
            peer.pinging.store(false, Ordering::Relaxed);
        });
    }

    /// When the peer last answered ([`now_ms`]), if ever.
    pub fn last_reply_ms(&self) -> Option<u64> {
        match self.last_reply.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }

    async fn conn(&self) -> io::Result<Arc<Conn>> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if !c.closed.load(Ordering::Relaxed) {
                return Ok(c.clone());
            }
        }
        *guard = None;
        let dialled = async {
            let mut stream = self.link.dial(&self.addr).await?;
            // The hello: the peer's cluster port serves quorum groups from here on.
            write_frame(&mut stream, &Request::QuorumMux).await?;
            Ok::<_, io::Error>(stream)
        };
        let stream = match dialled.await {
            Ok(s) => s,
            Err(e) => {
                self.lost.store(true, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.lost.store(false, Ordering::Relaxed);
        let c = Arc::new(Conn::start(
            stream,
            self.last_reply.clone(),
            self.lost.clone(),
        ));
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Sends `rpc` to `group` on the peer and waits for its reply.
    pub async fn call(
        &self,
        group: u64,
        rpc: GroupRpc,
        timeout: Duration,
    ) -> Result<GroupReply, CallError> {
        let not_sent = |error| CallError { sent: false, error };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode_frame(&RequestFrame { id, group, rpc }).map_err(not_sent)?;
        let conn = tokio::time::timeout(timeout, self.conn())
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "dial timed out")))
            .map_err(not_sent)?;
        let (tx, rx) = oneshot::channel();
        pending_map(&conn.pending).insert(id, tx);
        if conn.tx.send(bytes).is_err() {
            pending_map(&conn.pending).remove(&id);
            return Err(not_sent(io::Error::other("connection closed")));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(CallError {
                sent: true,
                error: io::Error::new(io::ErrorKind::ConnectionReset, "connection closed"),
            }),
            Err(_) => {
                pending_map(&conn.pending).remove(&id);
                Err(CallError {
                    sent: true,
                    error: io::Error::new(io::ErrorKind::TimedOut, "request timed out"),
                })
            }
        }
    }
}

/// Multiplexed connections by address, shared by every group on the node.
#[derive(Clone, Default)]
pub struct MuxPeers {
    peers: Arc<Mutex<HashMap<String, Arc<MuxPeer>>>>,
    link: Link,
}

impl MuxPeers {
    /// Connections dialled through `link`.
    pub fn new(link: Link) -> Self {
        MuxPeers {
            peers: Arc::default(),
            link,
        }
    }

    pub fn get(&self, addr: &str) -> Arc<MuxPeer> {
        let mut m = match self.peers.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(addr.to_owned())
            .or_insert_with(|| Arc::new(MuxPeer::new(addr.to_owned(), self.link.clone())))
            .clone()
    }

    /// Drops every connection (their tasks end).
    pub fn clear(&self) {
        match self.peers.lock() {
            Ok(mut m) => m.clear(),
            Err(p) => p.into_inner().clear(),
        }
    }
}

/// Serves one accepted, authenticated connection after its hello: each
/// request runs in its own task.
pub async fn serve(stream: NodeStream, registry: Weak<Registry>) {
    let (mut r, w) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel();
    let closed = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_loop(w, rx, closed));
    while let Ok(Some(req)) = read_frame::<_, RequestFrame>(&mut r).await {
        let Some(reg) = registry.upgrade() else {
            break;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let reply = reg.handle(req.group, req.rpc).await;
            drop(reg);
            match encode_frame(&ReplyFrame { id: req.id, reply }) {
                Ok(bytes) => {
                    let _ = tx.send(bytes);
                }
                Err(e) => tracing::warn!(error = %e, "quorum reply not sent"),
            }
        });
    }
    drop(tx);
    // The writer ends once the in-flight requests have answered.
    let _ = writer.await;
}

/// openraft's network factory for one group.
pub struct GroupNetwork {
    pub group: u64,
    pub peers: MuxPeers,
}

pub struct GroupClient {
    group: u64,
    target: NodeId,
    peer: Arc<MuxPeer>,
}

impl RaftNetworkFactory<QueueTypeConfig> for GroupNetwork {
    type Network = GroupClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> GroupClient {
        GroupClient {
            group: self.group,
            target,
            peer: self.peers.get(&node.addr),
        }
    }
}

fn unexpected<E: std::error::Error>(
    reply: &GroupReply,
) -> RPCError<NodeId, Member, RaftError<NodeId, E>> {
    let text = match reply {
        GroupReply::NoGroup => "the peer has no such group",
        _ => "unexpected response type",
    };
    RPCError::Network(NetworkError::new(&io::Error::other(text)))
}

impl RaftNetwork<QueueTypeConfig> for GroupClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<QueueTypeConfig>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<NodeId>> {
        match self
            .peer
            .call(self.group, GroupRpc::AppendEntries(rpc), option.hard_ttl())
            .await
            .map_err(transport_err)?
        {
            GroupReply::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<QueueTypeConfig>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self
            .peer
            .call(
                self.group,
                GroupRpc::InstallSnapshot(rpc),
                option.hard_ttl(),
            )
            .await
            .map_err(transport_err)?
        {
            GroupReply::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Rpc<VoteResponse<NodeId>> {
        match self
            .peer
            .call(self.group, GroupRpc::Vote(rpc), option.hard_ttl())
            .await
            .map_err(transport_err)?
        {
            GroupReply::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(&other)),
        }
    }
}

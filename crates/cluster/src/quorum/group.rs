//! The per-node manager of quorum groups and the per-queue handle.
//!
//! Timing (per group): heartbeat 100 ms, election timeout 200-350 ms. In
//! openraft 0.9.25 a follower that knows a leader (its vote is committed)
//! starts an election only after `leader_lease + election_timeout` without
//! hearing from it, where the lease is `election_timeout_max`: here 550-700 ms,
//! plus up to one tick (1.5 x heartbeat = 150 ms) to notice. That keeps a
//! queue leader killed with -9 replaced in under 1 s (the failover goal) while
//! a follower needs 5-7 missed heartbeats in a row before it disrupts anyone.
//! (The 400-800 ms range first planned gives 1.2-1.6 s, measured 1.4 s.)
//! openraft 0.9.25 has no pre-vote; its leader lease does the same job against
//! a flapping node: a follower that heard from a leader within the lease
//! refuses to vote for anyone else, so a node that comes back with a higher
//! term cannot depose a healthy leader.
//!
//! Idle cost: each group runs openraft's core, state-machine and tick tasks,
//! plus a replication task per follower on its leader, and its leader sends a
//! heartbeat per follower every 100 ms. See the README (Clustering) for what
//! that measured and the plan to quiesce idle groups.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::SnapshotPolicy;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::machine::{Outcome, QueueCommand, QueueState, ReadyMessage};
use super::network::{serve, GroupNetwork, GroupReply, GroupRpc, MuxPeers};
pub use super::sm::GroupEvent;
use super::sm::{lock, QueueSm, Shared};
use super::wal::{encode, GroupLog, RecoveredGroup, Wal, WalStats};
use super::{QMetrics, QRaft};
use crate::types::{node_id, Member, NodeId};

/// Why a proposal was not written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the group's leader; the leader it knows of, if any.
    #[error("not the leader (leader: {0:?})")]
    NotLeader(Option<Member>),
    /// The node has no such group.
    #[error("no such quorum group")]
    NoGroup,
    /// Raft refused or failed, or the forwarded request's outcome is unknown.
    #[error("{0}")]
    Failed(String),
}

/// A node's quorum settings.
#[derive(Debug, Clone)]
pub struct QuorumSettings {
    /// This node's name (its id is `node_id(name)`).
    pub node: String,
    /// Where the groups' RPCs are accepted (`host:port`, port 0 for any).
    pub listen: String,
    /// Where the shared WAL lives (`<data_dir>/quorum`).
    pub dir: PathBuf,
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    /// A snapshot is built every this many applied entries; the log is then
    /// purged up to it, minus `keep_logs` (kept for followers slightly behind;
    /// those further behind get the snapshot).
    pub snapshot_every: u64,
    pub keep_logs: u64,
    /// How long a forwarded proposal may take.
    pub forward_timeout: Duration,
}

impl QuorumSettings {
    pub fn new(node: String, listen: String, dir: PathBuf) -> Self {
        QuorumSettings {
            node,
            listen,
            dir,
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(200),
            election_max: Duration::from_millis(350),
            snapshot_every: 4096,
            keep_logs: 512,
            forward_timeout: Duration::from_secs(5),
        }
    }

    fn raft_config(&self) -> io::Result<openraft::Config> {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        openraft::Config {
            cluster_name: "switchyard-quorum".to_owned(),
            heartbeat_interval: millis(self.heartbeat),
            election_timeout_min: millis(self.election_min),
            election_timeout_max: millis(self.election_max),
            install_snapshot_timeout: 2000,
            max_payload_entries: 128,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_logs,
            replication_lag_threshold: self.snapshot_every + self.keep_logs,
            ..Default::default()
        }
        .validate()
        .map_err(io::Error::other)
    }
}

/// What the WAL keeps about a group.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GroupRecord {
    members: BTreeMap<NodeId, Member>,
    /// The node that initialises the group (and so usually its first leader).
    initializer: NodeId,
}

struct GroupInner {
    id: u64,
    me: NodeId,
    raft: QRaft,
    state: Shared,
    applied: watch::Receiver<u64>,
    events: broadcast::Sender<GroupEvent>,
    log: GroupLog,
    members: BTreeMap<NodeId, Member>,
}

/// One quorum queue's group on this node (cheap to clone).
#[derive(Clone)]
pub struct GroupHandle {
    inner: Arc<GroupInner>,
}

impl GroupHandle {
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The members the group was created with.
    pub fn members(&self) -> &BTreeMap<NodeId, Member> {
        &self.inner.members
    }

    /// Writes `cmd` if this node is the leader; returns once it is committed (on
    /// a majority's disks, this node's included) and applied here, with its
    /// index and outcome.
    pub async fn propose(&self, cmd: QueueCommand) -> Result<(u64, Outcome), ProposeError> {
        match self.inner.raft.client_write(cmd).await {
            Ok(r) => Ok((r.log_id.index, r.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(
                ProposeError::NotLeader(f.leader_node.or_else(|| self.leader_member())),
            ),
            Err(e) => Err(ProposeError::Failed(e.to_string())),
        }
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    pub fn leader_member(&self) -> Option<Member> {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        m.current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).cloned())
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.inner.me)
    }

    /// openraft's metrics: leader, term, state, last log and applied index.
    /// `metrics().wait_for(..)`/`changed()` is the leader watch.
    pub fn metrics(&self) -> watch::Receiver<QMetrics> {
        self.inner.raft.metrics()
    }

    /// The index applied to this node's state machine.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.inner.applied.clone()
    }

    /// Waits until some node is the leader (as this node sees it).
    pub async fn wait_leader(&self, timeout: Duration) -> Option<NodeId> {
        let mut m = self.metrics();
        let got = tokio::time::timeout(timeout, m.wait_for(|m| m.current_leader.is_some())).await;
        match got {
            Ok(Ok(m)) => m.current_leader,
            _ => None,
        }
    }

    /// The messages in this node's state machine, in index order (as applied
    /// so far: on a follower it may lag).
    pub fn ready_messages(&self) -> Vec<ReadyMessage> {
        lock(&self.inner.state).ready().collect()
    }

    /// Reads the state machine under its lock.
    pub fn with_state<R>(&self, f: impl FnOnce(&QueueState) -> R) -> R {
        f(&lock(&self.inner.state))
    }

    /// For a node that became leader: confirms it still is (a round to a
    /// majority), waits until everything committed before is applied here, and
    /// returns the applied index and the messages in the queue. Entries applied
    /// later arrive through [`GroupHandle::subscribe`] (subscribe first).
    pub async fn leader_view(&self) -> Result<(u64, Vec<ReadyMessage>), ProposeError> {
        match self.inner.raft.ensure_linearizable().await {
            Ok(_) => {
                let state = lock(&self.inner.state);
                Ok((*self.inner.applied.borrow(), state.ready().collect()))
            }
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(
                ProposeError::NotLeader(f.leader_node.or_else(|| self.leader_member())),
            ),
            Err(e) => Err(ProposeError::Failed(e.to_string())),
        }
    }

    /// Every applied command, in log order, from now on (a lagging receiver
    /// gets `Lagged` and should re-read [`GroupHandle::ready_messages`]).
    pub fn subscribe(&self) -> broadcast::Receiver<GroupEvent> {
        self.inner.events.subscribe()
    }

    /// The first and last log index held on this node (purging shows here).
    pub fn log_bounds(&self) -> (Option<u64>, Option<u64>) {
        self.inner.log.bounds()
    }

    /// The openraft handle (metrics, triggers, tests).
    pub fn raft(&self) -> &QRaft {
        &self.inner.raft
    }
}

/// The groups of a node, shared with the connections it serves.
pub struct Registry {
    groups: RwLock<HashMap<u64, GroupHandle>>,
}

impl Registry {
    fn get(&self, group: u64) -> Option<GroupHandle> {
        match self.groups.read() {
            Ok(g) => g.get(&group).cloned(),
            Err(p) => p.into_inner().get(&group).cloned(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, GroupHandle>> {
        match self.groups.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub(crate) async fn handle(&self, group: u64, rpc: GroupRpc) -> GroupReply {
        let Some(h) = self.get(group) else {
            return GroupReply::NoGroup;
        };
        let raft = &h.inner.raft;
        match rpc {
            GroupRpc::AppendEntries(r) => GroupReply::AppendEntries(raft.append_entries(r).await),
            GroupRpc::Vote(r) => GroupReply::Vote(raft.vote(r).await),
            GroupRpc::InstallSnapshot(r) => {
                GroupReply::InstallSnapshot(raft.install_snapshot(r).await)
            }
            GroupRpc::Propose(cmd) => GroupReply::Propose(h.propose(cmd).await),
        }
    }
}

/// The quorum groups of one node: the shared WAL, the listener for the groups'
/// RPCs and every group's Raft.
pub struct QuorumGroups {
    me: Member,
    id: NodeId,
    settings: QuorumSettings,
    config: Arc<openraft::Config>,
    wal: Wal,
    peers: MuxPeers,
    registry: Arc<Registry>,
    /// Groups found damaged on disk at open (not started), with the reason.
    damaged: std::sync::Mutex<BTreeMap<u64, String>>,
    /// Serialises create/delete.
    admin: tokio::sync::Mutex<()>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl QuorumGroups {
    /// Opens the WAL in `settings.dir`, binds the listener and restarts every
    /// group found in the WAL. Must run inside a multi-threaded tokio runtime.
    pub async fn open(settings: QuorumSettings) -> io::Result<QuorumGroups> {
        let config = Arc::new(settings.raft_config()?);
        let (listener, addr) = crate::transport::bind(&settings.listen).await?;
        let (wal, recovered) = Wal::open(&settings.dir.join("quorum.redb"))?;
        let registry = Arc::new(Registry {
            groups: RwLock::new(HashMap::new()),
        });
        let (stop, stop_rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, Arc::downgrade(&registry), stop_rx));
        let me = Member {
            name: settings.node.clone(),
            addr: addr.to_string(),
        };
        let groups = QuorumGroups {
            id: node_id(&settings.node),
            me,
            settings,
            config,
            wal,
            peers: MuxPeers::default(),
            registry,
            damaged: std::sync::Mutex::new(BTreeMap::new()),
            admin: tokio::sync::Mutex::new(()),
            addr,
            stop,
            accept,
        };
        let n = recovered.len();
        for (gid, mut rec) in recovered {
            let record = match &rec.damaged {
                Some(e) => Err(e.clone()),
                None => postcard::from_bytes::<GroupRecord>(&rec.record).map_err(|e| e.to_string()),
            };
            match record {
                Ok(record) => {
                    groups.start(gid, record, Some(&mut rec)).await?;
                }
                Err(e) => {
                    tracing::error!(group = gid, error = %e, "quorum group not started");
                    groups.damaged_write().insert(gid, e);
                }
            }
        }
        tracing::info!(node = %groups.me, groups = n, "quorum groups opened");
        Ok(groups)
    }

    fn damaged_write(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, String>> {
        match self.damaged.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Groups found damaged on disk when the node opened (checksum mismatch):
    /// not started here, so this replica neither votes nor leads in them, and
    /// `create` refuses them. The repair is a membership change: remove this
    /// replica from the group, `delete` it here, add it back as a new learner
    /// (membership changes of quorum groups are not built yet).
    pub fn damaged(&self) -> BTreeMap<u64, String> {
        self.damaged_write().clone()
    }

    /// This node as group members name it (its bound address).
    pub fn member(&self) -> Member {
        self.me.clone()
    }

    pub fn node_id(&self) -> NodeId {
        self.id
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared WAL's counters (batches vs appends show the group commit).
    pub fn wal_stats(&self) -> &WalStats {
        self.wal.stats()
    }

    async fn start(
        &self,
        gid: u64,
        record: GroupRecord,
        mut recovered: Option<&mut RecoveredGroup>,
    ) -> io::Result<GroupHandle> {
        let snapshot = recovered.as_mut().and_then(|r| r.snapshot.take());
        let log = GroupLog::new(gid, self.wal.clone(), recovered);
        let (events, _) = broadcast::channel(1024);
        let (sm, state, applied) =
            QueueSm::open(gid, self.wal.clone(), snapshot.as_deref(), events.clone())?;
        let network = GroupNetwork {
            group: gid,
            peers: self.peers.clone(),
        };
        let raft = QRaft::new(self.id, self.config.clone(), network, log.clone(), sm)
            .await
            .map_err(io::Error::other)?;
        if record.initializer == self.id
            && !raft.is_initialized().await.map_err(io::Error::other)?
        {
            match raft.initialize(record.members.clone()).await {
                Ok(()) => {}
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        let handle = GroupHandle {
            inner: Arc::new(GroupInner {
                id: gid,
                me: self.id,
                raft,
                state,
                applied,
                events,
                log,
                members: record.members,
            }),
        };
        self.registry.write().insert(gid, handle.clone());
        Ok(handle)
    }

    /// Creates (or, if it exists, returns) the group `gid` over `members`
    /// (this node must be one). The first member (lowest id) initialises it.
    pub async fn create(
        &self,
        gid: u64,
        members: BTreeMap<NodeId, Member>,
    ) -> io::Result<GroupHandle> {
        let first = members.keys().next().copied().unwrap_or(self.id);
        self.create_led_by(gid, members, first).await
    }

    /// [`QuorumGroups::create`], with `initializer` (a member) initialising
    /// the group: it normally becomes the first leader, which is how the
    /// placement spreads leaders across nodes. Every member must be created
    /// with the same arguments. Durable before it returns: the group is
    /// restarted by [`QuorumGroups::open`] after a restart.
    pub async fn create_led_by(
        &self,
        gid: u64,
        members: BTreeMap<NodeId, Member>,
        initializer: NodeId,
    ) -> io::Result<GroupHandle> {
        let _admin = self.admin.lock().await;
        if let Some(h) = self.registry.get(gid) {
            return Ok(h);
        }
        if let Some(e) = self.damaged_write().get(&gid) {
            // Restarting it empty would let this replica vote without the
            // log (and vote) it had: refused until deleted here.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("quorum group {gid} is damaged on this node: {e}"),
            ));
        }
        if !members.contains_key(&self.id) || !members.contains_key(&initializer) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "this node and the initializer must be members of the group",
            ));
        }
        let record = GroupRecord {
            members,
            initializer,
        };
        self.wal.put_group(gid, encode(&record)?).await?;
        self.start(gid, record, None).await
    }

    /// Stops the group and deletes its log, state and snapshot on this node.
    pub async fn delete(&self, gid: u64) -> io::Result<()> {
        let _admin = self.admin.lock().await;
        self.damaged_write().remove(&gid);
        let handle = self.registry.write().remove(&gid);
        if let Some(h) = handle {
            if let Err(e) = h.inner.raft.shutdown().await {
                tracing::warn!(group = gid, error = %e, "quorum group did not stop cleanly");
            }
        }
        self.wal.delete_group(gid).await
    }

    pub fn get(&self, gid: u64) -> Option<GroupHandle> {
        self.registry.get(gid)
    }

    /// The groups on this node.
    pub fn groups(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = match self.registry.groups.read() {
            Ok(g) => g.keys().copied().collect(),
            Err(p) => p.into_inner().keys().copied().collect(),
        };
        ids.sort_unstable();
        ids
    }

    /// Proposes `cmd` to the group's leader: here if this node leads it, else
    /// forwarded once to the leader this node knows of.
    pub async fn propose(
        &self,
        gid: u64,
        cmd: QueueCommand,
    ) -> Result<(u64, Outcome), ProposeError> {
        let h = self.get(gid).ok_or(ProposeError::NoGroup)?;
        match h.propose(cmd.clone()).await {
            Err(ProposeError::NotLeader(Some(leader))) if leader.name != self.me.name => {
                self.forward(gid, &leader, cmd).await
            }
            other => other,
        }
    }

    /// Sends `cmd` to `leader` for it to write.
    pub async fn forward(
        &self,
        gid: u64,
        leader: &Member,
        cmd: QueueCommand,
    ) -> Result<(u64, Outcome), ProposeError> {
        let peer = self.peers.get(&leader.addr);
        match peer
            .call(gid, GroupRpc::Propose(cmd), self.settings.forward_timeout)
            .await
        {
            Ok(GroupReply::Propose(r)) => r,
            Ok(GroupReply::NoGroup) => Err(ProposeError::NoGroup),
            Ok(_) => Err(ProposeError::Failed("unexpected reply".to_owned())),
            // Never sent: certainly not written; the caller may retry.
            Err(e) if !e.sent => Err(ProposeError::NotLeader(None)),
            Err(e) => Err(ProposeError::Failed(format!(
                "forwarded to {}, outcome unknown: {}",
                leader.name, e.error
            ))),
        }
    }

    /// Stops every group, the listener and the connections, and closes the WAL
    /// (what a crash does, minus the torn writes).
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        self.accept.abort();
        let handles: Vec<GroupHandle> = self.registry.write().drain().map(|(_, h)| h).collect();
        for h in handles {
            if let Err(e) = h.inner.raft.shutdown().await {
                tracing::warn!(group = h.inner.id, error = %e, "quorum group did not stop cleanly");
            }
        }
        self.peers.clear();
        self.wal.close().await;
    }
}

impl Drop for QuorumGroups {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    registry: Weak<Registry>,
    stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = match crate::transport::accept(&listener).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "quorum accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = serve(stream, registry) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

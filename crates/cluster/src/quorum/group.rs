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
//! Idle cost: a group in use runs openraft's timers (a tick every 150 ms on
//! every replica, a heartbeat per follower every 100 ms on the leader). A
//! group idle for `quiet_after` is quiesced (`quiesce.rs`): no timer, no
//! heartbeat, woken by its next use or by a node event, with liveness watched
//! per node (pings) instead of per group. The node's one failure detector
//! (`detector.rs`, the `detect` task below) adds a tick a second that reads
//! a timestamp per follower of the groups led here.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::SnapshotPolicy;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use switchyard_core::quorum::QueueMachine;

use super::network::{serve, GroupNetwork, GroupReply, GroupRpc, MuxPeers};
use super::quiesce::Quiet;
use super::sm::{lock, Deliver, Owner, QueueSm, Shared};
use super::wal::{encode, GroupLog, RecoveredGroup, Wal, WalStats};
use super::{Batch, Outcome, QMetrics, QRaft};
use crate::transport::{Link, NodeStream, Request};
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
    /// This process's incarnation (random per start): what the machines
    /// assign to `node` under it goes to [`Deliver`].
    pub incarnation: u64,
    /// With `own_listener`: where the groups' RPCs are accepted (`host:port`,
    /// port 0 for any; in-process tests). Without: the node's cluster address,
    /// whose accept loop hands quorum connections to [`QuorumGroups::serve`].
    pub listen: String,
    pub own_listener: bool,
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
    /// A member that has not answered this node for this long is proposed
    /// `NodeDown` in the groups this node leads (see [`super::detector`]).
    pub down_after: Duration,
    /// A group unused for this long goes quiet (`None`: never; see
    /// [`super::quiesce`]).
    pub quiet_after: Option<Duration>,
    /// A peer that has not answered pings for this long (or whose connection
    /// was lost: at once) counts as gone for quiet groups: the followers of a
    /// quiet leader on it wake and elect. Longer than a busy group's election
    /// timeout, since the followers of a quiet leader have no lease to protect
    /// it from a false alarm: a loaded node that answers late would otherwise
    /// lose its quiet groups' leadership.
    pub silent_after: Duration,
    /// How long a group restarted from the WAL waits before it may start an
    /// election (see `start`).
    pub rejoin_grace: Duration,
}

impl QuorumSettings {
    /// Settings for a node with its own listener on `listen`.
    pub fn new(node: String, listen: String, dir: PathBuf) -> Self {
        QuorumSettings {
            node,
            incarnation: 0,
            listen,
            own_listener: true,
            dir,
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(200),
            election_max: Duration::from_millis(350),
            snapshot_every: 4096,
            keep_logs: 512,
            forward_timeout: Duration::from_secs(5),
            down_after: Duration::from_secs(5),
            quiet_after: Some(Duration::from_secs(2)),
            silent_after: Duration::from_millis(1500),
            rejoin_grace: Duration::from_secs(2),
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

/// Where a quorum queue's group lives: what the metadata log decides when it
/// applies the queue's declare, identical on every node. The WAL keeps it as
/// the group's record, so a restarting member reopens the group for its queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub vhost: String,
    pub queue: String,
    pub gid: u64,
    pub members: BTreeMap<NodeId, Member>,
    /// The node that initialises the group (and so usually its first leader).
    pub initializer: NodeId,
}

struct GroupInner {
    id: u64,
    me: NodeId,
    raft: QRaft,
    state: Shared,
    applied: watch::Receiver<u64>,
    log: GroupLog,
    members: BTreeMap<NodeId, Member>,
    /// How long the last entry written through this replica took to commit,
    /// in microseconds (0: none yet): the per-queue commit latency.
    commit_latency_us: AtomicU64,
    quiet: Quiet,
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

    /// Writes `cmd` (one entry) if this node is the leader; returns once it is
    /// committed (on a majority's disks, this node's included) and applied
    /// here, with its index and outcome.
    pub async fn propose(&self, cmd: Batch) -> Result<(u64, Outcome), ProposeError> {
        let started = std::time::Instant::now();
        self.wake();
        let written = self.inner.raft.client_write(cmd).await;
        // The idle clock starts when the write is done, not when it began.
        self.wake();
        match written {
            Ok(r) => {
                let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                self.inner.commit_latency_us.store(took, Ordering::Relaxed);
                Ok((r.log_id.index, r.data))
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(
                ProposeError::NotLeader(f.leader_node.or_else(|| self.leader_member())),
            ),
            Err(e) => Err(ProposeError::Failed(e.to_string())),
        }
    }

    /// How long the last entry this replica wrote (as leader) took to be
    /// committed and applied, in microseconds; 0 before the first.
    pub fn commit_latency_us(&self) -> u64 {
        self.inner.commit_latency_us.load(Ordering::Relaxed)
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

    /// Reads the queue's machine (as applied here so far: on a follower it
    /// may lag) under its lock.
    pub fn with_state<R>(&self, f: impl FnOnce(&QueueMachine) -> R) -> R {
        f(&lock(&self.inner.state))
    }

    /// For a node that became leader: confirms it still is (a round to a
    /// majority), waits until everything committed before is applied here, and
    /// returns the applied index and the machine.
    pub async fn leader_view(&self) -> Result<(u64, QueueMachine), ProposeError> {
        self.wake();
        match self.inner.raft.ensure_linearizable().await {
            Ok(_) => {
                let state = lock(&self.inner.state);
                Ok((*self.inner.applied.borrow(), state.clone()))
            }
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(
                ProposeError::NotLeader(f.leader_node.or_else(|| self.leader_member())),
            ),
            Err(e) => Err(ProposeError::Failed(e.to_string())),
        }
    }

    /// The first and last log index held on this node (purging shows here).
    pub fn log_bounds(&self) -> (Option<u64>, Option<u64>) {
        self.inner.log.bounds()
    }

    /// The openraft handle (metrics, triggers, tests).
    pub fn raft(&self) -> &QRaft {
        &self.inner.raft
    }

    /// Whether the group is quiet on this node (see [`super::quiesce`]).
    pub fn is_quiet(&self) -> bool {
        self.inner.quiet.is_quiet()
    }

    /// Wakes the group if quiet and restarts its idle clock.
    pub fn wake(&self) {
        self.inner.quiet.wake(&self.inner.raft);
    }

    /// Milliseconds since the group was last used or woken.
    pub(crate) fn idle_ms(&self, now: u64) -> u64 {
        self.inner.quiet.idle_ms(now)
    }

    /// As leader: asks `followers` (the live ones) to go quiet, and goes
    /// quiet itself if all of them did and nothing used the group meanwhile.
    pub(crate) async fn quiesce(&self, peers: MuxPeers, followers: Vec<Member>) {
        let Some(epoch) = self.inner.quiet.begin() else {
            return;
        };
        let term = self.inner.raft.metrics().borrow().current_term;
        let rpc = || GroupRpc::Quiesce {
            leader: self.inner.me,
            term,
        };
        let mut agreed = true;
        for m in &followers {
            let reply = peers
                .get(&m.addr)
                .call(self.inner.id, rpc(), Duration::from_secs(1))
                .await;
            agreed &= matches!(reply, Ok(GroupReply::Quiesce(true)));
        }
        let m = self.inner.raft.metrics().borrow().clone();
        agreed &= m.current_leader == Some(self.inner.me) && m.current_term == term;
        self.inner
            .quiet
            .finish_leader(&self.inner.raft, epoch, agreed);
    }

    /// As follower: goes quiet if it follows `leader` in `term`.
    fn quiesce_follower(&self, leader: NodeId, term: u64) -> bool {
        let ok = {
            let m = self.inner.raft.metrics();
            let m = m.borrow();
            m.current_leader == Some(leader)
                && leader != self.inner.me
                && m.current_term == term
                && m.vote.is_committed()
                && m.state == openraft::ServerState::Follower
        };
        if ok {
            self.inner.quiet.quiesce_follower(&self.inner.raft);
        }
        ok
    }
}

/// The groups of a node, shared with the connections it serves.
pub struct Registry {
    groups: RwLock<HashMap<u64, GroupHandle>>,
    /// This process's incarnation, what its pongs say.
    incarnation: u64,
}

impl Registry {
    /// Every group on this node.
    pub(crate) fn handles(&self) -> Vec<GroupHandle> {
        match self.groups.read() {
            Ok(g) => g.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        }
    }

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
        if let GroupRpc::Ping = rpc {
            return GroupReply::Pong {
                incarnation: self.incarnation,
            };
        }
        let Some(h) = self.get(group) else {
            return GroupReply::NoGroup;
        };
        let raft = &h.inner.raft;
        // What wakes a quiet replica: entries (the leader is writing), a vote
        // request, a snapshot. Empty AppendEntries do not (`quiesce.rs`).
        match rpc {
            GroupRpc::AppendEntries(r) => {
                if !r.entries.is_empty() {
                    h.wake();
                }
                GroupReply::AppendEntries(raft.append_entries(r).await)
            }
            GroupRpc::Vote(r) => {
                h.wake();
                GroupReply::Vote(raft.vote(r).await)
            }
            GroupRpc::InstallSnapshot(r) => {
                h.wake();
                GroupReply::InstallSnapshot(raft.install_snapshot(r).await)
            }
            GroupRpc::Propose(cmd) => GroupReply::Propose(h.propose(cmd).await),
            GroupRpc::Quiesce { leader, term } => {
                GroupReply::Quiesce(h.quiesce_follower(leader, term))
            }
            GroupRpc::Ping => GroupReply::NoGroup,
        }
    }
}

/// The quorum groups of one node: the shared WAL, every group's Raft, and
/// every quorum queue's placement (also of queues this node is no member of:
/// it forwards their proposals).
pub struct QuorumGroups {
    me: Member,
    id: NodeId,
    settings: QuorumSettings,
    config: Arc<openraft::Config>,
    wal: Wal,
    peers: MuxPeers,
    registry: Arc<Registry>,
    deliver: Option<Arc<dyn Deliver>>,
    placements: RwLock<HashMap<(String, String), Placement>>,
    /// Groups found damaged on disk at open (not started), with the reason.
    damaged: std::sync::Mutex<BTreeMap<u64, String>>,
    /// Serialises create/delete.
    admin: tokio::sync::Mutex<()>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
    detector: JoinHandle<()>,
    quiescer: JoinHandle<()>,
}

impl QuorumGroups {
    /// Opens the WAL in `settings.dir`, binds the listener (with
    /// `own_listener`) and restarts every group found in the WAL. Peers are
    /// dialled, and accepted connections authenticated, through `link`; what
    /// the machines assign to this node goes to `deliver`. Must run inside a
    /// multi-threaded tokio runtime.
    pub async fn open(
        settings: QuorumSettings,
        link: Link,
        deliver: Option<Arc<dyn Deliver>>,
    ) -> io::Result<QuorumGroups> {
        let config = Arc::new(settings.raft_config()?);
        let peers = MuxPeers::new(link.clone());
        std::fs::create_dir_all(&settings.dir)?;
        let (wal, recovered) = Wal::open(&settings.dir.join("quorum.redb"))?;
        let registry = Arc::new(Registry {
            groups: RwLock::new(HashMap::new()),
            incarnation: settings.incarnation,
        });
        let (stop, stop_rx) = watch::channel(false);
        let (addr, accept) = if settings.own_listener {
            let (listener, addr) = crate::transport::bind(&settings.listen).await?;
            let weak = Arc::downgrade(&registry);
            let task = tokio::spawn(accept_loop(listener, link.clone(), weak, stop_rx));
            (addr, Some(task))
        } else {
            let addr: SocketAddr = settings.listen.parse().map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("quorum address '{}': {e}", settings.listen),
                )
            })?;
            (addr, None)
        };
        let me = Member {
            name: settings.node.clone(),
            addr: addr.to_string(),
        };
        let detector = tokio::spawn(detect(
            Arc::downgrade(&registry),
            MuxPeers::clone(&peers),
            settings.node.clone(),
            settings.down_after,
            stop.subscribe(),
        ));
        let quiescer = tokio::spawn(super::quiesce::run(
            Arc::downgrade(&registry),
            MuxPeers::clone(&peers),
            node_id(&settings.node),
            settings.heartbeat,
            settings.silent_after,
            settings.quiet_after,
            stop.subscribe(),
        ));
        let groups = QuorumGroups {
            id: node_id(&settings.node),
            me,
            settings,
            config,
            wal,
            peers,
            registry,
            deliver,
            placements: RwLock::new(HashMap::new()),
            damaged: std::sync::Mutex::new(BTreeMap::new()),
            admin: tokio::sync::Mutex::new(()),
            addr,
            stop,
            accept,
            detector,
            quiescer,
        };
        let n = recovered.len();
        for (gid, mut rec) in recovered {
            let record = match &rec.damaged {
                Some(e) => Err(e.clone()),
                None => postcard::from_bytes::<Placement>(&rec.record).map_err(|e| e.to_string()),
            };
            match record {
                Ok(record) if record.gid == gid => {
                    groups.place(record.clone());
                    groups.start(record, Some(&mut rec), false).await?;
                }
                Ok(record) => {
                    let e = format!("its record names group {}", record.gid);
                    tracing::error!(group = gid, error = %e, "quorum group not started");
                    groups.damaged_write().insert(gid, e);
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

    /// Groups whose WAL rows failed their checksum at open: not started, and
    /// `create` refuses them. The repair is a membership change: remove this
    /// replica from the group, `delete` it here, add it back as a new learner
    /// (membership changes of quorum groups are not built yet).
    pub fn damaged(&self) -> BTreeMap<u64, String> {
        self.damaged_write().clone()
    }

    /// This node as group members name it.
    pub fn member(&self) -> Member {
        self.me.clone()
    }

    pub fn node_id(&self) -> NodeId {
        self.id
    }

    /// The address this node's groups are reached at.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared WAL's counters (batches vs appends show the group commit).
    pub fn wal_stats(&self) -> &WalStats {
        self.wal.stats()
    }

    /// Serves a connection accepted (and authenticated) on the cluster port
    /// whose hello was `Request::QuorumMux`.
    pub async fn serve(&self, stream: NodeStream) {
        let mut stop = self.stop.subscribe();
        tokio::select! {
            _ = serve(stream, Arc::downgrade(&self.registry)) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }

    fn placements_write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<(String, String), Placement>> {
        match self.placements.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Records where a queue's group lives (members or not).
    pub fn place(&self, p: Placement) {
        self.placements_write()
            .insert((p.vhost.clone(), p.queue.clone()), p);
    }

    /// The placement of a queue's group.
    pub fn placement(&self, vhost: &str, queue: &str) -> Option<Placement> {
        let key = (vhost.to_owned(), queue.to_owned());
        match self.placements.read() {
            Ok(g) => g.get(&key).cloned(),
            Err(p) => p.into_inner().get(&key).cloned(),
        }
    }

    /// Every placement known here.
    pub fn placements(&self) -> Vec<Placement> {
        let mut all: Vec<Placement> = match self.placements.read() {
            Ok(g) => g.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        };
        all.sort_by(|a, b| (&a.vhost, &a.queue).cmp(&(&b.vhost, &b.queue)));
        all
    }

    async fn start(
        &self,
        record: Placement,
        mut recovered: Option<&mut RecoveredGroup>,
        fresh: bool,
    ) -> io::Result<GroupHandle> {
        let gid = record.gid;
        let rejoining = recovered.is_some();
        let snapshot = recovered.as_mut().and_then(|r| r.snapshot.take());
        let log = GroupLog::new(gid, self.wal.clone(), recovered);
        let owner = Owner {
            vhost: record.vhost.clone(),
            queue: record.queue.clone(),
            node: self.settings.node.clone(),
            incarnation: self.settings.incarnation,
            deliver: self.deliver.clone(),
        };
        let (sm, state, applied) =
            QueueSm::open(gid, self.wal.clone(), owner, snapshot.as_deref())?;
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
        } else if fresh {
            // The initializer may be down when the declare is applied here:
            // then the other members initialise too, after a while without a
            // leader. Initialising several members with the same membership is
            // safe in Raft (openraft's `initialize` docs); one of them wins.
            // Not while the initializer's node answers: it is only slower to
            // apply the declare (many declares at once on a busy node), and
            // initialising here would make this node the leader instead, which
            // piles leaders up on the fastest node.
            let (raft, members) = (raft.clone(), record.members.clone());
            let wait = self.settings.election_max * 8;
            let initializer = record
                .members
                .get(&record.initializer)
                .map(|m| self.peers.get(&m.addr));
            let silent_ms =
                u64::try_from(self.settings.silent_after.as_millis()).unwrap_or(u64::MAX);
            tokio::spawn(async move {
                // At most a minute of waiting for a live but slow initializer.
                for _ in 0..(Duration::from_secs(60).as_millis() / wait.as_millis().max(1)).max(1) {
                    tokio::time::sleep(wait).await;
                    if !matches!(raft.is_initialized().await, Ok(false)) {
                        return;
                    }
                    let alive = initializer
                        .as_ref()
                        .is_some_and(|p| p.alive(super::network::now_ms(), silent_ms));
                    if !alive {
                        break;
                    }
                }
                if matches!(raft.is_initialized().await, Ok(false)) {
                    tracing::info!(group = gid, "quorum group initialised by a non-initializer");
                    let _ = raft.initialize(members).await;
                }
            });
        }
        let handle = GroupHandle {
            inner: Arc::new(GroupInner {
                id: gid,
                me: self.id,
                raft,
                state,
                applied,
                log,
                members: record.members,
                commit_latency_us: AtomicU64::new(0),
                quiet: Quiet::new(),
            }),
        };
        if rejoining {
            // A restarted member stands for election only after a grace:
            // openraft 0.9 has no pre-vote, so a member that times out before
            // the leader reaches it (the leader's retries to a dead follower
            // back off 500 ms) would raise the term, and the healthy leader
            // would step down when it next hears from it, an election for
            // nothing. Within the grace the leader reaches it; if none does
            // (all restarted), it elects after it.
            let rc = handle.raft().runtime_config();
            rc.elect(false);
            let (h, grace) = (handle.clone(), self.settings.rejoin_grace);
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                if !h.is_quiet() {
                    h.raft().runtime_config().elect(true);
                }
            });
        }
        self.registry.write().insert(gid, handle.clone());
        Ok(handle)
    }

    /// Records `p` and creates (or, if it exists, returns) its group on this
    /// node, which must be a member. The initializer normally becomes the
    /// first leader, which is how the placement spreads leaders across nodes.
    /// Every member must be created with the same placement. Durable before it
    /// returns: the group is restarted by [`QuorumGroups::open`] after a
    /// restart.
    pub async fn create(&self, p: &Placement) -> io::Result<GroupHandle> {
        let _admin = self.admin.lock().await;
        self.place(p.clone());
        if let Some(h) = self.registry.get(p.gid) {
            return Ok(h);
        }
        if let Some(e) = self.damaged_write().get(&p.gid) {
            // Restarting it empty would let this replica vote without the
            // log (and vote) it had: refused until deleted here.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("quorum group {} is damaged on this node: {e}", p.gid),
            ));
        }
        if !p.members.contains_key(&self.id) || !p.members.contains_key(&p.initializer) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "this node and the initializer must be members of the group",
            ));
        }
        self.wal.put_group(p.gid, encode(p)?).await?;
        self.start(p.clone(), None, true).await
    }

    /// Records `p`; creates its group here if this node is a member.
    pub async fn ensure(&self, p: &Placement) -> io::Result<()> {
        if p.members.contains_key(&self.id) {
            self.create(p).await.map(drop)
        } else {
            self.place(p.clone());
            Ok(())
        }
    }

    /// Stops the group and deletes its log, state and snapshot on this node,
    /// and forgets its placement.
    pub async fn delete(&self, gid: u64) -> io::Result<()> {
        let _admin = self.admin.lock().await;
        self.placements_write().retain(|_, p| p.gid != gid);
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
    pub async fn propose(&self, gid: u64, cmd: Batch) -> Result<(u64, Outcome), ProposeError> {
        let h = self.get(gid).ok_or(ProposeError::NoGroup)?;
        match h.propose(cmd.clone()).await {
            Err(ProposeError::NotLeader(Some(leader))) if leader.name != self.me.name => {
                self.forward(gid, &leader, cmd).await
            }
            other => other,
        }
    }

    /// Proposes `cmd` to the group of `vhost`/`queue`, wherever its leader is:
    /// here, or forwarded to the leader this node knows of, or (a node outside
    /// the group, or a member that knows no leader) to the members in turn,
    /// following their redirects a few hops. `Failed`: the outcome is unknown
    /// (the caller resends; the machine deduplicates enqueues).
    pub async fn propose_to_queue(
        &self,
        vhost: &str,
        queue: &str,
        cmd: Batch,
    ) -> Result<(u64, Outcome), ProposeError> {
        let p = self.placement(vhost, queue).ok_or(ProposeError::NoGroup)?;
        let mut targets: std::collections::VecDeque<Member> = std::collections::VecDeque::new();
        if let Some(h) = self.get(p.gid) {
            match h.propose(cmd.clone()).await {
                Err(ProposeError::NotLeader(Some(l))) if l.name != self.me.name => {
                    targets.push_back(l)
                }
                Err(ProposeError::NotLeader(_)) => {}
                other => return other,
            }
        }
        if targets.is_empty() {
            targets.extend(
                p.members
                    .values()
                    .filter(|m| m.name != self.me.name)
                    .cloned(),
            );
        }
        let mut last = ProposeError::NotLeader(None);
        for _ in 0..4 {
            let Some(m) = targets.pop_front() else {
                break;
            };
            match self.forward(p.gid, &m, cmd.clone()).await {
                Ok(r) => return Ok(r),
                Err(ProposeError::NotLeader(Some(l))) if l.name != self.me.name => {
                    targets.push_front(l);
                }
                Err(e @ ProposeError::Failed(_)) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Sends `cmd` to `leader` for it to write.
    pub async fn forward(
        &self,
        gid: u64,
        leader: &Member,
        cmd: Batch,
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
        if let Some(a) = &self.accept {
            a.abort();
        }
        self.detector.abort();
        self.quiescer.abort();
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
        self.detector.abort();
        self.quiescer.abort();
        if let Some(a) = &self.accept {
            a.abort();
        }
    }
}

/// The own listener's accept loop (in-process tests): each connection is
/// authenticated through `link` and must open with the `QuorumMux` hello,
/// as on the cluster port.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    link: Link,
    registry: Weak<Registry>,
    stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = match crate::transport::accept(&listener).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "quorum accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        let mut stop = stop.clone();
        let link = link.clone();
        tokio::spawn(async move {
            let mut stream = match link.secure(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "quorum connection refused");
                    return;
                }
            };
            match crate::transport::read_frame::<_, Request>(&mut stream).await {
                Ok(Some(Request::QuorumMux)) => {}
                _ => {
                    tracing::warn!(%peer, "quorum connection without its hello");
                    return;
                }
            }
            tokio::select! {
                _ = serve(stream, registry) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

type InFlight = std::sync::Mutex<std::collections::HashSet<(u64, String)>>;

fn in_flight(p: &InFlight) -> std::sync::MutexGuard<'_, std::collections::HashSet<(u64, String)>> {
    match p.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

/// The node's failure detector loop (see [`super::detector`]): a tick a
/// second over the groups led here.
async fn detect(
    registry: Weak<Registry>,
    peers: MuxPeers,
    me: String,
    down_after: Duration,
    mut stop: watch::Receiver<bool>,
) {
    use switchyard_core::quorum::QueueCommand;
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut detector = super::detector::Detector::new(ms(down_after));
    let proposing: Arc<InFlight> = Arc::default();
    let every = (down_after / 5).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(reg) = registry.upgrade() else {
            return;
        };
        let handles: HashMap<u64, GroupHandle> = match reg.groups.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        drop(reg);
        let views: Vec<super::detector::GroupView> = handles
            .values()
            .map(|h| {
                let leader = h.is_leader();
                let members = if leader {
                    h.members()
                        .values()
                        .filter(|m| m.name != me)
                        .map(|m| (m.name.clone(), peers.get(&m.addr).last_reply_ms()))
                        .collect()
                } else {
                    Vec::new()
                };
                super::detector::GroupView {
                    gid: h.id(),
                    leader,
                    members,
                }
            })
            .collect();
        let now = super::network::now_ms();
        let picks = detector.tick(now, &views, |gid, node| {
            !in_flight(&proposing).contains(&(gid, node.to_owned()))
                && handles
                    .get(&gid)
                    .is_some_and(|h| h.with_state(|m| m.worth_marking_down(node)))
        });
        for (gid, node) in picks {
            let Some(h) = handles.get(&gid).cloned() else {
                continue;
            };
            in_flight(&proposing).insert((gid, node.clone()));
            let proposing = proposing.clone();
            tokio::spawn(async move {
                tracing::warn!(group = gid, %node, "quorum group member silent too long; proposing it down");
                let cmd = vec![QueueCommand::NodeDown { node: node.clone() }];
                match tokio::time::timeout(Duration::from_secs(10), h.propose(cmd)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::info!(group = gid, %node, error = %e, "NodeDown not written")
                    }
                    Err(_) => tracing::info!(group = gid, %node, "NodeDown timed out"),
                }
                in_flight(&proposing).remove(&(gid, node));
            });
        }
    }
}

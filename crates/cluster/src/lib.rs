//! Switchyard clustering, stage 1: nodes, membership and the replicated
//! metadata log.
//!
//! One openraft group (0.9, `storage-v2`) spans every node. Its log carries the
//! core's [`MetaCommand`]s; its state machine is the broker (`sm.rs`), so a
//! committed command is applied on every node through the same
//! `Broker::apply_local` path a single node uses. [`Cluster::start`] makes
//! `Broker::apply` go through the log ([`switchyard_core::MetaLog`]): a
//! command proposed on a follower is forwarded to the leader over the
//! inter-node transport (`transport.rs`), and `apply` returns once the command
//! is committed and applied on the proposing node, so reads stay local.
//! Without a majority, `apply` returns an error after the write timeout.
//!
//! Clustered quorum queues run on Raft groups of their own, one per queue
//! (`quorum/`), created and deleted as the metadata log applies their declares
//! and deletes (`sm.rs`); their traffic shares the cluster port and its
//! authentication. [`QuorumLog`] for the core is [`GroupProposer`].

pub mod network;
pub mod quorum;
pub mod sm;
pub mod store;
pub mod transport;
pub mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use switchyard_core::admin::MetaCommand;
use switchyard_core::quorum::{Assigned, QueueCommand};
use switchyard_core::quorum_link::{Proposal, QuorumLog};
use switchyard_core::{Broker, CoreError, CoreResult, ErrorKind, MetaLog};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use types::{node_id, Member, NodeId};

use crate::network::Network;
use crate::quorum::{Deliver, ProposeError, QuorumGroups, QuorumSettings};
use crate::sm::StateMachine;
use crate::store::{LogStore, RaftDb};
pub use crate::transport::{Cookie, Link, NodeTls};
use crate::transport::{Peers, Refused, Request, Response, WriteResult};
use crate::types::{Applied, Command, Raft};

/// What a node needs to join the metadata group.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's unique name (`[cluster] node`).
    pub node: String,
    /// The inter-node listen address (`[cluster] listen`).
    pub listen: String,
    /// The nodes that form the cluster on first start (`[cluster] seeds`).
    pub seeds: Vec<Member>,
    /// Where the Raft log, vote and state live (`<data_dir>/cluster`).
    pub dir: PathBuf,
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// Election timeout range: a follower that hears no leader for a random
    /// time in it starts an election.
    pub election_min: Duration,
    pub election_max: Duration,
    /// How long a metadata write may wait for a commit before it fails.
    pub write_timeout: Duration,
    /// How long a quorum group's member may go without answering before the
    /// group's leader marks it down (`quorum::detector`).
    pub node_down_after: Duration,
    /// How long a publish to a quorum queue may wait for its commit before it
    /// fails (`QuorumLog::commit_timeout`).
    pub quorum_commit_timeout: Duration,
    /// Mutual TLS between nodes (`[tls]` set); `None`: plain TCP.
    pub tls: Option<Arc<NodeTls>>,
    /// The cluster's shared secret (`[cluster] cookie`).
    pub cookie: Option<Cookie>,
}

impl Settings {
    /// Settings with the defaults for timing.
    pub fn new(node: String, listen: String, seeds: Vec<Member>, dir: PathBuf) -> Self {
        Settings {
            node,
            listen,
            seeds,
            dir,
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(500),
            election_max: Duration::from_millis(1000),
            write_timeout: Duration::from_secs(10),
            node_down_after: Duration::from_secs(5),
            quorum_commit_timeout: switchyard_core::quorum_link::DEFAULT_COMMIT_TIMEOUT,
            tls: None,
            cookie: None,
        }
    }
}

/// Parses a seed `name@host:port`.
pub fn parse_member(s: &str) -> Result<Member, String> {
    let (name, addr) = s
        .split_once('@')
        .ok_or_else(|| format!("'{s}' is not name@host:port"))?;
    if name.is_empty() {
        return Err(format!("'{s}' has no node name"));
    }
    if !addr.contains(':') || addr.ends_with(':') {
        return Err(format!("'{s}' has no port"));
    }
    Ok(Member {
        name: name.to_owned(),
        addr: addr.to_owned(),
    })
}

/// One member as [`Status`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub addr: String,
    /// A voter (false: a learner still catching up).
    pub voter: bool,
    pub leader: bool,
}

/// A node's view of the cluster (`switchyard ctl cluster status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    /// `Leader`, `Follower`, `Candidate`, `Learner` or `Shutdown`.
    pub state: String,
    pub term: u64,
    pub leader: Option<String>,
    pub last_log_index: u64,
    /// The last entry applied here: committed (openraft 0.9's metrics have no
    /// separate commit index; applying follows a commit within one step).
    pub last_applied: u64,
    /// The last entry covered by a snapshot (0: none).
    pub snapshot_index: u64,
    /// How long the last metadata write proposed on this node took from
    /// proposal to being applied here, in microseconds (0: none yet).
    pub commit_latency_us: u64,
    pub members: Vec<MemberStatus>,
    /// The quorum queues' groups this node is a member of.
    #[serde(default)]
    pub quorum: Vec<GroupStatus>,
}

/// One quorum queue's group as a member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub vhost: String,
    pub queue: String,
    pub group: u64,
    /// The member names.
    pub members: Vec<String>,
    pub leader: Option<String>,
    /// The index applied here.
    pub applied: u64,
    /// Messages ready in the machine, and checked out to nodes.
    pub ready: usize,
    pub checked_out: usize,
    /// Credit the members' consumers hold (0: no consumer takes messages).
    pub credit: u64,
    /// The group's Raft term, last log index written here and last snapshot
    /// index (0: none), as this member sees them.
    #[serde(default)]
    pub term: u64,
    #[serde(default)]
    pub last_log_index: u64,
    #[serde(default)]
    pub snapshot_index: u64,
    /// How long the last entry written through this member, while it led, took
    /// to commit, in microseconds (0: none yet).
    #[serde(default)]
    pub commit_latency_us: u64,
    /// Idle and quiesced on this member: no timer, no heartbeat until used
    /// (`quorum/quiesce.rs`).
    #[serde(default)]
    pub quiet: bool,
}

impl Status {
    /// Human-readable lines.
    pub fn render(&self) -> String {
        let mut out = format!(
            "node {}: {} (term {}), leader {}, log {}, applied {}\n",
            self.node,
            self.state,
            self.term,
            self.leader.as_deref().unwrap_or("none"),
            self.last_log_index,
            self.last_applied
        );
        for m in &self.members {
            out.push_str(&format!(
                "  {}@{}  {}{}\n",
                m.name,
                m.addr,
                if m.voter { "voter" } else { "learner" },
                if m.leader { ", leader" } else { "" }
            ));
        }
        for g in &self.quorum {
            out.push_str(&format!(
                "  quorum queue {}/{}: group {:016x} on {}, leader {}, {} ready, {} checked out{}\n",
                g.vhost,
                g.queue,
                g.group,
                g.members.join(","),
                g.leader.as_deref().unwrap_or("none"),
                g.ready,
                g.checked_out,
                if g.quiet { ", quiet" } else { "" }
            ));
        }
        out
    }
}

struct Inner {
    node: String,
    raft: Raft,
    applied: watch::Receiver<u64>,
    /// Connections for forwarded writes (apart from Raft's own RPCs, which may
    /// wait on a slow peer).
    forward: Peers,
    write_timeout: Duration,
    runtime: tokio::runtime::Handle,
    /// See [`Status::commit_latency_us`].
    commit_latency_us: std::sync::atomic::AtomicU64,
    /// How this node dials and serves its peers.
    link: Link,
    /// This node's quorum queue groups.
    groups: Arc<QuorumGroups>,
}

/// A running cluster node.
pub struct Cluster {
    inner: Arc<Inner>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Cluster {
    /// Opens the Raft state in `settings.dir`, binds the inter-node listener,
    /// starts Raft, forms the cluster from the seeds if this node is one and
    /// the group was never initialised, and routes `broker`'s metadata commands
    /// through the log. Must run inside a multi-threaded tokio runtime.
    pub async fn start(settings: Settings, broker: Arc<Broker>) -> io::Result<Cluster> {
        let id = node_id(&settings.node);
        let db = RaftDb::open(&settings.dir.join("raft.redb"))?;
        let (mut sm, applied) = StateMachine::open(broker.clone(), db.clone())?;
        // A new incarnation per start: what the last one held of quorum
        // queues goes back to their ready lists (`NodeUp`).
        let incarnation: u64 = rand::random();
        let log = LogStore::new(db);
        let (listener, addr) = transport::bind(&settings.listen).await?;
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let config = openraft::Config {
            cluster_name: "switchyard".to_owned(),
            heartbeat_interval: millis(settings.heartbeat),
            election_timeout_min: millis(settings.election_min),
            election_timeout_max: millis(settings.election_max),
            // The log is the whole history: a snapshot is only built on request
            // (see sm.rs), so followers catch up from the log.
            snapshot_policy: SnapshotPolicy::Never,
            ..Default::default()
        }
        .validate()
        .map_err(io::Error::other)?;
        let link = Link::node(&addr, settings.tls.clone(), settings.cookie.clone());
        if !link.is_authenticated() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the inter-node port is neither TLS nor protected by a cookie: \
                anyone who reaches it can change the cluster; set [tls] or [cluster] cookie");
        }
        // The quorum groups: their data under the cluster dir, their RPCs on
        // the cluster port (handed over by the accept loop below).
        let mut qs = QuorumSettings::new(
            settings.node.clone(),
            addr.to_string(),
            settings.dir.join("quorum"),
        );
        qs.own_listener = false;
        qs.incarnation = incarnation;
        qs.down_after = settings.node_down_after;
        let deliver: Arc<dyn Deliver> = Arc::new(BrokerDeliver(Arc::downgrade(&broker)));
        let groups = Arc::new(QuorumGroups::open(qs, link.clone(), Some(deliver)).await?);
        sm.attach_groups(groups.clone()).await;
        let network = Network {
            peers: Peers::new(link.clone()),
        };
        let raft = Raft::new(id, Arc::new(config), network, log, sm)
            .await
            .map_err(io::Error::other)?;
        let inner = Arc::new(Inner {
            node: settings.node.clone(),
            raft: raft.clone(),
            applied,
            forward: Peers::new(link.clone()),
            link,
            groups: groups.clone(),
            write_timeout: settings.write_timeout,
            runtime: tokio::runtime::Handle::current(),
            commit_latency_us: Default::default(),
        });
        let accept = tokio::spawn(accept_loop(listener, inner.clone()));
        let is_seed = settings.seeds.iter().any(|m| m.name == settings.node);
        if is_seed && !raft.is_initialized().await.map_err(io::Error::other)? {
            let members: BTreeMap<NodeId, Member> = settings
                .seeds
                .iter()
                .map(|m| (node_id(&m.name), m.clone()))
                .collect();
            // Every seed initialises with the same membership: safe in Raft
            // (openraft's `initialize` docs); one of them wins the election.
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(node = %settings.node, "cluster formed from the seeds"),
                Err(e) => {
                    tracing::info!(node = %settings.node, error = %e, "cluster already formed")
                }
            }
        }
        let quorum = Arc::new(GroupProposer {
            node: settings.node.clone(),
            groups,
            incarnation,
            nudge: broker.confirm_nudger(),
            commit_timeout: settings.quorum_commit_timeout,
        });
        broker.set_meta_log(Arc::new(Replicator {
            inner: inner.clone(),
            quorum,
        }));
        tracing::info!(node = %settings.node, %addr, "cluster node started");
        Ok(Cluster {
            inner,
            addr,
            accept,
        })
    }

    /// The bound inter-node address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The Raft handle (tests, metrics).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub fn status(&self) -> Status {
        self.inner.status()
    }

    /// A handle for reading this node's and its peers' state (management API).
    pub fn view(&self) -> ClusterView {
        ClusterView {
            inner: self.inner.clone(),
        }
    }

    /// This node's quorum queue groups (tests, metrics).
    pub fn groups(&self) -> &Arc<QuorumGroups> {
        &self.inner.groups
    }

    /// Stops Raft, the quorum groups and the listener.
    pub async fn shutdown(self) {
        self.accept.abort();
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
        self.inner.groups.shutdown().await;
    }
}

impl Inner {
    fn status(&self) -> Status {
        let m = self.inner_metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| MemberStatus {
                name: node.name.clone(),
                addr: node.addr.clone(),
                voter: voters.contains(id),
                leader: m.current_leader == Some(*id),
            })
            .collect();
        let leader = m
            .current_leader
            .and_then(|l| membership.get_node(&l).map(|n| n.name.clone()));
        Status {
            node: self.node.clone(),
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            commit_latency_us: self
                .commit_latency_us
                .load(std::sync::atomic::Ordering::Relaxed),
            members,
            quorum: self.group_status(),
        }
    }

    fn group_status(&self) -> Vec<GroupStatus> {
        self.groups
            .placements()
            .into_iter()
            .filter_map(|p| self.group_status_of(p))
            .collect()
    }

    /// One quorum queue's group as this node sees it (None: not a member).
    fn group_status_of(&self, p: quorum::group::Placement) -> Option<GroupStatus> {
        let h = self.groups.get(p.gid)?;
        let (ready, checked_out, credit) = h.with_state(|m| {
            let credit = p.members.values().map(|n| m.credit_of(&n.name)).sum();
            (m.ready_count(), m.checked_out_count(), credit)
        });
        let (term, last_log_index, snapshot_index) = {
            let m = h.metrics();
            let m = m.borrow();
            (
                m.current_term,
                m.last_log_index.unwrap_or(0),
                m.snapshot.map_or(0, |s| s.index),
            )
        };
        Some(GroupStatus {
            vhost: p.vhost,
            queue: p.queue,
            group: p.gid,
            members: p.members.values().map(|m| m.name.clone()).collect(),
            leader: h.leader_member().map(|m| m.name),
            applied: *h.applied().borrow(),
            ready,
            checked_out,
            credit,
            term,
            last_log_index,
            snapshot_index,
            commit_latency_us: h.commit_latency_us(),
            quiet: h.is_quiet(),
        })
    }

    fn inner_metrics(&self) -> openraft::RaftMetrics<NodeId, Member> {
        self.raft.metrics().borrow().clone()
    }

    fn leader_member(&self) -> Option<Member> {
        let m = self.inner_metrics();
        m.current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).cloned())
    }

    /// Writes `cmd` on the leader (this node, or forwarded), then waits until
    /// this node applied it. Retries while there is no leader, until the write
    /// timeout.
    async fn write(&self, cmd: Command) -> CoreResult<Applied> {
        let started = Instant::now();
        let deadline = started + self.write_timeout;
        let mut metrics = self.raft.metrics();
        loop {
            let local = self.leader_write(cmd.clone()).await;
            let outcome = match local {
                Err(Refused::NotLeader(Some(leader))) => {
                    let peer = self.forward.get(&leader.addr);
                    let left = deadline.saturating_duration_since(Instant::now());
                    match peer.call(&Request::Write(cmd.clone()), left).await {
                        Ok(Response::Write(r)) => r,
                        Ok(_) => Err(Refused::Failed("unexpected response".to_owned())),
                        // Sent but no answer: it may or may not be committed.
                        Err(e) if e.sent => {
                            return Err(unavailable(format!(
                            "metadata write to the leader {} failed, its outcome is unknown: {}",
                            leader.name, e.error
                        )))
                        }
                        Err(_) => Err(Refused::NotLeader(None)),
                    }
                }
                other => other,
            };
            match outcome {
                Ok((index, applied)) => {
                    let mut rx = self.applied.clone();
                    let left = deadline.saturating_duration_since(Instant::now());
                    let waited = tokio::time::timeout(left, rx.wait_for(|&i| i >= index)).await;
                    return match waited {
                        Ok(Ok(_)) => {
                            let took = u64::try_from(started.elapsed().as_micros());
                            self.commit_latency_us.store(
                                took.unwrap_or(u64::MAX),
                                std::sync::atomic::Ordering::Relaxed,
                            );
                            Ok(applied)
                        }
                        _ => Err(unavailable(
                            "metadata write committed but not applied on this node in time"
                                .to_owned(),
                        )),
                    };
                }
                Err(Refused::Failed(text)) => return Err(unavailable(text)),
                Err(Refused::NotLeader(_)) => {
                    // No (reachable) leader: wait for the membership view to change.
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(unavailable(
                            "no cluster leader: metadata writes need a majority of nodes"
                                .to_owned(),
                        ));
                    }
                    let _ = tokio::time::timeout(
                        left.min(Duration::from_millis(200)),
                        metrics.changed(),
                    )
                    .await;
                }
            }
        }
    }

    /// Writes on this node if it is the leader.
    async fn leader_write(&self, cmd: Command) -> WriteResult {
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok((resp.log_id.index, resp.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(
                Refused::NotLeader(f.leader_node.or_else(|| self.leader_member())),
            ),
            Err(e) => Err(Refused::Failed(e.to_string())),
        }
    }

    async fn change(&self, req: Request) -> Result<(), Refused> {
        let result = match req {
            Request::Join(member) => {
                let id = node_id(&member.name);
                match self.raft.add_learner(id, member, true).await {
                    Ok(_) => {
                        self.raft
                            .change_membership(
                                ChangeMembers::AddVoterIds(BTreeSet::from([id])),
                                false,
                            )
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
            Request::Leave(name) => {
                let id = node_id(&name);
                self.raft
                    .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                    .await
            }
            _ => return Err(Refused::Failed("not a membership change".to_owned())),
        };
        match result {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(
                Refused::NotLeader(f.leader_node.or_else(|| self.leader_member())),
            ),
            Err(e) => Err(Refused::Failed(e.to_string())),
        }
    }

    async fn handle(&self, req: Request) -> Response {
        match req {
            Request::AppendEntries(r) => Response::AppendEntries(self.raft.append_entries(r).await),
            Request::Vote(r) => Response::Vote(self.raft.vote(r).await),
            Request::InstallSnapshot(r) => {
                Response::InstallSnapshot(self.raft.install_snapshot(r).await)
            }
            Request::Write(cmd) => Response::Write(self.leader_write(cmd).await),
            req @ (Request::Join(_) | Request::Leave(_)) => {
                Response::Membership(self.change(req).await)
            }
            Request::Status => Response::Status(self.status()),
            // Taken by the accept loop before it gets here.
            Request::QuorumMux => Response::Write(Err(Refused::Failed(
                "a quorum connection's hello in the middle of a connection".to_owned(),
            ))),
        }
    }
}

fn unavailable(text: String) -> CoreError {
    CoreError::new(ErrorKind::ResourceError, text)
}

async fn accept_loop(listener: tokio::net::TcpListener, inner: Arc<Inner>) {
    loop {
        let (tcp, peer) = match transport::accept(&listener).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cluster accept failed");
                continue;
            }
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let mut stream = match inner.link.secure(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cluster connection refused");
                    return;
                }
            };
            loop {
                let req: Request = match transport::read_frame(&mut stream).await {
                    Ok(Some(Request::QuorumMux)) => {
                        // The rest of this connection is quorum groups' RPCs.
                        inner.groups.serve(stream).await;
                        return;
                    }
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "cluster connection closed");
                        return;
                    }
                };
                let resp = inner.handle(req).await;
                if let Err(e) = transport::write_frame(&mut stream, &resp).await {
                    tracing::debug!(%peer, error = %e, "cluster connection closed");
                    return;
                }
            }
        });
    }
}

/// Reads a node's view of the cluster and asks its peers for theirs.
#[derive(Clone)]
pub struct ClusterView {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterView")
            .field("node", &self.inner.node)
            .finish()
    }
}

impl ClusterView {
    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    pub fn status(&self) -> Status {
        self.inner.status()
    }

    /// A clustered quorum queue's group as this node sees it (None: not a
    /// quorum queue here, or this node is not one of its members).
    pub fn quorum_group(&self, vhost: &str, queue: &str) -> Option<GroupStatus> {
        let p = self.inner.groups.placement(vhost, queue)?;
        self.inner.group_status_of(p)
    }

    /// Every member (by name) with its own status, asked over the inter-node port
    /// (`None`: it did not answer within `timeout`, so it counts as down); this
    /// node answers from memory.
    pub async fn members(&self, timeout: Duration) -> Vec<(MemberStatus, Option<Status>)> {
        let me = self.inner.status();
        // Asked concurrently: a member that is down costs one timeout, not one each.
        let asks: Vec<_> = me
            .members
            .iter()
            .map(|m| {
                let addr = m.addr.clone();
                let link = self.inner.link.clone();
                let local = (m.name == me.node).then(|| me.clone());
                tokio::spawn(async move {
                    match local {
                        Some(s) => Some(s),
                        None => remote_status(&addr, &link, timeout).await.ok(),
                    }
                })
            })
            .collect();
        let mut out = Vec::with_capacity(asks.len());
        for (m, ask) in me.members.iter().zip(asks) {
            out.push((m.clone(), ask.await.ok().flatten()));
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        out
    }
}

/// `Broker::apply` on a clustered node.
struct Replicator {
    inner: Arc<Inner>,
    quorum: Arc<GroupProposer>,
}

/// Clustered quorum queues' commands, proposed to each queue's own group.
struct GroupProposer {
    node: String,
    groups: Arc<QuorumGroups>,
    incarnation: u64,
    nudge: Arc<watch::Sender<u64>>,
    commit_timeout: Duration,
}

impl std::fmt::Debug for GroupProposer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupProposer")
            .field("node", &self.node)
            .field("incarnation", &self.incarnation)
            .finish()
    }
}

impl QuorumLog for GroupProposer {
    fn node(&self) -> &str {
        &self.node
    }

    fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Resolves once the entry is committed (on a majority's disks); it is
    /// applied on this node's member shortly after, which only matters for
    /// what it assigns here (it arrives through `Deliver` when applied).
    fn propose(&self, vhost: &str, queue: &str, cmds: Vec<QueueCommand>) -> Proposal {
        let groups = self.groups.clone();
        let (vhost, queue) = (vhost.to_owned(), queue.to_owned());
        let mut cmds = cmds;
        let member = groups
            .placement(&vhost, &queue)
            .map(|p| p.members.contains_key(&groups.node_id()));
        if member == Some(false) {
            // A node outside the group (a cluster of more than GROUP_SIZE)
            // applies no copy of the machine, so nothing assigned to it would
            // ever reach it: it asks for no credit, and its consumers stay idle
            // while the members' consumers get the messages.
            cmds.retain(|c| !matches!(c, QueueCommand::Checkout { .. }));
            if cmds.is_empty() {
                return Box::pin(async { Ok(()) });
            }
        }
        Box::pin(async move {
            match groups.propose_to_queue(&vhost, &queue, cmds).await {
                Ok(_) => Ok(()),
                Err(ProposeError::NoGroup) => Err(unavailable(format!(
                    "quorum queue '{queue}' has no group on the nodes asked"
                ))),
                Err(ProposeError::NotLeader(_)) => Err(unavailable(format!(
                    "quorum queue '{queue}' has no leader now (it needs a majority of its members)"
                ))),
                Err(ProposeError::Failed(e)) => Err(unavailable(e)),
            }
        })
    }

    fn nudge(&self) {
        self.nudge.send_modify(|_| ());
    }

    fn commit_timeout(&self) -> Duration {
        self.commit_timeout
    }

    fn message_count(&self, vhost: &str, queue: &str) -> Option<usize> {
        let p = self.groups.placement(vhost, queue)?;
        let h = self.groups.get(p.gid)?;
        Some(h.with_state(|m| m.ready_count() + m.checked_out_count()))
    }
}

/// Hands what quorum groups assign to this node to the broker's queues.
struct BrokerDeliver(std::sync::Weak<Broker>);

impl Deliver for BrokerDeliver {
    fn assigned(&self, vhost: &str, queue: &str, assigned: Vec<Assigned>) {
        if let Some(v) = self.0.upgrade().and_then(|b| b.vhost(vhost).ok()) {
            v.quorum_assigned(queue, assigned);
        }
    }

    fn marked_down(&self, vhost: &str, queue: &str, incarnation: u64) {
        if let Some(v) = self.0.upgrade().and_then(|b| b.vhost(vhost).ok()) {
            v.quorum_marked_down(queue, incarnation);
        }
    }
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("node", &self.inner.node)
            .finish()
    }
}

impl MetaLog for Replicator {
    fn quorum(&self) -> Option<Arc<dyn QuorumLog>> {
        Some(self.quorum.clone())
    }

    fn replicate(&self, cmd: MetaCommand) -> CoreResult<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let inner = self.inner.clone();
        self.inner.runtime.spawn(async move {
            let _ = tx.send(inner.write(Command::Meta(cmd)).await);
        });
        // `apply` is synchronous; the write runs on the runtime's other workers
        // while this one waits (block_in_place lets the runtime move its tasks).
        let limit = self.inner.write_timeout + Duration::from_secs(1);
        let wait = || rx.recv_timeout(limit);
        let got = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        match got {
            Ok(Ok(applied)) => match applied.error {
                None => Ok(()),
                Some(e) => Err(e.into_core()),
            },
            Ok(Err(e)) => Err(e),
            Err(_) => Err(unavailable("metadata write timed out".to_owned())),
        }
    }
}

/// Asks the node at `addr` (its `[cluster] listen`) for its status.
pub async fn remote_status(addr: &str, link: &Link, timeout: Duration) -> io::Result<Status> {
    match transport::call_once(addr, link, &Request::Status, timeout).await? {
        Response::Status(s) => Ok(s),
        _ => Err(io::Error::other("unexpected response")),
    }
}

/// Asks the cluster reachable at `addr` to add `member` as a voter (or, with
/// `leave`, to remove the node named `member.name`), following a redirect to
/// the leader once.
pub async fn remote_membership(
    addr: &str,
    link: &Link,
    member: Member,
    leave: bool,
    timeout: Duration,
) -> io::Result<()> {
    let req = || {
        if leave {
            Request::Leave(member.name.clone())
        } else {
            Request::Join(member.clone())
        }
    };
    let mut target = addr.to_owned();
    for _ in 0..3 {
        match transport::call_once(&target, link, &req(), timeout).await? {
            Response::Membership(Ok(())) => return Ok(()),
            Response::Membership(Err(Refused::NotLeader(Some(leader)))) => target = leader.addr,
            Response::Membership(Err(Refused::NotLeader(None))) => {
                return Err(io::Error::other("the cluster has no leader now"))
            }
            Response::Membership(Err(Refused::Failed(e))) => return Err(io::Error::other(e)),
            _ => return Err(io::Error::other("unexpected response")),
        }
    }
    Err(io::Error::other("no leader found"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quorum::Placement;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_outside_the_group_publishes_through_it_but_takes_no_credit() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let open = |name: &str, dir: &std::path::Path| {
            let mut s = QuorumSettings::new(name.into(), "127.0.0.1:0".into(), dir.into());
            s.incarnation = 1;
            QuorumGroups::open(s, Link::default(), None)
        };
        let member = Arc::new(open("m1", da.path()).await.unwrap());
        let outside = Arc::new(open("o1", db.path()).await.unwrap());
        let p = Placement {
            vhost: "/".into(),
            queue: "q".into(),
            gid: 9,
            members: BTreeMap::from([(member.node_id(), member.member())]),
            initializer: member.node_id(),
        };
        let h = member.create(&p).await.unwrap();
        h.wait_leader(Duration::from_secs(10)).await.unwrap();
        outside.ensure(&p).await.unwrap();
        assert!(outside.get(9).is_none(), "no replica outside the group");
        let proposer = GroupProposer {
            node: "o1".into(),
            groups: outside.clone(),
            incarnation: 1,
            nudge: Arc::new(watch::channel(0).0),
            commit_timeout: Duration::from_secs(30),
        };
        // Credit alone: nothing to propose.
        let credit = QueueCommand::Checkout {
            node: "o1".into(),
            incarnation: 1,
            credit: 5,
        };
        proposer
            .propose("/", "q", vec![credit.clone()])
            .await
            .unwrap();
        let batch = vec![
            QueueCommand::NodeUp {
                node: "o1".into(),
                incarnation: 1,
            },
            credit,
            QueueCommand::Enqueue {
                enqueuer: 3,
                seq: 1,
                body: b"x".to_vec(),
            },
        ];
        proposer.propose("/", "q", batch).await.unwrap();
        let (_, m) = h.leader_view().await.unwrap();
        // Forwarded to the member; the message stays ready for members'
        // consumers instead of being assigned to a node that cannot get it.
        assert_eq!(m.incarnation_of("o1"), Some(1));
        assert_eq!(m.credit_of("o1"), 0);
        assert_eq!((m.ready_count(), m.checked_out_count()), (1, 0));
        member.shutdown().await;
        outside.shutdown().await;
    }
}

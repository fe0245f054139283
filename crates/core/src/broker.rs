//! The broker: its vhosts, users, policies, limits, live connections and shared
//! counters. One `Arc<Broker>` is shared by every connection task.
//!
//! Metadata changes only through [`Broker::apply`] (see [`crate::admin`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::admin::{BindingInfo, ExchangeInfo, PermissionInfo, QueueInfo};
use crate::admin::{
    MetaCommand, MetaWrite, PolicyInfo, PolicySpec, TopicPermissionInfo, UserInfo, UserLimits,
    UserLimitsInfo, VhostInfo, VhostLimits, VhostLimitsInfo, KIND_OPERATOR_POLICY, KIND_PERMISSION,
    KIND_POLICY, KIND_SEEDED, KIND_TOPIC_PERMISSION, KIND_USER, KIND_USER_LIMITS, KIND_VHOST,
    KIND_VHOST_LIMITS,
};
use crate::auth::{decode_hash, Auth, HashAlgorithm};
use crate::connections::{ConnectionGuard, ConnectionInfo, Registry};
use crate::consumer::Outbox;
use crate::error::{CoreError, CoreResult, ErrorKind};
use crate::memory::MemoryMonitor;
use crate::persist::{Recovered, Store};
use crate::policy::{Policies, Policy, PolicyTable};
use crate::stats::{self, Lengths, MessageStats, NodeStats, Range};
use crate::timer::{Clock, Timers, NEVER};
use crate::vhost::VHost;

/// Called with a vhost's name when it is deleted: adapters drop their own
/// records of it (MQTT sessions and retained messages).
pub type VhostDeletedHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Where [`Broker::apply`] sends metadata commands when the node is clustered:
/// a replicated log (crates/cluster) that commits the command on a majority and
/// applies it on every node through [`Broker::apply_local`]. `replicate` returns
/// once the command is committed and applied on this node, with the result of
/// applying it; a cluster without a majority returns an error within its timeout.
pub trait MetaLog: Send + Sync + std::fmt::Debug {
    fn replicate(&self, cmd: MetaCommand) -> CoreResult<()>;
    /// The log that carries clustered quorum queues' commands (quorum_link.rs);
    /// `None`: quorum queues stay node-local.
    fn quorum(&self) -> Option<Arc<dyn crate::quorum_link::QuorumLog>> {
        None
    }
}

/// Where a clustered node's [`MetaLog`] is set once, after the broker and its
/// vhosts exist; empty on a single node.
pub type MetaLogCell = Arc<std::sync::OnceLock<Arc<dyn MetaLog>>>;

pub struct Broker {
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    pub auth: Arc<Auth>,
    pub memory: Arc<MemoryMonitor>,
    next_id: AtomicU64,
    /// The store's synced position, when there is a store.
    synced: Option<tokio::sync::watch::Receiver<u64>>,
    /// On a clustered node: the store's synced position as followed by
    /// connections, also poked when a quorum queue commits publishes (see
    /// [`Broker::confirm_nudger`]).
    nudged: std::sync::OnceLock<Arc<tokio::sync::watch::Sender<u64>>>,
    /// The store itself, for adapters' own records (MQTT retained messages and
    /// sessions); `None`: everything lives in memory only.
    store: Option<Arc<dyn Store>>,
    timers: Arc<Timers>,
    /// Message statistics of the node, its protocols and connections (stats.rs).
    pub stats: Arc<NodeStats>,
    /// Adapters' session state, for the management API (sessions.rs).
    pub session_directories: crate::sessions::SessionDirectories,
    policies: Arc<PolicyTable>,
    vhost_meta: RwLock<BTreeMap<String, VhostInfo>>,
    vhost_limits: RwLock<BTreeMap<String, VhostLimits>>,
    user_limits: RwLock<BTreeMap<String, UserLimits>>,
    connections: Arc<Registry>,
    /// `[limits] connection_rate_per_ip`, checked when a connection registers.
    pub connection_rate: crate::ratelimit::ConnectionRate,
    /// Serialises [`Broker::apply`]: validation, the store write and the live
    /// change of one command happen before the next command starts.
    admin: Mutex<()>,
    /// Ids of config-file objects created once already (boot definitions).
    seeded: Mutex<HashSet<String>>,
    /// Durable entities recovered for vhosts that did not exist (yet) when the
    /// broker opened: a data directory from before vhosts were stored, whose
    /// vhosts come from the config file at boot. Restored when the vhost is put.
    pending: Mutex<Recovered>,
    vhost_hooks: Mutex<Vec<VhostDeletedHook>>,
    /// Set when the node is clustered: metadata commands go through it.
    /// The replicated log, on a clustered node; shared with every vhost, which
    /// proposes its replicated declarations through it.
    meta_log: MetaLogCell,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("vhosts", &self.vhosts.read().keys().collect::<Vec<_>>())
            .field("connections", &self.connections.len())
            .finish_non_exhaustive()
    }
}

fn key2(a: &str, b: &str) -> String {
    format!("{a}\0{b}")
}

fn key3(a: &str, b: &str, c: &str) -> String {
    format!("{a}\0{b}\0{c}")
}

fn encode<T: serde::Serialize>(value: &T) -> CoreResult<Vec<u8>> {
    postcard::to_stdvec(value)
        .map_err(|e| CoreError::new(ErrorKind::ResourceError, format!("cannot encode: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> std::io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| std::io::Error::other(e.to_string()))
}

/// A limit value as RabbitMQ treats it: negative means none.
fn limit_of(v: Option<i64>) -> Option<u64> {
    v.and_then(|n| u64::try_from(n).ok())
}

/// What a validated command needs that validation computed.
enum Prepared {
    None,
    User(Vec<u8>, HashAlgorithm),
    Policy(Box<Policy>),
}

impl Broker {
    /// A broker with the given users and vhosts (`/` always exists), in memory.
    pub fn new(auth: Auth, vhosts: &[String], memory_high_watermark: usize) -> Arc<Self> {
        Self::with_store(auth, vhosts, memory_high_watermark, None)
    }

    /// A broker whose durable entities and persistent messages live in `store`,
    /// starting from what the store recovered.
    pub fn with_store(
        auth: Auth,
        vhosts: &[String],
        memory_high_watermark: usize,
        store: Option<(Arc<dyn Store>, Recovered)>,
    ) -> Arc<Self> {
        Self::build(
            auth,
            vhosts,
            memory_high_watermark,
            store,
            Policies::default(),
            Clock::System,
        )
    }

    /// A broker with the given users, vhosts (`/` always exists) and queue
    /// `policies` (applied to recovered and new queues), and the `clock` read
    /// by calls that take no `now`. The vhosts, users and policies given are
    /// live only: they are not written to the store (the server uses
    /// [`Broker::open`] and boot definitions instead).
    pub fn build(
        auth: Auth,
        vhosts: &[String],
        memory_high_watermark: usize,
        store: Option<(Arc<dyn Store>, Recovered)>,
        policies: Policies,
        clock: Clock,
    ) -> Arc<Self> {
        let broker = Self::empty(auth, memory_high_watermark, store, policies, clock);
        for name in vhosts
            .iter()
            .map(String::as_str)
            .chain(std::iter::once("/"))
        {
            broker.create_vhost(VhostInfo {
                name: name.to_owned(),
                description: String::new(),
                tags: Vec::new(),
                default_queue_type: None,
            });
        }
        broker
    }

    /// The broker as the store knows it: vhosts, users, permissions, policies
    /// and limits from the store's metadata records, queues, exchanges and
    /// bindings from `recovered`. A fresh store gives a broker with nothing in
    /// it; the server then applies its boot definitions ([`Broker::seed`]).
    pub fn open(
        store: Arc<dyn Store>,
        recovered: Recovered,
        memory_high_watermark: usize,
        clock: Clock,
    ) -> std::io::Result<Arc<Self>> {
        let broker = Self::empty(
            Auth::new(),
            memory_high_watermark,
            Some((store.clone(), recovered)),
            Policies::default(),
            clock,
        );
        for (name, _) in store.records(KIND_SEEDED)? {
            broker.seeded.lock().insert(name);
        }
        for (_, v) in store.records(KIND_USER)? {
            let u: UserInfo = decode(&v)?;
            let algorithm =
                HashAlgorithm::parse(&u.hashing_algorithm).unwrap_or(HashAlgorithm::Sha256);
            let hash =
                decode_hash(&u.name, &u.password_hash, algorithm).map_err(std::io::Error::other)?;
            broker.auth.put_user(&u.name, hash, algorithm, u.tags);
        }
        for (_, v) in store.records(KIND_VHOST)? {
            let info: VhostInfo = decode(&v)?;
            broker.create_vhost(info);
        }
        for (_, v) in store.records(KIND_PERMISSION)? {
            let p: PermissionInfo = decode(&v)?;
            broker
                .auth
                .put_permissions(&p.user, &p.vhost, &p.configure, &p.write, &p.read)
                .map_err(std::io::Error::other)?;
        }
        for (_, v) in store.records(KIND_TOPIC_PERMISSION)? {
            let p: TopicPermissionInfo = decode(&v)?;
            broker
                .auth
                .put_topic_permissions(&p.user, &p.vhost, &p.exchange, &p.write, &p.read)
                .map_err(std::io::Error::other)?;
        }
        for (kind, operator) in [(KIND_POLICY, false), (KIND_OPERATOR_POLICY, true)] {
            for (_, v) in store.records(kind)? {
                let spec: PolicySpec = decode(&v)?;
                let policy = Self::compile_policy(&spec, operator)
                    .map_err(|e| std::io::Error::other(e.text))?;
                broker.policies.put(operator, policy);
            }
        }
        for (vhost, v) in store.records(KIND_VHOST_LIMITS)? {
            let limits: VhostLimits = decode(&v)?;
            if let Ok(vh) = broker.vhost(&vhost) {
                vh.set_max_queues(limits.max_queues.unwrap_or(-1));
            }
            broker.vhost_limits.write().insert(vhost, limits);
        }
        for (user, v) in store.records(KIND_USER_LIMITS)? {
            let limits: UserLimits = decode(&v)?;
            broker.user_limits.write().insert(user, limits);
        }
        // Queues recovered before the policies were loaded: apply them now.
        let now = broker.timers.now_ms();
        for vh in broker.vhosts.read().values() {
            vh.reapply_policies(now);
        }
        Ok(broker)
    }

    fn empty(
        auth: Auth,
        memory_high_watermark: usize,
        store: Option<(Arc<dyn Store>, Recovered)>,
        policies: Policies,
        clock: Clock,
    ) -> Arc<Self> {
        let timers = Arc::new(Timers::new(clock));
        let memory = Arc::new(MemoryMonitor::new(memory_high_watermark));
        let (store, recovered) = match store {
            Some((s, r)) => (Some(s), r),
            None => (None, Recovered::default()),
        };
        let synced = store.as_ref().map(|s| s.synced());
        Arc::new(Broker {
            vhosts: RwLock::new(HashMap::new()),
            auth: Arc::new(auth),
            memory,
            next_id: AtomicU64::new(1),
            synced,
            nudged: std::sync::OnceLock::new(),
            store,
            timers,
            stats: Arc::new(NodeStats::default()),
            session_directories: crate::sessions::SessionDirectories::default(),
            policies: Arc::new(PolicyTable::new(policies)),
            vhost_meta: RwLock::new(BTreeMap::new()),
            vhost_limits: RwLock::new(BTreeMap::new()),
            user_limits: RwLock::new(BTreeMap::new()),
            connections: Registry::new(),
            connection_rate: crate::ratelimit::ConnectionRate::default(),
            admin: Mutex::new(()),
            seeded: Mutex::new(HashSet::new()),
            pending: Mutex::new(recovered),
            vhost_hooks: Mutex::new(Vec::new()),
            meta_log: MetaLogCell::default(),
        })
    }

    /// Creates a vhost in memory (restoring what the store recovered for it),
    /// or updates the metadata of an existing one.
    fn create_vhost(&self, info: VhostInfo) {
        let name = info.name.clone();
        let default_queue_type = info.default_queue_type.clone();
        self.vhost_meta.write().insert(name.clone(), info);
        if let Some(existing) = self.vhosts.read().get(&name) {
            existing.set_default_queue_type(default_queue_type.as_deref());
            return;
        }
        let vhost = VHost::in_broker(
            name.clone(),
            self.memory.clone(),
            self.store.clone(),
            self.timers.clone(),
            self.policies.clone(),
            self.meta_log.clone(),
        );
        vhost.set_default_queue_type(default_queue_type.as_deref());
        vhost.restore(&mut self.pending.lock());
        self.vhosts.write().insert(name, vhost);
    }

    /// The clock and the earliest deadline of every queue: the server's timer
    /// task sleeps until [`Timers::earliest`] or [`Timers::changed`].
    pub fn timers(&self) -> &Arc<Timers> {
        &self.timers
    }

    /// Does what is due at `now` (ms since the Unix epoch) in every vhost:
    /// expires messages and unused queues, releases delayed messages. Returns
    /// the next deadline (`timer::NEVER`: none). The core never sleeps; the
    /// server calls this from one timer task.
    pub fn tick(&self, now: u64) -> u64 {
        self.timers.clock.advance_to(now);
        self.timers.reset();
        let vhosts: Vec<Arc<VHost>> = self.vhosts.read().values().cloned().collect();
        let next = vhosts.iter().map(|v| v.tick(now)).fold(NEVER, u64::min);
        self.timers.note(next);
        next
    }

    /// Records a statistics sample of every object when one is due (every
    /// [`stats::SAMPLE_INTERVAL_MS`]); the server calls this from its timer
    /// task, which wakes at least once a second. Returns whether it sampled.
    pub fn sample_stats(&self, now: u64) -> bool {
        if !self.stats.sample_due(now) {
            return false;
        }
        self.sample_stats_now(now);
        true
    }

    /// Records a statistics sample of every object at `now`, due or not.
    pub fn sample_stats_now(&self, now: u64) {
        self.stats.sample_sources(now);
        let by_vhost = self.stats.by_vhost();
        let mut total = self.stats.retired_vhost_totals();
        let mut lengths = Lengths::default();
        for v in self.vhosts() {
            let sources = by_vhost.get(&v.name).copied().unwrap_or_default();
            let (t, l) = v.sample_stats(now, &sources);
            total.merge(&t);
            lengths.merge(&l);
        }
        self.stats.history.record(now, total, lengths);
    }

    /// The overview's `message_stats` (the node's totals as of the last sample).
    pub fn message_stats(&self, range: Option<Range>) -> MessageStats {
        let (current, _) = self.stats.history.last();
        self.stats
            .history
            .message_stats(&current, stats::TOTAL_KEYS, range)
    }

    pub fn vhost(&self, name: &str) -> CoreResult<Arc<VHost>> {
        self.vhosts
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| CoreError::not_allowed(format!("vhost '{name}' not found")))
    }

    pub fn has_vhost(&self, name: &str) -> bool {
        self.vhosts.read().contains_key(name)
    }

    /// Every vhost object, by name.
    pub fn vhosts(&self) -> Vec<Arc<VHost>> {
        let mut out: Vec<Arc<VHost>> = self.vhosts.read().values().cloned().collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Follows the store's synced position: a publish whose `Routed::durable_at`
    /// is at or below it is on disk. `None` without a store (nothing to wait for).
    pub fn synced(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self.nudged.get() {
            Some(tx) => Some(tx.subscribe()),
            None => self.synced.clone(),
        }
    }

    /// What wakes connections waiting for confirms when something other than
    /// the store commits (a clustered quorum queue): `send_modify(|_| ())`
    /// on it. Connections opened from then on follow it; it forwards the
    /// store's synced position. Must run inside a tokio runtime.
    pub fn confirm_nudger(&self) -> Arc<tokio::sync::watch::Sender<u64>> {
        self.nudged
            .get_or_init(|| {
                let start = self.synced.as_ref().map_or(0, |rx| *rx.borrow());
                let tx = Arc::new(tokio::sync::watch::channel(start).0);
                if let Some(mut rx) = self.synced.clone() {
                    let fwd = Arc::downgrade(&tx);
                    tokio::spawn(async move {
                        while rx.changed().await.is_ok() {
                            let Some(tx) = fwd.upgrade() else { return };
                            let at = *rx.borrow_and_update();
                            tx.send_replace(at);
                        }
                    });
                }
                tx
            })
            .clone()
    }

    /// The store, if the broker has one: adapters keep their own records in it
    /// ([`Store::save_record`]). `None` for a broker in memory only.
    pub fn store(&self) -> Option<Arc<dyn Store>> {
        self.store.clone()
    }

    /// A broker-wide unique id (connections, consumers).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The policies and operator policies in force.
    pub fn policy_table(&self) -> &Arc<PolicyTable> {
        &self.policies
    }

    /// Registers a hook called when a vhost is deleted (after its entities are).
    pub fn on_vhost_deleted(&self, hook: VhostDeletedHook) {
        self.vhost_hooks.lock().push(hook);
    }

    // ---- live connections ----

    /// The registry of live connections.
    pub fn connections(&self) -> &Arc<Registry> {
        &self.connections
    }

    /// Registers a connection that has logged in and chosen its vhost, enforcing
    /// the vhost's and the user's `max-connections` with RabbitMQ's texts
    /// (a `NotAllowed` error: AMQP 530). `id` is the adapter's broker-wide id
    /// ([`Broker::next_id`]); `outbox` is what the connection waits on, so that
    /// a close request wakes it.
    pub fn register_connection(
        &self,
        id: u64,
        info: ConnectionInfo,
        outbox: Arc<Outbox>,
    ) -> CoreResult<ConnectionGuard> {
        let vhost_limit = self
            .vhost_limits
            .read()
            .get(&info.vhost)
            .and_then(|l| limit_of(l.max_connections));
        let user_limit = self
            .user_limits
            .read()
            .get(&info.user)
            .and_then(|l| limit_of(l.max_connections));
        let (vhost, user) = (info.vhost.clone(), info.user.clone());
        if !self.has_vhost(&vhost) {
            return Err(CoreError::not_allowed(format!("vhost {vhost} not found")));
        }
        let ip = info.peer.ip();
        if !self.connection_rate.admit(ip, info.connected_at) {
            return Err(CoreError::not_allowed(format!(
                "connection refused for user '{user}': {} ({} per second from {ip}) is reached",
                crate::ratelimit::REFUSAL,
                self.connection_rate.rate()
            )));
        }
        self.connections.register(id, info, outbox, |counts| {
            if let Some(limit) = vhost_limit.filter(|l| counts.vhost as u64 >= *l) {
                return Err(CoreError::not_allowed(format!(
                    "access to vhost '{vhost}' refused for user '{user}': connection limit ({limit}) is reached"
                )));
            }
            if let Some(limit) = user_limit.filter(|l| counts.user as u64 >= *l) {
                return Err(CoreError::not_allowed(format!(
                    "connection refused for user '{user}': user connection limit ({limit}) is reached"
                )));
            }
            Ok(())
        })
    }

    /// Whether `user` may open one more channel (its `max-channels` limit over
    /// all its connections), with RabbitMQ's text (`NotAllowed`: AMQP 530).
    /// The caller counts the channel in its [`ConnectionGuard`] once open.
    pub fn admit_channel(&self, user: &str) -> CoreResult<()> {
        let Some(limit) = self
            .user_limits
            .read()
            .get(user)
            .and_then(|l| limit_of(l.max_channels))
        else {
            return Ok(());
        };
        if self.connections.user_channels(user) >= limit {
            return Err(CoreError::not_allowed(format!(
                "number of channels opened for user '{user}' has reached the maximum allowed user limit of {limit}"
            )));
        }
        Ok(())
    }

    // ---- reads ----

    /// Every vhost's metadata, by name.
    pub fn vhost_infos(&self) -> Vec<VhostInfo> {
        self.vhost_meta.read().values().cloned().collect()
    }

    pub fn vhost_info(&self, name: &str) -> Option<VhostInfo> {
        self.vhost_meta.read().get(name).cloned()
    }

    /// Every user, by name.
    pub fn users(&self) -> Vec<UserInfo> {
        self.auth.users()
    }

    pub fn user_info(&self, name: &str) -> Option<UserInfo> {
        self.auth.users().into_iter().find(|u| u.name == name)
    }

    /// Every permission, by vhost then user.
    pub fn permissions(&self) -> Vec<PermissionInfo> {
        self.auth.permissions()
    }

    /// Every topic permission.
    pub fn topic_permissions(&self) -> Vec<TopicPermissionInfo> {
        self.auth.topic_permissions()
    }

    /// Every policy, by vhost then name.
    pub fn policies(&self) -> Vec<PolicyInfo> {
        self.policies.list(false)
    }

    /// Every operator policy, by vhost then name.
    pub fn operator_policies(&self) -> Vec<PolicyInfo> {
        self.policies.list(true)
    }

    /// The limits of every vhost that has some.
    pub fn vhost_limits(&self) -> Vec<VhostLimitsInfo> {
        self.vhost_limits
            .read()
            .iter()
            .map(|(vhost, limits)| VhostLimitsInfo {
                vhost: vhost.clone(),
                limits: *limits,
            })
            .collect()
    }

    /// The limits of every user that has some.
    pub fn user_limits(&self) -> Vec<UserLimitsInfo> {
        self.user_limits
            .read()
            .iter()
            .map(|(user, limits)| UserLimitsInfo {
                user: user.clone(),
                limits: *limits,
            })
            .collect()
    }

    /// Queues of one vhost, or of all (`None`), by vhost then name.
    pub fn queue_infos(&self, vhost: Option<&str>) -> CoreResult<Vec<QueueInfo>> {
        Ok(self
            .scope(vhost)?
            .iter()
            .flat_map(|v| v.queue_infos())
            .collect())
    }

    /// Exchanges of one vhost, or of all (`None`), by vhost then name.
    pub fn exchange_infos(&self, vhost: Option<&str>) -> CoreResult<Vec<ExchangeInfo>> {
        Ok(self
            .scope(vhost)?
            .iter()
            .flat_map(|v| v.exchange_infos())
            .collect())
    }

    /// Bindings of one vhost, or of all (`None`).
    pub fn binding_infos(&self, vhost: Option<&str>) -> CoreResult<Vec<BindingInfo>> {
        Ok(self
            .scope(vhost)?
            .iter()
            .flat_map(|v| v.binding_infos())
            .collect())
    }

    fn scope(&self, vhost: Option<&str>) -> CoreResult<Vec<Arc<VHost>>> {
        match vhost {
            Some(name) => Ok(vec![self.vhost(name).map_err(|_| {
                CoreError::not_found(format!("vhost '{name}' not found"))
            })?]),
            None => Ok(self.vhosts()),
        }
    }

    // ---- changes ----

    /// Applies one metadata change: validates it, commits it to the store (one
    /// transaction, on disk before this returns), then changes the live state.
    /// Deterministic given the command. Errors: `NotFound` when the command
    /// names a vhost or user that does not exist (or deletes what is not
    /// there), `PreconditionFailed` for an invalid value (a bad regex, policy
    /// definition, hash or limit name), `ResourceError` when the store failed
    /// (nothing changed).
    ///
    /// On a clustered node the command goes through the replicated log instead
    /// (see [`MetaLog`]) and this returns once it is committed and applied here.
    pub fn apply(&self, cmd: MetaCommand) -> CoreResult<()> {
        match self.meta_log.get() {
            Some(log) => log.replicate(cmd),
            None => self.apply_seeded(cmd, None),
        }
    }

    /// Applies a command on this node only: what the replicated log's state
    /// machine calls on every node for a committed command.
    pub fn apply_local(&self, cmd: MetaCommand) -> CoreResult<()> {
        self.apply_seeded(cmd, None)
    }

    /// Routes every later [`Broker::apply`] through `log` (once; false if a log
    /// was set already).
    pub fn set_meta_log(&self, log: Arc<dyn MetaLog>) -> bool {
        let quorum = log.quorum().is_some();
        if self.meta_log.set(log).is_err() {
            return false;
        }
        if quorum {
            self.confirm_nudger();
            // Quorum queues the store brought back become clustered ones.
            for v in self.vhosts() {
                v.attach_quorum_links();
            }
        }
        true
    }

    /// Whether metadata commands go through a replicated log.
    pub fn is_clustered(&self) -> bool {
        self.meta_log.get().is_some()
    }

    /// Applies a boot definition from the config file once: `id` names the
    /// object (`user:guest`). If an object with this id was seeded before (even
    /// if it was changed or deleted since), nothing happens and this returns
    /// false; otherwise the command is applied and the id recorded in the same
    /// transaction.
    pub fn seed(&self, id: &str, cmd: MetaCommand) -> CoreResult<bool> {
        if self.seeded.lock().contains(id) {
            return Ok(false);
        }
        self.apply_seeded(cmd, Some(id))?;
        Ok(true)
    }

    /// Whether a boot definition with this id was seeded already.
    pub fn was_seeded(&self, id: &str) -> bool {
        self.seeded.lock().contains(id)
    }

    fn apply_seeded(&self, cmd: MetaCommand, seed: Option<&str>) -> CoreResult<()> {
        if let MetaCommand::Entity(e) = &cmd {
            // The vhost stores and applies its own entities (vhost.rs).
            return self.vhost(e.vhost())?.apply_entity(e);
        }
        let _serial = self.admin.lock();
        let prepared = self.validate(&cmd)?;
        let mut writes = self.writes(&cmd)?;
        if let Some(id) = seed {
            writes.push(MetaWrite::Put {
                kind: KIND_SEEDED,
                key: id.to_owned(),
                value: Vec::new(),
            });
        }
        // A vhost being deleted stops taking new entities before the store
        // deletes its records, so none is written after them.
        let deleting = match &cmd {
            MetaCommand::DeleteVhost { name } => self.vhost(name).ok(),
            _ => None,
        };
        if let Some(v) = &deleting {
            v.begin_delete(false);
        }
        if let Some(store) = &self.store {
            if let Err(e) = store.apply_meta(&writes) {
                tracing::error!(command = %cmd.describe(), error = %e, "cannot write metadata");
                if let Some(v) = &deleting {
                    v.begin_delete(true);
                }
                return Err(CoreError::new(
                    ErrorKind::ResourceError,
                    format!("cannot store {}: {e}", cmd.describe()),
                ));
            }
        }
        if let Some(id) = seed {
            self.seeded.lock().insert(id.to_owned());
        }
        self.change(cmd, prepared);
        Ok(())
    }

    fn need_vhost(&self, name: &str) -> CoreResult<()> {
        if self.vhost_meta.read().contains_key(name) {
            Ok(())
        } else {
            Err(CoreError::not_found(format!("no vhost '{name}'")))
        }
    }

    fn need_user(&self, name: &str) -> CoreResult<()> {
        if self.auth.has_user(name) {
            Ok(())
        } else {
            Err(CoreError::not_found(format!("no user '{name}'")))
        }
    }

    fn compile_policy(spec: &PolicySpec, operator: bool) -> CoreResult<Policy> {
        let build = if operator {
            Policy::new_operator
        } else {
            Policy::new
        };
        build(
            spec.name.clone(),
            spec.vhost.clone(),
            &spec.pattern,
            &spec.apply_to,
            spec.priority,
            &spec.definition,
        )
        .map_err(CoreError::precondition)
    }

    /// Checks a command against the current state; computes what the change
    /// needs (a decoded hash, a compiled policy).
    fn validate(&self, cmd: &MetaCommand) -> CoreResult<Prepared> {
        let invalid = |text: String| CoreError::precondition(text);
        match cmd {
            MetaCommand::Entity(_) => Ok(Prepared::None),
            MetaCommand::PutVhost {
                name,
                default_queue_type,
                ..
            } => {
                if name.is_empty() {
                    return Err(invalid("a vhost name must not be empty".into()));
                }
                match default_queue_type.as_deref() {
                    None | Some("classic" | "quorum") => Ok(Prepared::None),
                    Some(other) => Err(invalid(format!(
                        "default queue type '{other}' is not supported (classic, quorum)"
                    ))),
                }
            }
            MetaCommand::DeleteVhost { name } => {
                self.need_vhost(name)?;
                Ok(Prepared::None)
            }
            MetaCommand::PutUser {
                name,
                password_hash,
                hashing_algorithm,
                ..
            } => {
                if name.is_empty() {
                    return Err(invalid("a user name must not be empty".into()));
                }
                let algorithm = HashAlgorithm::parse(hashing_algorithm).ok_or_else(|| {
                    invalid(format!(
                        "hashing algorithm '{hashing_algorithm}' is not supported ({}, {})",
                        crate::admin::SHA256,
                        crate::admin::SHA512
                    ))
                })?;
                let hash = decode_hash(name, password_hash, algorithm).map_err(invalid)?;
                Ok(Prepared::User(hash, algorithm))
            }
            MetaCommand::DeleteUser { name } => {
                self.need_user(name)?;
                Ok(Prepared::None)
            }
            MetaCommand::SetPermissions {
                user,
                vhost,
                configure,
                write,
                read,
            } => {
                self.need_user(user)?;
                self.need_vhost(vhost)?;
                Auth::validate_permissions(
                    user,
                    vhost,
                    &[("configure", configure), ("write", write), ("read", read)],
                )
                .map_err(invalid)?;
                Ok(Prepared::None)
            }
            MetaCommand::ClearPermissions { user, vhost } => {
                if !self.auth.has_permissions(user, vhost) {
                    return Err(CoreError::not_found(format!(
                        "no permissions of user '{user}' in vhost '{vhost}'"
                    )));
                }
                Ok(Prepared::None)
            }
            MetaCommand::SetTopicPermissions {
                user,
                vhost,
                exchange,
                write,
                read,
            } => {
                self.need_user(user)?;
                self.need_vhost(vhost)?;
                if exchange.is_empty() {
                    return Err(invalid("topic permissions need an exchange name".into()));
                }
                Auth::validate_topic_permissions(user, vhost, &[("write", write), ("read", read)])
                    .map_err(invalid)?;
                Ok(Prepared::None)
            }
            MetaCommand::ClearTopicPermissions {
                user,
                vhost,
                exchange,
            } => {
                if !self
                    .auth
                    .has_topic_permissions(user, vhost, exchange.as_deref())
                {
                    return Err(CoreError::not_found(format!(
                        "no topic permissions of user '{user}' in vhost '{vhost}'"
                    )));
                }
                Ok(Prepared::None)
            }
            MetaCommand::SetPolicy(spec) | MetaCommand::SetOperatorPolicy(spec) => {
                self.need_vhost(&spec.vhost)?;
                if spec.name.is_empty() {
                    return Err(invalid("a policy name must not be empty".into()));
                }
                let operator = matches!(cmd, MetaCommand::SetOperatorPolicy(_));
                Ok(Prepared::Policy(Box::new(Self::compile_policy(
                    spec, operator,
                )?)))
            }
            MetaCommand::ClearPolicy { vhost, name }
            | MetaCommand::ClearOperatorPolicy { vhost, name } => {
                let operator = matches!(cmd, MetaCommand::ClearOperatorPolicy { .. });
                if !self.policies.contains(operator, vhost, name) {
                    return Err(CoreError::not_found(format!(
                        "no policy '{name}' in vhost '{vhost}'"
                    )));
                }
                Ok(Prepared::None)
            }
            MetaCommand::SetVhostLimits { vhost, .. } => {
                self.need_vhost(vhost)?;
                Ok(Prepared::None)
            }
            MetaCommand::ClearVhostLimit { vhost, limit } => {
                self.need_vhost(vhost)?;
                match limit.as_deref() {
                    None | Some("max-connections" | "max-queues") => Ok(Prepared::None),
                    Some(other) => Err(invalid(format!(
                        "unknown vhost limit '{other}' (max-connections, max-queues)"
                    ))),
                }
            }
            MetaCommand::SetUserLimits { user, .. } => {
                self.need_user(user)?;
                Ok(Prepared::None)
            }
            MetaCommand::ClearUserLimit { user, limit } => {
                self.need_user(user)?;
                match limit.as_deref() {
                    None | Some("max-connections" | "max-channels") => Ok(Prepared::None),
                    Some(other) => Err(invalid(format!(
                        "unknown user limit '{other}' (max-connections, max-channels)"
                    ))),
                }
            }
        }
    }

    /// The vhost's limits after `cmd` (a set merges, a clear removes).
    fn next_vhost_limits(&self, vhost: &str, cmd: &MetaCommand) -> VhostLimits {
        let mut l = self
            .vhost_limits
            .read()
            .get(vhost)
            .copied()
            .unwrap_or_default();
        match cmd {
            MetaCommand::SetVhostLimits { limits, .. } => {
                if limits.max_connections.is_some() {
                    l.max_connections = limits.max_connections;
                }
                if limits.max_queues.is_some() {
                    l.max_queues = limits.max_queues;
                }
            }
            MetaCommand::ClearVhostLimit { limit, .. } => match limit.as_deref() {
                Some("max-connections") => l.max_connections = None,
                Some("max-queues") => l.max_queues = None,
                _ => l = VhostLimits::default(),
            },
            _ => {}
        }
        l
    }

    fn next_user_limits(&self, user: &str, cmd: &MetaCommand) -> UserLimits {
        let mut l = self
            .user_limits
            .read()
            .get(user)
            .copied()
            .unwrap_or_default();
        match cmd {
            MetaCommand::SetUserLimits { limits, .. } => {
                if limits.max_connections.is_some() {
                    l.max_connections = limits.max_connections;
                }
                if limits.max_channels.is_some() {
                    l.max_channels = limits.max_channels;
                }
            }
            MetaCommand::ClearUserLimit { limit, .. } => match limit.as_deref() {
                Some("max-connections") => l.max_connections = None,
                Some("max-channels") => l.max_channels = None,
                _ => l = UserLimits::default(),
            },
            _ => {}
        }
        l
    }

    /// The store writes of a validated command.
    fn writes(&self, cmd: &MetaCommand) -> CoreResult<Vec<MetaWrite>> {
        let put =
            |kind: &'static str, key: String, value: Vec<u8>| MetaWrite::Put { kind, key, value };
        let del = |kind: &'static str, key: String| MetaWrite::Delete { kind, key };
        Ok(match cmd {
            MetaCommand::Entity(_) => Vec::new(),
            MetaCommand::PutVhost {
                name,
                description,
                tags,
                default_queue_type,
            } => vec![put(
                KIND_VHOST,
                name.clone(),
                encode(&VhostInfo {
                    name: name.clone(),
                    description: description.clone(),
                    tags: tags.clone(),
                    default_queue_type: default_queue_type.clone(),
                })?,
            )],
            MetaCommand::DeleteVhost { name } => {
                let mut w = vec![
                    del(KIND_VHOST, name.clone()),
                    del(KIND_VHOST_LIMITS, name.clone()),
                    MetaWrite::DeleteVhostEntities {
                        vhost: name.clone(),
                    },
                ];
                for p in self.auth.permissions().iter().filter(|p| &p.vhost == name) {
                    w.push(del(KIND_PERMISSION, key2(&p.vhost, &p.user)));
                }
                for p in self
                    .auth
                    .topic_permissions()
                    .iter()
                    .filter(|p| &p.vhost == name)
                {
                    w.push(del(
                        KIND_TOPIC_PERMISSION,
                        key3(&p.vhost, &p.user, &p.exchange),
                    ));
                }
                for (kind, operator) in [(KIND_POLICY, false), (KIND_OPERATOR_POLICY, true)] {
                    for p in self
                        .policies
                        .list(operator)
                        .iter()
                        .filter(|p| &p.vhost == name)
                    {
                        w.push(del(kind, key2(&p.vhost, &p.name)));
                    }
                }
                w
            }
            MetaCommand::PutUser {
                name,
                password_hash,
                hashing_algorithm,
                tags,
            } => {
                let algorithm =
                    HashAlgorithm::parse(hashing_algorithm).unwrap_or(HashAlgorithm::Sha256);
                vec![put(
                    KIND_USER,
                    name.clone(),
                    encode(&UserInfo {
                        name: name.clone(),
                        password_hash: password_hash.trim().to_owned(),
                        hashing_algorithm: algorithm.name().to_owned(),
                        tags: tags.clone(),
                    })?,
                )]
            }
            MetaCommand::DeleteUser { name } => {
                let mut w = vec![
                    del(KIND_USER, name.clone()),
                    del(KIND_USER_LIMITS, name.clone()),
                ];
                for p in self.auth.permissions().iter().filter(|p| &p.user == name) {
                    w.push(del(KIND_PERMISSION, key2(&p.vhost, &p.user)));
                }
                for p in self
                    .auth
                    .topic_permissions()
                    .iter()
                    .filter(|p| &p.user == name)
                {
                    w.push(del(
                        KIND_TOPIC_PERMISSION,
                        key3(&p.vhost, &p.user, &p.exchange),
                    ));
                }
                w
            }
            MetaCommand::SetPermissions {
                user,
                vhost,
                configure,
                write,
                read,
            } => vec![put(
                KIND_PERMISSION,
                key2(vhost, user),
                encode(&PermissionInfo {
                    user: user.clone(),
                    vhost: vhost.clone(),
                    configure: configure.clone(),
                    write: write.clone(),
                    read: read.clone(),
                })?,
            )],
            MetaCommand::ClearPermissions { user, vhost } => {
                vec![del(KIND_PERMISSION, key2(vhost, user))]
            }
            MetaCommand::SetTopicPermissions {
                user,
                vhost,
                exchange,
                write,
                read,
            } => vec![put(
                KIND_TOPIC_PERMISSION,
                key3(vhost, user, exchange),
                encode(&TopicPermissionInfo {
                    user: user.clone(),
                    vhost: vhost.clone(),
                    exchange: exchange.clone(),
                    write: write.clone(),
                    read: read.clone(),
                })?,
            )],
            MetaCommand::ClearTopicPermissions {
                user,
                vhost,
                exchange,
            } => self
                .auth
                .topic_permissions()
                .iter()
                .filter(|p| {
                    &p.user == user
                        && &p.vhost == vhost
                        && exchange.as_ref().is_none_or(|x| x == &p.exchange)
                })
                .map(|p| del(KIND_TOPIC_PERMISSION, key3(&p.vhost, &p.user, &p.exchange)))
                .collect(),
            MetaCommand::SetPolicy(spec) => {
                vec![put(
                    KIND_POLICY,
                    key2(&spec.vhost, &spec.name),
                    encode(spec)?,
                )]
            }
            MetaCommand::SetOperatorPolicy(spec) => vec![put(
                KIND_OPERATOR_POLICY,
                key2(&spec.vhost, &spec.name),
                encode(spec)?,
            )],
            MetaCommand::ClearPolicy { vhost, name } => {
                vec![del(KIND_POLICY, key2(vhost, name))]
            }
            MetaCommand::ClearOperatorPolicy { vhost, name } => {
                vec![del(KIND_OPERATOR_POLICY, key2(vhost, name))]
            }
            MetaCommand::SetVhostLimits { vhost, .. }
            | MetaCommand::ClearVhostLimit { vhost, .. } => {
                let next = self.next_vhost_limits(vhost, cmd);
                if next.is_empty() {
                    vec![del(KIND_VHOST_LIMITS, vhost.clone())]
                } else {
                    vec![put(KIND_VHOST_LIMITS, vhost.clone(), encode(&next)?)]
                }
            }
            MetaCommand::SetUserLimits { user, .. } | MetaCommand::ClearUserLimit { user, .. } => {
                let next = self.next_user_limits(user, cmd);
                if next.is_empty() {
                    vec![del(KIND_USER_LIMITS, user.clone())]
                } else {
                    vec![put(KIND_USER_LIMITS, user.clone(), encode(&next)?)]
                }
            }
        })
    }

    /// Changes the live state after the store has the command.
    fn change(&self, cmd: MetaCommand, prepared: Prepared) {
        let now = self.timers.now_ms();
        match cmd {
            MetaCommand::Entity(_) => {}
            MetaCommand::PutVhost {
                name,
                description,
                tags,
                default_queue_type,
            } => self.create_vhost(VhostInfo {
                name,
                description,
                tags,
                default_queue_type,
            }),
            MetaCommand::DeleteVhost { name } => {
                self.vhost_meta.write().remove(&name);
                self.vhost_limits.write().remove(&name);
                let removed = self.vhosts.write().remove(&name);
                self.auth.delete_vhost(&name);
                self.policies.remove_vhost(&name);
                let reason = format!("vhost '{name}' is deleted");
                self.connections
                    .close_where(|c| c.info.vhost == name, &reason);
                if let Some(vhost) = removed {
                    vhost.destroy();
                    self.stats.retire_vhost(
                        &vhost.churn,
                        &vhost.dead_lettered,
                        &vhost.history.last().0,
                    );
                }
                let hooks: Vec<VhostDeletedHook> = self.vhost_hooks.lock().clone();
                for hook in hooks {
                    hook(&name);
                }
                tracing::info!(vhost = %name, "vhost deleted");
            }
            MetaCommand::PutUser { name, tags, .. } => {
                if let Prepared::User(hash, algorithm) = prepared {
                    self.auth.put_user(&name, hash, algorithm, tags);
                }
            }
            MetaCommand::DeleteUser { name } => {
                self.auth.delete_user(&name);
                self.user_limits.write().remove(&name);
                let reason = format!("user '{name}' is deleted");
                self.connections
                    .close_where(|c| c.info.user == name, &reason);
                tracing::info!(user = %name, "user deleted");
            }
            MetaCommand::SetPermissions {
                user,
                vhost,
                configure,
                write,
                read,
            } => {
                // Validated above: compiling again cannot fail.
                let _ = self
                    .auth
                    .put_permissions(&user, &vhost, &configure, &write, &read);
            }
            MetaCommand::ClearPermissions { user, vhost } => {
                self.auth.clear_permissions(&user, &vhost)
            }
            MetaCommand::SetTopicPermissions {
                user,
                vhost,
                exchange,
                write,
                read,
            } => {
                let _ = self
                    .auth
                    .put_topic_permissions(&user, &vhost, &exchange, &write, &read);
            }
            MetaCommand::ClearTopicPermissions {
                user,
                vhost,
                exchange,
            } => self
                .auth
                .clear_topic_permissions(&user, &vhost, exchange.as_deref()),
            MetaCommand::SetPolicy(spec) => {
                if let Prepared::Policy(policy) = prepared {
                    self.policies.put(false, *policy);
                    self.reapply(&spec.vhost, now);
                }
            }
            MetaCommand::SetOperatorPolicy(spec) => {
                if let Prepared::Policy(policy) = prepared {
                    self.policies.put(true, *policy);
                    self.reapply(&spec.vhost, now);
                }
            }
            MetaCommand::ClearPolicy { vhost, name } => {
                self.policies.remove(false, &vhost, &name);
                self.reapply(&vhost, now);
            }
            MetaCommand::ClearOperatorPolicy { vhost, name } => {
                self.policies.remove(true, &vhost, &name);
                self.reapply(&vhost, now);
            }
            ref c @ (MetaCommand::SetVhostLimits { ref vhost, .. }
            | MetaCommand::ClearVhostLimit { ref vhost, .. }) => {
                let next = self.next_vhost_limits(vhost, c);
                if let Ok(vh) = self.vhost(vhost) {
                    vh.set_max_queues(next.max_queues.unwrap_or(-1));
                }
                if next.is_empty() {
                    self.vhost_limits.write().remove(vhost);
                } else {
                    self.vhost_limits.write().insert(vhost.clone(), next);
                }
            }
            ref c @ (MetaCommand::SetUserLimits { ref user, .. }
            | MetaCommand::ClearUserLimit { ref user, .. }) => {
                let next = self.next_user_limits(user, c);
                if next.is_empty() {
                    self.user_limits.write().remove(user);
                } else {
                    self.user_limits.write().insert(user.clone(), next);
                }
            }
        }
    }

    fn reapply(&self, vhost: &str, now: u64) {
        if let Ok(vh) = self.vhost(vhost) {
            let changed = vh.reapply_policies(now);
            tracing::debug!(vhost, changed, "policies applied to existing queues");
        }
    }
}

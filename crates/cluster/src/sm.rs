//! The metadata group's state machine: the broker itself. A committed
//! [`Command::Meta`] is applied on every node by `Broker::apply_local` (store
//! commit, then live state), exactly what a single node does for the same
//! command. The applied position and membership are kept in the Raft database,
//! written after the broker's own commit: a crash in between re-applies the last
//! commands on restart, which the metadata commands tolerate (puts replace,
//! deletes of what is gone are refused without changing anything).
//!
//! A snapshot is the metadata as commands (vhosts, users, permissions, topic
//! permissions, policies, operator policies, limits). Installing one reconciles
//! the node with it: what the snapshot lacks is deleted, the rest put.
//!
//! Quorum queues' groups follow the log: applying a clustered quorum queue's
//! declare places its group ([`place`]: id and members derived from the entry
//! and the membership, so identical on every node) and creates this node's
//! member of it; deleting the queue (or its vhost) deletes the group here. The
//! placements are kept with the applied position and travel in snapshots.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, Snapshot};
use serde::{Deserialize, Serialize};
use switchyard_core::admin::{EntityCommand, MetaCommand};
use switchyard_core::queue::QueueOptions;
use switchyard_core::Broker;
use tokio::sync::watch;

use crate::quorum::{Placement, QuorumGroups};
use crate::store::{encode, RaftDb, KEY_APPLIED, KEY_MEMBERSHIP, KEY_QUORUM, KEY_SNAPSHOT};
use crate::types::{
    node_id, Applied, Command, Entry, LogId, Member, NodeId, SnapshotMeta, StorageError,
    StoredMembership, TypeConfig, WireError,
};

/// A stored snapshot: its meta and body.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The body of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotBody {
    pub commands: Vec<MetaCommand>,
    /// Every clustered quorum queue's group placement.
    pub groups: Vec<Placement>,
}

/// A clustered quorum queue: (vhost, name).
type QueueKey = (String, String);

/// How many members a quorum queue's group has (fewer in a smaller cluster).
pub const GROUP_SIZE: usize = 3;

/// Whether a queue with these options is a clustered quorum queue (what
/// `VHost` links to the quorum log).
fn is_quorum(options: &QueueOptions) -> bool {
    options.arguments.get_str("x-queue-type") == Some("quorum")
        && options.durable
        && !options.exclusive
        && !options.auto_delete
}

/// The group of a quorum queue declared by the metadata entry at `index`,
/// over the voters of `membership`. Every node applies the same entry with the
/// same membership, so every node computes the same placement.
///
/// The group id hashes vhost, name and the declare's log index: the same on
/// every node, and a queue deleted and declared again (a later entry) gets a
/// new group, so a node that missed the delete can never mix the old group's
/// log into the new one. Members: the `GROUP_SIZE` voters ranked highest by a
/// hash of (group id, node) (rendezvous hashing: queues spread evenly over
/// nodes); the first of them initialises the group and so normally leads it
/// first, which spreads leaders too.
/// A node's rendezvous score for a group. FNV alone (`node_id`) ranks names
/// that differ in their last byte (n1, n2, n3) in correlated orders, which
/// piled half the leaders of 1,000 queues on one node; a 64-bit finaliser
/// (MurmurHash3's fmix64) decorrelates them.
fn score(gid: u64, node: &str) -> u64 {
    let mut h = node_id(&format!("{gid}/{node}"));
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

pub fn place(
    vhost: &str,
    queue: &str,
    index: u64,
    membership: &openraft::Membership<NodeId, Member>,
) -> Option<Placement> {
    let gid = node_id(&format!("{vhost}\n{queue}\n{index}"));
    let mut voters: Vec<(u64, NodeId, Member)> = membership
        .voter_ids()
        .filter_map(|id| {
            membership
                .get_node(&id)
                .map(|m| (score(gid, &m.name), id, m.clone()))
        })
        .collect();
    voters.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    voters.truncate(GROUP_SIZE);
    let initializer = voters.first()?.1;
    Some(Placement {
        vhost: vhost.to_owned(),
        queue: queue.to_owned(),
        gid,
        members: voters.into_iter().map(|(_, id, m)| (id, m)).collect(),
        initializer,
    })
}

/// The broker's metadata as the commands that recreate it.
pub fn export(broker: &Broker) -> Vec<MetaCommand> {
    let mut out = Vec::new();
    for v in broker.vhost_infos() {
        out.push(MetaCommand::PutVhost {
            name: v.name,
            description: v.description,
            tags: v.tags,
            default_queue_type: v.default_queue_type,
        });
    }
    for u in broker.users() {
        out.push(MetaCommand::PutUser {
            name: u.name,
            password_hash: u.password_hash,
            hashing_algorithm: u.hashing_algorithm,
            tags: u.tags,
        });
    }
    for p in broker.permissions() {
        out.push(MetaCommand::SetPermissions {
            user: p.user,
            vhost: p.vhost,
            configure: p.configure,
            write: p.write,
            read: p.read,
        });
    }
    for p in broker.topic_permissions() {
        out.push(MetaCommand::SetTopicPermissions {
            user: p.user,
            vhost: p.vhost,
            exchange: p.exchange,
            write: p.write,
            read: p.read,
        });
    }
    out.extend(broker.policies().into_iter().map(MetaCommand::SetPolicy));
    out.extend(
        broker
            .operator_policies()
            .into_iter()
            .map(MetaCommand::SetOperatorPolicy),
    );
    for l in broker.vhost_limits() {
        out.push(MetaCommand::SetVhostLimits {
            vhost: l.vhost,
            limits: l.limits,
        });
    }
    for l in broker.user_limits() {
        out.push(MetaCommand::SetUserLimits {
            user: l.user,
            limits: l.limits,
        });
    }
    out.extend(replicated_entities(broker).map(MetaCommand::Entity));
    out
}

/// Every vhost's replicated exchanges and bindings.
fn replicated_entities(broker: &Broker) -> impl Iterator<Item = EntityCommand> + '_ {
    broker
        .vhost_infos()
        .into_iter()
        .filter_map(|v| broker.vhost(&v.name).ok())
        .flat_map(|v| v.replicated_entities())
}

/// The command that undoes a replicated entity the snapshot lacks.
fn undo(entity: EntityCommand) -> Option<EntityCommand> {
    match entity {
        EntityCommand::DeclareExchange { vhost, name, .. } => {
            Some(EntityCommand::DeleteExchange { vhost, name })
        }
        EntityCommand::BindExchange {
            vhost,
            source,
            destination,
            routing_key,
            arguments,
        } => Some(EntityCommand::UnbindExchange {
            vhost,
            source,
            destination,
            routing_key,
            arguments,
        }),
        EntityCommand::DeclareQueue { vhost, name, .. } => {
            Some(EntityCommand::DeleteQueue { vhost, name })
        }
        EntityCommand::BindQueue {
            vhost,
            source,
            queue,
            routing_key,
            arguments,
        } => Some(EntityCommand::UnbindQueue {
            vhost,
            source,
            queue,
            routing_key,
            arguments,
        }),
        EntityCommand::DeleteExchange { .. }
        | EntityCommand::UnbindExchange { .. }
        | EntityCommand::DeleteQueue { .. }
        | EntityCommand::UnbindQueue { .. } => None,
    }
}

/// Makes `broker`'s metadata equal to `target` (an [`export`]): deletes what
/// `target` lacks, then applies every command of it. Returns how many commands
/// failed (logged).
pub fn reconcile(broker: &Broker, target: &[MetaCommand]) -> usize {
    let mut vhosts = BTreeSet::new();
    let mut users = BTreeSet::new();
    let mut perms = BTreeSet::new();
    let mut topic = BTreeSet::new();
    let mut policies = BTreeSet::new();
    let mut op_policies = BTreeSet::new();
    let mut vlimits = BTreeSet::new();
    let mut ulimits = BTreeSet::new();
    for c in target {
        match c {
            MetaCommand::PutVhost { name, .. } => {
                vhosts.insert(name.clone());
            }
            MetaCommand::PutUser { name, .. } => {
                users.insert(name.clone());
            }
            MetaCommand::SetPermissions { user, vhost, .. } => {
                perms.insert((user.clone(), vhost.clone()));
            }
            MetaCommand::SetTopicPermissions {
                user,
                vhost,
                exchange,
                ..
            } => {
                topic.insert((user.clone(), vhost.clone(), exchange.clone()));
            }
            MetaCommand::SetPolicy(p) => {
                policies.insert((p.vhost.clone(), p.name.clone()));
            }
            MetaCommand::SetOperatorPolicy(p) => {
                op_policies.insert((p.vhost.clone(), p.name.clone()));
            }
            MetaCommand::SetVhostLimits { vhost, .. } => {
                vlimits.insert(vhost.clone());
            }
            MetaCommand::SetUserLimits { user, .. } => {
                ulimits.insert(user.clone());
            }
            _ => {}
        }
    }
    let mut deletes = Vec::new();
    // Bindings first, then exchanges (a deleted exchange takes its bindings).
    let mut entity_undos: Vec<EntityCommand> = replicated_entities(broker)
        .filter(|e| !target.contains(&MetaCommand::Entity(e.clone())))
        .filter_map(undo)
        .collect();
    entity_undos.sort_by_key(|e| {
        matches!(
            e,
            EntityCommand::DeleteExchange { .. } | EntityCommand::DeleteQueue { .. }
        )
    });
    deletes.extend(entity_undos.into_iter().map(MetaCommand::Entity));
    for p in broker.permissions() {
        if !perms.contains(&(p.user.clone(), p.vhost.clone())) {
            deletes.push(MetaCommand::ClearPermissions {
                user: p.user,
                vhost: p.vhost,
            });
        }
    }
    for p in broker.topic_permissions() {
        if !topic.contains(&(p.user.clone(), p.vhost.clone(), p.exchange.clone())) {
            deletes.push(MetaCommand::ClearTopicPermissions {
                user: p.user,
                vhost: p.vhost,
                exchange: Some(p.exchange),
            });
        }
    }
    for p in broker.policies() {
        if !policies.contains(&(p.vhost.clone(), p.name.clone())) {
            deletes.push(MetaCommand::ClearPolicy {
                vhost: p.vhost,
                name: p.name,
            });
        }
    }
    for p in broker.operator_policies() {
        if !op_policies.contains(&(p.vhost.clone(), p.name.clone())) {
            deletes.push(MetaCommand::ClearOperatorPolicy {
                vhost: p.vhost,
                name: p.name,
            });
        }
    }
    for l in broker.vhost_limits() {
        if !vlimits.contains(&l.vhost) {
            deletes.push(MetaCommand::ClearVhostLimit {
                vhost: l.vhost,
                limit: None,
            });
        }
    }
    for l in broker.user_limits() {
        if !ulimits.contains(&l.user) {
            deletes.push(MetaCommand::ClearUserLimit {
                user: l.user,
                limit: None,
            });
        }
    }
    for u in broker.users() {
        if !users.contains(&u.name) {
            deletes.push(MetaCommand::DeleteUser { name: u.name });
        }
    }
    for v in broker.vhost_infos() {
        if !vhosts.contains(&v.name) {
            deletes.push(MetaCommand::DeleteVhost { name: v.name });
        }
    }
    let mut failed = 0;
    for cmd in deletes.into_iter().chain(target.iter().cloned()) {
        let what = cmd.describe();
        if let Err(e) = broker.apply_local(cmd) {
            tracing::warn!(command = %what, error = %e, "snapshot install: command refused");
            failed += 1;
        }
    }
    failed
}

/// The state machine over the broker.
pub struct StateMachine {
    broker: Arc<Broker>,
    db: RaftDb,
    applied: Option<LogId>,
    membership: StoredMembership,
    snapshot: Option<StoredSnapshot>,
    /// The index applied last, for writers waiting to read their own write.
    applied_tx: watch::Sender<u64>,
    snapshot_seq: u64,
    /// Clustered quorum queues' group placements (kept with the applied
    /// position); `placed_changed`: changed since the last persist.
    placements: BTreeMap<QueueKey, Placement>,
    placed_changed: bool,
    /// This node's quorum groups (none in unit tests of the metadata alone).
    groups: Option<Arc<QuorumGroups>>,
}

fn read_err(e: std::io::Error) -> StorageError {
    StorageError::from_io_error(ErrorSubject::StateMachine, ErrorVerb::Read, e)
}

fn write_err(e: std::io::Error) -> StorageError {
    StorageError::from_io_error(ErrorSubject::StateMachine, ErrorVerb::Write, e)
}

impl StateMachine {
    /// Loads the applied position, membership and last snapshot from `db`.
    pub fn open(broker: Arc<Broker>, db: RaftDb) -> std::io::Result<(Self, watch::Receiver<u64>)> {
        let applied: Option<LogId> = db.get::<Option<LogId>>(KEY_APPLIED)?.flatten();
        let membership: StoredMembership = db.get(KEY_MEMBERSHIP)?.unwrap_or_default();
        let snapshot: Option<StoredSnapshot> = db.get(KEY_SNAPSHOT)?;
        let (applied_tx, rx) = watch::channel(applied.map_or(0, |l| l.index));
        let placed: Vec<Placement> = db.get(KEY_QUORUM)?.unwrap_or_default();
        let placements = placed
            .into_iter()
            .map(|p| ((p.vhost.clone(), p.queue.clone()), p))
            .collect();
        Ok((
            StateMachine {
                broker,
                db,
                applied,
                membership,
                snapshot,
                applied_tx,
                snapshot_seq: 0,
                placements,
                placed_changed: false,
                groups: None,
            },
            rx,
        ))
    }

    /// Hands the quorum queues' groups to this node's `groups`: every known
    /// placement is registered there (proposals find their group), and a
    /// group this node is a member of but lacks (lost with its WAL) is
    /// created empty; it catches up from the others.
    pub async fn attach_groups(&mut self, groups: Arc<QuorumGroups>) {
        for p in self.placements.values() {
            if groups.get(p.gid).is_none() {
                if let Err(e) = groups.ensure(p).await {
                    tracing::error!(queue = %p.queue, group = p.gid, error = %e, "quorum group not started");
                }
            } else {
                groups.place(p.clone());
            }
        }
        self.groups = Some(groups);
    }

    fn persist_applied(&mut self) -> std::io::Result<()> {
        let mut items: Vec<(&str, Vec<u8>)> = vec![
            (KEY_APPLIED, encode(&self.applied)?),
            (KEY_MEMBERSHIP, encode(&self.membership)?),
        ];
        if std::mem::take(&mut self.placed_changed) {
            let placed: Vec<&Placement> = self.placements.values().collect();
            items.push((KEY_QUORUM, encode(&placed)?));
        }
        self.db.put_all(&items)
    }

    /// After a committed declare of a clustered quorum queue: places its group
    /// (unless it has one: a repeated declare) and creates this node's member.
    async fn declared(&mut self, vhost: &str, queue: &str, index: u64) {
        let key = (vhost.to_owned(), queue.to_owned());
        if self.placements.contains_key(&key) {
            return;
        }
        let Some(p) = place(vhost, queue, index, self.membership.membership()) else {
            tracing::warn!(%queue, "quorum queue declared without a membership: no group");
            return;
        };
        self.placements.insert(key, p.clone());
        self.placed_changed = true;
        if let Some(groups) = &self.groups {
            if let Err(e) = groups.ensure(&p).await {
                tracing::error!(%queue, group = p.gid, error = %e, "quorum group not created");
            }
        }
    }

    /// Deletes the groups of the quorum queues `gone` selects.
    async fn forget(&mut self, gone: impl Fn(&QueueKey) -> bool) {
        let keys: Vec<QueueKey> = self
            .placements
            .keys()
            .filter(|k| gone(k))
            .cloned()
            .collect();
        for k in keys {
            if let Some(p) = self.placements.remove(&k) {
                self.placed_changed = true;
                if let Some(groups) = &self.groups {
                    if let Err(e) = groups.delete(p.gid).await {
                        tracing::warn!(queue = %p.queue, group = p.gid, error = %e, "quorum group not deleted");
                    }
                }
            }
        }
    }

    async fn apply_one(&mut self, entry: Entry) -> Applied {
        self.applied = Some(entry.log_id);
        let index = entry.log_id.index;
        match entry.payload {
            EntryPayload::Blank => Applied::default(),
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(entry.log_id), m);
                Applied::default()
            }
            EntryPayload::Normal(Command::Meta(cmd)) => {
                let what = cmd.describe();
                let result = self.broker.apply_local(cmd.clone());
                match &cmd {
                    MetaCommand::Entity(EntityCommand::DeclareQueue {
                        vhost,
                        name,
                        options,
                    }) if result.is_ok() && is_quorum(options) => {
                        self.declared(vhost, name, index).await;
                    }
                    MetaCommand::Entity(EntityCommand::DeleteQueue { vhost, name }) => {
                        self.forget(|k| k.0 == *vhost && k.1 == *name).await;
                    }
                    MetaCommand::DeleteVhost { name } if result.is_ok() => {
                        self.forget(|k| k.0 == *name).await;
                    }
                    _ => {}
                }
                match result {
                    Ok(()) => Applied::default(),
                    Err(e) => {
                        tracing::debug!(command = %what, error = %e, "replicated command refused");
                        Applied {
                            error: Some(WireError::from_core(&e)),
                        }
                    }
                }
            }
        }
    }

    fn build(&mut self) -> std::io::Result<StoredSnapshot> {
        let body = SnapshotBody {
            commands: export(&self.broker),
            groups: self.placements.values().cloned().collect(),
        };
        self.snapshot_seq += 1;
        let last = self.applied;
        let snapshot_id = format!(
            "{}-{}-{}",
            last.map_or(0, |l| l.leader_id.term),
            last.map_or(0, |l| l.index),
            self.snapshot_seq
        );
        let stored = StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: last,
                last_membership: self.membership.clone(),
                snapshot_id,
            },
            data: encode(&body)?,
        };
        self.db.put(KEY_SNAPSHOT, &stored)?;
        self.snapshot = Some(stored.clone());
        Ok(stored)
    }
}

/// Builds snapshots: a handle on the state machine's data at build time.
pub struct SnapshotBuilder {
    stored: Result<StoredSnapshot, String>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        match &self.stored {
            Ok(s) => Ok(Snapshot {
                meta: s.meta.clone(),
                snapshot: Box::new(Cursor::new(s.data.clone())),
            }),
            Err(e) => Err(write_err(std::io::Error::other(e.clone()))),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        for e in entries {
            results.push(self.apply_one(e).await);
        }
        self.persist_applied().map_err(write_err)?;
        self.applied_tx
            .send_replace(self.applied.map_or(0, |l| l.index));
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            stored: self.build().map_err(|e| e.to_string()),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = postcard::from_bytes(&data)
            .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
        let failed = reconcile(&self.broker, &body.commands);
        let target: BTreeMap<QueueKey, Placement> = body
            .groups
            .into_iter()
            .map(|p| ((p.vhost.clone(), p.queue.clone()), p))
            .collect();
        // Groups the snapshot lacks (or has under another id) go; the rest
        // are created here where missing.
        let stale: BTreeSet<QueueKey> = self
            .placements
            .iter()
            .filter(|(k, p)| target.get(*k).map(|t| t.gid) != Some(p.gid))
            .map(|(k, _)| k.clone())
            .collect();
        self.forget(|k| stale.contains(k)).await;
        for (k, p) in target {
            if self.placements.contains_key(&k) {
                continue;
            }
            if let Some(groups) = &self.groups {
                if let Err(e) = groups.ensure(&p).await {
                    tracing::error!(queue = %p.queue, group = p.gid, error = %e, "quorum group not created");
                }
            }
            self.placements.insert(k, p);
        }
        self.placed_changed = true;
        tracing::info!(snapshot = %meta.snapshot_id, commands = body.commands.len(), failed, "snapshot installed");
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.db.put(KEY_SNAPSHOT, &stored).map_err(write_err)?;
        self.snapshot = Some(stored);
        self.persist_applied().map_err(write_err)?;
        self.applied_tx
            .send_replace(self.applied.map_or(0, |l| l.index));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Membership};
    use std::collections::{BTreeMap, BTreeSet};
    use switchyard_core::admin::PolicySpec;
    use switchyard_core::auth::Auth;
    use switchyard_core::FieldTable;

    use crate::types::Member;

    fn broker() -> Arc<Broker> {
        Broker::new(Auth::new(), &[], 0)
    }

    fn put_vhost(name: &str) -> MetaCommand {
        MetaCommand::PutVhost {
            name: name.into(),
            description: String::new(),
            tags: vec![],
            default_queue_type: None,
        }
    }

    fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 7), index),
            payload,
        }
    }

    fn vhosts(b: &Broker) -> Vec<String> {
        b.vhost_infos().into_iter().map(|v| v.name).collect()
    }

    #[tokio::test]
    async fn applies_commands_reports_refusals_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = RaftDb::open(&dir.path().join("raft.redb")).unwrap();
        let b = broker();
        let (mut sm, applied) = StateMachine::open(b.clone(), db.clone()).unwrap();
        let members = BTreeMap::from([(
            7u64,
            Member {
                name: "n1".into(),
                addr: "127.0.0.1:1".into(),
            },
        )]);
        let membership = Membership::new(vec![BTreeSet::from([7u64])], members);
        let out = sm
            .apply(vec![
                entry(1, EntryPayload::Membership(membership.clone())),
                entry(2, EntryPayload::Normal(Command::Meta(put_vhost("a")))),
                entry(
                    3,
                    EntryPayload::Normal(Command::Meta(MetaCommand::DeleteVhost {
                        name: "missing".into(),
                    })),
                ),
            ])
            .await
            .unwrap();
        assert_eq!(out.len(), 3);
        assert!(out[1].error.is_none());
        assert_eq!(out[2].error.as_ref().unwrap().kind, "NOT_FOUND");
        assert!(vhosts(&b).contains(&"a".to_owned()));
        assert_eq!(*applied.borrow(), 3);

        // A restart reads back what was applied and the membership.
        drop(sm);
        let (mut again, applied) = StateMachine::open(broker(), db).unwrap();
        let (last, m) = again.applied_state().await.unwrap();
        assert_eq!(last.unwrap().index, 3);
        assert_eq!(m.membership(), &membership);
        assert_eq!(*applied.borrow(), 3);
    }

    #[tokio::test]
    async fn a_snapshot_installed_elsewhere_reproduces_the_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let source = broker();
        for cmd in [
            put_vhost("kept"),
            MetaCommand::put_user_with_password("alice", "pw", vec!["management".into()]),
            MetaCommand::SetPermissions {
                user: "alice".into(),
                vhost: "kept".into(),
                configure: ".*".into(),
                write: ".*".into(),
                read: "".into(),
            },
            MetaCommand::SetPolicy(PolicySpec {
                vhost: "kept".into(),
                name: "p".into(),
                pattern: "^q".into(),
                apply_to: "queues".into(),
                priority: 1,
                definition: FieldTable::default(),
            }),
        ] {
            source.apply_local(cmd).unwrap();
        }
        let (mut sm, _) = StateMachine::open(
            source.clone(),
            RaftDb::open(&dir.path().join("a.redb")).unwrap(),
        )
        .unwrap();
        sm.apply(vec![entry(1, EntryPayload::Blank)]).await.unwrap();
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id.unwrap().index, 1);

        // The target has something the snapshot does not: it goes.
        let target = broker();
        target.apply_local(put_vhost("stale")).unwrap();
        let (mut other, applied) = StateMachine::open(
            target.clone(),
            RaftDb::open(&dir.path().join("b.redb")).unwrap(),
        )
        .unwrap();
        other
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(vhosts(&target), vhosts(&source));
        assert!(!vhosts(&target).contains(&"stale".to_owned()));
        assert_eq!(target.users(), source.users());
        assert_eq!(target.permissions(), source.permissions());
        assert_eq!(target.policies(), source.policies());
        assert_eq!(*applied.borrow(), 1);
        assert!(other.get_current_snapshot().await.unwrap().is_some());
    }

    #[test]
    fn groups_are_placed_the_same_everywhere_and_spread() {
        let nodes: BTreeMap<u64, Member> = (1..=5)
            .map(|i| {
                let name = format!("n{i}");
                (
                    crate::types::node_id(&name),
                    Member {
                        name,
                        addr: format!("127.0.0.1:{i}"),
                    },
                )
            })
            .collect();
        let voters: BTreeSet<u64> = nodes.keys().copied().collect();
        let membership = Membership::new(vec![voters], nodes.clone());
        let a = place("/", "orders", 12, &membership).unwrap();
        assert_eq!(place("/", "orders", 12, &membership), Some(a.clone()));
        assert_eq!(a.members.len(), GROUP_SIZE);
        assert!(a.members.contains_key(&a.initializer));
        // Declared again later: another group.
        assert_ne!(place("/", "orders", 40, &membership).unwrap().gid, a.gid);
        // Leaders spread over the nodes.
        let leaders: BTreeSet<u64> = (0..50)
            .map(|i| {
                place("/", &format!("q{i}"), i, &membership)
                    .unwrap()
                    .initializer
            })
            .collect();
        assert!(leaders.len() >= 4, "{leaders:?}");
        // Evenly, for names that differ only in their last character: 3,000
        // groups over n1..n3, each node initialises 1,000 +- 10%.
        let three: BTreeMap<u64, Member> = nodes
            .values()
            .filter(|m| ["n1", "n2", "n3"].contains(&m.name.as_str()))
            .map(|m| (crate::types::node_id(&m.name), m.clone()))
            .collect();
        let voters: BTreeSet<u64> = three.keys().copied().collect();
        let membership = Membership::new(vec![voters], three);
        let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
        for i in 0..3000 {
            let p = place("/", &format!("q{i}"), i, &membership).unwrap();
            *per_node.entry(p.initializer).or_default() += 1;
        }
        assert!(
            per_node.values().all(|&n| (900..=1100).contains(&n)),
            "{per_node:?}"
        );
        // No membership yet: no group.
        assert!(place("/", "x", 1, &Membership::new(vec![], BTreeMap::new())).is_none());
    }
}

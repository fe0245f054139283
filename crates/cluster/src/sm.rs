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

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, Snapshot};
use serde::{Deserialize, Serialize};
use switchyard_core::admin::{EntityCommand, MetaCommand};
use switchyard_core::quorum::{QueueCommand, QueueMachine};
use switchyard_core::Broker;
use tokio::sync::watch;

use crate::store::{encode, RaftDb, KEY_APPLIED, KEY_MEMBERSHIP, KEY_QUORUM, KEY_SNAPSHOT};
use crate::types::{
    Applied, Command, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
    WireError,
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
    /// Every clustered quorum queue's machine: (vhost, queue, machine).
    pub queues: Vec<(String, String, QueueMachine)>,
}

/// A clustered quorum queue: (vhost, name).
type QueueKey = (String, String);

fn machine_key(q: &QueueKey) -> String {
    format!("quorum/{}\n{}", q.0, q.1)
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
    /// Clustered quorum queues' machines (kept with the applied position).
    queues: BTreeMap<QueueKey, QueueMachine>,
    /// Machines changed since the last persist; `queues_listed`: the set of
    /// queues changed too.
    touched: BTreeSet<QueueKey>,
    queues_listed: bool,
    /// This node's name and incarnation: what the machines assign to it is
    /// handed to its broker.
    node: String,
    incarnation: u64,
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
        let listed: Vec<QueueKey> = db.get(KEY_QUORUM)?.unwrap_or_default();
        let mut queues = BTreeMap::new();
        for q in listed {
            if let Some(m) = db.get::<QueueMachine>(&machine_key(&q))? {
                queues.insert(q, m);
            }
        }
        Ok((
            StateMachine {
                broker,
                db,
                applied,
                membership,
                snapshot,
                applied_tx,
                snapshot_seq: 0,
                queues,
                touched: BTreeSet::new(),
                queues_listed: false,
                node: String::new(),
                incarnation: 0,
            },
            rx,
        ))
    }

    /// Names this node: what quorum queue machines assign to `node` while it
    /// is `incarnation` goes to the broker's local queues.
    pub fn set_node(&mut self, node: String, incarnation: u64) {
        self.node = node;
        self.incarnation = incarnation;
    }

    fn persist_applied(&mut self) -> std::io::Result<()> {
        let touched = std::mem::take(&mut self.touched);
        let mut owned: Vec<(String, Vec<u8>)> = Vec::new();
        for q in &touched {
            if let Some(m) = self.queues.get(q) {
                owned.push((machine_key(q), encode(m)?));
            }
        }
        if std::mem::take(&mut self.queues_listed) {
            let listed: Vec<&QueueKey> = self.queues.keys().collect();
            owned.push((KEY_QUORUM.to_owned(), encode(&listed)?));
        }
        let mut items: Vec<(&str, Vec<u8>)> = vec![
            (KEY_APPLIED, encode(&self.applied)?),
            (KEY_MEMBERSHIP, encode(&self.membership)?),
        ];
        items.extend(owned.iter().map(|(k, v)| (k.as_str(), v.clone())));
        self.db.put_all(&items)
    }

    /// Applies a quorum queue's commands; hands this node what it was assigned.
    fn apply_queue(&mut self, vhost: String, queue: String, cmds: Vec<QueueCommand>) {
        let Ok(v) = self.broker.vhost(&vhost) else {
            return;
        };
        if v.queue(&queue).is_err() {
            // Deleted (or never declared here): late commands are dropped.
            return;
        }
        let key = (vhost, queue);
        if !self.queues.contains_key(&key) {
            self.queues_listed = true;
        }
        let m = self.queues.entry(key.clone()).or_default();
        let mut assigned = Vec::new();
        for cmd in cmds {
            let index = m.applied_index() + 1;
            m.apply(index, cmd, &mut assigned);
        }
        if m.incarnation_of(&self.node) == Some(self.incarnation) {
            assigned.retain(|a| a.node == self.node);
            v.quorum_assigned(&key.1, assigned);
        }
        self.touched.insert(key);
    }

    /// A metadata command that removes quorum queues drops their machines.
    fn forget_queues(&mut self, cmd: &MetaCommand) {
        let gone = |k: &QueueKey| match cmd {
            MetaCommand::Entity(EntityCommand::DeleteQueue { vhost, name }) => {
                k.0 == *vhost && k.1 == *name
            }
            MetaCommand::DeleteVhost { name } => k.0 == *name,
            _ => false,
        };
        let before = self.queues.len();
        self.queues.retain(|k, _| !gone(k));
        if self.queues.len() != before {
            self.queues_listed = true;
        }
    }

    fn apply_one(&mut self, entry: Entry) -> Applied {
        self.applied = Some(entry.log_id);
        match entry.payload {
            EntryPayload::Blank => Applied::default(),
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(entry.log_id), m);
                Applied::default()
            }
            EntryPayload::Normal(Command::Queue { vhost, queue, cmds }) => {
                self.apply_queue(vhost, queue, cmds);
                Applied::default()
            }
            EntryPayload::Normal(Command::Meta(cmd)) => {
                self.forget_queues(&cmd);
                let what = cmd.describe();
                match self.broker.apply_local(cmd) {
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
            queues: self
                .queues
                .iter()
                .map(|((v, q), m)| (v.clone(), q.clone(), m.clone()))
                .collect(),
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
        let results: Vec<Applied> = entries.into_iter().map(|e| self.apply_one(e)).collect();
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
        self.queues = body
            .queues
            .into_iter()
            .map(|(v, q, m)| ((v, q), m))
            .collect();
        self.touched = self.queues.keys().cloned().collect();
        self.queues_listed = true;
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
}

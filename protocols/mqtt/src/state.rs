//! Broker-wide MQTT state, shared by every MQTT connection (TCP and WebSocket)
//! as one `Arc<MqttState>` that the server creates:
//! - the client-id registry: one [`SessionData`] per (vhost, client id), which a
//!   connection attaches to at CONNECT (taking over from a connection that holds
//!   it) and detaches from when it ends; a persistent session stays here until its
//!   expiry interval has passed;
//! - the retained messages of each vhost ([`RetainedStore`]);
//! - will messages waiting for their delay ([`MqttState::schedule_will`]);
//! - reference counts of shared-subscription queues.
//!
//! Persistence: when the broker has a store ([`Broker::store`]), retained
//! messages and persistent sessions are written through to it as records
//! ([`crate::persist`]) and read back by [`MqttState::open`] at start; without
//! one (unit tests) they live in memory only. Messages of a persistent session
//! are not in its record: they wait in its durable queues, which the core
//! recovers itself.
//!
//! Must not: speak the protocol (no packets here), hold a lock across `.await`.
//! Locks are `parking_lot::Mutex`es held for short synchronous sections. Lock
//! order: the session map, then one session's data, then core locks (queues,
//! outboxes); never a session's data before the map.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use switchyard_core::consumer::Consumer;
use switchyard_core::persist::Store;
use switchyard_core::queue::{Queue, QueueOptions, QueuedMessage};
use switchyard_core::vhost::{QueueDeclare, Routed, VHost};
use switchyard_core::{Broker, CoreError, CoreResult, ErrorKind, FieldTable, Message};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod view;

use crate::codec::{Publish, SubOptions};
use crate::mapping;
use crate::persist::{self, SessionRecord};

/// Removes the binding `sub` made (and the argument-less binding it had before
/// bindings carried their MQTT filter), unless another subscription of the
/// session needs the same binding (callers check).
pub fn unbind_subscription(vhost: &VHost, exchange: &str, sub: &Subscription, lossless: bool) {
    let args = crate::mapping::binding_arguments(&sub.filter, lossless);
    let _ = vhost.unbind_queue(&sub.queue, exchange, &sub.key, &args, 0);
    if args != FieldTable::new() {
        let _ = vhost.unbind_queue(&sub.queue, exchange, &sub.key, &FieldTable::new(), 0);
    }
}

/// A session's identity: client ids are per vhost.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    pub vhost: String,
    pub client_id: String,
}

/// One subscription of a session.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The MQTT filter without any `$share/<group>/` prefix.
    pub filter: String,
    /// The shared-subscription group, if any.
    pub share: Option<String>,
    pub options: SubOptions,
    pub id: Option<u32>,
    /// The queue its binding leads to.
    pub queue: String,
    /// The binding key.
    pub key: String,
}

/// Where an outgoing QoS 1/2 message is in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// QoS 1 sent, waiting for PUBACK.
    PubAck,
    /// QoS 2 sent, waiting for PUBREC.
    PubRec,
    /// PUBREL sent, waiting for PUBCOMP.
    PubComp,
}

/// An outgoing QoS 1/2 message not yet completed.
#[derive(Debug, Clone)]
pub struct Inflight {
    pub stage: Stage,
    /// The PUBLISH as sent (full topic, no alias), for a resend with DUP.
    pub publish: Publish,
    /// The queue message to settle once the client has it; `None` for retained
    /// messages and once settled (QoS 2 after PUBREC).
    pub source: Option<(Arc<Queue>, QueuedMessage)>,
    /// Whether it holds a slot of the current connection's receive-maximum credit.
    pub charged: bool,
}

/// Everything an MQTT session keeps between connections.
#[derive(Debug)]
pub struct SessionData {
    pub key: SessionKey,
    /// Stable id of this session, stamped on what it publishes (no-local).
    pub origin: u64,
    /// The connection attached now, if any.
    pub owner: Option<u64>,
    /// Cancelled to make the attached connection close (takeover).
    pub kick: Option<CancellationToken>,
    /// By the filter as the client wrote it (`$share/...` included).
    pub subscriptions: BTreeMap<String, Subscription>,
    /// The attached connection's consumers.
    pub consumers: Vec<(Arc<Queue>, Arc<Consumer>)>,
    pub inflight: BTreeMap<u16, Inflight>,
    next_packet_id: u16,
    /// QoS 2 packet ids received from the client, PUBREL not yet seen: a
    /// re-sent PUBLISH with one of these is not routed again (exactly once).
    /// The value is the store position its message needs on disk before the
    /// PUBREC (0: nothing to wait for) while the PUBREC has not gone out, and
    /// `None` once it has; those ids are in the session's record
    /// ([`SessionData::confirm_incoming`]).
    pub incoming_qos2: HashMap<u16, Option<u64>>,
    /// Session expiry interval in seconds (0: ends with the connection;
    /// u32::MAX: never expires).
    pub expiry_secs: u32,
    /// When a detached session expires (`None`: never, or attached).
    pub expires_at: Option<Instant>,
    /// Queue names this session made (its own qos0/qos1 queues).
    pub own_queues: Vec<String>,
    /// The protocol level of the last CONNECT (3, 4 or 5), for its record.
    pub protocol_level: u8,
    /// The record last written to the store (`None`: no record exists), so an
    /// unchanged session is not written again on every reconnect.
    stored: Option<Vec<u8>>,
}

impl SessionData {
    fn new(key: SessionKey, origin: u64) -> Self {
        SessionData {
            key,
            origin,
            owner: None,
            kick: None,
            subscriptions: BTreeMap::new(),
            consumers: Vec::new(),
            inflight: BTreeMap::new(),
            next_packet_id: 1,
            incoming_qos2: HashMap::new(),
            expiry_secs: 0,
            expires_at: None,
            own_queues: Vec::new(),
            protocol_level: 4,
            stored: None,
        }
    }

    /// A packet id not in flight, or `None` if all 65,535 are (receive maximum
    /// keeps us far from that).
    pub fn alloc_packet_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.inflight.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Whether `conn` is the connection attached to this session.
    pub fn owned_by(&self, conn: u64) -> bool {
        self.owner == Some(conn)
    }

    /// The PUBREC of incoming QoS 2 packet `id` goes out now: from here on
    /// the id belongs in the session's record (the caller persists it before
    /// sending), so a PUBLISH re-sent after a restart is not routed twice.
    /// Returns whether the id is known.
    pub fn confirm_incoming(&mut self, id: u16) -> bool {
        match self.incoming_qos2.get_mut(&id) {
            Some(at) => {
                *at = None;
                true
            }
            None => false,
        }
    }

    /// Incoming QoS 2 ids whose PUBREC went out (the record's list), sorted.
    pub fn confirmed_incoming(&self) -> Vec<u16> {
        let mut ids: Vec<u16> = self
            .incoming_qos2
            .iter()
            .filter(|(_, at)| at.is_none())
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Outgoing QoS 2 ids past PUBREC (a PUBREL is owed until PUBCOMP), sorted.
    pub fn pubrel_owed(&self) -> Vec<u16> {
        self.inflight
            .iter()
            .filter(|(_, f)| f.stage == Stage::PubComp)
            .map(|(id, _)| *id)
            .collect()
    }
}

pub type SessionRef = Arc<Mutex<SessionData>>;

/// A retained message: the core message (so the one converter in
/// [`mapping`] serves it) and its MQTT topic.
#[derive(Debug, Clone)]
pub struct Retained {
    pub topic: String,
    pub message: Arc<Message>,
}

/// Retained messages per vhost, by topic. Wildcard subscriptions scan the
/// vhost's map: retained topics are few compared with publishes, and a scan
/// happens once per SUBSCRIBE, never on the publish path.
///
/// With a store, every change is written through (record kind
/// [`persist::RETAINED`]) before it is made in memory and before the publish
/// is routed, so the PUBACK of a retained PUBLISH means the retained message
/// survives a `kill -9`. That is one synchronous redb commit (an fsync) per
/// retained PUBLISH, on the publishing connection's task: acceptable because a
/// retained message is the last known state of a topic (a device's status,
/// its configuration), updated per topic now and then rather than streamed;
/// publishes without the retain flag never touch it.
#[derive(Debug, Default)]
pub struct RetainedStore {
    by_vhost: Mutex<HashMap<String, BTreeMap<String, Retained>>>,
    store: Option<Arc<dyn Store>>,
    /// Held across a store write and the matching change in memory, so that
    /// two publishers of the same topic leave disk and memory agreeing on the
    /// last one. Separate from `by_vhost` so SUBSCRIBEs do not wait for fsyncs.
    writing: Mutex<()>,
}

impl RetainedStore {
    fn with_store(store: Option<Arc<dyn Store>>) -> Self {
        RetainedStore {
            store,
            ..RetainedStore::default()
        }
    }

    /// Stores (or with an empty payload, clears) the retained message of
    /// `topic`: on disk first, when there is a store. A failed write changes
    /// nothing and is returned.
    pub fn set(&self, vhost: &str, topic: &str, message: Arc<Message>) -> std::io::Result<()> {
        let _writing = self.writing.lock();
        let clear = message.body.is_empty();
        if let Some(store) = &self.store {
            let key = persist::key(vhost, topic);
            if clear {
                // Only a topic that has a retained message has a record: clearing
                // an unknown topic (a common "make sure it is empty") costs no write.
                if self
                    .by_vhost
                    .lock()
                    .get(vhost)
                    .is_some_and(|v| v.contains_key(topic))
                {
                    store.delete_record(persist::RETAINED, &key)?;
                }
            } else {
                let value = persist::encode_retained(vhost, topic, &message)?;
                store.save_record(persist::RETAINED, &key, &value)?;
            }
        }
        let mut map = self.by_vhost.lock();
        if clear {
            if let Some(v) = map.get_mut(vhost) {
                v.remove(topic);
            }
            return Ok(());
        }
        map.entry(vhost.to_owned()).or_default().insert(
            topic.to_owned(),
            Retained {
                topic: topic.to_owned(),
                message,
            },
        );
        Ok(())
    }

    /// Reads the stored retained messages back (at start, before any client).
    fn load(&self) -> std::io::Result<usize> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let mut map = self.by_vhost.lock();
        let mut n = 0;
        for (key, value) in store.records(persist::RETAINED)? {
            match persist::decode_retained(&value) {
                Ok(r) => {
                    map.entry(r.vhost).or_default().insert(
                        r.topic.clone(),
                        Retained {
                            topic: r.topic,
                            message: Arc::new(r.message),
                        },
                    );
                    n += 1;
                }
                // One unreadable record must not keep the broker from starting.
                Err(e) => {
                    tracing::warn!(key = %key.escape_debug(), error = %e, "skipping unreadable retained message record")
                }
            }
        }
        Ok(n)
    }

    /// The retained messages whose topic matches `filter`.
    pub fn matching(&self, vhost: &str, filter: &str) -> Vec<Retained> {
        let map = self.by_vhost.lock();
        map.get(vhost)
            .map(|v| {
                v.values()
                    .filter(|r| mapping::filter_matches(filter, &r.topic))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sets a retained message in memory only (`$SYS`: facts about the running
    /// broker, replaced every few seconds and meaningless after a restart).
    pub fn set_volatile(&self, vhost: &str, topic: &str, message: Arc<Message>) {
        self.by_vhost
            .lock()
            .entry(vhost.to_owned())
            .or_default()
            .insert(
                topic.to_owned(),
                Retained {
                    topic: topic.to_owned(),
                    message,
                },
            );
    }

    /// Retained messages of every vhost, `$SYS` ones left out.
    pub fn count_durable(&self) -> usize {
        self.by_vhost
            .lock()
            .values()
            .map(|v| v.keys().filter(|t| !crate::sys::is_sys(t)).count())
            .sum()
    }

    pub fn len(&self, vhost: &str) -> usize {
        self.by_vhost.lock().get(vhost).map_or(0, BTreeMap::len)
    }

    /// Drops retained messages whose expiry has passed (from the store too).
    fn expire(&self, now_ms: u64) {
        let _writing = self.writing.lock();
        let mut gone = Vec::new();
        {
            let mut map = self.by_vhost.lock();
            for (vhost, v) in map.iter_mut() {
                v.retain(|topic, r| {
                    let keep = mapping::from_core(&r.message, false, now_ms).is_some();
                    if !keep {
                        gone.push(persist::key(vhost, topic));
                    }
                    keep
                });
            }
        }
        if let Some(store) = &self.store {
            for key in gone {
                // A record left behind is harmless: it is loaded expired after a
                // restart and dropped again by the first tick.
                if let Err(e) = store.delete_record(persist::RETAINED, &key) {
                    tracing::warn!(error = %e, "cannot delete an expired retained message record");
                }
            }
        }
    }
}

/// A will message waiting for its delay.
#[derive(Debug)]
struct PendingWill {
    key: SessionKey,
    vhost: Arc<VHost>,
    topic: String,
    message: Arc<Message>,
    retain: bool,
    at: Instant,
}

/// The broker-wide MQTT state.
#[derive(Debug)]
pub struct MqttState {
    sessions: Mutex<HashMap<SessionKey, SessionRef>>,
    pub retained: RetainedStore,
    wills: Mutex<Vec<PendingWill>>,
    /// (vhost, queue) -> sessions subscribed through that shared queue.
    shared: Mutex<HashMap<(String, String), usize>>,
    /// Where persistent sessions are written (`None`: memory only).
    store: Option<Arc<dyn Store>>,
    /// MQTT counters for `$SYS`.
    pub stats: crate::sys::SysStats,
    /// When this state was made (the broker's start), for `$SYS` uptime.
    pub started: Instant,
}

impl Default for MqttState {
    fn default() -> Self {
        MqttState {
            sessions: Mutex::default(),
            retained: RetainedStore::default(),
            wills: Mutex::default(),
            shared: Mutex::default(),
            store: None,
            stats: crate::sys::SysStats::default(),
            started: Instant::now(),
        }
    }
}

/// What [`MqttState::open`] read back, for the log.
#[derive(Debug, Clone, Copy, Default)]
pub struct Restored {
    pub retained: usize,
    pub sessions: usize,
}

/// The wall clock in milliseconds since the Unix epoch (0 if the clock is
/// before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl MqttState {
    /// State in memory only (no store).
    pub fn new() -> Arc<Self> {
        Arc::new(MqttState::default())
    }

    /// State backed by the broker's store, if it has one: retained messages and
    /// persistent sessions are read back from it, and written through from now
    /// on. Call once at start, after the core recovered its queues (restored
    /// sessions consume them) and before any MQTT client connects.
    ///
    /// Restored sessions are detached, and their expiry runs from now (the
    /// restart): the store does not know when a client went away (a `kill -9`
    /// leaves no trace of the connections it cut), and counting from the restart
    /// never ends a session before its client had the full interval to return.
    /// `exchange` is the one subscriptions bind from (`[mqtt] exchange`);
    /// `lossless_vhosts` those whose topics map losslessly (`[mqtt]
    /// lossless_topic_vhosts`).
    pub fn open(
        broker: &Broker,
        exchange: &str,
        lossless_vhosts: &[String],
    ) -> std::io::Result<(Arc<Self>, Restored)> {
        let store = broker.store();
        let state = MqttState {
            retained: RetainedStore::with_store(store.clone()),
            store: store.clone(),
            ..MqttState::default()
        };
        let mut restored = Restored {
            retained: state.retained.load()?,
            sessions: 0,
        };
        if let Some(store) = &store {
            let now = Instant::now();
            for (key, value) in store.records(persist::SESSION)? {
                let record = match SessionRecord::decode(&value) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(key = %key.escape_debug(), error = %e, "skipping unreadable MQTT session record");
                        continue;
                    }
                };
                let lossless = lossless_vhosts.contains(&record.vhost);
                match state.restore_session(broker, exchange, lossless, record, value, now) {
                    Ok(()) => restored.sessions += 1,
                    Err(e) => {
                        tracing::warn!(key = %key.escape_debug(), error = %e, "cannot restore MQTT session")
                    }
                }
            }
        }
        Ok((Arc::new(state), restored))
    }

    /// Re-creates one stored session, detached, with its subscriptions. Its
    /// queues are durable, so the core has recovered them with their bindings
    /// and messages; a queue that is missing anyway (the session had become
    /// persistent only after subscribing) is declared and bound again.
    fn restore_session(
        &self,
        broker: &Broker,
        exchange: &str,
        lossless: bool,
        r: SessionRecord,
        stored: Vec<u8>,
        now: Instant,
    ) -> CoreResult<()> {
        let vhost = broker.vhost(&r.vhost)?;
        let key = SessionKey {
            vhost: r.vhost.clone(),
            client_id: r.client_id.clone(),
        };
        let mut data = SessionData::new(key.clone(), r.origin);
        data.expiry_secs = r.expiry_secs;
        data.expires_at = (r.expiry_secs != u32::MAX)
            .then(|| now + Duration::from_secs(u64::from(r.expiry_secs)));
        data.own_queues = r.own_queues;
        data.protocol_level = r.protocol_level;
        data.stored = Some(stored);
        for id in &r.incoming_qos2 {
            data.incoming_qos2.insert(*id, None);
        }
        for id in &r.pubrel_owed {
            // Only the PUBREL is re-sent for these: the message itself left its
            // queue when the client's PUBREC came.
            data.inflight.insert(
                *id,
                Inflight {
                    stage: Stage::PubComp,
                    publish: Publish {
                        dup: false,
                        qos: crate::codec::QoS::ExactlyOnce,
                        retain: false,
                        topic: String::new(),
                        packet_id: *id,
                        properties: crate::codec::Properties::default(),
                        payload: bytes::Bytes::new(),
                    },
                    source: None,
                    charged: false,
                },
            );
        }
        for s in &r.subscriptions {
            let sub = s.subscription();
            if vhost.queue(&sub.queue).is_err() {
                vhost.declare_queue(QueueDeclare {
                    name: sub.queue.clone(),
                    passive: false,
                    options: QueueOptions {
                        durable: true,
                        exclusive: false,
                        auto_delete: false,
                        arguments: FieldTable::new(),
                    },
                    connection: 0,
                    ..QueueDeclare::default()
                })?;
            }
            // Bound with the MQTT filter (mapping::binding_arguments). A binding
            // stored before bindings carried it is replaced, so routing applies
            // MQTT's rules to this subscription too.
            let args = crate::mapping::binding_arguments(&sub.filter, lossless);
            vhost.bind_queue(&sub.queue, exchange, &sub.key, args.clone(), 0)?;
            if args != FieldTable::new() {
                let _ = vhost.unbind_queue(&sub.queue, exchange, &sub.key, &FieldTable::new(), 0);
            }
            if sub.share.is_some() {
                self.acquire_shared(&vhost.name, &sub.queue);
            }
            data.subscriptions.insert(s.raw.clone(), sub);
        }
        self.sessions.lock().insert(key, Arc::new(Mutex::new(data)));
        Ok(())
    }

    /// Publishes a message an MQTT client (or a will) sent: stores or clears the
    /// retained message first (on disk, when there is a store), then routes it
    /// like any other publish. A retained message that cannot be stored refuses
    /// the publish: the client must not get a PUBACK for it.
    pub fn publish(
        &self,
        vhost: &VHost,
        topic: &str,
        message: Arc<Message>,
        retain: bool,
    ) -> CoreResult<Routed> {
        if retain {
            self.retained
                .set(&vhost.name, topic, message.clone())
                .map_err(|e| {
                    tracing::error!(vhost = %vhost.name, topic, error = %e, "cannot store retained message");
                    CoreError::new(
                        ErrorKind::ResourceError,
                        format!("cannot store retained message: {e}"),
                    )
                })?;
        }
        vhost.publish(message)
    }

    /// Writes the session's record when it is persistent (expiry > 0) and
    /// changed since the last write, deletes it when the session stopped being
    /// persistent. Call under the session's lock after every change of what the
    /// record holds (CONNECT, SUBSCRIBE, UNSUBSCRIBE, DISCONNECT's expiry), so
    /// writes of one session reach the store in order. A failed write is logged
    /// and the session goes on in memory: it would only be missing after a
    /// restart, and refusing the client now would not bring it back.
    pub fn persist_session(&self, data: &mut SessionData) {
        let Some(store) = &self.store else {
            return;
        };
        let key = persist::key(&data.key.vhost, &data.key.client_id);
        if data.expiry_secs == 0 {
            if data.stored.is_some() {
                match store.delete_record(persist::SESSION, &key) {
                    Ok(()) => data.stored = None,
                    Err(e) => {
                        tracing::warn!(client_id = %data.key.client_id, error = %e, "cannot delete MQTT session record")
                    }
                }
            }
            return;
        }
        let value = match SessionRecord::of(data).encode() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(client_id = %data.key.client_id, error = %e, "cannot encode MQTT session record");
                return;
            }
        };
        if data.stored.as_ref() == Some(&value) {
            return;
        }
        match store.save_record(persist::SESSION, &key, &value) {
            Ok(()) => data.stored = Some(value),
            Err(e) => {
                tracing::warn!(client_id = %data.key.client_id, error = %e, "cannot store MQTT session record")
            }
        }
    }

    /// Deletes the session's record, if it has one (the session ended).
    fn forget_session(&self, data: &mut SessionData) {
        if data.stored.take().is_none() {
            return;
        }
        if let Some(store) = &self.store {
            let key = persist::key(&data.key.vhost, &data.key.client_id);
            if let Err(e) = store.delete_record(persist::SESSION, &key) {
                tracing::warn!(client_id = %data.key.client_id, error = %e, "cannot delete MQTT session record");
            }
        }
    }

    /// Attaches connection `conn` to the session `key`, creating it or, with
    /// `clean_start`, replacing an existing one. A connection attached before is
    /// told to go (`kick`) and its consumers are cancelled; its in-flight
    /// messages stay with the session. Returns the session and whether an
    /// existing one was resumed (CONNACK's session-present flag).
    pub fn attach(
        &self,
        vhost: &Arc<VHost>,
        key: SessionKey,
        conn: u64,
        kick: CancellationToken,
        clean_start: bool,
    ) -> (SessionRef, bool) {
        // A delayed will of an earlier connection is not sent once the client is
        // back (spec 3.1.3.2.2).
        self.wills.lock().retain(|w| w.key != key);
        let mut sessions = self.sessions.lock();
        if let Some(existing) = sessions.get(&key).cloned() {
            let mut data = existing.lock();
            if let Some(old) = data.kick.take() {
                old.cancel();
            }
            for (q, c) in std::mem::take(&mut data.consumers) {
                vhost.cancel_consumer(&q, c.id);
            }
            if !clean_start {
                data.owner = Some(conn);
                data.kick = Some(kick);
                data.expires_at = None;
                drop(data);
                return (existing, true);
            }
            self.destroy(vhost, &mut data);
        }
        // A random origin rather than `broker.next_id()`: origins are stamped
        // on messages that outlive a restart in durable queues, and ids restart
        // from 1, so a counter would let a new session take an old one's origin
        // and have no-local drop messages that are not its own. Below
        // `u64::MAX`, which a message's origin stamp reserves for "none".
        let origin = rand::random::<u64>().min(u64::MAX - 1);
        let mut data = SessionData::new(key.clone(), origin);
        data.owner = Some(conn);
        data.kick = Some(kick);
        let session = Arc::new(Mutex::new(data));
        sessions.insert(key, session.clone());
        (session, false)
    }

    /// Detaches connection `conn` from `session` (if it is still the attached
    /// one): its consumers are cancelled; a session with expiry 0 ends now, any
    /// other waits for its expiry. Returns whether the session ended.
    pub fn detach(
        &self,
        vhost: &Arc<VHost>,
        session: &SessionRef,
        conn: u64,
        now: Instant,
    ) -> bool {
        let mut sessions = self.sessions.lock();
        let mut data = session.lock();
        if !data.owned_by(conn) {
            return false;
        }
        data.owner = None;
        data.kick = None;
        for (q, c) in std::mem::take(&mut data.consumers) {
            vhost.cancel_consumer(&q, c.id);
        }
        for f in data.inflight.values_mut() {
            f.charged = false;
        }
        if data.expiry_secs == 0 {
            self.destroy(vhost, &mut data);
            if sessions
                .get(&data.key)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                sessions.remove(&data.key);
            }
            return true;
        }
        data.expires_at = (data.expiry_secs != u32::MAX)
            .then(|| now + Duration::from_secs(u64::from(data.expiry_secs)));
        false
    }

    /// Ends a session: deletes its own queues, leaves its shared ones (deleting
    /// a shared queue nobody else uses), gives back what it had in flight, and
    /// deletes its record. The delete runs under the session map's lock (as
    /// the queue deletes do): sessions end at connection rate, not message rate,
    /// and it keeps a new session of the same client id from being written
    /// before the old record is gone.
    fn destroy(&self, vhost: &VHost, data: &mut SessionData) {
        self.forget_session(data);
        for (q, c) in std::mem::take(&mut data.consumers) {
            vhost.cancel_consumer(&q, c.id);
        }
        for (_, f) in std::mem::take(&mut data.inflight) {
            if let Some((q, m)) = f.source {
                // Back to a shared queue for the group's other members; an own
                // queue is deleted just below, which drops it.
                q.requeue(vec![m]);
            }
        }
        let subs = std::mem::take(&mut data.subscriptions);
        for sub in subs.values() {
            if sub.share.is_some() {
                self.release_shared(vhost, &sub.queue, &sub.key);
            }
        }
        for q in std::mem::take(&mut data.own_queues) {
            let _ = vhost.delete_queue(&q, false, false, 0);
        }
        data.incoming_qos2.clear();
    }

    /// Forgets everything of a deleted vhost in memory: its sessions (their
    /// records, queues and retained messages were deleted with the vhost, in
    /// the store's transaction) and retained messages. A connection still
    /// attached is being closed by the broker; its detach then ends the session
    /// without writing anything back.
    pub fn forget_vhost(&self, vhost: &str) {
        let mut sessions = self.sessions.lock();
        sessions.retain(|key, session| {
            if key.vhost != vhost {
                return true;
            }
            let mut data = session.lock();
            data.expiry_secs = 0;
            data.stored = None;
            false
        });
        drop(sessions);
        self.retained.by_vhost.lock().remove(vhost);
        self.shared.lock().retain(|(v, _), _| v != vhost);
        self.wills.lock().retain(|w| w.key.vhost != vhost);
    }

    /// Counts one more session subscribed through a shared queue.
    pub fn acquire_shared(&self, vhost: &str, queue: &str) {
        *self
            .shared
            .lock()
            .entry((vhost.to_owned(), queue.to_owned()))
            .or_insert(0) += 1;
    }

    /// One session fewer on a shared queue; the last one out deletes the queue
    /// unless other (e.g. AMQP) consumers still use it.
    pub fn release_shared(&self, vhost: &VHost, queue: &str, _key: &str) {
        let mut shared = self.shared.lock();
        let k = (vhost.name.clone(), queue.to_owned());
        let left = match shared.get_mut(&k) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left == 0 {
            shared.remove(&k);
            drop(shared);
            if vhost.queue(queue).is_ok_and(|q| q.consumer_count() == 0) {
                let _ = vhost.delete_queue(queue, false, false, 0);
            }
        }
    }

    /// Queues a will to be published at `at` (or at once if `at` has passed).
    pub fn schedule_will(
        &self,
        key: SessionKey,
        vhost: Arc<VHost>,
        topic: String,
        message: Arc<Message>,
        retain: bool,
        at: Instant,
    ) {
        self.wills.lock().push(PendingWill {
            key,
            vhost,
            topic,
            message,
            retain,
            at,
        });
    }

    /// Number of sessions known (attached or waiting for expiry).
    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Sessions, and subscriptions over all sessions (for `$SYS`).
    pub fn session_and_subscription_counts(&self) -> (usize, usize) {
        let sessions: Vec<SessionRef> = self.sessions.lock().values().cloned().collect();
        let subs = sessions.iter().map(|s| s.lock().subscriptions.len()).sum();
        (sessions.len(), subs)
    }

    /// (filter, queue) of every `$SYS` subscription in `vhost`.
    pub fn sys_subscriptions(&self, vhost: &str) -> Vec<(String, String)> {
        let sessions: Vec<SessionRef> = self
            .sessions
            .lock()
            .iter()
            .filter(|(k, _)| k.vhost == vhost)
            .map(|(_, s)| s.clone())
            .collect();
        let mut out = Vec::new();
        for s in sessions {
            let data = s.lock();
            for sub in data.subscriptions.values() {
                if crate::sys::is_sys(&sub.filter) {
                    out.push((sub.filter.clone(), sub.queue.clone()));
                }
            }
        }
        out
    }

    /// Whether a session exists for (vhost, client id).
    pub fn has_session(&self, vhost: &str, client_id: &str) -> bool {
        self.sessions.lock().contains_key(&SessionKey {
            vhost: vhost.to_owned(),
            client_id: client_id.to_owned(),
        })
    }

    /// Does what is due at `now`: publishes wills whose delay has passed, ends
    /// detached sessions whose expiry has passed (publishing their pending
    /// will first), drops expired retained messages.
    pub fn tick(&self, broker: &Broker, now: Instant, now_ms: u64) {
        let expired: Vec<(SessionKey, SessionRef)> = {
            let sessions = self.sessions.lock();
            sessions
                .iter()
                .filter(|(_, s)| {
                    let d = s.lock();
                    d.owner.is_none() && d.expires_at.is_some_and(|t| t <= now)
                })
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect()
        };
        let ended: HashSet<SessionKey> = expired.iter().map(|(k, _)| k.clone()).collect();
        let due: Vec<PendingWill> = {
            let mut wills = self.wills.lock();
            let (due, keep) = std::mem::take(&mut *wills)
                .into_iter()
                .partition(|w| w.at <= now || ended.contains(&w.key));
            *wills = keep;
            due
        };
        for w in due {
            let _ = self.publish(&w.vhost, &w.topic, w.message, w.retain);
        }
        for (key, session) in expired {
            let Ok(vhost) = broker.vhost(&key.vhost) else {
                continue;
            };
            let mut sessions = self.sessions.lock();
            let mut data = session.lock();
            // Re-checked under the locks: a client may have come back meanwhile.
            if data.owner.is_some() || data.expires_at.is_none_or(|t| t > now) {
                continue;
            }
            self.destroy(&vhost, &mut data);
            if sessions.get(&key).is_some_and(|s| Arc::ptr_eq(s, &session)) {
                sessions.remove(&key);
            }
        }
        self.retained.expire(now_ms);
    }

    /// Runs [`MqttState::tick`] until `shutdown` is cancelled. The server spawns
    /// this once. A fixed short period keeps it simple; will delays and session
    /// expiries are whole seconds, so 100 ms is precise enough.
    pub async fn run_timers(self: Arc<Self>, broker: Arc<Broker>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = every.tick() => self.tick(&broker, Instant::now(), unix_ms()),
            }
        }
    }
}

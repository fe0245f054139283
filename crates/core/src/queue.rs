//! Queues: ordered messages, their consumers, and dispatch; and the queue
//! policies that act on them (TTL, expiry, length limits, priorities, single
//! active consumer, delayed messages, quorum delivery limits).
//!
//! All of a queue's mutable state sits behind one `parking_lot::Mutex`. Every
//! critical section is short and synchronous (no `.await` can happen while it is
//! held), so a blocking mutex is cheaper than an async one. Dispatch runs on
//! whichever task made progress possible: the publisher after enqueueing, the
//! consumer's connection after an ack, the timer task after a deadline. Lock
//! order: queue state, then a consumer's outbox (taken inside
//! `Consumer::deliver`); never the other way round.
//!
//! Messages that leave the queue for good while the lock is held (expired,
//! dropped by a length limit, over the delivery limit) are collected in the state
//! and dead-lettered only after the lock is released (`Queue::bury`): the
//! dead-letter exchange may route them back into this very queue.
//!
//! Expiry follows RabbitMQ: only messages at the head of the queue expire (of
//! each priority level, in a priority queue), so a message with a short
//! per-message TTL behind one with a long TTL waits for it. Deliveries never hand
//! out an expired message, and a TTL of 0 means "deliver now or expire".
//!
//! Delayed messages (`x-delay` header, in ms) wait inside each queue they were
//! routed to, invisible (not counted, not consumable) until due; they then enter
//! the queue as if published at that moment (length limits and TTL apply from
//! there). Why in the queue rather than in an exchange: routing, `mandatory`
//! returns and publisher confirms happen at publish time as for any message, and
//! a persistent delayed message is stored like any other persistent message of
//! its queue, so a restart recovers it (with its due time, re-derived from the
//! header and the receive time it is stored with) without a second store.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};

use crate::consumer::{Consumer, Delivery};
use crate::deadletter::DeathReason;
use crate::error::{CoreError, CoreResult};
use crate::field::{FieldTable, FieldValue};
use crate::flow;
use crate::memory::MemoryMonitor;
use crate::message::Message;
use crate::persist::{RecoveredMessage, Store, StoredRef};
use crate::policy::{Overflow, QueueSettings};
use crate::stats::{
    self, History, Lengths, MessageStats, QueueCounts, QueueType, Range, Snapshot, Stat,
};
use crate::timer::{Timers, NEVER};
use crate::vhost::VHost;

/// The header holding a message's delay in milliseconds (the name users of
/// RabbitMQ's delayed-message-exchange plugin know).
pub const DELAY_HEADER: &str = "x-delay";

/// The header a quorum queue sets on redeliveries: how often the message was
/// returned before.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

mod consumers;
mod peek;
pub use peek::Peeked;
/// A message in a queue, with what the queue knows of its history.
///
/// One of these exists per message per queue, so a backlog of millions costs
/// millions of them (issue 11): the fields are packed into 48 bytes (72 as
/// plain `Option`s) and read through accessors. The store reference is kept
/// as its raw parts, the expiry with a sentinel, and the flags (redelivered,
/// stored, body on disk) in the top bits of the delivery count.
#[derive(Clone)]
pub struct QueuedMessage {
    /// Position in the queue's arrival order; requeued messages go back there.
    pub id: u64,
    pub message: Arc<Message>,
    /// [`StoredRef::id`], when [`STORED`] is set.
    stored_id: u64,
    /// [`StoredRef::segment`] (high half) and [`StoredRef::offset`] (low half).
    stored_at: u64,
    /// When it expires (the lower of queue and message TTL), in ms since the
    /// epoch; [`NO_EXPIRY`] for never.
    expires_at: u64,
    /// How often it came back to the queue (a quorum queue's delivery count,
    /// below [`FLAGS`]), and the flags.
    count_and_flags: u32,
    /// The body's length while the body is only on disk ([`ON_DISK`]).
    disk_len: u32,
}

/// [`QueuedMessage::expires_at`]'s "never".
const NO_EXPIRY: u64 = u64::MAX;
/// Delivered before (and not acknowledged).
const REDELIVERED: u32 = 1 << 31;
/// The message sits in the store (persistent, in a durable queue).
const STORED: u32 = 1 << 30;
/// The body is only on disk (paged out under memory pressure): `message` is
/// a copy without it, and it is read back from the store when handed out.
const ON_DISK: u32 = 1 << 29;
const FLAGS: u32 = REDELIVERED | STORED | ON_DISK;

impl QueuedMessage {
    /// A message new to the queue: never delivered, not stored, no expiry.
    pub fn new(id: u64, message: Arc<Message>) -> Self {
        QueuedMessage {
            id,
            message,
            stored_id: 0,
            stored_at: 0,
            expires_at: NO_EXPIRY,
            count_and_flags: 0,
            disk_len: 0,
        }
    }

    fn flag(&self, flag: u32) -> bool {
        self.count_and_flags & flag != 0
    }

    fn set_flag(&mut self, flag: u32, on: bool) {
        if on {
            self.count_and_flags |= flag;
        } else {
            self.count_and_flags &= !flag;
        }
    }

    /// Delivered before (and not acknowledged).
    pub fn redelivered(&self) -> bool {
        self.flag(REDELIVERED)
    }

    pub fn set_redelivered(&mut self, redelivered: bool) {
        self.set_flag(REDELIVERED, redelivered);
    }

    /// How often it came back to the queue (a quorum queue's delivery count).
    pub fn delivery_count(&self) -> u32 {
        self.count_and_flags & !FLAGS
    }

    /// Sets the delivery count, saturating below the flag bits (half a
    /// billion returns of one message).
    pub fn set_delivery_count(&mut self, count: u32) {
        self.count_and_flags = (self.count_and_flags & FLAGS) | count.min(!FLAGS);
    }

    /// Where the message sits in the store, when it is persistent and the
    /// queue durable.
    pub fn stored(&self) -> Option<StoredRef> {
        self.flag(STORED).then_some(StoredRef {
            id: self.stored_id,
            segment: (self.stored_at >> 32) as u32,
            offset: self.stored_at as u32,
        })
    }

    pub fn set_stored(&mut self, stored: Option<StoredRef>) {
        let s = stored.unwrap_or(StoredRef {
            id: 0,
            segment: 0,
            offset: 0,
        });
        self.stored_id = s.id;
        self.stored_at = (u64::from(s.segment) << 32) | u64::from(s.offset);
        self.set_flag(STORED, stored.is_some());
    }

    /// When it expires, in ms since the epoch.
    pub fn expires_at(&self) -> Option<u64> {
        (self.expires_at != NO_EXPIRY).then_some(self.expires_at)
    }

    /// Sets the expiry (a deadline of `u64::MAX` is as good as none).
    pub fn set_expires_at(&mut self, at: Option<u64>) {
        self.expires_at = at.unwrap_or(NO_EXPIRY);
    }

    /// The body's length when the body is only on disk (paged out): `message`
    /// is then a copy without it.
    pub fn on_disk(&self) -> Option<u32> {
        self.flag(ON_DISK).then_some(self.disk_len)
    }

    pub fn set_on_disk(&mut self, len: Option<u32>) {
        self.disk_len = len.unwrap_or(0);
        self.set_flag(ON_DISK, len.is_some());
    }

    /// The body's length, wherever the body is (what length limits count).
    pub fn body_len(&self) -> usize {
        self.on_disk()
            .map_or_else(|| self.message.body_size(), |len| len as usize)
    }

    /// What the memory alarm counts for this message: its body plus the
    /// per-message overhead while in memory (issue 6: bodies alone let 16-byte
    /// messages grow the broker to gigabytes unnoticed), nothing once paged out.
    pub fn resident(&self) -> usize {
        if self.flag(ON_DISK) {
            0
        } else {
            crate::memory::cost(self.message.body_size())
        }
    }
}

impl std::fmt::Debug for QueuedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuedMessage")
            .field("id", &self.id)
            .field("message", &self.message)
            .field("redelivered", &self.redelivered())
            .field("stored", &self.stored())
            .field("expires_at", &self.expires_at())
            .field("delivery_count", &self.delivery_count())
            .field("on_disk", &self.on_disk())
            .finish()
    }
}

/// Properties fixed at declaration; compared on re-declaration.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct QueueOptions {
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

/// What became of a message offered to a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// In the queue (or already handed to a consumer, or dropped at once by a TTL
    /// of 0 or by drop-head: the publish itself was accepted).
    Accepted,
    /// Waiting for its `x-delay` to pass.
    Delayed,
    /// Refused by `x-overflow` reject-publish(-dlx): a publisher in confirm mode
    /// must get a nack.
    Rejected,
}

/// Ready messages: one FIFO per priority level (a single level without
/// `x-max-priority`), the highest level served first.
#[derive(Debug)]
struct Ready {
    levels: Vec<VecDeque<QueuedMessage>>,
    len: usize,
    /// Body bytes, for `x-max-length-bytes`.
    bytes: usize,
    /// Messages with an expiry: when 0, no expiry work is done at all.
    expiring: usize,
}

impl Ready {
    fn new(max_priority: Option<u8>) -> Self {
        let levels = usize::from(max_priority.unwrap_or(0)) + 1;
        Ready {
            levels: (0..levels).map(|_| VecDeque::new()).collect(),
            len: 0,
            bytes: 0,
            expiring: 0,
        }
    }

    /// RabbitMQ: no `priority` property is priority 0; above the maximum counts
    /// as the maximum.
    fn level_of(&self, m: &Message) -> usize {
        let top = self.levels.len().saturating_sub(1);
        if top == 0 {
            return 0;
        }
        usize::from(m.properties.priority.unwrap_or(0)).min(top)
    }

    fn added(&mut self, m: &QueuedMessage) {
        self.len += 1;
        self.bytes += m.body_len();
        self.expiring += usize::from(m.expires_at().is_some());
    }

    fn removed(&mut self, m: &QueuedMessage) {
        self.len = self.len.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(m.body_len());
        self.expiring = self
            .expiring
            .saturating_sub(usize::from(m.expires_at().is_some()));
    }

    fn push_front(&mut self, m: QueuedMessage) {
        self.added(&m);
        let level = self.level_of(&m.message);
        match self.levels.get_mut(level) {
            Some(q) => q.push_front(m),
            None => self.levels.push(VecDeque::from([m])),
        }
    }

    fn push_back(&mut self, m: QueuedMessage) {
        self.added(&m);
        let level = self.level_of(&m.message);
        match self.levels.get_mut(level) {
            Some(q) => q.push_back(m),
            None => self.levels.push(VecDeque::from([m])),
        }
    }

    /// Puts a returned message back at its original position.
    fn insert_by_id(&mut self, m: QueuedMessage) {
        self.added(&m);
        let level = self.level_of(&m.message);
        match self.levels.get_mut(level) {
            Some(q) => {
                // Usually older than everything ready: a search from the front is short.
                let pos = q.partition_point(|r| r.id < m.id);
                q.insert(pos, m);
            }
            None => self.levels.push(VecDeque::from([m])),
        }
    }

    fn pop_front(&mut self) -> Option<QueuedMessage> {
        let q = self.levels.iter_mut().rev().find(|q| !q.is_empty())?;
        let m = q.pop_front()?;
        give_back_slack(q);
        self.removed(&m);
        Some(m)
    }

    /// Removes expired messages from the head of every level: `deadline <= now`,
    /// or `< now` when `strict` (a TTL of 0 may still be delivered at publish).
    fn pop_expired(&mut self, now: u64, strict: bool, out: &mut Vec<QueuedMessage>) {
        let expired = |m: &QueuedMessage| {
            m.expires_at()
                .is_some_and(|at| if strict { at < now } else { at <= now })
        };
        let mut taken = Vec::new();
        for q in &mut self.levels {
            while q.front().is_some_and(expired) {
                taken.extend(q.pop_front());
            }
            give_back_slack(q);
        }
        for m in &taken {
            self.removed(m);
        }
        out.extend(taken);
    }

    /// The earliest expiry among the heads.
    fn next_expiry(&self) -> u64 {
        if self.expiring == 0 {
            return NEVER;
        }
        self.levels
            .iter()
            .filter_map(|q| q.front().and_then(QueuedMessage::expires_at))
            .min()
            .unwrap_or(NEVER)
    }

    /// Gives every ready message a new expiry, `f(message, current expiry)`,
    /// and recounts the expiring ones.
    fn reexpire(&mut self, f: impl Fn(&Message, Option<u64>) -> Option<u64>) {
        let mut expiring = 0;
        for q in &mut self.levels {
            for m in q.iter_mut() {
                let at = f(&m.message, m.expires_at());
                m.set_expires_at(at);
                expiring += usize::from(at.is_some());
            }
        }
        self.expiring = expiring;
    }

    fn take_all(&mut self) -> Vec<QueuedMessage> {
        let mut all = Vec::with_capacity(self.len);
        for q in self.levels.iter_mut().rev() {
            all.extend(q.drain(..));
            give_back_slack(q);
        }
        self.len = 0;
        self.bytes = 0;
        self.expiring = 0;
        all
    }
}

/// Below this many slots a ready list keeps its capacity: 192 KiB of entries,
/// not worth a copy to give back.
const KEPT_CAPACITY: usize = 4096;

/// Shrinks a ready list that has fallen below a quarter of its capacity to
/// twice its length. A drained backlog otherwise keeps its whole `VecDeque`
/// (48 bytes a slot, 143 MB touched after 3 M messages) until the queue is
/// deleted, and the memory alarm's measure with it. Halving at a quarter
/// leaves room to grow back without another copy soon: the copies cost
/// O(1) per message popped.
fn give_back_slack(q: &mut VecDeque<QueuedMessage>) {
    let capacity = q.capacity();
    if capacity > KEPT_CAPACITY && q.len() < capacity / 4 {
        q.shrink_to((q.len() * 2).max(KEPT_CAPACITY));
    }
}

/// A delayed message, ordered by due time then arrival.
#[derive(Debug)]
struct Delayed {
    due: u64,
    message: QueuedMessage,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.due, self.message.id).cmp(&(other.due, other.message.id))
    }
}

/// A message leaving for good, and why (`None`: dropped without dead-lettering,
/// as a reject-publish refusal is).
type Dead = (QueuedMessage, Option<DeathReason>);

#[derive(Debug)]
struct QueueState {
    /// The effective settings, as [`Queue::settings`] but read under the lock
    /// the message path holds anyway (no second lock per message).
    settings: Arc<QueueSettings>,
    ready: Ready,
    /// Min-heap by due time.
    delayed: BinaryHeap<Reverse<Delayed>>,
    consumers: Vec<Arc<Consumer>>,
    /// Round-robin position in `consumers`.
    next_consumer: usize,
    next_id: u64,
    /// Delivered, not yet settled.
    unacked: usize,
    /// A consumer holds the queue exclusively.
    exclusive_consumer: bool,
    /// Auto-delete only applies once a first consumer has come and gone.
    had_consumer: bool,
    deleted: bool,
    /// Last declaration, basic.get or consumer departure (`x-expires`).
    last_used: u64,
    /// Left the queue in this critical section; buried once the lock is released.
    dead: Vec<Dead>,
    /// Single active consumer: the active one left with deliveries unsettled.
    /// Its successor starts once they are settled or back in the queue, so that
    /// returned messages keep their place ahead of later ones (as in RabbitMQ).
    handover_pending: bool,
    /// Message counters (stats.rs): plain integers, since every path that
    /// bumps them holds this lock already.
    counts: QueueCounts,
}

/// What the vhost gives a queue it creates.
#[derive(Debug, Clone)]
pub(crate) struct QueueEnv {
    pub memory: Arc<MemoryMonitor>,
    pub timers: Arc<Timers>,
    pub home: Weak<VHost>,
}

/// A queue.
#[derive(Debug)]
pub struct Queue {
    pub name: String,
    pub vhost: String,
    pub options: QueueOptions,
    /// Its arguments merged with the policies that apply to it; replaced when a
    /// policy changes ([`Queue::update_settings`]). Read with [`Queue::settings`].
    settings: RwLock<Arc<QueueSettings>>,
    /// The connection that declared an exclusive queue.
    pub owner: Option<u64>,
    state: Mutex<QueueState>,
    memory: Arc<MemoryMonitor>,
    timers: Arc<Timers>,
    /// The vhost, to dead-letter what the queue drops on its own.
    home: Weak<VHost>,
    /// Itself, to dispatch from calls that only have `&self`.
    me: Weak<Queue>,
    /// The store and this queue's id in it, for a durable queue.
    durable: Option<(Arc<dyn Store>, u64)>,
    /// The next moment something timed is due (`NEVER`: nothing), read by the
    /// tick without taking the lock.
    deadline: AtomicU64,
    /// The samples of its counters and lengths (stats.rs), recorded every 5 s.
    pub history: History,
    /// Classic or quorum, from the declared `x-queue-type`.
    kind: QueueType,
    /// Set once for a stream queue (stream_queue.rs): its entry points hand over.
    stream: std::sync::OnceLock<Arc<crate::stream_queue::StreamQueue>>,
    /// Set once for a quorum queue of a cluster (quorum_link.rs): publishes,
    /// acks, returns and consumer credit go through the replicated log.
    quorum: std::sync::OnceLock<Arc<crate::quorum_link::QuorumLink>>,
    /// Whether its consumers have fallen behind, for the connections that
    /// publish into it (flow.rs).
    flow: Arc<flow::Gate>,
}

/// What `basic.get` takes from a queue.
#[derive(Debug)]
pub struct Got {
    pub message: QueuedMessage,
    /// Ready messages left after this one.
    pub remaining: usize,
}

/// A message's delay from its `x-delay` header, when positive.
pub fn delay_of(message: &Message) -> Option<u64> {
    let v = message.properties.headers.as_ref()?.get(DELAY_HEADER)?;
    let ms = v
        .as_i64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))?;
    u64::try_from(ms).ok().filter(|ms| *ms > 0)
}

/// The copy of a delayed message that enters the queue when due: its `x-delay`
/// negated, so that the same message published again as it is (a consumer
/// forwarding it, or after a restart once released) is not delayed twice.
fn released(message: &Arc<Message>) -> Arc<Message> {
    let Some(delay) = delay_of(message) else {
        return message.clone();
    };
    let mut copy = Message::clone(message);
    let headers = copy.properties.headers.get_or_insert_with(FieldTable::new);
    headers.insert(
        DELAY_HEADER,
        FieldValue::I64(0i64.saturating_sub_unsigned(delay)),
    );
    Arc::new(copy)
}

/// A copy of a message without its body, for a message paged out to disk
/// whose properties the queue still reads while it waits (see [`paged`]).
fn without_body(message: &Message) -> Arc<Message> {
    let mut stub = message.clone();
    stub.body = bytes::Bytes::new();
    Arc::new(stub)
}

/// What a message paged out to disk keeps in memory (issue 11: a paged
/// backlog must cost its queue entry, not a copy of every message's headers).
/// The queue reads a waiting message's properties only for its priority level,
/// its per-message TTL (`expiration`) and its `x-delay` (`delayed`); a message
/// needing none of them shares one empty placeholder, and everything else
/// (delivery, peeking, dead-lettering) reads the whole message back from the
/// store first (`Queue::load`).
fn paged(message: &Message, prioritised: bool, delayed: bool) -> Arc<Message> {
    if prioritised || delayed || message.properties.expiration.is_some() {
        without_body(message)
    } else {
        placeholder()
    }
}

/// The one empty message every paged-out entry that needs no properties of
/// its own points at.
fn placeholder() -> Arc<Message> {
    static PLACEHOLDER: std::sync::LazyLock<Arc<Message>> = std::sync::LazyLock::new(|| {
        Message::new(
            "",
            "",
            crate::message::Properties::default(),
            bytes::Bytes::new(),
        )
    });
    PLACEHOLDER.clone()
}

/// Whether a queue reads this message's properties while it waits on disk
/// (what `paged` keeps a body-less copy for): its priority (the level it
/// waits in), its per-message TTL (`expiration`, read again when a policy
/// changes the queue's TTL) or its `x-delay`. Recovery asks this before it
/// knows the queue's settings, so it looks at the message alone: a message
/// without a `priority` waits at level 0 of a priority queue, which is what
/// the placeholder gives it too.
pub fn read_while_paged(message: &Message) -> bool {
    message.properties.priority.is_some()
        || message.properties.expiration.is_some()
        || delay_of(message).is_some()
}

fn with_delivery_count(message: &Message, count: u32) -> Arc<Message> {
    let mut copy = message.clone();
    let headers = copy.properties.headers.get_or_insert_with(FieldTable::new);
    headers.insert(DELIVERY_COUNT_HEADER, FieldValue::I64(i64::from(count)));
    Arc::new(copy)
}

impl Queue {
    pub(crate) fn create(
        name: String,
        vhost: String,
        options: QueueOptions,
        settings: QueueSettings,
        owner: Option<u64>,
        env: QueueEnv,
        durable: Option<(Arc<dyn Store>, u64)>,
    ) -> Arc<Self> {
        let now = env.timers.now_ms();
        // Fixed at declaration (x-queue-type, or the vhost's default queue type).
        let kind = if settings.quorum {
            QueueType::Quorum
        } else {
            QueueType::Classic
        };
        let queue = Arc::new_cyclic(|me| Queue {
            me: me.clone(),
            name,
            vhost,
            options,
            owner,
            state: Mutex::new(QueueState {
                ready: Ready::new(settings.max_priority),
                delayed: BinaryHeap::new(),
                consumers: Vec::new(),
                next_consumer: 0,
                settings: Arc::new(settings.clone()),
                next_id: 0,
                unacked: 0,
                exclusive_consumer: false,
                had_consumer: false,
                deleted: false,
                last_used: now,
                dead: Vec::new(),
                handover_pending: false,
                counts: QueueCounts::default(),
            }),
            settings: RwLock::new(Arc::new(settings)),
            memory: env.memory,
            timers: env.timers,
            home: env.home,
            durable,
            deadline: AtomicU64::new(NEVER),
            history: History::default(),
            kind,
            stream: std::sync::OnceLock::new(),
            quorum: std::sync::OnceLock::new(),
            flow: Arc::default(),
        });
        let st = queue.state.lock();
        queue.refresh_deadline(&st);
        drop(st);
        queue
    }

    /// Its effective settings now (arguments merged with the policies). A read
    /// lock and a reference count: the lock is written only by a policy change.
    pub fn settings(&self) -> Arc<QueueSettings> {
        self.settings.read().clone()
    }

    /// Applies new effective settings (a policy was set, changed or cleared) to
    /// the queue as it is: a lower `max-length`/`max-length-bytes` with
    /// drop-head overflow drops (or dead-letters) the oldest ready messages now;
    /// a new `message-ttl` gives every ready message an expiry at most `ttl` from
    /// `now`, and a lifted one leaves each message only its own `expiration`
    /// (counted from `now`: the queue does not keep arrival times); a new
    /// `expires` restarts its countdown. Returns whether anything changed.
    /// `max-priority` and single-active-consumer are fixed at declaration.
    pub fn update_settings(self: &Arc<Self>, mut new: QueueSettings, now: u64) -> bool {
        let old = self.settings();
        new.max_priority = old.max_priority;
        new.single_active_consumer = old.single_active_consumer;
        new.quorum = old.quorum;
        if *old == new {
            return false;
        }
        let mut st = self.state.lock();
        let shared = Arc::new(new.clone());
        *self.settings.write() = shared.clone();
        st.settings = shared;
        if self.stream().is_some() {
            // A stream keeps no ready list: its limits are its log's retention.
            drop(st);
            self.stream_tick(now);
            return true;
        }
        if old.message_ttl != new.message_ttl {
            st.ready.reexpire(|m, current| {
                let own = m.properties.expiration_ms().map(|e| now.saturating_add(e));
                match new.message_ttl {
                    Some(ttl) => {
                        let by_queue = now.saturating_add(ttl);
                        Some(current.map_or(by_queue, |c| c.min(by_queue)))
                    }
                    None => own,
                }
            });
        }
        if old.expires != new.expires {
            st.last_used = st.last_used.max(now);
        }
        if st.ready.expiring > 0 {
            let mut expired = Vec::new();
            st.ready.pop_expired(now, false, &mut expired);
            st.dead
                .extend(expired.into_iter().map(|m| (m, Some(DeathReason::Expired))));
        }
        if new.has_length_limit() && new.overflow == Overflow::DropHead {
            while new.max_length.is_some_and(|max| st.ready.len as u64 > max)
                || new
                    .max_length_bytes
                    .is_some_and(|max| st.ready.bytes as u64 > max)
            {
                let Some(head) = st.ready.pop_front() else {
                    break;
                };
                st.dead.push((head, Some(DeathReason::MaxLen)));
            }
        }
        // A raised limit may let a held-back consumer go on.
        self.dispatch_locked(&mut st, now);
        self.finish(st, now);
        true
    }

    /// The queue as the management API lists it (a snapshot).
    pub fn info(&self) -> crate::admin::QueueInfo {
        let settings = self.settings();
        let (ready, unacked, delayed, consumers) = match self.stream() {
            Some(s) => (s.message_count(), 0, 0, s.consumer_count()),
            None => {
                let st = self.state.lock();
                (
                    st.ready.len,
                    st.unacked,
                    st.delayed.len(),
                    st.consumers.len(),
                )
            }
        };
        crate::admin::QueueInfo {
            vhost: self.vhost.clone(),
            name: self.name.clone(),
            durable: self.options.durable,
            exclusive: self.options.exclusive,
            auto_delete: self.options.auto_delete,
            arguments: self.options.arguments.clone(),
            queue_type: if self.stream().is_some() {
                "stream"
            } else if settings.quorum {
                "quorum"
            } else {
                "classic"
            }
            .to_owned(),
            policy: settings.policy.clone(),
            operator_policy: settings.operator_policy.clone(),
            owner: self.owner,
            messages_ready: ready,
            messages_unacknowledged: unacked,
            messages_delayed: delayed,
            consumers,
        }
    }

    /// The stream side of a stream queue.
    pub fn stream(&self) -> Option<&Arc<crate::stream_queue::StreamQueue>> {
        self.stream.get()
    }

    /// Makes this (new, durable) queue a stream queue on `log`.
    pub(crate) fn attach_stream(
        self: &Arc<Self>,
        log: Arc<dyn crate::stream::StreamLog>,
        store: Arc<dyn Store>,
    ) {
        let sq = crate::stream_queue::StreamQueue::new(log, Arc::downgrade(self), store);
        let _ = self.stream.set(sq);
        self.stream_tick(self.timers.now_ms());
    }

    /// Applies a stream's retention now and schedules the next check: `max-age`
    /// must work even when nothing is written (RabbitMQ only checks on roll).
    /// The retention in force (arguments and policy, see
    /// [`QueueSettings::max_age_ms`]) is applied first, so a policy set or
    /// cleared takes effect on a live stream at once.
    fn stream_tick(&self, now: u64) {
        let Some(s) = self.stream() else {
            return;
        };
        let settings = self.settings();
        let retention = crate::stream::Retention {
            max_bytes: settings.max_length_bytes,
            max_age_ms: settings.max_age_ms,
        };
        if s.log.retention() != retention {
            s.log.set_retention(retention, now);
        }
        let next = s.enforce_retention(now);
        self.deadline.store(next, Ordering::Release);
        if next != NEVER {
            self.timers.schedule(next);
        }
    }

    /// The queue's id in the store, if it is durable and a store is in use.
    /// The replicated log link of a clustered quorum queue.
    pub fn quorum_link(&self) -> Option<&Arc<crate::quorum_link::QuorumLink>> {
        self.quorum.get()
    }

    /// Makes this queue a clustered quorum queue (once; later calls do nothing).
    pub(crate) fn attach_quorum(&self, link: impl FnOnce() -> Arc<crate::quorum_link::QuorumLink>) {
        let mut made = false;
        self.quorum.get_or_init(|| {
            made = true;
            link()
        });
        if made {
            self.update_window();
        }
    }

    /// What this node's consumers can take, for the quorum credit window.
    fn update_window(&self) {
        let Some(link) = self.quorum.get() else {
            return;
        };
        let window: u64 = {
            let st = self.state.lock();
            st.consumers
                .iter()
                .map(|c| match c.options.prefetch {
                    0 => crate::quorum_link::UNLIMITED_WINDOW,
                    p => u64::from(p),
                })
                .sum()
        };
        if window == 0 {
            link.withdraw(self.take_ready_ids());
        } else {
            link.set_window(window);
        }
    }

    /// Takes every ready message out (a clustered quorum queue giving back
    /// what its node holds undelivered); returns their ids (log indexes).
    pub(crate) fn take_ready_ids(&self) -> Vec<u64> {
        let mut st = self.state.lock();
        let mut out = Vec::new();
        while let Some(m) = st.ready.pop_front() {
            self.memory.sub(m.resident());
            out.push(m.id);
        }
        out
    }

    /// A message the replicated log assigned to this node (a clustered quorum
    /// queue): its id is the log index, so acks map back.
    pub(crate) fn enqueue_assigned(
        self: &Arc<Self>,
        message: Arc<Message>,
        index: u64,
        delivery_count: u32,
    ) {
        let now = self.timers.now_ms();
        let message = if delivery_count > 0 {
            with_delivery_count(&message, delivery_count)
        } else {
            message
        };
        self.memory.add(crate::memory::cost(message.body_size()));
        let mut st = self.state.lock();
        if st.deleted {
            drop(st);
            self.memory.sub(crate::memory::cost(message.body_size()));
            return;
        }
        st.counts.bump(Stat::Publish);
        let expires_at = Self::expiry_of(st.settings.message_ttl, &message, now);
        let mut qm = QueuedMessage::new(index, message);
        qm.set_redelivered(delivery_count > 0);
        qm.set_delivery_count(delivery_count);
        qm.set_expires_at(expires_at);
        st.ready.insert_by_id(qm);
        self.dispatch_locked(&mut st, now);
        self.finish(st, now);
    }

    pub fn store_id(&self) -> Option<u64> {
        self.durable.as_ref().map(|(_, id)| *id)
    }

    /// RabbitMQ's queue type, the `queue_type` label of statistics.
    /// Fixed at declaration (`x-queue-type`; no policy changes it), so it is
    /// read from the declared arguments without the settings lock: the
    /// sessions ask for it on every delivery.
    pub fn queue_type(&self) -> QueueType {
        self.kind
    }

    /// The queue's message counters and lengths now, under one short lock.
    pub fn counters(&self) -> (Snapshot, Lengths) {
        let st = self.state.lock();
        let ready = st.ready.len as u64;
        let unacked = st.unacked as u64;
        (
            st.counts.snapshot(),
            Lengths {
                messages: ready + unacked,
                ready,
                unacked,
            },
        )
    }

    /// RabbitMQ's `message_stats` of this queue: counts now, rates from the
    /// last 5 s sample, `samples` when `range` is given.
    pub fn message_stats(&self, range: Option<Range>) -> MessageStats {
        let (counts, _) = self.counters();
        self.history
            .message_stats(&counts, stats::QUEUE_KEYS, range)
    }

    /// When something timed is next due in this queue (`timer::NEVER`: nothing).
    pub fn deadline(&self) -> u64 {
        self.deadline.load(Ordering::Acquire)
    }

    /// Appends a message and hands out what can be handed out.
    pub fn publish(self: &Arc<Self>, message: Arc<Message>) -> Enqueued {
        self.publish_stored(message, None)
    }

    /// Appends a message the store already holds for this queue (`stored`).
    pub fn publish_stored(
        self: &Arc<Self>,
        message: Arc<Message>,
        stored: Option<StoredRef>,
    ) -> Enqueued {
        let now = self.timers.now_ms();
        self.enqueue(message, stored, None, now)
    }

    /// Offers a message at `now`; `due` delays it until then.
    pub fn enqueue(
        self: &Arc<Self>,
        message: Arc<Message>,
        stored: Option<StoredRef>,
        due: Option<u64>,
        now: u64,
    ) -> Enqueued {
        // Under memory pressure a stored message keeps only its body on disk
        // (RabbitMQ pages to disk at half the watermark too): queues can grow far
        // past RAM while the memory alarm only counts what is really resident.
        let paged_len = u32::try_from(message.body_size())
            .ok()
            .filter(|_| stored.is_some() && self.memory.paging());
        let (message, on_disk) = if let Some(len) = paged_len {
            let prioritised = self.settings().max_priority.is_some();
            let delayed = due.is_some_and(|due| due > now);
            (paged(&message, prioritised, delayed), Some(len))
        } else {
            // Body plus per-message overhead, as `QueuedMessage::resident` (issue 6).
            self.memory.add(crate::memory::cost(message.body_size()));
            (message, None)
        };
        let mut st = self.state.lock();
        if st.deleted {
            drop(st);
            if on_disk.is_none() {
                self.memory.sub(crate::memory::cost(message.body_size()));
            }
            self.forget_stored(stored);
            return Enqueued::Accepted;
        }
        st.counts.bump(Stat::Publish);
        let id = st.next_id;
        st.next_id += 1;
        let mut qm = QueuedMessage::new(id, message);
        qm.set_stored(stored);
        qm.set_on_disk(on_disk);
        let outcome = match due.filter(|due| *due > now) {
            Some(due) => {
                st.delayed.push(Reverse(Delayed { due, message: qm }));
                Enqueued::Delayed
            }
            None => self.accept_locked(&mut st, qm, now, now),
        };
        self.finish(st, now);
        if self.flow.is_behind() {
            // The publishing connection (if one is being recorded) pauses its
            // reads until this queue's consumers catch up.
            flow::note(&self.flow);
        }
        outcome
    }

    /// The expiry of a message entering the queue at `base`.
    fn expiry_of(queue_ttl: Option<u64>, message: &Message, base: u64) -> Option<u64> {
        let ttl = match (queue_ttl, message.properties.expiration_ms()) {
            (Some(q), Some(m)) => Some(q.min(m)),
            (q, m) => q.or(m),
        }?;
        Some(base.saturating_add(ttl))
    }

    /// Takes a message into the ready list (entering at `base`), applying the
    /// length limit and TTL, and dispatches.
    fn accept_locked(
        self: &Arc<Self>,
        st: &mut QueueState,
        mut qm: QueuedMessage,
        base: u64,
        now: u64,
    ) -> Enqueued {
        // Copies of the limits: no reference count touched per message.
        let (limited, overflow, max_length, max_length_bytes) = {
            let s = &st.settings;
            (
                s.has_length_limit(),
                s.overflow,
                s.max_length,
                s.max_length_bytes,
            )
        };
        if limited && overflow != Overflow::DropHead {
            // RabbitMQ's will_overflow: would the ready count or bytes pass the limit?
            let over = max_length.is_some_and(|max| st.ready.len as u64 >= max)
                || max_length_bytes
                    .is_some_and(|max| (st.ready.bytes.saturating_add(qm.body_len())) as u64 > max);
            if over {
                let reason =
                    (overflow == Overflow::RejectPublishDlx).then_some(DeathReason::MaxLen);
                st.dead.push((qm, reason));
                return Enqueued::Rejected;
            }
        }
        qm.set_expires_at(Self::expiry_of(st.settings.message_ttl, &qm.message, base));
        st.ready.push_back(qm);
        self.dispatch_locked(st, now);
        if st.ready.expiring > 0 {
            // A TTL of 0 that no consumer took right away expires now.
            let mut expired = Vec::new();
            st.ready.pop_expired(now, false, &mut expired);
            st.dead
                .extend(expired.into_iter().map(|m| (m, Some(DeathReason::Expired))));
        }
        if limited && overflow == Overflow::DropHead {
            while max_length.is_some_and(|max| st.ready.len as u64 > max)
                || max_length_bytes.is_some_and(|max| st.ready.bytes as u64 > max)
            {
                let Some(head) = st.ready.pop_front() else {
                    break;
                };
                st.dead.push((head, Some(DeathReason::MaxLen)));
            }
        }
        Enqueued::Accepted
    }

    /// Puts messages recovered from the store back, in order, before any new one.
    ///
    /// A message recovery left on disk enters as a paged-out one does at run
    /// time: its entry points at the shared placeholder (or at the body-less
    /// copy recovery kept when [`read_while_paged`]) and it is read from the
    /// store when it is handed out (`Queue::load`). The list is taken from
    /// its back and put at the front of the queue, and given back to the
    /// allocator as it shrinks: a recovered backlog of millions of messages
    /// then never holds both the recovered list and the queue's entries in
    /// full (issue 11).
    pub fn restore(self: &Arc<Self>, mut messages: Vec<RecoveredMessage>) {
        /// Entries taken between two returns of the list's unused room.
        const SHRINK_EVERY: usize = 1 << 16;
        let now = self.timers.now_ms();
        let mut st = self.state.lock();
        let prioritised = st.settings.max_priority.is_some();
        if !prioritised {
            if let Some(level) = st.ready.levels.first_mut() {
                level.reserve(messages.len());
            }
        }
        // Queue order is id order: the last message gets the highest id.
        let mut next = st.next_id.saturating_add(messages.len() as u64);
        st.next_id = next;
        let mut taken = 0usize;
        while let Some(m) = messages.pop() {
            next = next.saturating_sub(1);
            taken += 1;
            if taken.is_multiple_of(SHRINK_EVERY) {
                messages.shrink_to_fit();
            }
            // A compact entry (no message kept) waits on the placeholder as it is.
            let compact = m.message.is_none();
            let message = m.message.unwrap_or_else(placeholder);
            if m.on_disk.is_none() {
                self.memory.add(crate::memory::cost(message.body_size()));
            }
            // The receive time is stored with the message: due times and TTLs
            // continue from it rather than restarting at boot.
            let received = m.received_ms.unwrap_or(now);
            let due = delay_of(&message).map(|d| received.saturating_add(d));
            // The delivery count is not stored: a quorum queue's restarts at boot.
            let mut qm = QueuedMessage::new(next, message);
            qm.set_redelivered(m.redelivered);
            qm.set_stored(Some(m.stored));
            qm.set_on_disk(m.on_disk);
            match due {
                Some(due) if due > now => {
                    st.delayed.push(Reverse(Delayed { due, message: qm }));
                }
                _ => {
                    qm.message = released(&qm.message);
                    qm.set_expires_at(Self::expiry_of(
                        st.settings.message_ttl,
                        &qm.message,
                        due.unwrap_or(received),
                    ));
                    if qm.on_disk().is_some() && !compact {
                        // Recovery gave the properties; nothing reads them now.
                        qm.message = paged(&qm.message, prioritised, false);
                    }
                    st.ready.push_front(qm);
                }
            }
        }
        self.refresh_deadline(&st);
    }

    /// Brings a paged-out body back from the store. A body that cannot be read
    /// (the disk lost it) drops the message, loudly: handing out an empty or
    /// wrong body would be worse.
    fn load(&self, mut m: QueuedMessage) -> Option<QueuedMessage> {
        let Some(len) = m.on_disk() else {
            return Some(m);
        };
        let read = match (&self.durable, m.stored()) {
            (Some((store, _)), Some(stored)) => store.read_message(stored),
            _ => Err(std::io::Error::other("no store reference")),
        };
        match read {
            Ok(full) => {
                // Ready messages are released ones: a stored x-delay must not
                // delay the copy read back.
                m.message = released(&Arc::new(full));
                m.set_on_disk(None);
                self.memory.add(crate::memory::cost(len as usize));
                Some(m)
            }
            Err(e) => {
                tracing::error!(queue = %self.name, vhost = %self.vhost, error = %e, "cannot read a paged-out message back; dropping it");
                self.forget_stored(m.stored());
                None
            }
        }
    }

    /// Tells the store these messages left the queue for good.
    fn forget_stored(&self, stored: impl IntoIterator<Item = StoredRef>) {
        if let Some((store, queue_id)) = &self.durable {
            for s in stored {
                store.append_ack(*queue_id, s);
            }
        }
    }

    /// Tells the store a message was handed out, so a restart marks it redelivered.
    fn note_delivered(&self, message: &QueuedMessage) {
        if let (Some((store, queue_id)), Some(stored), false) =
            (&self.durable, message.stored(), message.redelivered())
        {
            store.append_delivered(*queue_id, stored);
        }
    }

    /// Publishes the queue's next deadline for the timer task. Costs one atomic
    /// load when the queue has nothing timed.
    fn refresh_deadline(&self, st: &QueueState) {
        if self.stream().is_some() {
            // A stream's only deadline is its retention check (stream_tick).
            return;
        }
        let mut next = st.ready.next_expiry();
        if let Some(top) = st.delayed.peek() {
            next = next.min(top.0.due);
        }
        if let Some(expires) = st.settings.expires {
            if st.consumers.is_empty() && !st.deleted {
                next = next.min(st.last_used.saturating_add(expires));
            }
        }
        if next == NEVER && self.deadline.load(Ordering::Relaxed) == NEVER {
            return;
        }
        if self.deadline.swap(next, Ordering::AcqRel) != next && next != NEVER {
            self.timers.schedule(next);
        }
    }

    /// Ends a critical section: publishes the deadline, releases the lock and
    /// buries what left the queue.
    fn finish(&self, mut st: parking_lot::MutexGuard<'_, QueueState>, now: u64) {
        self.refresh_deadline(&st);
        self.flow.update(
            st.ready.len,
            st.ready.bytes,
            !st.consumers.is_empty() && !st.deleted,
        );
        let dead = std::mem::take(&mut st.dead);
        drop(st);
        self.bury(dead, now);
    }

    /// Dead-letters (if the queue has a dead-letter exchange and the reason
    /// allows) and forgets messages that left the queue for good. Called without
    /// the queue's lock: the dead-letter exchange may route back here.
    fn bury(&self, dead: Vec<Dead>, now: u64) {
        if dead.is_empty() {
            return;
        }
        self.memory
            .sub(dead.iter().map(|(m, _)| m.resident()).sum());
        if self.settings().dead_letter_exchange.is_none() && dead.iter().any(|(_, r)| r.is_some()) {
            // Dropped for good: RabbitMQ counts these under strategy `disabled`.
            if let Some(vhost) = self.home.upgrade() {
                for reason in dead.iter().filter_map(|(_, r)| *r) {
                    vhost
                        .dead_lettered
                        .count(self.queue_type(), reason.into(), false);
                }
            }
        }
        if self.settings().dead_letter_exchange.is_some() {
            if let Some(vhost) = self.home.upgrade() {
                for (m, reason) in &dead {
                    if let Some(reason) = reason {
                        let full = match (m.on_disk(), &self.durable, m.stored()) {
                            (Some(_), Some((store, _)), Some(stored)) => {
                                match store.read_message(stored) {
                                    Ok(full) => Arc::new(full),
                                    Err(e) => {
                                        tracing::error!(queue = %self.name, error = %e, "cannot read a paged-out message to dead-letter it");
                                        continue;
                                    }
                                }
                            }
                            _ => m.message.clone(),
                        };
                        vhost.republish_dead(self, &full, *reason, now / 1000, now);
                    }
                }
            }
        }
        self.forget_stored(dead.iter().filter_map(|(m, _)| m.stored()));
        if let Some(link) = self.quorum.get() {
            link.discard(dead.iter().map(|(m, _)| m.id).collect());
        }
    }

    /// Hands ready messages to consumers with credit, round robin, until either
    /// runs out.
    pub fn dispatch(self: &Arc<Self>) {
        if let Some(s) = self.stream() {
            s.dispatch();
            return;
        }
        let now = self.timers.now_ms();
        let mut st = self.state.lock();
        self.dispatch_locked(&mut st, now);
        self.finish(st, now);
    }

    fn dispatch_locked(self: &Arc<Self>, st: &mut QueueState, now: u64) {
        loop {
            if st.ready.expiring > 0 {
                let mut expired = Vec::new();
                st.ready.pop_expired(now, true, &mut expired);
                st.dead
                    .extend(expired.into_iter().map(|m| (m, Some(DeathReason::Expired))));
            }
            if st.ready.len == 0 || st.consumers.is_empty() || st.handover_pending {
                break;
            }
            let chosen = if st.settings.single_active_consumer {
                // Single active consumer: only the first registered one still
                // active gets messages (one being cancelled is passed over).
                st.consumers
                    .iter()
                    .position(|c| c.is_active())
                    .filter(|&i| st.consumers.get(i).is_some_and(|c| c.try_reserve()))
            } else {
                let n = st.consumers.len();
                let found = (0..n)
                    .map(|i| (st.next_consumer + i) % n)
                    .find(|&idx| st.consumers.get(idx).is_some_and(|c| c.try_reserve()));
                if let Some(idx) = found {
                    st.next_consumer = (idx + 1) % n;
                }
                found
            };
            let Some(idx) = chosen else { break };
            let (Some(consumer), Some(message)) =
                (st.consumers.get(idx).cloned(), st.ready.pop_front())
            else {
                break;
            };
            let Some(message) = self.load(message) else {
                consumer.release(1);
                continue;
            };
            if message.redelivered() {
                st.counts.bump(Stat::Redeliver);
            }
            if consumer.no_ack() {
                st.counts.bump(Stat::DeliverNoAck);
                self.memory.sub(message.resident());
                self.forget_stored(message.stored());
                if let Some(link) = self.quorum.get() {
                    link.settle(vec![message.id]);
                }
            } else {
                st.counts.bump(Stat::Deliver);
                st.unacked += 1;
                self.note_delivered(&message);
            }
            consumer.deliver(Delivery {
                consumer: consumer.clone(),
                queue: self.clone(),
                message,
            });
        }
    }

    /// Adds a consumer. `exclusive` consumers need the queue to themselves.
    pub fn add_consumer(self: &Arc<Self>, consumer: Arc<Consumer>) -> CoreResult<()> {
        let now = self.timers.now_ms();
        if let Some(s) = self.stream() {
            return s.add_consumer(consumer, now);
        }
        let mut st = self.state.lock();
        if st.deleted {
            return Err(CoreError::not_found(format!(
                "no queue '{}' in vhost '{}'",
                self.name, self.vhost
            )));
        }
        if st.exclusive_consumer || (consumer.options.exclusive && !st.consumers.is_empty()) {
            return Err(CoreError::access_refused(format!(
                "queue '{}' in vhost '{}' in exclusive use",
                self.name, self.vhost
            )));
        }
        st.exclusive_consumer = consumer.options.exclusive;
        st.had_consumer = true;
        st.consumers.push(consumer);
        self.dispatch_locked(&mut st, now);
        self.finish(st, now);
        self.update_window();
        Ok(())
    }

    /// Removes a consumer. Returns true when the queue is auto-delete and this was
    /// its last consumer, i.e. the caller should delete it.
    pub fn remove_consumer(self: &Arc<Self>, consumer_id: u64) -> bool {
        if let Some(s) = self.stream() {
            // Streams are never auto-delete.
            s.remove_consumer(consumer_id);
            return false;
        }
        let now = self.timers.now_ms();
        let mut st = self.state.lock();
        let before = st.consumers.len();
        let was_active = st
            .consumers
            .iter()
            .find(|c| c.is_active() || c.id == consumer_id)
            .is_some_and(|c| c.id == consumer_id);
        let mut removed = Vec::new();
        st.consumers.retain(|c| {
            let keep = c.id != consumer_id;
            if !keep {
                c.deactivate();
                // Its deliveries still in flight come back through requeue.
                removed.push(c.clone());
            }
            keep
        });
        if st.consumers.len() != before {
            st.exclusive_consumer = false;
            if st.consumers.is_empty() {
                // An unused queue's expiry (`x-expires`) counts from here.
                st.last_used = now;
            }
        }
        if st.next_consumer >= st.consumers.len() {
            st.next_consumer = 0;
        }
        if was_active && st.settings.single_active_consumer {
            // The next registered consumer takes over, at once or once the
            // leaving one's deliveries are settled or returned.
            let unsettled = removed.iter().any(|c| c.in_flight() > 0);
            st.handover_pending = unsettled;
            self.dispatch_locked(&mut st, now);
        }
        let delete =
            self.options.auto_delete && st.had_consumer && st.consumers.is_empty() && !st.deleted;
        self.finish(st, now);
        self.update_window();
        delete
    }

    /// The queue was used (declared again): restarts its `x-expires` countdown.
    pub fn touch(&self, now: u64) {
        if self.settings().expires.is_none() {
            return;
        }
        let mut st = self.state.lock();
        st.last_used = st.last_used.max(now);
        self.finish(st, now);
    }

    /// Takes the first ready message (`basic.get`). With `no_ack` it is settled at once.
    pub fn get(&self, no_ack: bool) -> Option<Got> {
        if self.stream().is_some() {
            // Refused by the adapters (540) before they get here.
            return None;
        }
        let now = self.timers.now_ms();
        let mut st = self.state.lock();
        st.last_used = st.last_used.max(now);
        if st.ready.expiring > 0 {
            let mut expired = Vec::new();
            st.ready.pop_expired(now, true, &mut expired);
            st.dead
                .extend(expired.into_iter().map(|m| (m, Some(DeathReason::Expired))));
        }
        let mut next = None;
        while let Some(m) = st.ready.pop_front() {
            if let Some(loaded) = self.load(m) {
                next = Some(loaded);
                break;
            }
        }
        if next.is_none() {
            st.counts.bump(Stat::GetEmpty);
        }
        let got = next.map(|message| {
            if message.redelivered() {
                st.counts.bump(Stat::Redeliver);
            }
            st.counts
                .bump(if no_ack { Stat::GetNoAck } else { Stat::Get });
            if no_ack {
                self.memory.sub(message.resident());
                self.forget_stored(message.stored());
            } else {
                st.unacked += 1;
                self.note_delivered(&message);
            }
            Got {
                message,
                remaining: st.ready.len,
            }
        });
        self.finish(st, now);
        got
    }

    /// Settles delivered messages for good: acknowledged (counted as `ack`).
    pub fn settle(&self, messages: &[QueuedMessage]) {
        if let Some(s) = self.stream() {
            s.settled(messages);
            return;
        }
        self.settle_counted(messages, true);
    }

    /// Settles delivered messages that were rejected without requeue (they are
    /// dead-lettered or dropped, not acknowledged).
    pub fn settle_rejected(&self, messages: &[QueuedMessage]) {
        if let Some(s) = self.stream() {
            s.settled(messages);
            return;
        }
        self.settle_counted(messages, false);
    }

    fn settle_counted(&self, messages: &[QueuedMessage], acked: bool) {
        if messages.is_empty() {
            return;
        }
        if let Some(link) = self.quorum.get() {
            let ids = messages.iter().map(|m| m.id).collect();
            if acked {
                link.settle(ids);
            } else {
                link.discard(ids);
            }
        }
        let bytes: usize = messages.iter().map(QueuedMessage::resident).sum();
        let resume = {
            let mut st = self.state.lock();
            if acked {
                st.counts.add(Stat::Ack, messages.len() as u64);
            }
            st.unacked = st.unacked.saturating_sub(messages.len());
            std::mem::take(&mut st.handover_pending)
        };
        self.memory.sub(bytes);
        self.forget_stored(messages.iter().filter_map(QueuedMessage::stored));
        if resume {
            if let Some(me) = self.me.upgrade() {
                me.dispatch();
            }
        }
    }

    /// Puts delivered messages back at their original positions, marked
    /// redelivered, and dispatches them again.
    pub fn requeue(self: &Arc<Self>, messages: Vec<QueuedMessage>) {
        let now = self.timers.now_ms();
        self.requeue_at(messages, now);
    }

    /// [`Queue::requeue`] at `now`. A quorum queue counts the return and
    /// dead-letters (reason `delivery_limit`) a message returned more often than
    /// its delivery limit; the others come back with `x-delivery-count`.
    pub fn requeue_at(self: &Arc<Self>, messages: Vec<QueuedMessage>, now: u64) {
        if let Some(s) = self.stream() {
            // A stream never takes a message back: a requeue settles (RabbitMQ).
            s.settled(&messages);
            return;
        }
        if messages.is_empty() {
            return;
        }
        if let Some(link) = self.quorum.get() {
            // The log takes them back (counting the delivery) and hands them
            // out again, here or on another node.
            let resume = {
                let mut st = self.state.lock();
                st.unacked = st.unacked.saturating_sub(messages.len());
                std::mem::take(&mut st.handover_pending)
            };
            self.memory
                .sub(messages.iter().map(QueuedMessage::resident).sum());
            link.return_(messages.iter().map(|m| m.id).collect());
            if resume {
                self.dispatch();
            }
            return;
        }
        let mut st = self.state.lock();
        st.unacked = st.unacked.saturating_sub(messages.len());
        st.handover_pending = false;
        if st.deleted {
            drop(st);
            self.memory
                .sub(messages.iter().map(QueuedMessage::resident).sum());
            self.forget_stored(messages.iter().filter_map(QueuedMessage::stored));
            return;
        }
        let settings = st.settings.clone();
        for mut m in messages {
            m.set_redelivered(true);
            if settings.quorum {
                m.set_delivery_count(m.delivery_count().saturating_add(1));
                if settings
                    .delivery_limit
                    .is_some_and(|limit| u64::from(m.delivery_count()) > limit)
                {
                    st.dead.push((m, Some(DeathReason::DeliveryLimit)));
                    continue;
                }
                m.message = with_delivery_count(&m.message, m.delivery_count());
            }
            st.ready.insert_by_id(m);
        }
        self.dispatch_locked(&mut st, now);
        self.finish(st, now);
    }

    /// Does what is due at `now`: releases due delayed messages, expires heads,
    /// dispatches. Returns true when the queue itself expired (`x-expires`) and
    /// should be deleted.
    pub fn tick(self: &Arc<Self>, now: u64) -> bool {
        if self.stream().is_some() {
            self.stream_tick(now);
            return false;
        }
        let mut st = self.state.lock();
        if st.deleted {
            return false;
        }
        while st.delayed.peek().is_some_and(|d| d.0.due <= now) {
            let Some(Reverse(d)) = st.delayed.pop() else {
                break;
            };
            let mut qm = d.message;
            qm.message = released(&qm.message);
            self.accept_locked(&mut st, qm, d.due, now);
        }
        if st.ready.expiring > 0 {
            let mut expired = Vec::new();
            st.ready.pop_expired(now, false, &mut expired);
            st.dead
                .extend(expired.into_iter().map(|m| (m, Some(DeathReason::Expired))));
        }
        self.dispatch_locked(&mut st, now);
        let expired = st
            .settings
            .expires
            .is_some_and(|e| st.consumers.is_empty() && now >= st.last_used.saturating_add(e));
        self.finish(st, now);
        expired
    }

    /// Drops every ready message; returns how many. Delayed messages stay.
    pub fn purge(&self) -> usize {
        if self.stream().is_some() {
            return 0;
        }
        let now = self.timers.now_ms();
        let mut st = self.state.lock();
        let dropped = st.ready.take_all();
        self.finish(st, now);
        self.memory
            .sub(dropped.iter().map(QueuedMessage::resident).sum());
        self.forget_stored(dropped.iter().filter_map(QueuedMessage::stored));
        dropped.len()
    }

    /// Ready messages (delayed ones are not counted until due).
    pub fn message_count(&self) -> usize {
        if let Some(s) = self.stream() {
            return s.message_count();
        }
        self.state.lock().ready.len
    }

    /// Messages waiting for their delay to pass.
    pub fn delayed_count(&self) -> usize {
        self.state.lock().delayed.len()
    }

    pub fn unacked_count(&self) -> usize {
        self.state.lock().unacked
    }

    /// Whether its consumers have fallen behind, so that connections publishing
    /// into it pause (flow.rs).
    pub fn flow_behind(&self) -> bool {
        self.flow.is_behind()
    }

    pub fn consumer_count(&self) -> usize {
        if let Some(s) = self.stream() {
            return s.consumer_count();
        }
        self.state.lock().consumers.len()
    }

    pub fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }

    /// Marks the queue deleted, drops its messages and tells its consumers they
    /// were cancelled. Returns the number of ready messages it held.
    pub(crate) fn mark_deleted(&self) -> usize {
        if let Some(s) = self.stream() {
            self.state.lock().deleted = true;
            let count = s.message_count();
            for c in s.destroy() {
                c.notify_cancelled();
            }
            return count;
        }
        let (consumers, dropped, delayed) = {
            let mut st = self.state.lock();
            st.deleted = true;
            let out = (
                std::mem::take(&mut st.consumers),
                st.ready.take_all(),
                std::mem::take(&mut st.delayed),
            );
            self.refresh_deadline(&st);
            out
        };
        // Nothing left to wait for: publishers paused on it resume.
        self.flow.set(false);
        let count = dropped.len();
        let delayed: Vec<QueuedMessage> = delayed.into_iter().map(|d| d.0.message).collect();
        self.memory.sub(
            dropped
                .iter()
                .chain(&delayed)
                .map(QueuedMessage::resident)
                .sum(),
        );
        // Acks let the store reclaim the space of a deleted queue's messages.
        self.forget_stored(
            dropped
                .iter()
                .chain(&delayed)
                .filter_map(QueuedMessage::stored),
        );
        for c in &consumers {
            c.notify_cancelled();
        }
        count
    }
}

#[cfg(test)]
mod entry_tests {
    use super::*;
    use crate::message::Properties;

    /// A queue's index costs this per message (issue 11): keep it small.
    #[test]
    fn queued_message_stays_small() {
        assert_eq!(std::mem::size_of::<QueuedMessage>(), 48);
    }

    /// A drained backlog gives its ready list's memory back (issue 11).
    #[test]
    fn a_drained_ready_list_gives_its_slack_back() {
        let message = Message::new("", "k", Properties::default(), "b".into());
        let mut ready = Ready::new(None);
        for id in 0..100_000 {
            ready.push_back(QueuedMessage::new(id, message.clone()));
        }
        let full = ready.levels[0].capacity();
        assert!(full >= 100_000);
        while ready.len > 1_000 {
            ready.pop_front();
        }
        let drained = ready.levels[0].capacity();
        assert!(
            drained <= KEPT_CAPACITY.max(4 * 1_000),
            "capacity {drained} of {full}"
        );
        let order: Vec<u64> = std::iter::from_fn(|| ready.pop_front())
            .map(|m| m.id)
            .collect();
        assert_eq!(order, (99_000..100_000).collect::<Vec<_>>(), "order kept");
        for id in 0..50_000 {
            ready.push_back(QueuedMessage::new(id, message.clone()));
        }
        assert_eq!(ready.take_all().len(), 50_000);
        assert!(ready.levels[0].capacity() <= KEPT_CAPACITY);
    }

    /// The packed fields read back what was set, independently of each other.
    #[test]
    fn packed_fields_round_trip() {
        /// Every packed field, as it reads back.
        type Fields = (bool, Option<StoredRef>, Option<u64>, u32, Option<u32>);
        let fields = |m: &QueuedMessage| -> Fields {
            (
                m.redelivered(),
                m.stored(),
                m.expires_at(),
                m.delivery_count(),
                m.on_disk(),
            )
        };
        let mut m = QueuedMessage::new(7, Message::new("", "k", Properties::default(), "b".into()));
        assert_eq!(fields(&m), (false, None, None, 0, None));
        let at = StoredRef {
            id: u64::MAX - 1,
            segment: u32::MAX,
            offset: 0x8000_0001,
        };
        m.set_stored(Some(at));
        m.set_on_disk(Some(u32::MAX));
        m.set_delivery_count(u32::MAX);
        m.set_expires_at(Some(0));
        assert_eq!(m.stored(), Some(at));
        assert_eq!(m.on_disk(), Some(u32::MAX));
        assert_eq!(m.delivery_count(), !FLAGS, "saturates below the flags");
        assert!(!m.redelivered(), "the count does not spill into the flags");
        assert_eq!(m.expires_at(), Some(0));
        assert_eq!(m.body_len(), u32::MAX as usize);
        assert_eq!(m.resident(), 0);
        m.set_redelivered(true);
        m.set_delivery_count(3);
        m.set_on_disk(None);
        m.set_stored(None);
        m.set_expires_at(None);
        assert_eq!(fields(&m), (true, None, None, 3, None));
        assert_eq!(m.body_len(), 1);
    }
}

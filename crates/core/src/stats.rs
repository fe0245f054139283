//! Message statistics without a statistics database: counters live on the
//! objects themselves and one task samples them every 5 s into small rate rings
//! (LavinMQ's design, MANAGEMENT.md §8), from which RabbitMQ's `message_stats`
//! JSON (`publish`, `publish_details.rate`, optional `samples`) is computed on
//! demand.
//!
//! # Counters, and where each is bumped
//!
//! | object | counters | where | how |
//! |---|---|---|---|
//! | queue | `publish` | [`crate::queue::Queue::enqueue`] | plain `u64` under the queue lock the path holds anyway |
//! | queue | `deliver`, `deliver_no_ack`, `redeliver` | `Queue::dispatch_locked` | same |
//! | queue | `get`, `get_no_ack`, `get_empty`, `redeliver` | [`crate::queue::Queue::get`] | same |
//! | queue | `ack` | [`crate::queue::Queue::settle`] (ack, MQTT PUBACK/PUBREC, STOMP ACK) | same |
//! | exchange | `publish_in` (1 per message), `publish_out` (1 per queue reached) | [`crate::vhost::VHost::route`] | relaxed `fetch_add` next to the bindings lock routing already takes |
//! | vhost | `queues_declared/created/deleted` | `VHost::declare_queue`, `VHost::remove_queue` | relaxed atomics (not per message) |
//! | source (AMQP channel, MQTT/STOMP session) | `publish`, `confirm`, `return_unroutable`, `drop_unroutable`, `deliver*`, `get*`, `ack`, `redeliver`, message sizes, octets | the protocol sessions | single-writer: relaxed load + store, no lock prefix, on memory only that session's task writes |
//! | node | `dead_lettered` per reason and strategy, connections/channels opened/closed | `Queue::bury`, `VHost::republish_dead`, sessions | relaxed atomics (not on the common path) |
//!
//! Why queue counters are plain integers under the queue's mutex rather than
//! atomics: every path that bumps them already holds that lock, so the
//! increment costs nothing more than a store to a cache line the core owns at
//! that moment; readers (the sampler, the API) take the lock briefly, as they
//! do for the queue's length.
//!
//! Derived totals (no per-message cost): a vhost is the sum of its queues and
//! exchanges (plus what deleted ones counted, folded in at deletion) and of the
//! sources in it; the node is the sum of its vhosts; a protocol is the sum of
//! its sources plus what closed ones counted. The sampler computes them every
//! [`SAMPLE_INTERVAL_MS`] ([`crate::Broker::sample_stats`]).
//!
//! # Rings
//!
//! Each object has a [`History`]: the last sample (for `rate`) and, only while
//! the object is active, a ring of up to [`RING_LEN`] samples (10 minutes at
//! 5 s) for `samples`/`avg_rate`. An object idle for the whole window drops its
//! ring, so 10,000 idle queues cost a few hundred bytes each; one that never
//! counted anything keeps only the times of its (all-zero) samples.
//!
//! A source allocates its counters at its first count (bytes on the wire are
//! kept apart, as every connection counts its handshake), so the sources of
//! an idle connection (an MQTT or STOMP session, an AMQP connection and its
//! channels) cost about 200 bytes each rather than 850, and still list with
//! zeros wherever RabbitMQ shows them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use serde::ser::{SerializeMap, SerializeStruct};
use serde::Serialize;

/// How often the sampler records every object's counters.
pub const SAMPLE_INTERVAL_MS: u64 = 5_000;
/// Samples kept per active object: 10 minutes at 5 s.
pub const RING_LEN: usize = 120;

/// The message counters, as RabbitMQ names them in `message_stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Stat {
    Publish,
    PublishIn,
    PublishOut,
    Confirm,
    Deliver,
    DeliverNoAck,
    Get,
    GetNoAck,
    GetEmpty,
    Ack,
    Redeliver,
    ReturnUnroutable,
    DropUnroutable,
    /// Bytes received / sent on the wire (connections, sources, vhosts, node).
    RecvOct,
    SendOct,
    /// Publishes on a channel in confirm mode (Prometheus
    /// `messages_received_confirm_total`; not a `message_stats` key).
    PublishConfirm,
}

/// Number of [`Stat`]s.
pub const N_STATS: usize = 16;

impl Stat {
    pub const ALL: [Stat; N_STATS] = [
        Stat::Publish,
        Stat::PublishIn,
        Stat::PublishOut,
        Stat::Confirm,
        Stat::Deliver,
        Stat::DeliverNoAck,
        Stat::Get,
        Stat::GetNoAck,
        Stat::GetEmpty,
        Stat::Ack,
        Stat::Redeliver,
        Stat::ReturnUnroutable,
        Stat::DropUnroutable,
        Stat::RecvOct,
        Stat::SendOct,
        Stat::PublishConfirm,
    ];

    /// The key in RabbitMQ's `message_stats` (octets are connection fields,
    /// `recv_oct`/`send_oct`).
    pub fn name(self) -> &'static str {
        match self {
            Stat::Publish => "publish",
            Stat::PublishIn => "publish_in",
            Stat::PublishOut => "publish_out",
            Stat::Confirm => "confirm",
            Stat::Deliver => "deliver",
            Stat::DeliverNoAck => "deliver_no_ack",
            Stat::Get => "get",
            Stat::GetNoAck => "get_no_ack",
            Stat::GetEmpty => "get_empty",
            Stat::Ack => "ack",
            Stat::Redeliver => "redeliver",
            Stat::ReturnUnroutable => "return_unroutable",
            Stat::DropUnroutable => "drop_unroutable",
            Stat::RecvOct => "recv_oct",
            Stat::SendOct => "send_oct",
            Stat::PublishConfirm => "publish_confirm",
        }
    }

    fn idx(self) -> usize {
        self as usize
    }
}

/// A copy of an object's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot(pub [u64; N_STATS]);

impl Snapshot {
    pub fn get(&self, s: Stat) -> u64 {
        self.0.get(s.idx()).copied().unwrap_or(0)
    }

    pub fn set(&mut self, s: Stat, v: u64) {
        if let Some(x) = self.0.get_mut(s.idx()) {
            *x = v;
        }
    }

    /// Adds one to a counter (for counters kept under a lock).
    #[inline]
    pub fn bump(&mut self, s: Stat) {
        self.add(s, 1);
    }

    #[inline]
    pub fn add(&mut self, s: Stat, n: u64) {
        if let Some(x) = self.0.get_mut(s.idx()) {
            *x = x.wrapping_add(n);
        }
    }

    pub fn merge(&mut self, other: &Snapshot) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a = a.wrapping_add(*b);
        }
    }

    /// RabbitMQ's `deliver_get`: every message handed out, by consume or get.
    pub fn deliver_get(&self) -> u64 {
        self.get(Stat::Deliver)
            + self.get(Stat::DeliverNoAck)
            + self.get(Stat::Get)
            + self.get(Stat::GetNoAck)
    }
}

/// A queue's counters, kept under its lock: the eight queue keys in one
/// 64-byte cache line (a full [`Snapshot`] would spread them over two or
/// three lines, each moving between the publisher's and the consumer's core).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct QueueCounts([u64; 8]);

impl QueueCounts {
    fn slot(s: Stat) -> Option<usize> {
        Some(match s {
            Stat::Publish => 0,
            Stat::Deliver => 1,
            Stat::DeliverNoAck => 2,
            Stat::Get => 3,
            Stat::GetNoAck => 4,
            Stat::GetEmpty => 5,
            Stat::Ack => 6,
            Stat::Redeliver => 7,
            _ => return None,
        })
    }

    #[inline]
    pub fn bump(&mut self, s: Stat) {
        self.add(s, 1);
    }

    #[inline]
    pub fn add(&mut self, s: Stat, n: u64) {
        if let Some(x) = Self::slot(s).and_then(|i| self.0.get_mut(i)) {
            *x = x.wrapping_add(n);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut out = Snapshot::default();
        for s in QUEUE_KEYS {
            if let Some(v) = Self::slot(*s).and_then(|i| self.0.get(i)) {
                out.set(*s, *v);
            }
        }
        out
    }
}

/// Counters as atomics, for objects read without a lock.
#[derive(Debug, Default)]
pub struct Counters([AtomicU64; N_STATS]);

impl Counters {
    /// Adds `n`; any number of writers.
    #[inline]
    pub fn add(&self, s: Stat, n: u64) {
        if let Some(c) = self.0.get(s.idx()) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Adds `n` when only one task ever writes these counters (an AMQP channel,
    /// an MQTT or STOMP session): a relaxed load and store, no locked
    /// instruction. Readers on other threads see a value at most a moment old.
    #[inline]
    pub fn add_local(&self, s: Stat, n: u64) {
        if let Some(c) = self.0.get(s.idx()) {
            c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        }
    }

    pub fn get(&self, s: Stat) -> u64 {
        self.0.get(s.idx()).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut out = Snapshot::default();
        for (o, c) in out.0.iter_mut().zip(self.0.iter()) {
            *o = c.load(Ordering::Relaxed);
        }
        out
    }
}

/// Queue-length gauges recorded with each sample: `messages`, `messages_ready`,
/// `messages_unacknowledged` (zero for objects without messages).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lengths {
    pub messages: u64,
    pub ready: u64,
    pub unacked: u64,
}

impl Lengths {
    pub fn merge(&mut self, o: &Lengths) {
        self.messages += o.messages;
        self.ready += o.ready;
        self.unacked += o.unacked;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    at: u64,
    counters: Snapshot,
    lengths: Lengths,
}

/// An object's samples: the last two (for `rate`) always, the ring only while
/// the object is active.
///
/// While every sample so far was all zeros (an idle connection's channels,
/// an unused queue), only the times of the last two are kept, and the samples
/// themselves (about 370 bytes) are allocated at the first non-zero one: the
/// zeros are then filled in as they were taken, so rates, samples and rings
/// come out exactly as if they had been kept all along.
#[derive(Debug, Default)]
pub struct History(Mutex<HistoryCell>);

#[derive(Debug)]
struct HistoryCell {
    /// When the last two all-zero samples were taken (`NO_SAMPLE`: none),
    /// while `full` is `None`.
    zero_prev_at: u64,
    zero_last_at: u64,
    full: Option<Box<HistoryInner>>,
}

const NO_SAMPLE: u64 = u64::MAX;

impl Default for HistoryCell {
    fn default() -> Self {
        HistoryCell {
            zero_prev_at: NO_SAMPLE,
            zero_last_at: NO_SAMPLE,
            full: None,
        }
    }
}

impl HistoryCell {
    /// The all-zero samples kept as times only, as a [`HistoryInner`].
    fn zeros(&self) -> HistoryInner {
        let zero = |at: u64| {
            (at != NO_SAMPLE).then(|| Sample {
                at,
                counters: Snapshot::default(),
                lengths: Lengths::default(),
            })
        };
        HistoryInner {
            prev: zero(self.zero_prev_at),
            last: zero(self.zero_last_at),
            ring: None,
        }
    }

    /// Calls `f` with the samples, whichever way they are kept.
    fn with<R>(&self, f: impl FnOnce(&HistoryInner) -> R) -> R {
        match &self.full {
            Some(full) => f(full),
            None => f(&self.zeros()),
        }
    }
}

#[derive(Debug, Default)]
struct HistoryInner {
    prev: Option<Sample>,
    last: Option<Sample>,
    ring: Option<VecDeque<Sample>>,
}

/// Which samples to return, as RabbitMQ's `msg_rates_age`/`msg_rates_incr`
/// (and `lengths_*`, `data_rates_*`) query parameters ask, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub age_ms: u64,
    pub incr_ms: u64,
}

/// One `*_details` object: `{"rate": r}`, with `samples`, `avg` and `avg_rate`
/// when a range was asked for.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Details {
    pub rate: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<Vec<Point>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avg_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avg: Option<f64>,
}

/// One sample: the cumulative count (or length) at `timestamp` (ms since the
/// epoch), newest first as RabbitMQ sends them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub sample: u64,
    pub timestamp: u64,
}

fn rate_between(a: &Sample, b: &Sample, f: impl Fn(&Sample) -> u64) -> f64 {
    let dt = b.at.saturating_sub(a.at);
    if dt == 0 {
        return 0.0;
    }
    let dv = f(b).saturating_sub(f(a));
    // Counts and milliseconds both fit an f64's 53 bits for centuries.
    #[allow(clippy::cast_precision_loss)]
    let r = dv as f64 * 1000.0 / dt as f64;
    r
}

impl History {
    /// Records a sample taken at `now` (ms since the epoch). Called by the
    /// sampler only.
    pub fn record(&self, now: u64, counters: Snapshot, lengths: Lengths) {
        let mut cell = self.0.lock();
        if cell.full.is_none() {
            if counters == Snapshot::default() && lengths == Lengths::default() {
                // Still nothing: shift the times (a zero sample never starts a
                // ring, as the samples before it were zeros too).
                cell.zero_prev_at = cell.zero_last_at;
                cell.zero_last_at = now;
                return;
            }
            let zeros = cell.zeros_taken();
            cell.full = Some(Box::new(zeros));
        }
        if let Some(h) = cell.full.as_mut() {
            h.record(now, counters, lengths);
        }
    }
}

impl HistoryCell {
    /// [`HistoryCell::zeros`], leaving no times behind.
    fn zeros_taken(&mut self) -> HistoryInner {
        let inner = self.zeros();
        self.zero_prev_at = NO_SAMPLE;
        self.zero_last_at = NO_SAMPLE;
        inner
    }
}

impl HistoryInner {
    fn record(&mut self, now: u64, counters: Snapshot, lengths: Lengths) {
        let sample = Sample {
            at: now,
            counters,
            lengths,
        };
        let h = self;
        // The first sample only sets the baseline; a ring starts with the
        // first change.
        let changed = h
            .last
            .is_some_and(|l| l.counters != counters || l.lengths != lengths);
        if changed && h.ring.is_none() {
            let mut ring = VecDeque::with_capacity(RING_LEN);
            ring.extend(h.last);
            h.ring = Some(ring);
        }
        if let Some(ring) = h.ring.as_mut() {
            if ring.len() >= RING_LEN {
                ring.pop_front();
            }
            ring.push_back(sample);
            // Idle for the whole window: keep only the last two samples.
            let idle = ring.len() >= RING_LEN
                && ring
                    .iter()
                    .all(|s| s.counters == counters && s.lengths == lengths);
            if idle {
                h.ring = None;
            }
        }
        h.prev = h.last.replace(sample);
    }

    /// `*_details` for one value, with samples when `range` is given.
    fn details(&self, range: Option<Range>, f: impl Fn(&Sample) -> u64) -> Details {
        let h = self;
        let rate = match (&h.prev, &h.last) {
            (Some(a), Some(b)) => rate_between(a, b, &f),
            _ => 0.0,
        };
        let Some(range) = range else {
            return Details {
                rate,
                ..Details::default()
            };
        };
        let Some(last) = h.last else {
            return Details {
                rate,
                samples: Some(Vec::new()),
                avg_rate: Some(0.0),
                avg: Some(0.0),
            };
        };
        let from = last.at.saturating_sub(range.age_ms);
        let incr = range.incr_ms.max(SAMPLE_INTERVAL_MS);
        let mut points: Vec<&Sample> = Vec::new();
        let iter: Box<dyn Iterator<Item = &Sample>> = match &h.ring {
            Some(ring) => Box::new(ring.iter().rev()),
            None => Box::new(h.last.iter().chain(h.prev.iter())),
        };
        let mut next_at = u64::MAX;
        for s in iter {
            if s.at < from {
                break;
            }
            // Newest first, one per `incr`.
            if s.at <= next_at {
                points.push(s);
                next_at = s.at.saturating_sub(incr);
            }
        }
        let avg_rate = match (points.last(), points.first()) {
            (Some(oldest), Some(newest)) => rate_between(oldest, newest, &f),
            _ => 0.0,
        };
        #[allow(clippy::cast_precision_loss)]
        let avg = if points.is_empty() {
            0.0
        } else {
            points.iter().map(|s| f(s) as f64).sum::<f64>() / points.len() as f64
        };
        Details {
            rate,
            samples: Some(
                points
                    .iter()
                    .map(|s| Point {
                        sample: f(s),
                        timestamp: s.at,
                    })
                    .collect(),
            ),
            avg_rate: Some(avg_rate),
            avg: Some(avg),
        }
    }
}

impl History {
    /// The per-second rate of one value between the last two samples.
    fn rate(&self, f: impl Fn(&Sample) -> u64) -> f64 {
        self.0.lock().with(|h| match (&h.prev, &h.last) {
            (Some(a), Some(b)) => rate_between(a, b, f),
            _ => 0.0,
        })
    }

    /// `*_details` for one value, with samples when `range` is given.
    fn details(&self, range: Option<Range>, f: impl Fn(&Sample) -> u64) -> Details {
        self.0.lock().with(|h| h.details(range, f))
    }

    /// The rate of one counter (per second, over the last sample interval).
    pub fn rate_of(&self, s: Stat) -> f64 {
        self.rate(|x| x.counters.get(s))
    }

    /// RabbitMQ's `message_stats` for `current` counters (read now, so counts
    /// are exact while rates are as of the last sample), showing the keys in
    /// `keys` that had some activity.
    pub fn message_stats(
        &self,
        current: &Snapshot,
        keys: &'static [Stat],
        range: Option<Range>,
    ) -> MessageStats {
        let mut entries = Vec::new();
        for &k in keys {
            let count = current.get(k);
            if count > 0 {
                entries.push((k.name(), count, self.details(range, |x| x.counters.get(k))));
            }
        }
        let deliver_get_wanted = keys.contains(&Stat::Deliver);
        if deliver_get_wanted && current.deliver_get() > 0 {
            entries.push((
                "deliver_get",
                current.deliver_get(),
                self.details(range, |x| x.counters.deliver_get()),
            ));
        }
        MessageStats { entries }
    }

    /// `messages_details`, `messages_ready_details`,
    /// `messages_unacknowledged_details` of a queue (or vhost, or the node).
    pub fn length_details(&self, range: Option<Range>) -> LengthDetails {
        LengthDetails {
            messages_details: self.details(range, |x| x.lengths.messages),
            messages_ready_details: self.details(range, |x| x.lengths.ready),
            messages_unacknowledged_details: self.details(range, |x| x.lengths.unacked),
        }
    }

    /// `*_details` of one counter (e.g. `recv_oct_details` of a connection).
    pub fn counter_details(&self, s: Stat, range: Option<Range>) -> Details {
        self.details(range, |x| x.counters.get(s))
    }

    /// Whether this history keeps a ring now (for tests and memory accounting).
    pub fn has_ring(&self) -> bool {
        self.0
            .lock()
            .full
            .as_ref()
            .is_some_and(|h| h.ring.is_some())
    }

    /// Whether the samples are allocated (some sample was not all zeros).
    pub fn is_allocated(&self) -> bool {
        self.0.lock().full.is_some()
    }

    /// The last sampled counters and lengths (zero before the first sample).
    pub fn last(&self) -> (Snapshot, Lengths) {
        self.0
            .lock()
            .full
            .as_ref()
            .and_then(|h| h.last)
            .map_or_else(Default::default, |s| (s.counters, s.lengths))
    }
}

/// The keys a queue shows in `message_stats`.
pub const QUEUE_KEYS: &[Stat] = &[
    Stat::Publish,
    Stat::Deliver,
    Stat::DeliverNoAck,
    Stat::Get,
    Stat::GetNoAck,
    Stat::GetEmpty,
    Stat::Ack,
    Stat::Redeliver,
];
/// The keys an exchange shows.
pub const EXCHANGE_KEYS: &[Stat] = &[Stat::PublishIn, Stat::PublishOut];
/// The keys a channel (and an MQTT/STOMP session) shows.
pub const CHANNEL_KEYS: &[Stat] = &[
    Stat::Publish,
    Stat::Confirm,
    Stat::ReturnUnroutable,
    Stat::DropUnroutable,
    Stat::Deliver,
    Stat::DeliverNoAck,
    Stat::Get,
    Stat::GetNoAck,
    Stat::GetEmpty,
    Stat::Ack,
    Stat::Redeliver,
];
/// The keys a vhost and the overview show.
pub const TOTAL_KEYS: &[Stat] = CHANNEL_KEYS;

/// RabbitMQ's `message_stats` object: `{"publish": n, "publish_details":
/// {"rate": r}, ...}` with only the keys that saw activity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageStats {
    entries: Vec<(&'static str, u64, Details)>,
}

impl MessageStats {
    /// The count of one key (`"publish"`, `"deliver_get"`...), if shown.
    pub fn count(&self, key: &str) -> Option<u64> {
        self.entries.iter().find(|e| e.0 == key).map(|e| e.1)
    }

    /// The rate of one key, 0 when not shown.
    pub fn rate(&self, key: &str) -> f64 {
        self.entries
            .iter()
            .find(|e| e.0 == key)
            .map_or(0.0, |e| e.2.rate)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Serialize for MessageStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.entries.len() * 2))?;
        for (name, count, details) in &self.entries {
            m.serialize_entry(name, count)?;
            m.serialize_entry(&DetailsKey(name), details)?;
        }
        m.end()
    }
}

/// Serialises as `<name>_details` without allocating.
struct DetailsKey<'a>(&'a str);

impl Serialize for DetailsKey<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}_details", self.0))
    }
}

/// The three length `*_details` of a queue, vhost or node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LengthDetails {
    pub messages_details: Details,
    pub messages_ready_details: Details,
    pub messages_unacknowledged_details: Details,
}

impl Serialize for LengthDetails {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("LengthDetails", 3)?;
        st.serialize_field("messages_details", &self.messages_details)?;
        st.serialize_field("messages_ready_details", &self.messages_ready_details)?;
        st.serialize_field(
            "messages_unacknowledged_details",
            &self.messages_unacknowledged_details,
        )?;
        st.end()
    }
}

// ---- protocols and sources ----

/// The protocol label of RabbitMQ's global counters (`protocol="amqp091"`...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Protocol {
    Amqp091,
    Mqtt310,
    Mqtt311,
    Mqtt50,
    Stomp10,
    Stomp11,
    Stomp12,
}

pub const N_PROTOCOLS: usize = 7;

impl Protocol {
    pub const ALL: [Protocol; N_PROTOCOLS] = [
        Protocol::Amqp091,
        Protocol::Mqtt310,
        Protocol::Mqtt311,
        Protocol::Mqtt50,
        Protocol::Stomp10,
        Protocol::Stomp11,
        Protocol::Stomp12,
    ];

    /// rabbitmq_prometheus's label value (RS `rabbit_global_counters.erl`,
    /// `rabbit_mqtt.hrl`, `rabbit_stomp.hrl`).
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Amqp091 => "amqp091",
            Protocol::Mqtt310 => "mqtt310",
            Protocol::Mqtt311 => "mqtt311",
            Protocol::Mqtt50 => "mqtt50",
            Protocol::Stomp10 => "STOMP 1.0",
            Protocol::Stomp11 => "STOMP 1.1",
            Protocol::Stomp12 => "STOMP 1.2",
        }
    }

    fn idx(self) -> usize {
        self as usize
    }
}

/// RabbitMQ's queue types, the `queue_type` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum QueueType {
    Classic,
    Quorum,
}

impl QueueType {
    pub const ALL: [QueueType; 2] = [QueueType::Classic, QueueType::Quorum];

    pub fn label(self) -> &'static str {
        match self {
            QueueType::Classic => "rabbit_classic_queue",
            QueueType::Quorum => "rabbit_quorum_queue",
        }
    }
}

/// `rabbitmq_message_size_bytes` bucket bounds (RS `rabbit_msg_size_metrics.erl`).
pub const SIZE_BUCKETS: [u64; 8] = [
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
];

/// The counters of one publishing/consuming context: an AMQP channel, or an
/// MQTT or STOMP session. Written by its session's task only (single writer,
/// [`Counters::add_local`]); read by anyone.
#[derive(Debug)]
pub struct Source {
    pub id: u64,
    pub protocol: Protocol,
    /// The broker-wide id of its connection (the session's id).
    pub connection: u64,
    /// The AMQP channel number (0 for MQTT and STOMP).
    pub channel: u16,
    pub vhost: String,
    /// An AMQP channel (counted in `rabbitmq_channels`); MQTT and STOMP
    /// sessions are not.
    pub is_channel: bool,
    /// The counters, allocated at the first count: an idle connection's
    /// sources (10,000 idle MQTT clients, two idle AMQP channels each...) then
    /// cost about 200 bytes each instead of 850; an absent block reads as
    /// zeros everywhere (listings, totals, Prometheus).
    counts: OnceLock<Box<SourceCounts>>,
    /// Bytes received and sent (`RecvOct`, `SendOct`): counted from the first
    /// frame on, so kept here rather than in `counts`.
    recv_oct: AtomicU64,
    send_oct: AtomicU64,
    /// Consumers open now (a gauge set by the session).
    consumers: AtomicU64,
    /// The channel's settings and in-flight counts (gauges the session
    /// publishes after each batch it handles; see [`ChannelState`]).
    state: [AtomicU64; 8],
    pub history: History,
}

/// A [`Source`]'s counters (single writer: its session's task).
#[derive(Debug, Default)]
struct SourceCounts {
    /// Publish-side counters and counters of classic queues.
    classic: Counters,
    /// Delivery-side counters of quorum queues.
    quorum: Counters,
    /// Message sizes received, per bucket of [`SIZE_BUCKETS`] (+Inf last).
    sizes: [AtomicU64; 9],
    size_sum: AtomicU64,
}

impl SourceCounts {
    fn counters(&self, qt: QueueType) -> &Counters {
        match qt {
            QueueType::Classic => &self.classic,
            QueueType::Quorum => &self.quorum,
        }
    }

    fn sizes(&self) -> SizeHistogram {
        let mut h = SizeHistogram::default();
        for (o, c) in h.buckets.iter_mut().zip(self.sizes.iter()) {
            *o = c.load(Ordering::Relaxed);
        }
        h.sum = self.size_sum.load(Ordering::Relaxed);
        h
    }
}

/// What `/api/channels` shows of a channel beyond its counters: its settings
/// and what it has in flight. The session owns the real state; it copies it
/// here with [`Source::set_state`] once per read batch or outbox drain
/// (single writer: eight relaxed stores, no lock), so a listing is at most one
/// batch old.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelState {
    /// Per-consumer prefetch (AMQP `basic.qos` global=false; MQTT: the
    /// in-flight window; STOMP: the largest subscription's `prefetch-count`).
    pub prefetch_count: u64,
    /// Channel-wide prefetch (AMQP `basic.qos` global=true).
    pub global_prefetch_count: u64,
    /// Publisher confirms on (AMQP `confirm.select`; MQTT: QoS 1/2 publishes
    /// are acknowledged once routed and stored).
    pub confirm: bool,
    /// Transactions on (AMQP `tx.select`; STOMP: a BEGIN is open).
    pub transactional: bool,
    /// Deliveries awaiting the client's ack.
    pub messages_unacknowledged: u64,
    /// Publishes not yet confirmed to the client.
    pub messages_unconfirmed: u64,
    /// Publishes / acks held by an open transaction.
    pub messages_uncommitted: u64,
    pub acks_uncommitted: u64,
}

impl Source {
    /// The counters, allocated now if nothing was counted yet (the writer's
    /// side: only the session's task counts).
    #[inline]
    fn counts_mut(&self) -> &SourceCounts {
        self.counts.get_or_init(Box::default)
    }

    /// A snapshot of one queue type's counters (zeros before the first count);
    /// octets count on the publish side.
    fn counters_snapshot(&self, qt: QueueType) -> Snapshot {
        let mut s = self
            .counts
            .get()
            .map_or_else(Snapshot::default, |c| c.counters(qt).snapshot());
        if qt == QueueType::Classic {
            s.add(Stat::RecvOct, self.recv_oct.load(Ordering::Relaxed));
            s.add(Stat::SendOct, self.send_oct.load(Ordering::Relaxed));
        }
        s
    }

    /// Counts `n` of a publish-side stat (publish, confirm, unroutable, octets).
    #[inline]
    pub fn add(&self, s: Stat, n: u64) {
        if n == 0 {
            return;
        }
        let octets = match s {
            Stat::RecvOct => &self.recv_oct,
            Stat::SendOct => &self.send_oct,
            _ => return self.counts_mut().classic.add_local(s, n),
        };
        // Single writer (see `Counters::add_local`).
        octets.store(
            octets.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Counts a delivery-side stat for a queue of type `qt`.
    #[inline]
    pub fn add_for(&self, qt: QueueType, s: Stat, n: u64) {
        if n == 0 {
            return;
        }
        self.counts_mut().counters(qt).add_local(s, n);
    }

    /// Counts one received message of `size` bytes (publish + size histogram).
    #[inline]
    pub fn published(&self, size: usize) {
        let counts = self.counts_mut();
        counts.classic.add_local(Stat::Publish, 1);
        let size = size as u64;
        let bucket = SIZE_BUCKETS
            .iter()
            .position(|&b| size <= b)
            .unwrap_or(SIZE_BUCKETS.len());
        if let Some(c) = counts.sizes.get(bucket) {
            c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        counts.size_sum.store(
            counts.size_sum.load(Ordering::Relaxed).wrapping_add(size),
            Ordering::Relaxed,
        );
    }

    /// Whether anything was counted yet (the counters are allocated).
    pub fn has_counts(&self) -> bool {
        self.counts.get().is_some()
    }

    pub fn set_consumers(&self, n: usize) {
        self.consumers.store(n as u64, Ordering::Relaxed);
    }

    pub fn consumers(&self) -> u64 {
        self.consumers.load(Ordering::Relaxed)
    }

    /// Publishes the channel's [`ChannelState`] (single writer: its session).
    #[inline]
    pub fn set_state(&self, st: &ChannelState) {
        let values = [
            st.prefetch_count,
            st.global_prefetch_count,
            u64::from(st.confirm),
            u64::from(st.transactional),
            st.messages_unacknowledged,
            st.messages_unconfirmed,
            st.messages_uncommitted,
            st.acks_uncommitted,
        ];
        for (slot, v) in self.state.iter().zip(values) {
            // Skip the store when nothing changed: the line then stays shared
            // with readers instead of being invalidated on every batch.
            if slot.load(Ordering::Relaxed) != v {
                slot.store(v, Ordering::Relaxed);
            }
        }
    }

    /// An MQTT or STOMP session: the one channel of its connection.
    pub fn protocol_is_session(&self) -> bool {
        self.protocol != Protocol::Amqp091
    }

    /// The channel's last published [`ChannelState`].
    pub fn state(&self) -> ChannelState {
        let [prefetch_count, global_prefetch_count, confirm, transactional, messages_unacknowledged, messages_unconfirmed, messages_uncommitted, acks_uncommitted] =
            self.state.each_ref().map(|a| a.load(Ordering::Relaxed));
        ChannelState {
            prefetch_count,
            global_prefetch_count,
            confirm: confirm != 0,
            transactional: transactional != 0,
            messages_unacknowledged,
            messages_unconfirmed,
            messages_uncommitted,
            acks_uncommitted,
        }
    }

    /// Both queue types together: the channel's own `message_stats` counts.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = self.counters_snapshot(QueueType::Classic);
        s.merge(&self.counters_snapshot(QueueType::Quorum));
        s
    }

    pub fn snapshot_for(&self, qt: QueueType) -> Snapshot {
        self.counters_snapshot(qt)
    }

    /// The channel's `message_stats`.
    pub fn message_stats(&self, range: Option<Range>) -> MessageStats {
        self.history
            .message_stats(&self.snapshot(), CHANNEL_KEYS, range)
    }

    fn sizes(&self) -> SizeHistogram {
        self.counts
            .get()
            .map_or_else(SizeHistogram::default, |c| c.sizes())
    }
}

/// The message-size histogram: count per bucket (not cumulative) and the sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SizeHistogram {
    pub buckets: [u64; 9],
    pub sum: u64,
}

impl SizeHistogram {
    fn merge(&mut self, o: &SizeHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets.iter()) {
            *a += b;
        }
        self.sum += o.sum;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// One protocol's totals: counters per queue type, sizes, gauges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProtocolTotals {
    /// Index 0: publish side and classic queues; 1: quorum queues.
    pub by_queue_type: [Snapshot; 2],
    pub sizes: SizeHistogram,
    /// Sources that have published at least once (`rabbitmq_global_publishers`).
    pub publishers: u64,
    pub consumers: u64,
}

impl ProtocolTotals {
    pub fn all(&self) -> Snapshot {
        let mut s = self.by_queue_type[0];
        s.merge(&self.by_queue_type[1]);
        s
    }

    pub fn for_queue_type(&self, qt: QueueType) -> &Snapshot {
        match qt {
            QueueType::Classic => &self.by_queue_type[0],
            QueueType::Quorum => &self.by_queue_type[1],
        }
    }
}

/// Why a message was dead-lettered (the Prometheus suffix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DeadReason {
    MaxLen,
    Expired,
    Rejected,
    DeliveryLimit,
}

impl DeadReason {
    pub const ALL: [DeadReason; 4] = [
        DeadReason::MaxLen,
        DeadReason::Expired,
        DeadReason::Rejected,
        DeadReason::DeliveryLimit,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DeadReason::MaxLen => "maxlen",
            DeadReason::Expired => "expired",
            DeadReason::Rejected => "rejected",
            DeadReason::DeliveryLimit => "delivery_limit",
        }
    }
}

impl From<crate::deadletter::DeathReason> for DeadReason {
    fn from(r: crate::deadletter::DeathReason) -> Self {
        use crate::deadletter::DeathReason as D;
        match r {
            D::MaxLen => DeadReason::MaxLen,
            D::Expired => DeadReason::Expired,
            D::Rejected => DeadReason::Rejected,
            D::DeliveryLimit => DeadReason::DeliveryLimit,
        }
    }
}

/// Node-wide statistics: the live sources, what closed ones counted, churn
/// counters, dead-letter counters, and the rings of the node and protocols.
#[derive(Debug)]
pub struct NodeStats {
    sources: Mutex<HashMap<u64, Arc<Source>>>,
    next_source: AtomicU64,
    /// What closed sources counted, per protocol.
    retired: Mutex<[ProtocolTotals; N_PROTOCOLS]>,
    /// What closed sources counted, per vhost (their channel-side counters).
    retired_by_vhost: Mutex<HashMap<String, Snapshot>>,
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    pub channels_opened: AtomicU64,
    pub channels_closed: AtomicU64,
    /// Queue churn and dead-letter counts of deleted vhosts, so node-wide
    /// counters never go down.
    pub retired_churn: Churn,
    pub retired_dead_lettered: DeadLettered,
    /// The totals of deleted vhosts.
    retired_vhost_totals: Mutex<Snapshot>,
    pub history: History,
    pub protocol_history: [History; N_PROTOCOLS],
    /// When the next sample is due (ms since the epoch; 0: at once).
    next_sample: AtomicU64,
    /// When the node started (ms since the epoch).
    pub started_ms: u64,
}

impl Default for NodeStats {
    fn default() -> Self {
        NodeStats {
            sources: Mutex::default(),
            next_source: AtomicU64::new(1),
            retired: Mutex::default(),
            retired_by_vhost: Mutex::default(),
            connections_opened: AtomicU64::new(0),
            connections_closed: AtomicU64::new(0),
            channels_opened: AtomicU64::new(0),
            channels_closed: AtomicU64::new(0),
            retired_churn: Churn::default(),
            retired_dead_lettered: DeadLettered::default(),
            retired_vhost_totals: Mutex::new(Snapshot::default()),
            history: History::default(),
            protocol_history: Default::default(),
            next_sample: AtomicU64::new(0),
            started_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// Keeps a [`Source`] registered while it lives; dropping it folds the
/// source's counters into the protocol's and vhost's retired totals.
#[derive(Debug)]
pub struct SourceGuard {
    node: Arc<NodeStats>,
    pub source: Arc<Source>,
}

impl std::ops::Deref for SourceGuard {
    type Target = Source;
    fn deref(&self) -> &Source {
        &self.source
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        self.node.retire(&self.source);
    }
}

/// Counts a connection as open until dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    node: Arc<NodeStats>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.node.connections_closed.fetch_add(1, Ordering::Relaxed);
    }
}

impl NodeStats {
    /// Registers a new source (an AMQP channel at channel.open, an MQTT or
    /// STOMP session at CONNECT).
    pub fn open_source(
        self: &Arc<Self>,
        protocol: Protocol,
        connection: u64,
        channel: u16,
        vhost: &str,
        is_channel: bool,
    ) -> SourceGuard {
        let source = Arc::new(Source {
            id: self.next_source.fetch_add(1, Ordering::Relaxed),
            protocol,
            connection,
            channel,
            vhost: vhost.to_owned(),
            is_channel,
            counts: OnceLock::new(),
            recv_oct: AtomicU64::new(0),
            send_oct: AtomicU64::new(0),
            consumers: AtomicU64::new(0),
            state: Default::default(),
            history: History::default(),
        });
        if is_channel {
            self.channels_opened.fetch_add(1, Ordering::Relaxed);
        }
        self.sources.lock().insert(source.id, source.clone());
        SourceGuard {
            node: self.clone(),
            source,
        }
    }

    /// Counts a connection opened now and closed when the guard drops.
    pub fn open_connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard { node: self.clone() }
    }

    fn retire(&self, source: &Source) {
        self.sources.lock().remove(&source.id);
        if source.is_channel {
            self.channels_closed.fetch_add(1, Ordering::Relaxed);
        }
        {
            let mut retired = self.retired.lock();
            if let Some(t) = retired.get_mut(source.protocol.idx()) {
                t.by_queue_type[0].merge(&source.snapshot_for(QueueType::Classic));
                t.by_queue_type[1].merge(&source.snapshot_for(QueueType::Quorum));
                t.sizes.merge(&source.sizes());
            }
        }
        self.retired_by_vhost
            .lock()
            .entry(source.vhost.clone())
            .or_default()
            .merge(&source.snapshot());
    }

    /// Keeps what a deleted vhost counted in the node's totals.
    pub fn retire_vhost(&self, churn: &Churn, dead: &DeadLettered, totals: &Snapshot) {
        for (mine, theirs) in [
            (&self.retired_churn.declared, &churn.declared),
            (&self.retired_churn.created, &churn.created),
            (&self.retired_churn.deleted, &churn.deleted),
        ] {
            mine.fetch_add(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        for qt in QueueType::ALL {
            for reason in DeadReason::ALL {
                for dlx in [true, false] {
                    let n = dead.get(qt, reason, dlx);
                    if let Some(c) = self.retired_dead_lettered.slot(qt, reason, dlx) {
                        c.fetch_add(n, Ordering::Relaxed);
                    }
                }
            }
        }
        self.retired_vhost_totals.lock().merge(totals);
    }

    /// What deleted vhosts counted (part of the node's totals).
    pub fn retired_vhost_totals(&self) -> Snapshot {
        *self.retired_vhost_totals.lock()
    }

    /// Every live source (channels and sessions), for listings.
    pub fn sources(&self) -> Vec<Arc<Source>> {
        self.sources.lock().values().cloned().collect()
    }

    /// Live AMQP channels.
    pub fn channel_count(&self) -> usize {
        self.sources
            .lock()
            .values()
            .filter(|s| s.is_channel)
            .count()
    }

    /// The live source of a connection's channel.
    pub fn source(&self, connection: u64, channel: u16) -> Option<Arc<Source>> {
        self.sources
            .lock()
            .values()
            .find(|s| s.connection == connection && s.channel == channel)
            .cloned()
    }

    /// Totals per protocol: closed sources plus live ones, read now.
    pub fn protocol_totals(&self) -> [ProtocolTotals; N_PROTOCOLS] {
        let mut out = self.retired.lock().clone();
        for s in self.sources.lock().values() {
            if let Some(t) = out.get_mut(s.protocol.idx()) {
                let classic = s.snapshot_for(QueueType::Classic);
                if classic.get(Stat::Publish) > 0 {
                    t.publishers += 1;
                }
                t.consumers += s.consumers();
                t.by_queue_type[0].merge(&classic);
                t.by_queue_type[1].merge(&s.snapshot_for(QueueType::Quorum));
                t.sizes.merge(&s.sizes());
            }
        }
        out
    }

    /// Channel-side counters of the sources of each vhost (live and closed).
    pub(crate) fn by_vhost(&self) -> HashMap<String, Snapshot> {
        let mut out = self.retired_by_vhost.lock().clone();
        for s in self.sources.lock().values() {
            out.entry(s.vhost.clone()).or_default().merge(&s.snapshot());
        }
        out
    }

    /// Whether a sample is due at `now`; if so, schedules the next one.
    pub(crate) fn sample_due(&self, now: u64) -> bool {
        let due = self.next_sample.load(Ordering::Relaxed);
        if now < due {
            return false;
        }
        self.next_sample
            .store(now.saturating_add(SAMPLE_INTERVAL_MS), Ordering::Relaxed);
        true
    }

    /// Records one sample of every source and protocol. Called by
    /// [`crate::Broker::sample_stats`].
    pub(crate) fn sample_sources(&self, now: u64) {
        for s in self.sources() {
            // A source's own history feeds its `message_stats`, which shows no
            // octets: left out, an idle connection's session (which did read
            // and send its handshake) keeps no samples (see `History`).
            let mut counters = s.snapshot();
            counters.set(Stat::RecvOct, 0);
            counters.set(Stat::SendOct, 0);
            s.history.record(now, counters, Lengths::default());
        }
        for (p, t) in Protocol::ALL.iter().zip(self.protocol_totals()) {
            if let Some(h) = self.protocol_history.get(p.idx()) {
                h.record(now, t.all(), Lengths::default());
            }
        }
    }

    /// The `message_stats` of a protocol (summed over its connections).
    pub fn protocol_message_stats(&self, p: Protocol, range: Option<Range>) -> MessageStats {
        let totals = self.protocol_totals();
        let current = totals
            .get(p.idx())
            .map(ProtocolTotals::all)
            .unwrap_or_default();
        match self.protocol_history.get(p.idx()) {
            Some(h) => h.message_stats(&current, TOTAL_KEYS, range),
            None => MessageStats::default(),
        }
    }
}

/// Dead-lettered messages of one vhost: `[queue type][reason][0 =
/// at_most_once (went to a dead-letter exchange), 1 = disabled (dropped)]`.
#[derive(Debug, Default)]
pub struct DeadLettered([[[AtomicU64; 2]; 4]; 2]);

impl DeadLettered {
    /// Counts one dead-lettered message.
    pub fn count(&self, qt: QueueType, reason: DeadReason, dlx: bool) {
        if let Some(c) = self.slot(qt, reason, dlx) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, qt: QueueType, reason: DeadReason, dlx: bool) -> u64 {
        self.slot(qt, reason, dlx)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn slot(&self, qt: QueueType, reason: DeadReason, dlx: bool) -> Option<&AtomicU64> {
        self.0
            .get(qt as usize)
            .and_then(|q| q.get(reason as usize))
            .and_then(|r| r.get(usize::from(!dlx)))
    }
}

/// Queue-declaration churn of one vhost.
#[derive(Debug, Default)]
pub struct Churn {
    pub declared: AtomicU64,
    pub created: AtomicU64,
    pub deleted: AtomicU64,
}

impl Churn {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads `/proc` for the process facts Prometheus and `/api/nodes` report.
pub mod process {
    /// Resident memory in bytes (`/proc/self/statm`), 0 when unknown.
    pub fn resident_bytes() -> u64 {
        let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
            return 0;
        };
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        pages * 4096
    }

    /// This node's name, `switchyard@<hostname>` (RabbitMQ's `rabbit@<host>`).
    /// This node's name: `switchyard@<hostname>`, or the `[cluster] node` name
    /// of a clustered node (set once at start, [`set_node_name`]).
    pub fn node_name() -> String {
        if let Some(name) = NODE_NAME.get() {
            return name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        format!("switchyard@{host}")
    }

    static NODE_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

    /// Names this node for the rest of the process (a clustered node goes by
    /// its `[cluster] node` name, the one its peers know it by). False if a
    /// name was set already.
    pub fn set_node_name(name: &str) -> bool {
        NODE_NAME.set(name.to_owned()).is_ok()
    }

    /// Open file descriptors (`/proc/self/fd`).
    pub fn open_fds() -> u64 {
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
    }

    /// The soft limit on open files (`/proc/self/limits`).
    pub fn max_fds() -> u64 {
        soft_limit("Max open files").unwrap_or(0)
    }

    /// A soft limit of `/proc/self/limits` (`None`: unknown or unlimited).
    fn soft_limit(name: &str) -> Option<u64> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        limits
            .lines()
            .find(|l| l.starts_with(name))?
            .trim_start_matches(name)
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Open file descriptors that are sockets (listeners and connections).
    pub fn open_sockets() -> u64 {
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
            return 0;
        };
        dir.filter_map(Result::ok)
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|t| t.as_os_str().as_encoded_bytes().starts_with(b"socket:"))
            })
            .count() as u64
    }

    /// OS threads of this process (`Threads:` of `/proc/self/status`).
    pub fn threads() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Threads:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// How many threads this process may have: the soft `Max processes`
    /// limit (it counts threads), or the kernel's `threads-max` when unlimited.
    pub fn max_threads() -> u64 {
        soft_limit("Max processes")
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/threads-max")
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(publish: u64) -> Snapshot {
        let mut s = Snapshot::default();
        s.set(Stat::Publish, publish);
        s
    }

    #[test]
    fn rate_is_the_delta_over_the_last_interval() {
        let h = History::default();
        assert_eq!(h.rate_of(Stat::Publish), 0.0);
        h.record(10_000, snap(0), Lengths::default());
        h.record(15_000, snap(50), Lengths::default());
        assert_eq!(h.rate_of(Stat::Publish), 10.0);
        h.record(20_000, snap(50), Lengths::default());
        assert_eq!(h.rate_of(Stat::Publish), 0.0);
    }

    #[test]
    fn message_stats_shows_active_keys_with_rates_and_samples() {
        let h = History::default();
        h.record(0, snap(0), Lengths::default());
        h.record(5_000, snap(25), Lengths::default());
        h.record(10_000, snap(75), Lengths::default());
        let mut cur = snap(80);
        cur.set(Stat::Deliver, 3);
        let ms = h.message_stats(&cur, QUEUE_KEYS, None);
        assert_eq!(ms.count("publish"), Some(80));
        assert_eq!(ms.rate("publish"), 10.0);
        assert_eq!(ms.count("deliver_get"), Some(3));
        assert_eq!(ms.count("ack"), None, "no activity, no key");
        let json = serde_json::to_value(&ms).unwrap();
        assert_eq!(json["publish"], 80);
        assert_eq!(json["publish_details"]["rate"], 10.0);
        assert_eq!(json["deliver_get"], 3);
        assert!(json.get("ack").is_none());

        let ranged = h.message_stats(
            &cur,
            QUEUE_KEYS,
            Some(Range {
                age_ms: 60_000,
                incr_ms: 5_000,
            }),
        );
        let d = &ranged.entries[0].2;
        let samples = d.samples.as_ref().unwrap();
        assert_eq!(samples.len(), 3);
        assert_eq!(
            samples[0],
            Point {
                sample: 75,
                timestamp: 10_000
            }
        );
        assert_eq!(d.avg_rate, Some(7.5));
    }

    #[test]
    fn ring_is_bounded_and_dropped_when_idle() {
        let h = History::default();
        h.record(0, snap(0), Lengths::default());
        assert!(!h.has_ring(), "no activity yet");
        let mut t = 0;
        for i in 1..=200u64 {
            t += SAMPLE_INTERVAL_MS;
            h.record(t, snap(i), Lengths::default());
        }
        assert!(h.has_ring());
        assert_eq!(
            h.0.lock()
                .full
                .as_ref()
                .unwrap()
                .ring
                .as_ref()
                .unwrap()
                .len(),
            RING_LEN
        );
        for _ in 0..RING_LEN {
            t += SAMPLE_INTERVAL_MS;
            h.record(t, snap(200), Lengths::default());
        }
        assert!(!h.has_ring(), "idle for the whole window");
        assert_eq!(h.rate_of(Stat::Publish), 0.0);
    }

    #[test]
    fn zero_samples_are_kept_as_times_and_read_as_if_kept_whole() {
        let h = History::default();
        // The reference keeps every sample from the start.
        let mut whole = HistoryInner::default();
        let range = Some(Range {
            age_ms: 60_000,
            incr_ms: 5_000,
        });
        let mut t = 0;
        for _ in 0..3 {
            t += SAMPLE_INTERVAL_MS;
            h.record(t, snap(0), Lengths::default());
            whole.record(t, snap(0), Lengths::default());
        }
        assert!(!h.is_allocated(), "nothing but zeros: no samples allocated");
        let publish = |x: &Sample| x.counters.get(Stat::Publish);
        assert_eq!(h.details(range, publish), whole.details(range, publish));
        assert_eq!(h.last(), (Snapshot::default(), Lengths::default()));
        for i in [4, 4, 9, 20] {
            t += SAMPLE_INTERVAL_MS;
            h.record(t, snap(i), Lengths::default());
            whole.record(t, snap(i), Lengths::default());
            assert!(h.is_allocated());
            assert_eq!(h.details(range, publish), whole.details(range, publish));
            assert_eq!(h.details(None, publish), whole.details(None, publish));
            assert_eq!(h.has_ring(), whole.ring.is_some());
        }
        // The first change counts from the last zero sample: 4 in 5 s.
        let h = History::default();
        h.record(5_000, snap(0), Lengths::default());
        h.record(10_000, snap(4), Lengths::default());
        assert_eq!(h.rate_of(Stat::Publish), 0.8);
        // A queue with messages but no counts is not all zeros.
        let h = History::default();
        let l = Lengths {
            messages: 1,
            ready: 1,
            unacked: 0,
        };
        h.record(5_000, snap(0), l);
        assert!(h.is_allocated());
        assert_eq!(h.last().1, l);
    }

    #[test]
    fn an_idle_source_allocates_no_counters_and_no_samples() {
        let node = Arc::new(NodeStats::default());
        let g = node.open_source(Protocol::Mqtt311, 7, 0, "/", false);
        // What every connection does: its handshake's bytes, and nothing sent.
        g.add(Stat::RecvOct, 40);
        g.add(Stat::SendOct, 0);
        g.add_for(QueueType::Classic, Stat::Deliver, 0);
        assert!(!g.has_counts());
        node.sample_sources(5_000);
        node.sample_sources(10_000);
        assert!(!g.history.is_allocated());
        // Listings and totals read zeros (and the octets).
        assert_eq!(g.snapshot().get(Stat::RecvOct), 40);
        assert_eq!(g.snapshot().get(Stat::Publish), 0);
        assert!(g.message_stats(None).is_empty());
        assert_eq!(node.protocol_totals()[2].all().get(Stat::RecvOct), 40);
        assert_eq!(node.protocol_totals()[2].publishers, 0);
        assert_eq!(node.source(7, 0).map(|s| s.id), Some(g.id));
        // The first publish allocates them; counts and rates are as before.
        g.published(16);
        assert!(g.has_counts());
        node.sample_sources(15_000);
        assert!(g.history.is_allocated());
        let ms = g.message_stats(None);
        assert_eq!(ms.count("publish"), Some(1));
        assert_eq!(ms.rate("publish"), 0.2);
        assert_eq!(node.protocol_totals()[2].publishers, 1);
        drop(g);
        assert_eq!(node.by_vhost()["/"].get(Stat::RecvOct), 40);
        assert_eq!(node.by_vhost()["/"].get(Stat::Publish), 1);
    }

    #[test]
    fn length_samples_follow_the_gauges() {
        let h = History::default();
        let l = |n| Lengths {
            messages: n,
            ready: n,
            unacked: 0,
        };
        h.record(0, snap(0), l(0));
        h.record(5_000, snap(0), l(10));
        let d = h.length_details(None);
        assert_eq!(d.messages_details.rate, 2.0);
    }

    #[test]
    fn sources_fold_into_retired_totals() {
        let node = Arc::new(NodeStats::default());
        let g = node.open_source(Protocol::Amqp091, 1, 1, "/", true);
        g.published(16);
        g.published(5000);
        g.add_for(QueueType::Quorum, Stat::Deliver, 2);
        let t = node.protocol_totals();
        assert_eq!(t[0].all().get(Stat::Publish), 2);
        assert_eq!(t[0].publishers, 1);
        assert_eq!(t[0].sizes.buckets[0], 1);
        assert_eq!(t[0].sizes.buckets[2], 1);
        drop(g);
        let t = node.protocol_totals();
        assert_eq!(t[0].all().get(Stat::Publish), 2, "kept after close");
        assert_eq!(t[0].for_queue_type(QueueType::Quorum).get(Stat::Deliver), 2);
        assert_eq!(t[0].publishers, 0);
        assert_eq!(node.channels_closed.load(Ordering::Relaxed), 1);
        assert_eq!(node.by_vhost()["/"].get(Stat::Publish), 2);
    }
}

//! Stream queues (`x-queue-type: stream`): an append-only log that consumers
//! read from an offset of their choice, non-destructively, as RabbitMQ's
//! stream queues over AMQP 0-9-1 (STREAMS.md §1).
//!
//! A stream queue is a [`Queue`] with a [`StreamQueue`] attached: the queue's
//! entry points (enqueue, consume, ack, get, purge) hand over to it, so routing,
//! bindings and the protocols' consume paths stay as they are. Messages are
//! stored as entries of the stream's [`StreamLog`]: what AMQP 0-9-1, STOMP and
//! MQTT publish as postcard of [`Message`] ([`EntryFormat::Core`]: exact, no
//! conversion either way), what Stream clients publish as their AMQP 1.0
//! bytes ([`EntryFormat::Amqp10`], decoded with [`crate::amqp10`] here for
//! this module's consumers);
//! each consumer has a cursor (the next offset) and reads chunks from the log
//! after the writer committed them. Acks, nacks and rejects only give credit
//! back (RabbitMQ's `settle`): nothing is redelivered, nothing removed.
//!
//! Dispatch runs on whichever thread made progress possible: the stream's
//! writer after a commit ([`StreamLog`] calls back), a consumer's connection
//! after an ack or when its outbox drained. Each consumer's cursor has its own
//! mutex (held while reading a chunk from the page cache and pushing to the
//! outbox; never while taking the queue's lock), so two dispatchers never
//! deliver the same offset twice.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::consumer::{Consumer, Delivery};
use crate::error::{CoreError, CoreResult};
use crate::field::{FieldTable, FieldValue};
use crate::message::Message;
use crate::persist::Store;
use crate::queue::{Queue, QueueOptions, QueuedMessage};
use crate::stream::{
    parse_max_age, EntryFormat, Filter, OffsetSpec, Retention, StreamConfig, StreamEntry,
    StreamLog, DEFAULT_FILTER_BYTES, FILTER_ARG, FILTER_VALUE_HEADER, MATCH_UNFILTERED_ARG,
    MAX_SEGMENT_BYTES, OFFSET_ARG,
};

/// The adapter-record table of stored consumer offsets (`x-stream-offset:
/// "stored"` consumers of AMQP 0-9-1 and STOMP, the Stream protocol's
/// StoreOffset): key `vhost \0 queue \0 reference` (a consumer tag is a
/// reference), value the next offset to read (u64 BE).
pub const OFFSETS_KIND: &str = "stream.offset";
/// The adapter-record table of the Stream protocol's publisher sequences
/// (deduplication): key `vhost \0 queue \0 publisher reference`, value the
/// highest publishing id stored (u64 BE).
pub const SEQUENCES_KIND: &str = "stream.publisher";

/// Queue arguments a stream accepts (RabbitMQ's `queue_arguments`).
const STREAM_ARGS: &[&str] = &[
    "x-queue-type",
    "x-max-length-bytes",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-stream-filter-size-bytes",
    "x-initial-cluster-size",
    "x-queue-leader-locator",
];

/// RabbitMQ's declare rules for a stream; returns its log's layout.
pub fn validate_declare(
    queue: &str,
    vhost: &str,
    options: &QueueOptions,
) -> CoreResult<StreamConfig> {
    let property = |p: &str| {
        Err(CoreError::precondition(format!(
            "invalid property '{p}' for queue '{queue}' in vhost '{vhost}'"
        )))
    };
    if !options.durable {
        return property("non-durable");
    }
    if options.exclusive {
        return property("exclusive-owner");
    }
    if options.auto_delete {
        return property("auto-delete");
    }
    let bad = |arg: &str, why: String| {
        Err(CoreError::precondition(format!(
            "invalid arg '{arg}' for queue '{queue}' in vhost '{vhost}': {why}"
        )))
    };
    let args = &options.arguments;
    for (name, _) in args.iter() {
        if !STREAM_ARGS.contains(&name) {
            return bad(
                name,
                "\"invalid arg for queue type rabbit_stream_queue\"".into(),
            );
        }
    }
    let mut config = StreamConfig {
        filter_bytes: DEFAULT_FILTER_BYTES,
        ..StreamConfig::default()
    };
    config.retention = retention_of(queue, vhost, args)?;
    if let Some(v) = args.get("x-stream-max-segment-size-bytes") {
        match v.as_i64().and_then(|n| u64::try_from(n).ok()) {
            Some(n) if n > 0 && n <= MAX_SEGMENT_BYTES => config.segment_bytes = n,
            Some(n) => {
                return bad(
                    "x-stream-max-segment-size-bytes",
                    format!("{{max_value_exceeded,{n}}}"),
                )
            }
            None => {
                return bad(
                    "x-stream-max-segment-size-bytes",
                    format!("\"expected integer, got {}\"", v.type_name()),
                )
            }
        }
    }
    if let Some(v) = args.get("x-stream-filter-size-bytes") {
        match v.as_i64().and_then(|n| u8::try_from(n).ok()) {
            Some(n) if n >= 16 => config.filter_bytes = n,
            _ => {
                return bad(
                    "x-stream-filter-size-bytes",
                    "\"expected integer between 16 and 255\"".into(),
                )
            }
        }
    }
    Ok(config)
}

fn retention_of(queue: &str, vhost: &str, args: &FieldTable) -> CoreResult<Retention> {
    let bad = |arg: &str, why: String| {
        Err(CoreError::precondition(format!(
            "invalid arg '{arg}' for queue '{queue}' in vhost '{vhost}': {why}"
        )))
    };
    let mut r = Retention::default();
    if let Some(v) = args.get("x-max-length-bytes") {
        match v.as_i64() {
            Some(n) if n >= 0 => r.max_bytes = u64::try_from(n).ok(),
            Some(n) => return bad("x-max-length-bytes", format!("{{value_negative,{n}}}")),
            None => {
                return bad(
                    "x-max-length-bytes",
                    format!("\"expected integer, got {}\"", v.type_name()),
                )
            }
        }
    }
    if let Some(v) = args.get("x-max-age") {
        match v.as_str().and_then(parse_max_age) {
            Some(ms) => r.max_age_ms = Some(ms),
            None => return bad("x-max-age", "invalid_max_age".into()),
        }
    }
    Ok(r)
}

/// Where a consumer starts, from its `x-stream-offset` argument (RabbitMQ's
/// `parse_offset_arg`): `first`, `last`, `next` (default), a number, an AMQP
/// timestamp (seconds), or an interval such as `"1h"` back from `now_ms`.
/// `"stored"` is ours: resume from the offset stored for the consumer tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Spec(OffsetSpec),
    Stored,
}

pub fn parse_start(v: Option<&FieldValue>, now_ms: u64) -> CoreResult<Start> {
    let bad = || {
        Err(CoreError::precondition(format!(
            "invalid arg '{OFFSET_ARG}': expected first, last, next, stored, an offset, a timestamp or an interval"
        )))
    };
    let Some(v) = v else {
        return Ok(Start::Spec(OffsetSpec::Next));
    };
    if let FieldValue::Timestamp(secs) = v {
        let ms = secs.saturating_mul(1000);
        return Ok(Start::Spec(OffsetSpec::Timestamp(
            i64::try_from(ms).unwrap_or(i64::MAX),
        )));
    }
    if let Some(n) = v.as_i64() {
        return Ok(Start::Spec(OffsetSpec::Offset(
            u64::try_from(n).unwrap_or(0),
        )));
    }
    match v.as_str() {
        Some("first") => Ok(Start::Spec(OffsetSpec::First)),
        Some("last") => Ok(Start::Spec(OffsetSpec::Last)),
        Some("next") => Ok(Start::Spec(OffsetSpec::Next)),
        Some("stored") => Ok(Start::Stored),
        Some(s) => match parse_max_age(s) {
            Some(ms) => Ok(Start::Spec(OffsetSpec::Timestamp(
                i64::try_from(now_ms.saturating_sub(ms)).unwrap_or(0),
            ))),
            None => bad(),
        },
        None => bad(),
    }
}

/// A consumer's filter from `x-stream-filter` (a string or an array of them)
/// and `x-stream-match-unfiltered`.
pub fn parse_filter(args: &FieldTable) -> Filter {
    let values = match args.get(FILTER_ARG) {
        Some(FieldValue::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(v) => v.as_str().map(|s| vec![s.to_owned()]).unwrap_or_default(),
        None => Vec::new(),
    };
    Filter {
        values,
        match_unfiltered: args.get_bool(MATCH_UNFILTERED_ARG).unwrap_or(false),
    }
}

/// The filter value a message was published with.
pub fn filter_value(m: &Message) -> Option<&str> {
    m.properties
        .headers
        .as_ref()?
        .get(FILTER_VALUE_HEADER)?
        .as_str()
        .filter(|s| !s.is_empty())
}

#[derive(Debug)]
struct Cursor {
    /// The next offset to look at.
    next: u64,
    filter: Filter,
    /// Decoded entries of the chunk being delivered, waiting for credit.
    buffered: VecDeque<(u64, Arc<Message>)>,
}

#[derive(Debug)]
struct Reader {
    consumer: Arc<Consumer>,
    cursor: Mutex<Cursor>,
    /// The record key its acked offset is stored under (`"stored"` consumers).
    tracking: Option<String>,
}

/// The stream side of a stream queue.
#[derive(Debug)]
pub struct StreamQueue {
    pub log: Arc<dyn StreamLog>,
    queue: Weak<Queue>,
    readers: Mutex<Vec<Arc<Reader>>>,
    store: Arc<dyn Store>,
    /// Publisher references -> highest publishing id stored (loaded from the
    /// store on first use, saved when a publisher goes or now and then).
    sequences: Mutex<Option<HashMap<String, u64>>>,
}

impl StreamQueue {
    pub(crate) fn new(
        log: Arc<dyn StreamLog>,
        queue: Weak<Queue>,
        store: Arc<dyn Store>,
    ) -> Arc<Self> {
        let sq = Arc::new(StreamQueue {
            log,
            queue,
            readers: Mutex::new(Vec::new()),
            store,
            sequences: Mutex::new(None),
        });
        let weak = Arc::downgrade(&sq);
        sq.log.on_commit(Box::new(move || {
            if let Some(sq) = weak.upgrade() {
                sq.dispatch();
            }
        }));
        sq
    }

    /// Appends a routed message; returns its offset (durable once the log's
    /// committed offset has passed it).
    pub fn append(&self, message: &Message, now_ms: u64) -> Option<u64> {
        self.append_all(std::slice::from_ref(message), now_ms)
    }

    /// Appends messages in one go (one chunk when the writer is idle); returns
    /// the offset of the first.
    pub fn append_all(&self, messages: &[Message], now_ms: u64) -> Option<u64> {
        let mut entries = Vec::with_capacity(messages.len());
        for m in messages {
            match postcard::to_stdvec(m) {
                Ok(data) => entries.push(StreamEntry {
                    filter: filter_value(m).map(str::to_owned),
                    data: bytes::Bytes::from(data),
                    format: EntryFormat::Core,
                }),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a message for a stream");
                    return None;
                }
            }
        }
        match self.log.append(entries, now_ms) {
            Ok(offset) => Some(offset),
            Err(e) => {
                tracing::error!(error = %e, "cannot append to a stream");
                None
            }
        }
    }

    /// The next offset stored for `reference` (StoreOffset, or the acks of a
    /// `"stored"` consumer with that tag).
    pub fn stored_offset(&self, reference: &str) -> Option<u64> {
        let key = self.offset_key(reference)?;
        self.store
            .records(OFFSETS_KIND)
            .ok()?
            .into_iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
    }

    /// Stores where `reference` resumes (the next offset to read).
    pub fn store_offset(&self, reference: &str, next: u64) {
        let Some(key) = self.offset_key(reference) else {
            return;
        };
        if let Err(e) = self
            .store
            .save_record(OFFSETS_KIND, &key, &next.to_be_bytes())
        {
            tracing::warn!(error = %e, "cannot store a stream offset");
        }
    }

    /// The highest publishing id stored for a publisher `reference` (0: none).
    pub fn publisher_sequence(&self, reference: &str) -> u64 {
        let mut seqs = self.sequences.lock();
        let map = seqs.get_or_insert_with(|| self.load_sequences());
        map.get(reference).copied().unwrap_or(0)
    }

    /// Records that `reference` stored everything up to `id`; `save` writes it
    /// to the store too (a publisher going away, or its periodic save).
    pub fn set_publisher_sequence(&self, reference: &str, id: u64, save: bool) {
        {
            let mut seqs = self.sequences.lock();
            let map = seqs.get_or_insert_with(|| self.load_sequences());
            let slot = map.entry(reference.to_owned()).or_insert(0);
            *slot = (*slot).max(id);
        }
        if save {
            if let Some(key) = self.offset_key(reference) {
                if let Err(e) = self
                    .store
                    .save_record(SEQUENCES_KIND, &key, &id.to_be_bytes())
                {
                    tracing::warn!(error = %e, "cannot store a publisher sequence");
                }
            }
        }
    }

    fn load_sequences(&self) -> HashMap<String, u64> {
        let Some(prefix) = self.offset_key("") else {
            return HashMap::new();
        };
        self.store
            .records(SEQUENCES_KIND)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| {
                let reference = k.strip_prefix(&prefix)?.to_owned();
                let id = u64::from_be_bytes(<[u8; 8]>::try_from(v.as_slice()).ok()?);
                Some((reference, id))
            })
            .collect()
    }

    /// Deletes what retention no longer keeps; returns when to check again
    /// (`NEVER` without `max-age`: size limits are checked on every roll).
    pub fn enforce_retention(&self, now_ms: u64) -> u64 {
        self.log.enforce_retention(now_ms);
        match self.log.retention().max_age_ms {
            // A tenth of the age, between 1 s and 1 min: segments go at most
            // that late.
            Some(age) => now_ms.saturating_add((age / 10).clamp(1_000, 60_000)),
            None => crate::timer::NEVER,
        }
    }

    /// Messages kept (offsets first..next).
    pub fn message_count(&self) -> usize {
        let b = self.log.bounds();
        usize::try_from(b.next.saturating_sub(b.first)).unwrap_or(usize::MAX)
    }

    fn offset_key(&self, tag: &str) -> Option<String> {
        let q = self.queue.upgrade()?;
        Some(format!("{}\0{}\0{}", q.vhost, q.name, tag))
    }

    /// Deletes the offsets stored for this stream's consumers: a stream
    /// declared again under the same name starts with none (as RabbitMQ,
    /// whose offsets live in the stream itself).
    fn forget_stored_offsets(&self) {
        let Some(prefix) = self.offset_key("") else {
            return;
        };
        for kind in [OFFSETS_KIND, SEQUENCES_KIND] {
            let keys = match self.store.records(kind) {
                Ok(records) => records
                    .into_iter()
                    .map(|(k, _)| k)
                    .filter(|k| k.starts_with(&prefix)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the stored offsets of a deleted stream");
                    return;
                }
            };
            for key in keys {
                if let Err(e) = self.store.delete_record(kind, &key) {
                    tracing::warn!(error = %e, "cannot delete a stored offset of a deleted stream");
                }
            }
        }
    }

    /// Attaches a consumer: RabbitMQ's rules (a prefetch, no automatic ack),
    /// then its start offset and filter.
    pub fn add_consumer(&self, consumer: Arc<Consumer>, now_ms: u64) -> CoreResult<()> {
        if consumer.no_ack() {
            return Err(CoreError::not_implemented(
                "consumer with no-ack is not supported by stream queues",
            ));
        }
        if consumer.options.prefetch == 0 {
            return Err(CoreError::precondition(
                "consumer prefetch count is not set",
            ));
        }
        let args = &consumer.options.arguments;
        let start = parse_start(args.get(OFFSET_ARG), now_ms)?;
        let tracking = match start {
            Start::Stored => {
                if consumer.tag().starts_with("amq.ctag-") {
                    return Err(CoreError::precondition(
                        "x-stream-offset \"stored\" needs a consumer tag chosen by the client",
                    ));
                }
                self.offset_key(consumer.tag())
            }
            Start::Spec(_) => None,
        };
        let next = match start {
            Start::Spec(spec) => self.log.resolve(spec),
            Start::Stored => {
                let stored = self.stored_offset(consumer.tag());
                // Never acked before: from the first message kept.
                self.log.resolve(OffsetSpec::Offset(stored.unwrap_or(0)))
            }
        };
        let filter = parse_filter(args);
        let reader = Arc::new(Reader {
            consumer,
            cursor: Mutex::new(Cursor {
                next,
                filter,
                buffered: VecDeque::new(),
            }),
            tracking,
        });
        self.readers.lock().push(reader.clone());
        self.dispatch_to(&reader);
        Ok(())
    }

    pub fn remove_consumer(&self, consumer_id: u64) -> bool {
        let mut readers = self.readers.lock();
        let before = readers.len();
        readers.retain(|r| {
            if r.consumer.id == consumer_id {
                r.consumer.deactivate();
                false
            } else {
                true
            }
        });
        readers.len() != before
    }

    pub fn consumer_count(&self) -> usize {
        self.readers.lock().len()
    }

    /// Consumers with the offset each will read next (management).
    pub fn consumer_offsets(&self) -> Vec<(Arc<Consumer>, u64)> {
        self.readers
            .lock()
            .iter()
            .map(|r| (r.consumer.clone(), r.cursor.lock().next))
            .collect()
    }

    /// Settled deliveries (ack, nack, reject alike): their credit is back
    /// (the caller released it), so more can go out.
    pub fn settled(&self, _messages: &[QueuedMessage]) {
        self.dispatch();
    }

    /// A consumer settled deliveries up to `offset`: a tracking consumer
    /// (`x-stream-offset: "stored"`) stores `offset + 1` as where it resumes.
    /// One record write per call: adapters call it once per ack frame.
    pub fn acked(&self, consumer_id: u64, offset: u64) {
        let reader = self
            .readers
            .lock()
            .iter()
            .find(|r| r.consumer.id == consumer_id)
            .cloned();
        if let Some(key) = reader.as_ref().and_then(|r| r.tracking.as_ref()) {
            let next = offset.saturating_add(1);
            if let Err(e) = self
                .store
                .save_record(OFFSETS_KIND, key, &next.to_be_bytes())
            {
                tracing::warn!(error = %e, "cannot store a stream consumer's offset");
            }
        }
    }

    pub fn dispatch(&self) {
        let readers: Vec<Arc<Reader>> = self.readers.lock().clone();
        for r in &readers {
            self.dispatch_to(r);
        }
    }

    fn dispatch_to(&self, reader: &Arc<Reader>) {
        let Some(queue) = self.queue.upgrade() else {
            return;
        };
        let consumer = &reader.consumer;
        let mut cur = reader.cursor.lock();
        loop {
            if !consumer.is_active() {
                return;
            }
            if cur.buffered.is_empty() && !self.fill(&mut cur) {
                return;
            }
            if !consumer.try_reserve() {
                return;
            }
            let Some((offset, message)) = cur.buffered.pop_front() else {
                consumer.release(1);
                return;
            };
            consumer.deliver(Delivery {
                consumer: consumer.clone(),
                queue: queue.clone(),
                message: QueuedMessage::new(offset, message),
            });
        }
    }

    /// Reads chunks from the cursor until one yields messages for it; false
    /// when nothing committed is left.
    fn fill(&self, cur: &mut Cursor) -> bool {
        loop {
            let chunk = match self.log.read_chunk(cur.next) {
                Ok(Some(c)) => c,
                Ok(None) => return false,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a stream chunk");
                    return false;
                }
            };
            // Retention may have removed what the cursor pointed at.
            let from = cur.next.max(chunk.id);
            cur.next = chunk.next();
            if !chunk.may_match(&cur.filter) {
                continue;
            }
            let trailer = match chunk.format {
                EntryFormat::Amqp10 => chunk.trailer_filters(),
                EntryFormat::Core => Vec::new(),
            };
            let queue_name = match chunk.format {
                EntryFormat::Amqp10 => self.queue.upgrade().map(|q| q.name.clone()),
                EntryFormat::Core => None,
            };
            for (i, (offset, data)) in chunk.entries().into_iter().enumerate() {
                if offset < from {
                    continue;
                }
                let mut message: Message = match chunk.format {
                    EntryFormat::Core => match Message::decode_stream_entry(&data) {
                        Some(m) => m,
                        None => {
                            tracing::warn!(offset, "undecodable stream entry skipped");
                            continue;
                        }
                    },
                    EntryFormat::Amqp10 => {
                        let filter = trailer.get(i).copied().flatten();
                        if filter.is_some() && !cur.filter.matches(filter) {
                            // Skipped before decoding (the trailer has it).
                            continue;
                        }
                        match crate::amqp10::decode(&data, queue_name.as_deref().unwrap_or("")) {
                            Ok(mut m) => {
                                if let Some(f) = filter {
                                    m.properties
                                        .headers
                                        .get_or_insert_with(FieldTable::new)
                                        .insert(FILTER_VALUE_HEADER, FieldValue::string(f));
                                }
                                m.received_ms = u64::try_from(chunk.timestamp).ok().into();
                                m
                            }
                            Err(e) => {
                                tracing::warn!(offset, error = %e, "undecodable stream entry skipped");
                                continue;
                            }
                        }
                    }
                };
                if !cur.filter.matches(filter_value(&message)) {
                    continue;
                }
                let headers = message
                    .properties
                    .headers
                    .get_or_insert_with(FieldTable::new);
                headers.insert(
                    OFFSET_ARG,
                    FieldValue::I64(i64::try_from(offset).unwrap_or(i64::MAX)),
                );
                cur.buffered.push_back((offset, Arc::new(message)));
            }
            if !cur.buffered.is_empty() {
                return true;
            }
        }
    }

    /// The queue was deleted: consumers stop, the files go.
    pub fn destroy(&self) -> Vec<Arc<Consumer>> {
        let readers = std::mem::take(&mut *self.readers.lock());
        self.log.destroy();
        self.forget_stored_offsets();
        readers.into_iter().map(|r| r.consumer.clone()).collect()
    }
}

impl Message {
    /// Decodes a stream entry written by [`StreamQueue::append`].
    pub fn decode_stream_entry(data: &[u8]) -> Option<Message> {
        postcard::from_bytes(data).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declare_rules() {
        let ok = QueueOptions {
            durable: true,
            ..Default::default()
        };
        assert!(validate_declare("s", "/", &ok).is_ok());
        for (o, what) in [
            (QueueOptions::default(), "non-durable"),
            (
                QueueOptions {
                    durable: true,
                    exclusive: true,
                    ..Default::default()
                },
                "exclusive-owner",
            ),
            (
                QueueOptions {
                    durable: true,
                    auto_delete: true,
                    ..Default::default()
                },
                "auto-delete",
            ),
        ] {
            let e = validate_declare("s", "/", &o).unwrap_err();
            assert!(e.text.contains(what), "{}", e.text);
        }
        let with = |k: &str, v: FieldValue| {
            let mut o = ok.clone();
            o.arguments.insert(k, v);
            validate_declare("s", "/", &o)
        };
        assert!(with("x-max-age", FieldValue::string("1A")).is_err());
        assert!(with("x-max-age", FieldValue::string("D")).is_err());
        assert_eq!(
            with("x-max-age", FieldValue::string("10s"))
                .unwrap()
                .retention
                .max_age_ms,
            Some(10_000)
        );
        assert!(with("x-single-active-consumer", FieldValue::Bool(true)).is_err());
        assert!(with("x-message-ttl", FieldValue::I64(5)).is_err());
        assert!(with("x-stream-filter-size-bytes", FieldValue::I64(8)).is_err());
        assert!(with(
            "x-stream-max-segment-size-bytes",
            FieldValue::I64(3_000_000_001)
        )
        .is_err());
        assert_eq!(
            with("x-max-length-bytes", FieldValue::I64(1000))
                .unwrap()
                .retention
                .max_bytes,
            Some(1000)
        );
    }

    #[test]
    fn offset_arguments() {
        let now = 10_000_000;
        let p = |v: FieldValue| parse_start(Some(&v), now).unwrap();
        assert_eq!(
            parse_start(None, now).unwrap(),
            Start::Spec(OffsetSpec::Next)
        );
        assert_eq!(
            p(FieldValue::string("first")),
            Start::Spec(OffsetSpec::First)
        );
        assert_eq!(p(FieldValue::string("last")), Start::Spec(OffsetSpec::Last));
        assert_eq!(p(FieldValue::string("stored")), Start::Stored);
        assert_eq!(p(FieldValue::I16(5)), Start::Spec(OffsetSpec::Offset(5)));
        assert_eq!(
            p(FieldValue::Timestamp(7)),
            Start::Spec(OffsetSpec::Timestamp(7_000))
        );
        assert_eq!(
            p(FieldValue::string("1h")),
            Start::Spec(OffsetSpec::Timestamp(10_000_000 - 3_600_000))
        );
        assert!(parse_start(Some(&FieldValue::string("soon")), now).is_err());
    }

    #[test]
    fn filters_from_arguments() {
        let mut args = FieldTable::new();
        args.insert(
            FILTER_ARG,
            FieldValue::Array(vec![FieldValue::string("a"), FieldValue::string("b")]),
        );
        args.insert(MATCH_UNFILTERED_ARG, FieldValue::Bool(true));
        let f = parse_filter(&args);
        assert_eq!(f.values, vec!["a".to_owned(), "b".to_owned()]);
        assert!(f.match_unfiltered);
        let mut one = FieldTable::new();
        one.insert(FILTER_ARG, FieldValue::string("c"));
        assert_eq!(parse_filter(&one).values, vec!["c".to_owned()]);
    }
}

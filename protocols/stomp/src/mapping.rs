//! INTEROP.md's STOMP contract: destinations <-> exchanges and queues, STOMP
//! headers <-> the core's message properties. Pure functions over strings and
//! core types; the session applies them.
//!
//! The rules, each written above the code that implements it:
//! - destinations (`/queue/`, `/amq/queue/`, `/topic/`, `/exchange/`,
//!   `/temp-queue/`, `/reply-queue/`, bare names) in [`Destination::parse`];
//! - `%2F` in a destination means `/` (so a name can hold a slash);
//! - MESSAGE `destination` from where the message went in [`message_destination`];
//! - SEND headers -> properties in [`properties_from_headers`], and back in
//!   [`write_property_headers`];
//! - queue arguments from SEND/SUBSCRIBE headers in [`QueueSpec::from_headers`].

use switchyard_core::message::DELIVERY_MODE_PERSISTENT;
use switchyard_core::{FieldTable, FieldValue, Message, Properties};

use crate::codec::FrameWriter;

/// The exchange MQTT publishes to and `/topic/` maps to.
pub const TOPIC_EXCHANGE: &str = "amq.topic";

/// A destination header, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `/queue/<q>` or a bare `<q>`: a queue declared on first use (durable by
    /// default), reached through the default exchange.
    Queue(String),
    /// `/amq/queue/<q>`: an existing queue, never declared.
    AmqQueue(String),
    /// `/topic/<key>`: `amq.topic` with routing key (or binding pattern) `<key>`.
    Topic(String),
    /// `/exchange/<x>[/<key>]`: exchange `<x>` with `<key>` (empty if absent).
    Exchange { exchange: String, key: String },
    /// `/temp-queue/<id>`: the session's private reply queue named `<id>`.
    TempQueue(String),
    /// `/reply-queue/<q>`: the queue `<q>` via the default exchange (what a temp
    /// queue's real name looks like to the other side).
    ReplyQueue(String),
}

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid destination '{destination}': {why}")]
pub struct BadDestination {
    pub destination: String,
    pub why: &'static str,
}

/// `%2F` (either case) means `/`: RabbitMQ's escape for names that hold a slash.
fn unescape_name(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    s.replace("%2F", "/").replace("%2f", "/")
}

/// The reverse of [`unescape_name`], for destinations we build.
fn escape_name(s: &str) -> String {
    if s.contains('/') {
        s.replace('/', "%2F")
    } else {
        s.to_owned()
    }
}

impl Destination {
    /// Parses a `destination` (or `reply-to`) header. A name without a leading `/`
    /// is a queue, as `/queue/<name>`.
    pub fn parse(s: &str) -> Result<Destination, BadDestination> {
        let bad = |why| BadDestination {
            destination: s.to_owned(),
            why,
        };
        let nonempty = |name: &str, why| {
            if name.is_empty() {
                Err(bad(why))
            } else {
                Ok(unescape_name(name))
            }
        };
        if let Some(q) = s.strip_prefix("/queue/") {
            return Ok(Destination::Queue(nonempty(q, "no queue name")?));
        }
        if let Some(q) = s.strip_prefix("/amq/queue/") {
            return Ok(Destination::AmqQueue(nonempty(q, "no queue name")?));
        }
        if let Some(key) = s.strip_prefix("/topic/") {
            return Ok(Destination::Topic(nonempty(key, "no topic name")?));
        }
        if let Some(rest) = s.strip_prefix("/exchange/") {
            let (x, key) = rest.split_once('/').unwrap_or((rest, ""));
            return Ok(Destination::Exchange {
                exchange: nonempty(x, "no exchange name")?,
                key: unescape_name(key),
            });
        }
        if let Some(id) = s.strip_prefix("/temp-queue/") {
            return Ok(Destination::TempQueue(nonempty(id, "no temp-queue name")?));
        }
        if let Some(q) = s.strip_prefix("/reply-queue/") {
            return Ok(Destination::ReplyQueue(nonempty(q, "no queue name")?));
        }
        if s.starts_with('/') {
            return Err(bad("unknown destination type; use /queue/, /amq/queue/, /topic/, /exchange/, /temp-queue/ or /reply-queue/"));
        }
        Ok(Destination::Queue(nonempty(s, "empty destination")?))
    }
}

/// MESSAGE `destination` is built from where the message went, not from what a
/// subscriber asked for: the default exchange -> `/queue/<key>`, `amq.topic` ->
/// `/topic/<key>`, anything else -> `/exchange/<x>/<key>`. A subscriber of
/// `/topic/sensors.*.temp` thus sees the concrete `/topic/sensors.room1.temp`.
pub fn message_destination(message: &Message) -> String {
    let key = escape_name(&message.routing_key);
    match message.exchange.as_str() {
        "" => format!("/queue/{key}"),
        TOPIC_EXCHANGE => format!("/topic/{key}"),
        x => format!("/exchange/{}/{key}", escape_name(x)),
    }
}

/// Headers that belong to STOMP itself or are consumed by the broker, so they
/// never become message headers.
const FRAME_HEADERS: [&str; 9] = [
    "destination",
    "transaction",
    "receipt",
    "content-length",
    "message-id",
    "subscription",
    "ack",
    "redelivered",
    "persistent",
];

/// Headers that map to a property of their own.
const PROPERTY_HEADERS: [&str; 11] = [
    "content-type",
    "content-encoding",
    "priority",
    "correlation-id",
    "reply-to",
    "expiration",
    "amqp-message-id",
    "timestamp",
    "type",
    "user-id",
    "app-id",
];

/// Queue-declaration headers (consumed, not passed on as message headers).
const QUEUE_HEADERS: [&str; 18] = [
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-stream-filter-size-bytes",
    "durable",
    "auto-delete",
    "exclusive",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-expires",
    "x-message-ttl",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-max-priority",
    "x-queue-name",
    "x-queue-type",
    "x-delivery-limit",
    "prefetch-count",
];

/// Why SEND headers cannot become properties.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid header {name}:{value}: {why}")]
pub struct BadHeader {
    pub name: String,
    pub value: String,
    pub why: &'static str,
}

/// The headers with repeats dropped (the first of a name wins). A set rather
/// than a scan, so a frame with the maximum number of headers costs linear time.
fn first_occurrences(headers: &[(String, String)]) -> impl Iterator<Item = &(String, String)> {
    let mut seen = std::collections::HashSet::with_capacity(headers.len());
    headers.iter().filter(move |(k, _)| seen.insert(k.as_str()))
}

fn bad_header(name: &str, value: &str, why: &'static str) -> BadHeader {
    BadHeader {
        name: name.to_owned(),
        value: value.chars().take(100).collect(),
        why,
    }
}

/// SEND headers -> properties (INTEROP.md): `content-type`, `content-encoding`,
/// `persistent:true` -> delivery-mode 2, `priority`, `correlation-id`,
/// `reply-to`, `expiration`, `amqp-message-id` -> message-id, `timestamp`,
/// `type`, `user-id`, `app-id`; every other header that is not STOMP's own or a
/// queue argument goes into `headers` as a string. The first of repeated headers
/// wins, as everywhere in STOMP. `reply-to` is taken verbatim here; the session
/// rewrites `/temp-queue/` and `/reply-queue/` names (see [`reply_to_property`]).
pub fn properties_from_headers(headers: &[(String, String)]) -> Result<Properties, BadHeader> {
    let mut p = Properties::default();
    let mut table = FieldTable::new();
    for (name, value) in first_occurrences(headers) {
        let v = || Some(value.clone());
        match name.as_str() {
            "persistent" => {
                if value.eq_ignore_ascii_case("true") {
                    p.delivery_mode = Some(DELIVERY_MODE_PERSISTENT);
                }
            }
            "content-type" => p.content_type = v(),
            "content-encoding" => p.content_encoding = v(),
            "priority" => {
                p.priority = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| bad_header(name, value, "must be 0..=255"))?,
                )
            }
            "correlation-id" => p.correlation_id = v(),
            "reply-to" => p.reply_to = v(),
            "expiration" => {
                if value.trim().parse::<u64>().is_err() {
                    return Err(bad_header(
                        name,
                        value,
                        "must be a non-negative number of milliseconds",
                    ));
                }
                p.expiration = Some(value.trim().to_owned());
            }
            "amqp-message-id" => p.message_id = v(),
            "timestamp" => {
                p.timestamp = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| bad_header(name, value, "must be seconds since 1970"))?,
                )
            }
            "type" => p.kind = v(),
            "user-id" => p.user_id = v(),
            "app-id" => p.app_id = v(),
            n if FRAME_HEADERS.contains(&n) || QUEUE_HEADERS.contains(&n) => {}
            n => table.0.push((n.into(), FieldValue::string(value.as_str()))),
        }
    }
    if !table.is_empty() {
        p.headers = Some(table);
    }
    Ok(p)
}

/// How a `reply-to` header travels: `/temp-queue/<id>` becomes the real name of
/// the session's reply queue (done by the session, which owns it), and
/// `/reply-queue/<q>` becomes `<q>`, so an AMQP service can answer through the
/// default exchange with `routing_key = reply_to`. Anything else is kept
/// verbatim (RabbitMQ's behaviour).
pub fn reply_to_property(reply_to: &str) -> Option<&str> {
    reply_to.strip_prefix("/reply-queue/")
}

/// The reverse of [`reply_to_property`] on the way out: a `reply_to` that is a
/// bare queue name (as AMQP clients and temp queues set it) is shown as
/// `/reply-queue/<q>`, which a STOMP client can SEND to as it is; one that
/// already starts with `/` is a STOMP destination and shown verbatim.
pub fn reply_to_header(reply_to: &str) -> String {
    if reply_to.starts_with('/') {
        reply_to.to_owned()
    } else {
        format!("/reply-queue/{}", escape_name(reply_to))
    }
}

/// Writes the property headers of a MESSAGE: the reverse of
/// [`properties_from_headers`]. Header values that are not strings are written as
/// their text (numbers, booleans); nested tables and arrays (such as `x-death`)
/// have no STOMP form and are left out. Property headers win over message headers
/// of the same name, and only the first of each name is written.
pub fn write_property_headers<O: switchyard_driver::Sink>(
    w: &mut FrameWriter<'_, O>,
    p: &Properties,
) {
    if let Some(v) = &p.content_type {
        w.header("content-type", v);
    }
    if let Some(v) = &p.content_encoding {
        w.header("content-encoding", v);
    }
    if p.is_persistent() {
        w.header("persistent", "true");
    }
    if let Some(v) = p.priority {
        w.header("priority", &v.to_string());
    }
    if let Some(v) = &p.correlation_id {
        w.header("correlation-id", v);
    }
    if let Some(v) = &p.reply_to {
        w.header("reply-to", &reply_to_header(v));
    }
    if let Some(v) = &p.expiration {
        w.header("expiration", v);
    }
    if let Some(v) = &p.message_id {
        w.header("amqp-message-id", v);
    }
    if let Some(v) = p.timestamp {
        w.header("timestamp", &v.to_string());
    }
    if let Some(v) = &p.kind {
        w.header("type", v);
    }
    if let Some(v) = &p.user_id {
        w.header("user-id", v);
    }
    if let Some(v) = &p.app_id {
        w.header("app-id", v);
    }
    let Some(table) = &p.headers else { return };
    for (name, value) in table.iter() {
        if PROPERTY_HEADERS.contains(&name) || FRAME_HEADERS.contains(&name) {
            continue;
        }
        let text = match value {
            FieldValue::Bool(b) => Some(b.to_string()),
            FieldValue::F32(f) => Some(f.to_string()),
            FieldValue::F64(f) => Some(f.to_string()),
            FieldValue::Void => Some(String::new()),
            v => v
                .as_str()
                .map(str::to_owned)
                .or_else(|| v.as_i64().map(|i| i.to_string())),
        };
        if let Some(text) = text {
            w.header(name, &text);
        }
    }
}

/// A queue to declare, from a destination and the frame's headers.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive: bool,
    pub arguments: FieldTable,
    /// `x-queue-name`: a chosen name for a subscription's queue.
    pub name: Option<String>,
    /// Whether any queue property was given explicitly (then an existing queue
    /// must match it, as a declare in AMQP would check).
    pub explicit: bool,
}

/// Stream consumer arguments from SUBSCRIBE headers, RabbitMQ's STOMP mapping:
/// `x-stream-offset` is `first`, `last`, `next`, `offset=<n>`, `timestamp=<unix
/// seconds>` (and, as over AMQP, an interval such as `1h`, or `stored`);
/// `x-stream-filter` is a comma-separated list; `x-stream-match-unfiltered` is
/// `true` or `false`. Other queues ignore them.
pub fn stream_consumer_arguments(headers: &[(String, String)]) -> Result<FieldTable, BadHeader> {
    let mut args = FieldTable::new();
    for (name, value) in first_occurrences(headers) {
        match name.as_str() {
            "x-stream-offset" => {
                let v = value.trim();
                let arg = if let Some(n) = v.strip_prefix("offset=") {
                    FieldValue::I64(
                        n.parse()
                            .map_err(|_| bad_header(name, value, "offset=<n> needs a number"))?,
                    )
                } else if let Some(t) = v.strip_prefix("timestamp=") {
                    FieldValue::Timestamp(t.parse().map_err(|_| {
                        bad_header(name, value, "timestamp=<unix seconds> needs a number")
                    })?)
                } else {
                    FieldValue::string(v)
                };
                args.insert("x-stream-offset", arg);
            }
            "x-stream-filter" => {
                let values = value
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(FieldValue::string)
                    .collect();
                args.insert("x-stream-filter", FieldValue::Array(values));
            }
            "x-stream-match-unfiltered" => {
                let on = match value.trim() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad_header(name, value, "must be true or false")),
                };
                args.insert("x-stream-match-unfiltered", FieldValue::Bool(on));
            }
            _ => {}
        }
    }
    Ok(args)
}

/// Queue arguments can be given as SEND/SUBSCRIBE headers (INTEROP.md):
/// `durable`, `auto-delete`, `exclusive` (booleans), `x-dead-letter-exchange`,
/// `x-dead-letter-routing-key`, `x-overflow`, `x-queue-type` (strings),
/// `x-expires`, `x-message-ttl`, `x-max-length`, `x-max-length-bytes`,
/// `x-max-priority`, `x-delivery-limit` (integers), `x-queue-name` (the queue's
/// name for topic and exchange subscriptions). Defaults are the caller's: a
/// `/queue/` queue is durable, a topic subscription's is exclusive and
/// auto-delete.
impl QueueSpec {
    pub fn from_headers(
        headers: &[(String, String)],
        durable: bool,
        auto_delete: bool,
        exclusive: bool,
    ) -> Result<QueueSpec, BadHeader> {
        let mut spec = QueueSpec {
            durable,
            auto_delete,
            exclusive,
            arguments: FieldTable::new(),
            name: None,
            explicit: false,
        };
        for (name, value) in first_occurrences(headers) {
            let flag = || match value.trim() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(bad_header(name, value, "must be true or false")),
            };
            match name.as_str() {
                "durable" => {
                    spec.durable = flag()?;
                    spec.explicit = true;
                }
                "auto-delete" => {
                    spec.auto_delete = flag()?;
                    spec.explicit = true;
                }
                "exclusive" => {
                    spec.exclusive = flag()?;
                    spec.explicit = true;
                }
                "x-queue-name" => spec.name = Some(value.clone()),
                "x-dead-letter-exchange"
                | "x-dead-letter-routing-key"
                | "x-overflow"
                | "x-queue-type"
                | "x-max-age" => {
                    spec.arguments
                        .insert(name.as_str(), FieldValue::string(value.as_str()));
                    spec.explicit = true;
                }
                "x-expires"
                | "x-message-ttl"
                | "x-max-length"
                | "x-max-length-bytes"
                | "x-max-priority"
                | "x-delivery-limit"
                | "x-stream-max-segment-size-bytes"
                | "x-stream-filter-size-bytes" => {
                    let n: i64 = value
                        .trim()
                        .parse()
                        .map_err(|_| bad_header(name, value, "must be an integer"))?;
                    spec.arguments.insert(name.as_str(), FieldValue::I64(n));
                    spec.explicit = true;
                }
                _ => {}
            }
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn destinations_parse_as_interop_says() {
        use Destination::*;
        assert_eq!(Destination::parse("/queue/a"), Ok(Queue("a".into())));
        assert_eq!(Destination::parse("a"), Ok(Queue("a".into())));
        assert_eq!(Destination::parse("/queue/a%2Fb"), Ok(Queue("a/b".into())));
        assert_eq!(Destination::parse("/amq/queue/q"), Ok(AmqQueue("q".into())));
        assert_eq!(
            Destination::parse("/topic/a.*.b"),
            Ok(Topic("a.*.b".into()))
        );
        assert_eq!(
            Destination::parse("/exchange/x/k.1"),
            Ok(Exchange {
                exchange: "x".into(),
                key: "k.1".into()
            })
        );
        assert_eq!(
            Destination::parse("/exchange/amq.fanout"),
            Ok(Exchange {
                exchange: "amq.fanout".into(),
                key: "".into()
            })
        );
        assert_eq!(
            Destination::parse("/temp-queue/r1"),
            Ok(TempQueue("r1".into()))
        );
        assert_eq!(
            Destination::parse("/reply-queue/amq.gen-x"),
            Ok(ReplyQueue("amq.gen-x".into()))
        );
        assert!(Destination::parse("/queue/").is_err());
        assert!(Destination::parse("/bogus/x").is_err());
        assert!(Destination::parse("").is_err());
    }

    #[test]
    fn message_destination_follows_the_exchange() {
        let m = |x: &str, k: &str| Message::new(x, k, Properties::default(), Bytes::new());
        assert_eq!(message_destination(&m("", "q")), "/queue/q");
        assert_eq!(message_destination(&m("", "a/b")), "/queue/a%2Fb");
        assert_eq!(
            message_destination(&m("amq.topic", "s.r.t")),
            "/topic/s.r.t"
        );
        assert_eq!(message_destination(&m("logs", "k")), "/exchange/logs/k");
    }

    #[test]
    fn headers_map_to_properties_and_back() {
        let p = properties_from_headers(&h(&[
            ("destination", "/queue/x"),
            ("persistent", "true"),
            ("content-type", "text/plain"),
            ("priority", "5"),
            ("correlation-id", "c1"),
            ("reply-to", "/queue/r"),
            ("expiration", "60000"),
            ("amqp-message-id", "m1"),
            ("timestamp", "1700000000"),
            ("type", "t"),
            ("app-id", "a"),
            ("x-custom", "v1"),
            ("x-custom", "v2"),
            ("x-message-ttl", "5"),
            ("receipt", "r"),
        ]))
        .unwrap();
        assert!(p.is_persistent());
        assert_eq!(p.priority, Some(5));
        assert_eq!(p.message_id.as_deref(), Some("m1"));
        assert_eq!(p.timestamp, Some(1_700_000_000));
        let headers = p.headers.clone().unwrap();
        assert_eq!(headers.get_str("x-custom"), Some("v1"));
        assert_eq!(headers.len(), 1, "{headers:?}");
        let mut out = BytesMut::new();
        let mut w = FrameWriter::start(
            &mut out,
            crate::codec::Command::Message,
            crate::codec::Version::V1_2,
        );
        write_property_headers(&mut w, &p);
        w.finish(b"");
        let text = String::from_utf8(out.to_vec()).unwrap();
        for line in [
            "content-type:text/plain",
            "persistent:true",
            "priority:5",
            "correlation-id:c1",
            "reply-to:/queue/r",
            "expiration:60000",
            "amqp-message-id:m1",
            "timestamp:1700000000",
            "type:t",
            "app-id:a",
            "x-custom:v1",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line} in {text}");
        }
        assert!(properties_from_headers(&h(&[("priority", "x")])).is_err());
        assert!(properties_from_headers(&h(&[("expiration", "-1")])).is_err());
    }

    #[test]
    fn reply_to_round_trips_through_amqp() {
        assert_eq!(
            reply_to_property("/reply-queue/amq.gen-1"),
            Some("amq.gen-1")
        );
        assert_eq!(reply_to_property("/queue/x"), None);
        assert_eq!(reply_to_header("amq.gen-1"), "/reply-queue/amq.gen-1");
        assert_eq!(reply_to_header("/topic/x"), "/topic/x");
    }

    #[test]
    fn queue_arguments_come_from_headers() {
        let s = QueueSpec::from_headers(
            &h(&[
                ("durable", "false"),
                ("x-message-ttl", "1000"),
                ("x-dead-letter-exchange", "dlx"),
                ("x-queue-name", "mine"),
            ]),
            true,
            false,
            false,
        )
        .unwrap();
        assert!(!s.durable && s.explicit);
        assert_eq!(s.arguments.get_i64("x-message-ttl"), Some(1000));
        assert_eq!(s.arguments.get_str("x-dead-letter-exchange"), Some("dlx"));
        assert_eq!(s.name.as_deref(), Some("mine"));
        let d = QueueSpec::from_headers(&[], true, false, false).unwrap();
        assert!(d.durable && !d.explicit);
        assert!(
            QueueSpec::from_headers(&h(&[("x-max-length", "ten")]), true, false, false).is_err()
        );
        assert!(QueueSpec::from_headers(&h(&[("durable", "yes")]), true, false, false).is_err());
    }
}

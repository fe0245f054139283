//! MQTT <-> the core's message model, as ../shared/INTEROP.md specifies. Every
//! mapping quirk lives here, with its rule written above the code; the session
//! only calls these functions.
//!
//! Must not: touch a socket, the clock (time is passed in) or session state.

use std::sync::Arc;

use bytes::Bytes;
use switchyard_core::message::{self, ShortStr, DELIVERY_MODE_PERSISTENT};
use switchyard_core::{FieldTable, FieldValue, Message, Properties as AmqpProperties};

use crate::codec::{Properties, QoS};

/// Header carrying the QoS a message was published with (RabbitMQ's name), so
/// QoS 2 survives the hop although delivery-mode only knows 1 and 2.
pub const HEADER_PUBLISH_QOS: &str = "x-mqtt-publish-qos";
/// Header set (true) when the publisher set the RETAIN flag; needed for the
/// retain-as-published subscription option.
pub const HEADER_RETAIN: &str = "x-mqtt-retain";
/// MQTT 5 Response Topic, in AMQP form (`.` separated) (INTEROP.md).
pub const HEADER_REPLY_TO_TOPIC: &str = "x-reply-to-topic";
/// MQTT 5 Correlation Data that is not UTF-8 or is 256 bytes or longer
/// (INTEROP.md); shorter UTF-8 goes to the correlation-id property.
pub const HEADER_CORRELATION_ID: &str = "x-correlation-id";
/// MQTT 5 Payload Format Indicator (1 = UTF-8 payload).
pub const HEADER_PAYLOAD_FORMAT: &str = "x-mqtt-payload-format-indicator";

/// Headers that carry MQTT protocol facts, never user properties.
const RESERVED_HEADERS: [&str; 5] = [
    HEADER_PUBLISH_QOS,
    HEADER_RETAIN,
    HEADER_REPLY_TO_TOPIC,
    HEADER_CORRELATION_ID,
    HEADER_PAYLOAD_FORMAT,
];

// ------------------------------------------------------------------ topics
//
// Rule (INTEROP.md): every `/` becomes `.`, every whole-level `+` becomes `*`,
// `#` stays `#`; the reverse on the way out. `sensors/room1/temp` is routing
// key `sensors.room1.temp`. A `.` inside an MQTT level is left as it is, so it
// becomes a level separator for AMQP and comes back as `/` (lossy, as in
// RabbitMQ).
//
// Lossless mode (opt-in per vhost): inside a level, `%` is written `%25`, `.`
// `%2E`, `*` `%2A` and `#` `%23`, so no level character can be read as an AMQP
// separator or wildcard and every topic round-trips. Whole-level `+`/`#` in
// filters still become `*`/`#`. AMQP publishers to such a vhost write escaped
// keys (`a%2Eb.c` is MQTT topic `a.b/c`).

/// What the topic mappings write into: a `String` (binding keys, topics) or
/// the message's inline [`ShortStr`] routing key (built once per PUBLISH, so
/// a usual topic costs no allocation).
trait Text {
    fn push(&mut self, c: char);
    fn push_str(&mut self, s: &str);
}

impl Text for String {
    fn push(&mut self, c: char) {
        String::push(self, c);
    }
    fn push_str(&mut self, s: &str) {
        String::push_str(self, s);
    }
}

impl Text for ShortStr {
    fn push(&mut self, c: char) {
        ShortStr::push(self, c);
    }
    fn push_str(&mut self, s: &str) {
        ShortStr::push_str(self, s);
    }
}

fn escape_level(level: &str, out: &mut impl Text) {
    for c in level.chars() {
        match c {
            '%' => out.push_str("%25"),
            '.' => out.push_str("%2E"),
            '*' => out.push_str("%2A"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
}

fn unescape_level(word: &str, out: &mut String) {
    let mut rest = word;
    while let Some(pos) = rest.find('%') {
        out.push_str(rest.get(..pos).unwrap_or(""));
        let code = rest.get(pos..pos + 3);
        let c = match code {
            Some("%25") => Some('%'),
            Some("%2E") | Some("%2e") => Some('.'),
            Some("%2A") | Some("%2a") => Some('*'),
            Some("%23") => Some('#'),
            _ => None,
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = rest.get(pos + 3..).unwrap_or("");
            }
            None => {
                out.push('%');
                rest = rest.get(pos + 1..).unwrap_or("");
            }
        }
    }
    out.push_str(rest);
}

/// The routing key of an MQTT topic name.
pub fn topic_to_key(topic: &str, lossless: bool) -> ShortStr {
    let mut out = ShortStr::with_capacity(topic.len());
    for (i, level) in topic.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        if lossless {
            escape_level(level, &mut out);
        } else {
            out.push_str(level);
        }
    }
    out
}

/// The binding key of an MQTT topic filter (without any `$share/` prefix).
pub fn filter_to_key(filter: &str, lossless: bool) -> String {
    let mut out = String::with_capacity(filter.len() + 8);
    for (i, level) in filter.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        match level {
            "+" => out.push('*'),
            "#" => out.push('#'),
            l if lossless => escape_level(l, &mut out),
            l => out.push_str(l),
        }
    }
    out
}

/// The arguments of a client's own subscription queue: at most `max_queued`
/// ready messages (those in flight are unacknowledged, not counted), the
/// oldest dropped beyond it (`drop-head`: publishers and other subscribers are
/// never refused or slowed; drops are counted as dead-lettered `maxlen`).
/// Empty when `max_queued` is 0 (no limit).
pub fn session_queue_arguments(max_queued: u32) -> FieldTable {
    let mut args = FieldTable::new();
    if max_queued > 0 {
        args.insert("x-max-length", FieldValue::I64(i64::from(max_queued)));
        args.insert("x-overflow", FieldValue::LongStr("drop-head".into()));
    }
    args
}

/// The queue of shared subscription group `group` on `filter`, whose binding
/// key is `key`. Named from the key (as ever) when the key tells the filter
/// apart; in the default mode a `.` or `*` inside a level makes keys collide
/// (`a.b/c` and `a/b.c` are both `a.b.c`), and the group would share one queue
/// between two filters: those are named from the filter itself after a `/`,
/// which no key contains, so the two kinds of names never meet.
pub fn shared_queue_name(group: &str, filter: &str, key: &str, lossless: bool) -> String {
    if lossless || !filter.contains(['.', '*']) {
        format!("mqtt-shared-{group}-{key}")
    } else {
        format!("mqtt-shared-{group}/{filter}")
    }
}

/// The arguments of the binding an MQTT subscription to `filter` makes. In the
/// default mode the binding carries its MQTT filter, so that a message published
/// on a topic with a `.` inside a level is routed by MQTT's rules on its real
/// topic (core's exchange.rs): `plant/v1.2/+` takes `plant/v1.2/temp.celsius`,
/// although RabbitMQ's key `plant.v1.2.*` cannot. The lossless mode's escaped
/// keys are exact already.
pub fn binding_arguments(filter: &str, lossless: bool) -> FieldTable {
    let mut args = FieldTable::new();
    if !lossless {
        args.insert(
            switchyard_core::exchange::MQTT_TOPIC_FILTER_ARG,
            FieldValue::string(filter),
        );
    }
    args
}

/// The MQTT topic name of a routing key.
pub fn key_to_topic(key: &str, lossless: bool) -> String {
    if !lossless {
        return key.replace('.', "/");
    }
    let mut out = String::with_capacity(key.len());
    for (i, word) in key.split('.').enumerate() {
        if i > 0 {
            out.push('/');
        }
        unescape_level(word, &mut out);
    }
    out
}

/// A topic name a client may publish to: not empty, no wildcard, no U+0000
/// (the codec has checked UTF-8), at most 65,535 bytes.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0']) && topic.len() <= usize::from(u16::MAX)
}

/// A topic filter: not empty; `+` only as a whole level; `#` only as the whole
/// last level (spec 4.7.1).
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len().saturating_sub(1);
    levels.iter().enumerate().all(|(i, l)| {
        if l.contains('#') {
            *l == "#" && i == last
        } else if l.contains('+') {
            *l == "+"
        } else {
            true
        }
    })
}

/// A `$share/<group>/<filter>` subscription split into (group, filter).
/// `Some(Err(()))` when it starts with `$share/` but is not valid.
pub fn parse_shared(filter: &str) -> Option<Result<(&str, &str), ()>> {
    let rest = filter.strip_prefix("$share/")?;
    Some(match rest.split_once('/') {
        Some((group, f)) if !group.is_empty() && !group.contains(['+', '#']) && valid_filter(f) => {
            Ok((group, f))
        }
        _ => Err(()),
    })
}

/// Whether `filter` matches `topic` with MQTT's rules, including spec 4.7.2:
/// a filter starting with a wildcard does not match a topic starting with `$`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

// ---------------------------------------------------------------- messages

/// What a PUBLISH carries, topic resolved (alias applied).
#[derive(Debug, Clone)]
pub struct MqttMessage {
    pub topic: String,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
    pub payload: Bytes,
}

/// MQTT -> core. Rules (INTEROP.md's table):
/// - exchange: the configured MQTT exchange; routing key from the topic.
/// - QoS 0 -> delivery-mode 1, QoS 1/2 -> delivery-mode 2; the exact QoS in
///   `x-mqtt-publish-qos`; RETAIN in `x-mqtt-retain`.
/// - Message Expiry Interval (s) -> expiration (ms, as a string).
/// - Response Topic -> header `x-reply-to-topic`, converted to AMQP form.
/// - Correlation Data -> correlation-id if UTF-8 and < 256 bytes, else header
///   `x-correlation-id` (bytes).
/// - User Properties -> headers with string values (duplicates kept, in order).
/// - Content Type -> content-type; Payload Format Indicator -> header.
pub fn to_core(
    m: MqttMessage,
    exchange: &str,
    lossless: bool,
    origin: u64,
    now_ms: u64,
) -> Arc<Message> {
    let p = m.properties;
    // Correlation data that is a short UTF-8 string is the correlation-id
    // property; any other is kept whole in a header.
    let (correlation_id, correlation_header) = match p.correlation_data {
        Some(cd) => match std::str::from_utf8(&cd) {
            Ok(s) if s.len() < 256 => (Some(s.to_owned()), None),
            _ => (None, Some(cd)),
        },
        None => (None, None),
    };
    // Exactly the room the headers below take: a table grown by pushing has
    // room for 4, which `Props::from` would then shrink with a realloc on
    // every PUBLISH.
    let entries = 1
        + usize::from(m.retain)
        + usize::from(p.response_topic.is_some())
        + usize::from(correlation_header.is_some())
        + usize::from(p.payload_format_indicator.is_some())
        + p.user_properties.len();
    let mut headers = FieldTable(Vec::with_capacity(entries));
    headers.insert(HEADER_PUBLISH_QOS, FieldValue::U8(m.qos.as_u8()));
    if m.retain {
        headers.insert(HEADER_RETAIN, FieldValue::Bool(true));
    }
    if let Some(rt) = &p.response_topic {
        headers.insert(
            HEADER_REPLY_TO_TOPIC,
            FieldValue::string(topic_to_key(rt, lossless)),
        );
    }
    if let Some(cd) = correlation_header {
        headers.insert(HEADER_CORRELATION_ID, FieldValue::LongStr(cd));
    }
    if let Some(pfi) = p.payload_format_indicator {
        headers.insert(HEADER_PAYLOAD_FORMAT, FieldValue::U8(pfi));
    }
    for (k, v) in p.user_properties {
        // Pushed, not inserted: MQTT allows a name more than once.
        headers.0.push((k.into(), FieldValue::string(v)));
    }
    let properties = AmqpProperties {
        content_type: p.content_type,
        headers: Some(headers),
        delivery_mode: Some(if m.qos == QoS::AtMostOnce {
            1
        } else {
            DELIVERY_MODE_PERSISTENT
        }),
        correlation_id,
        expiration: p
            .message_expiry_interval
            .map(|s| (u64::from(s) * 1000).to_string()),
        ..AmqpProperties::default()
    };
    let routing_key = topic_to_key(&m.topic, lossless);
    // The topic rides along only when the key cannot give it back. In the
    // default mode that is exactly a topic with a `.` inside a level (`/` and `.`
    // both become `.`), so the common case costs a scan, not a second string.
    let loses_topic = if lossless {
        key_to_topic(&routing_key, lossless) != m.topic
    } else {
        m.topic.contains('.')
    };
    let topic = loses_topic.then(|| m.topic.into_boxed_str());
    Arc::new(Message {
        exchange: exchange.into(),
        routing_key,
        properties: properties.into(),
        body: message::own_if_small(m.payload),
        origin: Some(origin).into(),
        received_ms: Some(now_ms).into(),
        topic,
    })
}

/// The QoS a core message was published with: `x-mqtt-publish-qos` if an MQTT
/// client published it, else from delivery-mode (persistent = QoS 1).
pub fn published_qos(m: &Message) -> QoS {
    let from_header = m
        .properties
        .headers
        .as_ref()
        .and_then(|h| h.get_i64(HEADER_PUBLISH_QOS))
        .and_then(|q| u8::try_from(q).ok())
        .and_then(QoS::from_u8);
    from_header.unwrap_or(if m.properties.is_persistent() {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    })
}

/// Whether the publisher set RETAIN.
pub fn published_retain(m: &Message) -> bool {
    m.properties
        .headers
        .as_ref()
        .and_then(|h| h.get_bool(HEADER_RETAIN))
        .unwrap_or(false)
}

/// A header value as a user-property string, if it has a natural text form.
fn header_text(v: &FieldValue) -> Option<String> {
    if let Some(s) = v.as_str() {
        return Some(s.to_owned());
    }
    if let Some(i) = v.as_i64() {
        return Some(i.to_string());
    }
    match v {
        FieldValue::Bool(b) => Some(b.to_string()),
        FieldValue::F32(f) => Some(f.to_string()),
        FieldValue::F64(f) => Some(f.to_string()),
        _ => None,
    }
}

/// Core -> MQTT 5 properties and topic: the reverse of [`to_core`]. The
/// expiry sent is what is left of it (spec 3.3.2.3.3); `None` means the
/// message has expired and must not be sent. Headers with no text form (tables,
/// arrays) are not sent as user properties. An AMQP message's `reply-to` is
/// not a topic, so it is not mapped (only `x-reply-to-topic` is).
pub fn from_core(m: &Message, lossless: bool, now_ms: u64) -> Option<(String, Properties)> {
    let mut p = Properties::default();
    if let Some(ms) = m.properties.expiration_ms() {
        let elapsed = m.received_ms.get().map_or(0, |r| now_ms.saturating_sub(r));
        let left = ms.checked_sub(elapsed).filter(|l| *l > 0)?;
        p.message_expiry_interval = Some(u32::try_from(left.div_ceil(1000)).unwrap_or(u32::MAX));
    }
    p.content_type = m.properties.content_type.clone();
    if let Some(c) = &m.properties.correlation_id {
        p.correlation_data = Some(Bytes::from(c.clone()));
    }
    if let Some(h) = &m.properties.headers {
        for (k, v) in h.iter() {
            match k {
                HEADER_REPLY_TO_TOPIC => {
                    if let Some(s) = v.as_str() {
                        p.response_topic = Some(key_to_topic(s, lossless));
                    }
                }
                HEADER_CORRELATION_ID => {
                    if p.correlation_data.is_none() {
                        if let FieldValue::LongStr(b) | FieldValue::ByteArray(b) = v {
                            p.correlation_data = Some(b.clone());
                        }
                    }
                }
                HEADER_PAYLOAD_FORMAT => {
                    p.payload_format_indicator = v
                        .as_i64()
                        .and_then(|x| u8::try_from(x).ok())
                        .filter(|x| *x <= 1);
                }
                k if RESERVED_HEADERS.contains(&k) => {}
                k => {
                    if let Some(text) = header_text(v) {
                        p.user_properties.push((k.to_owned(), text));
                    }
                }
            }
        }
    }
    Some((topic_of(m, lossless), p))
}

/// The MQTT topic a subscriber receives a core message on. Rule: the topic the
/// MQTT publisher used (the message's `topic` annotation) when the message
/// still carries the routing key that topic maps to; otherwise (AMQP or STOMP
/// publishers, a dead-letter routing key) the topic rebuilt from the routing
/// key (`.` -> `/`).
pub fn topic_of(m: &Message, lossless: bool) -> String {
    match &m.topic {
        Some(t) if topic_to_key(t, lossless) == m.routing_key => String::from(&**t),
        _ => key_to_topic(&m.routing_key, lossless),
    }
}

/// Whether a subscription (its MQTT filter and the binding key made from it)
/// takes a message that reached its queue with `routing_key`, delivered as
/// `topic`. Rules:
/// - a topic starting with `$` is never taken by a filter starting with a
///   wildcard (spec 4.7.2), although AMQP's `#` matches its key;
/// - a message an MQTT client published (`exact`: its topic is the one it was
///   published on, see [`topic_of`]) is taken when the filter matches the topic
///   with MQTT's rules, as Mosquitto decides: `a/+/c` does not take `a.b/c`,
///   although RabbitMQ's key `a.b.c` matches its binding `a.*.c`;
/// - any other message (AMQP, STOMP) is taken when the filter matches its
///   topic or the binding key matches its routing key: it was routed here, and
///   a `.` inside the filter's level (`v1.2/+` matching key `v1.2.x`, topic
///   `v1/2/x`) must not make it vanish at delivery.
pub fn subscription_matches(
    filter: &str,
    pattern: &str,
    topic: &str,
    routing_key: &str,
    exact: bool,
) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    filter_matches(filter, topic) || (!exact && key_matches(pattern, routing_key))
}

/// Whether [`topic_of`] gives the topic an MQTT client published `m` on (the
/// routing key alone cannot say so when `m` carries no annotation: an AMQP
/// key never has one).
pub fn has_published_topic(m: &Message, lossless: bool) -> bool {
    m.topic
        .as_deref()
        .is_some_and(|t| topic_to_key(t, lossless) == m.routing_key)
}

/// Whether the binding key `pattern` matches the routing key `key` with the
/// AMQP topic exchange's rules (`*` one word, `#` zero or more). Binding keys
/// made by [`filter_to_key`] have `#` only as their last word (an MQTT filter
/// has `#` only as its last level), which is all this needs to handle: a `#`
/// elsewhere only matches itself. Linear in the number of words.
pub fn key_matches(pattern: &str, key: &str) -> bool {
    let mut p = switchyard_core::topic::words(pattern).peekable();
    let mut k = switchyard_core::topic::words(key);
    loop {
        match (p.next(), k.next()) {
            (Some("#"), _) if p.peek().is_none() => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_both_ways() {
        assert_eq!(
            topic_to_key("sensors/room1/temp", false),
            "sensors.room1.temp"
        );
        assert_eq!(
            key_to_topic("sensors.room1.temp", false),
            "sensors/room1/temp"
        );
        assert_eq!(filter_to_key("sensors/+/temp", false), "sensors.*.temp");
        assert_eq!(filter_to_key("sensors/#", false), "sensors.#");
        // Lossy by default: the dot becomes a level.
        assert_eq!(
            key_to_topic(&topic_to_key("v1.2/x", false), false),
            "v1/2/x"
        );
        // Lossless mode round-trips dots, percent signs and stars.
        for t in ["v1.2/x", "a%2E/b", "*/#x/a.b.c", "/lead/", "100%"] {
            assert_eq!(key_to_topic(&topic_to_key(t, true), true), t, "{t}");
        }
        assert_eq!(topic_to_key("v1.2/x", true), "v1%2E2.x");
        assert_eq!(filter_to_key("v1.2/+/#", true), "v1%2E2.*.#");
    }

    #[test]
    fn filters_match_with_mqtt_rules() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(filter_matches("#", "a/b"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(!filter_matches("+/x", "$SYS/x"));
        assert!(filter_matches("$SYS/#", "$SYS/x"));
        assert!(filter_matches("+/+", "/x"));
    }

    #[test]
    fn published_topics_ride_along_only_when_the_key_loses_them() {
        let mk = |topic: &str, lossless: bool| {
            to_core(
                MqttMessage {
                    topic: topic.into(),
                    qos: QoS::AtMostOnce,
                    retain: false,
                    properties: Properties::default(),
                    payload: Bytes::new(),
                },
                "amq.topic",
                lossless,
                1,
                0,
            )
        };
        let m = mk("v1.2/x", false);
        assert_eq!(m.routing_key, "v1.2.x");
        assert_eq!(m.topic.as_deref(), Some("v1.2/x"));
        assert_eq!(topic_of(&m, false), "v1.2/x");
        assert!(has_published_topic(&m, false));
        assert_eq!(mk("a/b", false).topic, None);
        assert_eq!(mk("v1.2/x", true).topic, None);
        // A dead-letter routing key replaces the key: the topic no longer fits.
        let mut dl = (*m).clone();
        dl.routing_key = "failed".into();
        assert_eq!(topic_of(&dl, false), "failed");
        assert!(!has_published_topic(&dl, false));
    }

    #[test]
    fn subscriptions_match_mqtt_topics_the_mqtt_way_and_amqp_keys_either_way() {
        assert!(key_matches("a.*.c", "a.b.c"));
        assert!(key_matches("a.#", "a"));
        assert!(key_matches("#", ""));
        assert!(!key_matches("a.*", "a.b.c"));
        assert!(!key_matches("a.#", ""));
        // MQTT publisher: MQTT's rules only.
        assert!(subscription_matches(
            "v1.2/+", "v1.2.*", "v1.2/x", "v1.2.x", true
        ));
        assert!(!subscription_matches(
            "a/+/c", "a.*.c", "a.b/c", "a.b.c", true
        ));
        // AMQP publisher: routed by the key, delivered.
        assert!(subscription_matches(
            "v1.2/+", "v1.2.*", "v1/2/x", "v1.2.x", false
        ));
        // `$` topics never under a leading wildcard.
        assert!(!subscription_matches("#", "#", "$SYS/x", "$SYS.x", false));
        assert!(subscription_matches(
            "$SYS/#", "$SYS.#", "$SYS/x", "$SYS.x", false
        ));
    }

    #[test]
    fn filter_validation() {
        for ok in ["a", "#", "+", "a/+/b", "a/#", "/", "+/+"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "#/a"] {
            assert!(!valid_filter(bad), "{bad}");
        }
        assert_eq!(parse_shared("$share/g/a/+"), Some(Ok(("g", "a/+"))));
        assert_eq!(parse_shared("$share/g"), Some(Err(())));
        assert_eq!(parse_shared("$share//a"), Some(Err(())));
        assert_eq!(parse_shared("a/b"), None);
    }

    #[test]
    fn properties_round_trip_through_the_core() {
        let p = Properties {
            message_expiry_interval: Some(30),
            content_type: Some("text/plain".into()),
            response_topic: Some("replies/x".into()),
            correlation_data: Some(Bytes::from_static(b"7")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            payload_format_indicator: Some(1),
            ..Properties::default()
        };
        let m = to_core(
            MqttMessage {
                topic: "a/b".into(),
                qos: QoS::ExactlyOnce,
                retain: true,
                properties: p.clone(),
                payload: Bytes::from_static(b"hi"),
            },
            "amq.topic",
            false,
            9,
            1000,
        );
        assert_eq!(m.routing_key, "a.b");
        assert_eq!(m.properties.expiration.as_deref(), Some("30000"));
        assert_eq!(m.properties.correlation_id.as_deref(), Some("7"));
        assert!(m.properties.is_persistent());
        let h = m.properties.headers.as_ref().unwrap();
        assert_eq!(h.get_str(HEADER_REPLY_TO_TOPIC), Some("replies.x"));
        assert_eq!(published_qos(&m), QoS::ExactlyOnce);
        assert!(published_retain(&m));
        let (topic, back) = from_core(&m, false, 11_500).unwrap();
        assert_eq!(topic, "a/b");
        // 10.5 s of 30 s elapsed: 19.5 s left, rounded up.
        assert_eq!(back.message_expiry_interval, Some(20));
        assert_eq!(back.response_topic.as_deref(), Some("replies/x"));
        assert_eq!(back.user_properties, p.user_properties);
        assert_eq!(back.payload_format_indicator, Some(1));
        assert!(from_core(&m, false, 31_001).is_none(), "expired");
    }

    #[test]
    fn long_or_binary_correlation_data_goes_to_a_header() {
        let bin = Bytes::from_static(&[0xff, 0x00, 0x01]);
        let m = to_core(
            MqttMessage {
                topic: "t".into(),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: Properties {
                    correlation_data: Some(bin.clone()),
                    ..Properties::default()
                },
                payload: Bytes::new(),
            },
            "amq.topic",
            false,
            1,
            0,
        );
        assert_eq!(m.properties.correlation_id, None);
        assert_eq!(m.properties.delivery_mode, Some(1));
        let (_, back) = from_core(&m, false, 0).unwrap();
        assert_eq!(back.correlation_data, Some(bin));
    }
}

//! Exchanges and their bindings: where a published message goes.
//!
//! Each exchange owns its bindings behind a `RwLock`: publishers only read it (many
//! at once, briefly, never across an `.await`), declare/bind/unbind write it.
//! Bindings are indexed by exchange type so routing cost does not grow with the
//! number of bindings: a hash map for `direct`, a trie for `topic`, a list for
//! `fanout` and `headers` (headers must test each binding anyway).
//!
//! A topic exchange also indexes the bindings MQTT subscriptions made
//! ([`MQTT_TOPIC_FILTER_ARG`]) by their MQTT filter. RabbitMQ's mapping turns both
//! `/` and `.` of an MQTT topic into `.`, so its binding keys cannot tell
//! `plant/v1.2/+` from `plant/v1/2/+`: a message an MQTT client published on a
//! topic with a `.` inside a level (it carries that topic, [`Message::topic`])
//! is matched against those bindings with MQTT's own rules on its real topic,
//! exactly as Mosquitto would, and against every other binding by its routing
//! key as RabbitMQ does. Every other message matches every binding by key.
//!
//! [`Message::topic`]: crate::message::Message::topic

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::field::{FieldTable, FieldValue};
use crate::queue::Queue;
use crate::stats::{self, Counters, History, MessageStats, Range, Stat};
use crate::topic::{Syntax, TopicTrie};

/// The binding argument an MQTT subscription's binding carries: its MQTT topic
/// filter (without `$share/<group>/`), so that routing can apply MQTT's rules to
/// messages whose real topic the routing key does not give back.
pub const MQTT_TOPIC_FILTER_ARG: &str = "x-mqtt-topic-filter";

/// The four exchange types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// Where a binding leads: a queue (held directly, so routing needs no lookup) or
/// another exchange (held by name, so exchange-to-exchange cycles leak nothing).
#[derive(Debug, Clone)]
pub enum Destination {
    Queue(Arc<Queue>),
    Exchange(String),
}

/// A destination's identity within a vhost.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DestinationName {
    Queue(String),
    Exchange(String),
}

impl Destination {
    pub fn name(&self) -> DestinationName {
        match self {
            Destination::Queue(q) => DestinationName::Queue(q.name.clone()),
            Destination::Exchange(x) => DestinationName::Exchange(x.clone()),
        }
    }
}

/// One binding from an exchange.
#[derive(Debug)]
pub struct Binding {
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
    /// Pre-parsed `headers`-exchange matching rule.
    headers: Option<HeadersMatch>,
    /// The MQTT filter of a topic-exchange binding an MQTT subscription made.
    mqtt_filter: Option<Box<str>>,
}

/// The bindings of one exchange, indexed for its type.
#[derive(Debug)]
struct Bindings {
    /// Every binding by destination, then routing key: for unbind, listing and
    /// queue deletion. Keyed twice so that binding one queue under 100k keys
    /// stays O(1) per bind, not a scan of that queue's other bindings.
    by_destination: HashMap<DestinationName, HashMap<String, Vec<Arc<Binding>>>>,
    /// The routing index (for `fanout` and `headers` this is just the list).
    direct: HashMap<String, Vec<Arc<Binding>>>,
    topic: TopicTrie<Arc<Binding>>,
    /// The topic bindings that carry an MQTT filter, by that filter (they are
    /// in `topic` too).
    mqtt: TopicTrie<Arc<Binding>>,
    list: Vec<Arc<Binding>>,
    count: usize,
}

/// Properties fixed at declaration; compared on re-declaration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExchangeOptions {
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

/// An exchange.
#[derive(Debug)]
pub struct Exchange {
    pub name: String,
    pub kind: ExchangeKind,
    pub options: ExchangeOptions,
    bindings: RwLock<Bindings>,
    /// `publish_in` / `publish_out`, bumped by routing (stats.rs).
    pub stats: Counters,
    pub history: History,
}

impl Exchange {
    pub fn new(name: impl Into<String>, kind: ExchangeKind, options: ExchangeOptions) -> Self {
        Exchange {
            name: name.into(),
            kind,
            options,
            bindings: RwLock::new(Bindings::default()),
            stats: Counters::default(),
            history: History::default(),
        }
    }

    /// Counts one message published to this exchange that reached `queues`
    /// queues (RabbitMQ's `publish_in`, and `publish_out` per queue reached).
    #[inline]
    pub fn count_routed(&self, queues: usize) {
        self.stats.add(Stat::PublishIn, 1);
        if queues > 0 {
            self.stats.add(Stat::PublishOut, queues as u64);
        }
    }

    /// RabbitMQ's `message_stats` of this exchange.
    pub fn message_stats(&self, range: Option<Range>) -> MessageStats {
        self.history
            .message_stats(&self.stats.snapshot(), stats::EXCHANGE_KEYS, range)
    }

    /// The `alternate-exchange` argument: where messages this exchange cannot
    /// route go instead.
    pub fn alternate_exchange(&self) -> Option<&str> {
        self.options.arguments.get_str("alternate-exchange")
    }

    pub fn binding_count(&self) -> usize {
        self.bindings.read().count
    }

    /// Adds a binding; an identical binding (same destination, key and arguments)
    /// is not added twice. Returns whether it was new.
    pub fn bind(&self, destination: Destination, routing_key: &str, arguments: FieldTable) -> bool {
        let mut b = self.bindings.write();
        let dest_name = destination.name();
        if b.find(&dest_name, routing_key, &arguments).is_some() {
            return false;
        }
        let headers = (self.kind == ExchangeKind::Headers).then(|| HeadersMatch::new(&arguments));
        let mqtt_filter = (self.kind == ExchangeKind::Topic)
            .then(|| arguments.get_str(MQTT_TOPIC_FILTER_ARG))
            .flatten()
            .map(Box::from);
        let binding = Arc::new(Binding {
            destination,
            routing_key: routing_key.to_owned(),
            arguments,
            headers,
            mqtt_filter,
        });
        match self.kind {
            ExchangeKind::Direct => b
                .direct
                .entry(routing_key.to_owned())
                .or_default()
                .push(binding.clone()),
            ExchangeKind::Topic => {
                if let Some(filter) = &binding.mqtt_filter {
                    b.mqtt.insert(filter, binding.clone());
                }
                b.topic.insert(routing_key, binding.clone());
            }
            ExchangeKind::Fanout | ExchangeKind::Headers => b.list.push(binding.clone()),
        }
        b.by_destination
            .entry(dest_name)
            .or_default()
            .entry(routing_key.to_owned())
            .or_default()
            .push(binding);
        b.count += 1;
        true
    }

    /// Removes one binding. Returns whether it existed.
    pub fn unbind(
        &self,
        destination: &DestinationName,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> bool {
        let mut b = self.bindings.write();
        let Some(by_key) = b.by_destination.get_mut(destination) else {
            return false;
        };
        let Some(list) = by_key.get_mut(routing_key) else {
            return false;
        };
        let Some(pos) = list.iter().position(|x| x.arguments == *arguments) else {
            return false;
        };
        let binding = list.remove(pos);
        if list.is_empty() {
            by_key.remove(routing_key);
            if by_key.is_empty() {
                b.by_destination.remove(destination);
            }
        }
        b.remove_from_index(self.kind, &binding);
        true
    }

    /// Removes every binding to `destination` (the queue or exchange is going away).
    pub fn unbind_all(&self, destination: &DestinationName) -> usize {
        let mut b = self.bindings.write();
        let Some(by_key) = b.by_destination.remove(destination) else {
            return 0;
        };
        let mut removed = 0;
        for binding in by_key.values().flatten() {
            b.remove_from_index(self.kind, binding);
            removed += 1;
        }
        removed
    }

    /// Whether a binding with this destination, key and arguments exists.
    pub fn has_binding(
        &self,
        destination: &DestinationName,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> bool {
        self.bindings
            .read()
            .find(destination, routing_key, arguments)
            .is_some()
    }

    /// Every binding, for listing.
    pub fn bindings(&self) -> Vec<Arc<Binding>> {
        self.bindings
            .read()
            .by_destination
            .values()
            .flat_map(HashMap::values)
            .flatten()
            .cloned()
            .collect()
    }

    /// Calls `found` with the destination of every binding matching the message.
    /// The same destination may be reported more than once; the caller dedups.
    /// `mqtt_topic` is the real MQTT topic of a message an MQTT client published
    /// when its routing key cannot give it back (module docs).
    pub fn route(
        &self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        mqtt_topic: Option<&str>,
        mut found: impl FnMut(&Destination),
    ) {
        let b = self.bindings.read();
        match self.kind {
            ExchangeKind::Direct => {
                if let Some(list) = b.direct.get(routing_key) {
                    list.iter().for_each(|x| found(&x.destination));
                }
            }
            ExchangeKind::Fanout => b.list.iter().for_each(|x| found(&x.destination)),
            ExchangeKind::Topic => match mqtt_topic {
                Some(topic) if !b.mqtt.is_empty() => {
                    b.topic.matches(routing_key, |x| {
                        if x.mqtt_filter.is_none() {
                            found(&x.destination);
                        }
                    });
                    b.mqtt.matches(topic, |x| found(&x.destination));
                }
                _ => b.topic.matches(routing_key, |x| found(&x.destination)),
            },
            ExchangeKind::Headers => {
                for x in &b.list {
                    if x.headers.as_ref().is_some_and(|m| m.matches(headers)) {
                        found(&x.destination);
                    }
                }
            }
        }
    }
}

impl Default for Bindings {
    fn default() -> Self {
        Bindings {
            by_destination: HashMap::new(),
            direct: HashMap::new(),
            topic: TopicTrie::new(),
            mqtt: TopicTrie::with_syntax(Syntax::Mqtt),
            list: Vec::new(),
            count: 0,
        }
    }
}

impl Bindings {
    fn find(
        &self,
        destination: &DestinationName,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Option<&Arc<Binding>> {
        self.by_destination
            .get(destination)?
            .get(routing_key)?
            .iter()
            .find(|x| x.arguments == *arguments)
    }

    fn remove_from_index(&mut self, kind: ExchangeKind, binding: &Arc<Binding>) {
        let same = |x: &Arc<Binding>| Arc::ptr_eq(x, binding);
        match kind {
            ExchangeKind::Direct => {
                if let Some(list) = self.direct.get_mut(&binding.routing_key) {
                    list.retain(|x| !same(x));
                    if list.is_empty() {
                        self.direct.remove(&binding.routing_key);
                    }
                }
            }
            ExchangeKind::Topic => {
                if let Some(filter) = &binding.mqtt_filter {
                    self.mqtt.remove(filter, same);
                }
                self.topic.remove(&binding.routing_key, same);
            }
            ExchangeKind::Fanout | ExchangeKind::Headers => self.list.retain(|x| !same(x)),
        }
        self.count = self.count.saturating_sub(1);
    }
}

/// A `headers`-exchange rule, parsed once at bind time.
///
/// RabbitMQ's semantics: `x-match` is `all` (default), `any`, `all-with-x` or
/// `any-with-x`. Binding arguments whose name starts with `x-` are ignored unless
/// the mode is one of the `-with-x` ones. A `Void` argument matches any value of
/// a header of that name; otherwise the header must be present with an equal value.
/// `all` with no arguments matches everything; `any` with none matches nothing.
#[derive(Debug)]
struct HeadersMatch {
    any: bool,
    required: Vec<(String, FieldValue)>,
}

impl HeadersMatch {
    fn new(args: &FieldTable) -> Self {
        let mode = args.get_str("x-match").unwrap_or("all");
        let any = mode.starts_with("any");
        let with_x = mode.ends_with("-with-x");
        let required = args
            .iter()
            .filter(|(k, _)| *k != "x-match" && (with_x || !k.starts_with("x-")))
            .map(|(k, v)| (k.to_owned(), v.clone()))
            .collect();
        HeadersMatch { any, required }
    }

    fn matches(&self, headers: Option<&FieldTable>) -> bool {
        let one = |(name, want): &(String, FieldValue)| match headers.and_then(|h| h.get(name)) {
            None => false,
            Some(_) if *want == FieldValue::Void => true,
            Some(got) => got == want,
        };
        if self.any {
            self.required.iter().any(one)
        } else {
            self.required.iter().all(one)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, FieldValue)]) -> FieldTable {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn headers_modes() {
        let s = FieldValue::string;
        let all = HeadersMatch::new(&table(&[("a", s("1")), ("b", s("2"))]));
        let any = HeadersMatch::new(&table(&[
            ("x-match", s("any")),
            ("a", s("1")),
            ("b", s("2")),
        ]));
        let h_a = table(&[("a", s("1"))]);
        let h_ab = table(&[("a", s("1")), ("b", s("2")), ("c", s("3"))]);
        assert!(!all.matches(Some(&h_a)));
        assert!(all.matches(Some(&h_ab)));
        assert!(any.matches(Some(&h_a)));
        assert!(!any.matches(None));
        let empty_all = HeadersMatch::new(&FieldTable::new());
        assert!(empty_all.matches(None));
        let empty_any = HeadersMatch::new(&table(&[("x-match", s("any"))]));
        assert!(!empty_any.matches(Some(&h_ab)));
        let void = HeadersMatch::new(&table(&[("a", FieldValue::Void)]));
        assert!(void.matches(Some(&table(&[("a", FieldValue::I32(9))]))));
        let x_ignored = HeadersMatch::new(&table(&[("x-k", s("v"))]));
        assert!(x_ignored.matches(None));
        let with_x = HeadersMatch::new(&table(&[("x-match", s("all-with-x")), ("x-k", s("v"))]));
        assert!(!with_x.matches(None));
        assert!(with_x.matches(Some(&table(&[("x-k", s("v"))]))));
    }
}

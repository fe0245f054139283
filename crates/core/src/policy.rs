//! Queue policies (RabbitMQ's `set_policy`, here from the configuration) and the
//! effective settings of a queue: its `x-` arguments merged with the one policy
//! that applies to it.
//!
//! Which policy applies: among the policies of the queue's vhost whose
//! `apply_to` covers queues and whose pattern (a regex, searched unanchored as
//! RabbitMQ's `re:run` does) matches the queue name, the one with the highest
//! priority; on a tie the one defined first. Only one policy applies, as in
//! RabbitMQ: definitions are not merged across policies.
//!
//! How a policy and an argument for the same key combine is RabbitMQ's rule
//! (rabbit_amqqueue_process's `process_args_policy` and rabbit_quorum_queue):
//! for limits the lower value wins (`message-ttl`, `expires`, `max-length`,
//! `max-length-bytes`, `delivery-limit`); for everything else the queue's own
//! argument wins (`dead-letter-exchange`, `dead-letter-routing-key`, `overflow`).
//! `max-priority` and `single-active-consumer` are not policy keys in RabbitMQ
//! (they change how a queue is built, so they can only be fixed at declaration):
//! a policy naming them is refused, as `rabbitmqctl set_policy` refuses it.

use parking_lot::RwLock;
use regex::Regex;

use crate::admin::PolicySpec;
use crate::field::{FieldTable, FieldValue};

/// What kinds of entity a policy applies to (RabbitMQ's `apply-to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyTo {
    Queues,
    Exchanges,
    All,
}

impl ApplyTo {
    pub fn name(self) -> &'static str {
        match self {
            ApplyTo::Queues => "queues",
            ApplyTo::Exchanges => "exchanges",
            ApplyTo::All => "all",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queues" => Some(ApplyTo::Queues),
            "exchanges" => Some(ApplyTo::Exchanges),
            "all" => Some(ApplyTo::All),
            _ => None,
        }
    }
}

/// How a queue over its length limit makes room (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop (or dead-letter, reason `maxlen`) the oldest ready messages.
    #[default]
    DropHead,
    /// Refuse the new message (a publisher in confirm mode gets a nack).
    RejectPublish,
    /// Refuse it and dead-letter it (reason `maxlen`).
    RejectPublishDlx,
}

impl Overflow {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "drop-head" => Some(Overflow::DropHead),
            "reject-publish" => Some(Overflow::RejectPublish),
            "reject-publish-dlx" => Some(Overflow::RejectPublishDlx),
            _ => None,
        }
    }
}

/// The queue settings a policy can set; `None` leaves the key alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyDefinition {
    pub message_ttl: Option<u64>,
    pub expires: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Option<Overflow>,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    pub delivery_limit: Option<u64>,
    /// Streams' `max-age` (RabbitMQ's grammar, e.g. `"7D"`), in milliseconds.
    pub max_age_ms: Option<u64>,
}

/// Shows a value the way RabbitMQ's validation errors print Erlang terms.
fn show(v: &FieldValue) -> String {
    match (v.as_str(), v.as_i64(), v) {
        (Some(s), _, _) => format!("<<\"{s}\">>"),
        (None, Some(i), _) => i.to_string(),
        (None, None, FieldValue::Bool(b)) => b.to_string(),
        (None, None, other) => format!("{other:?}"),
    }
}

impl PolicyDefinition {
    /// Validates a definition with RabbitMQ's keys and error texts.
    pub fn parse(definition: &FieldTable) -> Result<Self, String> {
        let mut d = PolicyDefinition::default();
        let mut unknown = Vec::new();
        for (key, value) in definition.iter() {
            let int = |min: i64, what: &str| -> Result<u64, String> {
                value
                    .as_i64()
                    .filter(|n| *n >= min)
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or_else(|| format!("{} is not a valid {what}", show(value)))
            };
            let text = |what: &str| -> Result<String, String> {
                value
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{} is not a valid {what}", show(value)))
            };
            match key {
                "message-ttl" => d.message_ttl = Some(int(0, "message TTL")?),
                "expires" => d.expires = Some(int(1, "queue expiry")?),
                "max-length" => d.max_length = Some(int(0, "maximum length")?),
                "max-length-bytes" => d.max_length_bytes = Some(int(0, "maximum length in bytes")?),
                "delivery-limit" => d.delivery_limit = Some(int(0, "delivery limit")?),
                "max-age" => {
                    d.max_age_ms = Some(
                        value
                            .as_str()
                            .and_then(crate::stream::parse_max_age)
                            .ok_or_else(|| format!("{} is not a valid max age", show(value)))?,
                    )
                }
                "dead-letter-exchange" => {
                    d.dead_letter_exchange = Some(text("dead letter exchange name")?)
                }
                "dead-letter-routing-key" => {
                    d.dead_letter_routing_key = Some(text("dead letter routing key")?)
                }
                "overflow" => {
                    d.overflow =
                        Some(value.as_str().and_then(Overflow::parse).ok_or_else(|| {
                            format!("{} is not a valid overflow value", show(value))
                        })?)
                }
                _ => unknown.push(format!("{{<<\"{key}\">>,{}}}", show(value))),
            }
        }
        if !unknown.is_empty() {
            return Err(format!(
                "[{}] are not recognised policy settings",
                unknown.join(",")
            ));
        }
        Ok(d)
    }
}

/// One policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub vhost: String,
    pub pattern: Regex,
    pub apply_to: ApplyTo,
    pub priority: i64,
    pub definition: PolicyDefinition,
    /// The definition as given, for listing and export.
    pub definition_table: FieldTable,
}

/// The keys an operator policy may set (RabbitMQ's `operator_policy_validator`
/// registrations that Switchyard implements).
const OPERATOR_KEYS: [&str; 6] = [
    "expires",
    "message-ttl",
    "max-length",
    "max-length-bytes",
    "delivery-limit",
    "overflow",
];

impl Policy {
    /// Builds a policy, checking the pattern, `apply_to` and definition.
    pub fn new(
        name: impl Into<String>,
        vhost: impl Into<String>,
        pattern: &str,
        apply_to: &str,
        priority: i64,
        definition_table: &FieldTable,
    ) -> Result<Self, String> {
        let name = name.into();
        let definition = definition_table;
        let pattern = Regex::new(pattern)
            .map_err(|e| format!("policy '{name}': invalid pattern '{pattern}': {e}"))?;
        let apply_to = ApplyTo::parse(apply_to).ok_or_else(|| {
            format!("policy '{name}': apply_to '{apply_to}' is not one of queues, exchanges, all")
        })?;
        let definition = PolicyDefinition::parse(definition)
            .map_err(|e| format!("policy '{name}': Validation failed: {e}"))?;
        Ok(Policy {
            name,
            vhost: vhost.into(),
            pattern,
            apply_to,
            priority,
            definition,
            definition_table: definition_table.clone(),
        })
    }

    /// Builds an operator policy: as [`Policy::new`], limited to the keys
    /// operators may set.
    pub fn new_operator(
        name: impl Into<String>,
        vhost: impl Into<String>,
        pattern: &str,
        apply_to: &str,
        priority: i64,
        definition: &FieldTable,
    ) -> Result<Self, String> {
        let name = name.into();
        let unknown: Vec<String> = definition
            .iter()
            .filter(|(k, _)| !OPERATOR_KEYS.contains(k))
            .map(|(k, v)| format!("{{<<\"{k}\">>,{}}}", show(v)))
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "operator policy '{name}': Validation failed: [{}] are not recognised policy settings",
                unknown.join(",")
            ));
        }
        Self::new(name, vhost, pattern, apply_to, priority, definition)
    }

    /// The policy as set, for listing.
    pub fn spec(&self) -> PolicySpec {
        PolicySpec {
            vhost: self.vhost.clone(),
            name: self.name.clone(),
            pattern: self.pattern.as_str().to_owned(),
            apply_to: self.apply_to.name().to_owned(),
            priority: self.priority,
            definition: self.definition_table.clone(),
        }
    }

    fn applies_to_queue(&self, vhost: &str, queue: &str) -> bool {
        self.vhost == vhost
            && matches!(self.apply_to, ApplyTo::Queues | ApplyTo::All)
            && self.pattern.is_match(queue)
    }
}

/// Every configured policy.
#[derive(Debug, Clone, Default)]
pub struct Policies(pub Vec<Policy>);

impl Policies {
    /// The policy that applies to a queue: highest priority, first defined on a tie.
    pub fn for_queue(&self, vhost: &str, queue: &str) -> Option<&Policy> {
        let mut best: Option<&Policy> = None;
        for p in self.0.iter().filter(|p| p.applies_to_queue(vhost, queue)) {
            if best.is_none_or(|b| p.priority > b.priority) {
                best = Some(p);
            }
        }
        best
    }
}

/// The policies and operator policies in force, changed at runtime by
/// [`crate::Broker::apply`]. Read when a queue is declared or recovered and when
/// a policy change is applied to existing queues; never on the message path.
#[derive(Debug, Default)]
pub struct PolicyTable {
    policies: RwLock<Policies>,
    operator: RwLock<Policies>,
}

impl PolicyTable {
    pub fn new(policies: Policies) -> Self {
        PolicyTable {
            policies: RwLock::new(policies),
            operator: RwLock::new(Policies::default()),
        }
    }

    fn table(&self, operator: bool) -> &RwLock<Policies> {
        if operator {
            &self.operator
        } else {
            &self.policies
        }
    }

    /// A queue's effective settings under the policies in force now.
    pub fn settings_for(&self, vhost: &str, queue: &str, arguments: &FieldTable) -> QueueSettings {
        let policies = self.policies.read();
        let operator = self.operator.read();
        QueueSettings::resolve_with(
            arguments,
            policies.for_queue(vhost, queue),
            operator.for_queue(vhost, queue),
        )
    }

    /// Adds or replaces (same vhost and name, keeping its place) a policy.
    pub fn put(&self, operator: bool, policy: Policy) {
        let mut t = self.table(operator).write();
        match t
            .0
            .iter_mut()
            .find(|p| p.vhost == policy.vhost && p.name == policy.name)
        {
            Some(slot) => *slot = policy,
            None => t.0.push(policy),
        }
    }

    /// Removes a policy; false if there was none.
    pub fn remove(&self, operator: bool, vhost: &str, name: &str) -> bool {
        let mut t = self.table(operator).write();
        let before = t.0.len();
        t.0.retain(|p| !(p.vhost == vhost && p.name == name));
        t.0.len() != before
    }

    /// Removes every policy and operator policy of a vhost.
    pub fn remove_vhost(&self, vhost: &str) {
        self.policies.write().0.retain(|p| p.vhost != vhost);
        self.operator.write().0.retain(|p| p.vhost != vhost);
    }

    pub fn contains(&self, operator: bool, vhost: &str, name: &str) -> bool {
        self.table(operator)
            .read()
            .0
            .iter()
            .any(|p| p.vhost == vhost && p.name == name)
    }

    /// The policies (or operator policies) as set, by vhost then name.
    pub fn list(&self, operator: bool) -> Vec<PolicySpec> {
        let mut out: Vec<PolicySpec> = self
            .table(operator)
            .read()
            .0
            .iter()
            .map(Policy::spec)
            .collect();
        out.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        out
    }
}

/// A policy's definition merged with an operator policy's, as RabbitMQ's
/// `merge_operator_definitions`: for the numeric limits the lower value wins,
/// for `overflow` the operator's; keys only one side sets are taken as they are.
fn merge_operator(
    policy: Option<&PolicyDefinition>,
    op: Option<&PolicyDefinition>,
) -> Option<PolicyDefinition> {
    match (policy, op) {
        (None, None) => None,
        (Some(p), None) => Some(p.clone()),
        (None, Some(o)) => Some(o.clone()),
        (Some(p), Some(o)) => Some(PolicyDefinition {
            message_ttl: min_opt(p.message_ttl, o.message_ttl),
            expires: min_opt(p.expires, o.expires),
            max_length: min_opt(p.max_length, o.max_length),
            max_length_bytes: min_opt(p.max_length_bytes, o.max_length_bytes),
            overflow: o.overflow.or(p.overflow),
            dead_letter_exchange: p.dead_letter_exchange.clone(),
            dead_letter_routing_key: p.dead_letter_routing_key.clone(),
            delivery_limit: min_opt(p.delivery_limit, o.delivery_limit),
            // Not an operator policy key (nor RabbitMQ's).
            max_age_ms: p.max_age_ms,
        }),
    }
}

/// A queue's effective settings: its arguments merged with its policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueSettings {
    pub message_ttl: Option<u64>,
    pub expires: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    /// `x-max-priority`, capped at 255 as RabbitMQ does.
    pub max_priority: Option<u8>,
    /// Quorum queues only, as in RabbitMQ (classic queues ignore it).
    pub delivery_limit: Option<u64>,
    /// Streams only: `x-max-age` or the policy's `max-age`, the smaller (as
    /// `rabbit_stream_queue` merges them), in milliseconds.
    pub max_age_ms: Option<u64>,
    pub single_active_consumer: bool,
    /// `x-queue-type: quorum`: sets `x-delivery-count` on redeliveries.
    pub quorum: bool,
    /// The policy that applies, if any.
    pub policy: Option<String>,
    /// The operator policy that applies, if any.
    pub operator_policy: Option<String>,
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl QueueSettings {
    /// Merges validated queue arguments with the policy that applies (see the
    /// module comment for which side wins).
    pub fn resolve(arguments: &FieldTable, policy: Option<&Policy>) -> Self {
        Self::resolve_with(arguments, policy, None)
    }

    /// Merges queue arguments with the policy and the operator policy that
    /// apply: the two policies first (see `merge_operator`), then the result
    /// with the arguments (see the module comment).
    pub fn resolve_with(
        arguments: &FieldTable,
        policy: Option<&Policy>,
        operator: Option<&Policy>,
    ) -> Self {
        let merged = merge_operator(
            policy.map(|p| &p.definition),
            operator.map(|p| &p.definition),
        );
        let uint = |k: &str| {
            arguments
                .get(k)
                .and_then(FieldValue::as_i64)
                .and_then(|n| u64::try_from(n).ok())
        };
        let text = |k: &str| arguments.get_str(k).map(str::to_owned);
        let def = merged.as_ref();
        let quorum = arguments.get_str("x-queue-type") == Some("quorum");
        let delivery_limit = min_opt(uint("x-delivery-limit"), def.and_then(|d| d.delivery_limit));
        QueueSettings {
            message_ttl: min_opt(uint("x-message-ttl"), def.and_then(|d| d.message_ttl)),
            expires: min_opt(uint("x-expires"), def.and_then(|d| d.expires)),
            max_length: min_opt(uint("x-max-length"), def.and_then(|d| d.max_length)),
            max_length_bytes: min_opt(
                uint("x-max-length-bytes"),
                def.and_then(|d| d.max_length_bytes),
            ),
            overflow: arguments
                .get_str("x-overflow")
                .and_then(Overflow::parse)
                .or_else(|| def.and_then(|d| d.overflow))
                .unwrap_or_default(),
            dead_letter_exchange: text("x-dead-letter-exchange")
                .or_else(|| def.and_then(|d| d.dead_letter_exchange.clone())),
            dead_letter_routing_key: text("x-dead-letter-routing-key")
                .or_else(|| def.and_then(|d| d.dead_letter_routing_key.clone())),
            max_priority: uint("x-max-priority")
                .filter(|p| *p > 0)
                .map(|p| u8::try_from(p).unwrap_or(u8::MAX)),
            delivery_limit: delivery_limit.filter(|_| quorum),
            max_age_ms: min_opt(
                arguments
                    .get_str("x-max-age")
                    .and_then(crate::stream::parse_max_age),
                def.and_then(|d| d.max_age_ms),
            ),
            single_active_consumer: arguments.get_bool("x-single-active-consumer") == Some(true),
            quorum,
            policy: policy.map(|p| p.name.clone()),
            operator_policy: operator.map(|p| p.name.clone()),
        }
    }

    /// Whether anything here bounds the queue's length.
    pub fn has_length_limit(&self) -> bool {
        self.max_length.is_some() || self.max_length_bytes.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, FieldValue)]) -> FieldTable {
        let mut t = FieldTable::new();
        for (k, v) in pairs {
            t.insert(*k, v.clone());
        }
        t
    }

    #[test]
    fn limits_take_the_lower_value_and_arguments_win_the_rest() {
        let def = table(&[
            ("message-ttl", FieldValue::I64(1000)),
            ("max-length", FieldValue::I64(5)),
            ("overflow", FieldValue::string("reject-publish")),
            ("dead-letter-exchange", FieldValue::string("policy-dlx")),
        ]);
        let p = Policy::new("p", "/", "^orders", "queues", 0, &def).unwrap();
        let args = table(&[
            ("x-message-ttl", FieldValue::I64(500)),
            ("x-max-length", FieldValue::I64(50)),
            ("x-overflow", FieldValue::string("drop-head")),
        ]);
        let s = QueueSettings::resolve(&args, Some(&p));
        assert_eq!(s.message_ttl, Some(500));
        assert_eq!(s.max_length, Some(5));
        assert_eq!(s.overflow, Overflow::DropHead);
        assert_eq!(s.dead_letter_exchange.as_deref(), Some("policy-dlx"));
        assert_eq!(s.policy.as_deref(), Some("p"));
    }

    #[test]
    fn highest_priority_matching_policy_wins() {
        let empty = FieldTable::new();
        let policies = Policies(vec![
            Policy::new("low", "/", ".*", "queues", 1, &empty).unwrap(),
            Policy::new("high", "/", "^a", "all", 5, &empty).unwrap(),
            Policy::new("other-vhost", "v", ".*", "queues", 9, &empty).unwrap(),
            Policy::new("exchanges", "/", ".*", "exchanges", 9, &empty).unwrap(),
        ]);
        assert_eq!(policies.for_queue("/", "abc").unwrap().name, "high");
        assert_eq!(policies.for_queue("/", "xyz").unwrap().name, "low");
        assert!(policies.for_queue("w", "abc").is_none());
    }

    #[test]
    fn rabbitmq_refuses_max_priority_and_bad_values_in_policies() {
        let e =
            PolicyDefinition::parse(&table(&[("max-priority", FieldValue::I64(5))])).unwrap_err();
        assert_eq!(
            e,
            "[{<<\"max-priority\">>,5}] are not recognised policy settings"
        );
        let e = PolicyDefinition::parse(&table(&[("expires", FieldValue::I64(0))])).unwrap_err();
        assert_eq!(e, "0 is not a valid queue expiry");
        let e =
            PolicyDefinition::parse(&table(&[("overflow", FieldValue::string("x"))])).unwrap_err();
        assert_eq!(e, "<<\"x\">> is not a valid overflow value");
    }

    #[test]
    fn delivery_limit_only_for_quorum_and_priority_capped() {
        let args = table(&[
            ("x-delivery-limit", FieldValue::I64(3)),
            ("x-max-priority", FieldValue::I64(1000)),
        ]);
        let s = QueueSettings::resolve(&args, None);
        assert_eq!(s.delivery_limit, None);
        assert_eq!(s.max_priority, Some(255));
        let mut q = args.clone();
        q.insert("x-queue-type", FieldValue::string("quorum"));
        assert_eq!(QueueSettings::resolve(&q, None).delivery_limit, Some(3));
    }
}

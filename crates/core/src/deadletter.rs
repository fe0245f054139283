//! Dead-lettering: republishing a message that a queue gives up on (rejected
//! without requeue, and later expired or over a length limit) to the queue's
//! dead-letter exchange, with RabbitMQ's `x-death` history.
//!
//! The `x-death` header is an array of tables, most recent first, one per
//! (queue, reason): `count`, `reason`, `queue`, `time`, `exchange`,
//! `routing-keys` and, when the message had one, `original-expiration`. A message
//! dead-lettered again for the same queue and reason increments `count` and moves
//! that entry to the front. `x-first-death-{reason,queue,exchange}` are set once
//! and `x-last-death-*` every time, as RabbitMQ 3.13+ does.

use std::sync::Arc;

use crate::field::{FieldTable, FieldValue};
use crate::message::{Message, Stamp};
use crate::queue::Queue;

/// Why a message was dead-lettered (RabbitMQ's reason names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathReason {
    Rejected,
    Expired,
    MaxLen,
    DeliveryLimit,
}

impl DeathReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::MaxLen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// Where a queue dead-letters to: its arguments merged with its policy.
pub fn target(queue: &Queue) -> Option<(String, Option<String>)> {
    let s = queue.settings();
    let exchange = s.dead_letter_exchange.clone()?;
    Some((exchange, s.dead_letter_routing_key.clone()))
}

/// RabbitMQ's `is_cycle` (rabbit_dead_letter): the dead-lettered `message`
/// would enter `queue` again, and every death since it last left that queue
/// (that one included) was automatic, i.e. none was a rejection. Such copies
/// are dropped; a cycle with a rejection in it is a client's retry loop and
/// goes on.
pub fn is_cycle(message: &Message, queue: &str) -> bool {
    let Some(FieldValue::Array(deaths)) = message
        .properties
        .headers
        .as_ref()
        .and_then(|h| h.get("x-death"))
    else {
        return false;
    };
    let mut since = Vec::new();
    for d in deaths {
        let Some(t) = d.as_table() else {
            // Something a client put there: not a fully automatic cycle.
            return false;
        };
        since.push(t);
        if t.get_str("queue") == Some(queue) {
            return since
                .iter()
                .all(|t| t.get_str("reason") != Some(DeathReason::Rejected.as_str()));
        }
    }
    false
}

/// The copy of `message` to publish to `exchange`: routing key replaced if the
/// queue says so, expiration moved into the death record, `x-death` updated.
pub fn dead_lettered(
    message: &Message,
    queue: &str,
    reason: DeathReason,
    exchange: &str,
    routing_key: Option<&str>,
    now_secs: u64,
) -> Arc<Message> {
    let mut properties = message.properties.clone();
    let original_expiration = properties.expiration.take();
    let mut headers = properties.headers.take().unwrap_or_default();
    let s = |v: &str| FieldValue::string(v);

    let mut deaths = match headers.remove("x-death") {
        Some(FieldValue::Array(list)) => list,
        _ => Vec::new(),
    };
    let same = |t: &FieldTable| {
        t.get_str("queue") == Some(queue) && t.get_str("reason") == Some(reason.as_str())
    };
    let previous = deaths.iter().position(|v| v.as_table().is_some_and(same));
    let count = previous
        .map(|i| deaths.remove(i))
        .and_then(|v| v.as_table().and_then(|t| t.get_i64("count")))
        .unwrap_or(0)
        + 1;
    let mut entry = FieldTable::new();
    entry.insert("count", FieldValue::I64(count));
    entry.insert("reason", s(reason.as_str()));
    entry.insert("queue", s(queue));
    entry.insert("time", FieldValue::Timestamp(now_secs));
    entry.insert("exchange", s(&message.exchange));
    entry.insert(
        "routing-keys",
        FieldValue::Array(vec![s(&message.routing_key)]),
    );
    if let Some(exp) = original_expiration {
        entry.insert("original-expiration", s(&exp));
    }
    deaths.insert(0, FieldValue::Table(entry));
    headers.insert("x-death", FieldValue::Array(deaths));

    if headers.get("x-first-death-reason").is_none() {
        headers.insert("x-first-death-reason", s(reason.as_str()));
        headers.insert("x-first-death-queue", s(queue));
        headers.insert("x-first-death-exchange", s(&message.exchange));
    }
    headers.insert("x-last-death-reason", s(reason.as_str()));
    headers.insert("x-last-death-queue", s(queue));
    headers.insert("x-last-death-exchange", s(&message.exchange));
    properties.headers = Some(headers);

    let key = routing_key.unwrap_or(&message.routing_key);
    // The publisher's own topic goes along (an MQTT subscriber of the
    // dead-letter queue sees what was published); the adapter that reads it
    // checks it still fits the routing key, which a dead-letter key replaces.
    Arc::new(Message {
        exchange: exchange.into(),
        routing_key: key.into(),
        properties,
        body: message.body.clone(),
        origin: Stamp::NONE,
        received_ms: Stamp::NONE,
        topic: message.topic.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Properties;
    use bytes::Bytes;

    #[test]
    fn second_death_for_same_queue_and_reason_counts_up() {
        let props = Properties {
            expiration: Some("500".into()),
            ..Default::default()
        };
        let m = Message::new("orders", "new", props, Bytes::from_static(b"x"));
        let once = dead_lettered(
            &m,
            "payments",
            DeathReason::Rejected,
            "dlx",
            Some("failed"),
            10,
        );
        assert_eq!(once.exchange, "dlx");
        assert_eq!(once.routing_key, "failed");
        assert_eq!(once.properties.expiration, None);
        let twice = dead_lettered(&once, "payments", DeathReason::Rejected, "dlx", None, 11);
        let headers = twice.properties.headers.as_ref().unwrap();
        let Some(FieldValue::Array(deaths)) = headers.get("x-death") else {
            panic!("no x-death")
        };
        assert_eq!(deaths.len(), 1);
        let d = deaths[0].as_table().unwrap();
        assert_eq!(d.get_i64("count"), Some(2));
        assert_eq!(d.get_str("queue"), Some("payments"));
        assert_eq!(headers.get_str("x-first-death-exchange"), Some("orders"));
        assert_eq!(headers.get_str("x-last-death-exchange"), Some("dlx"));
    }
}

//! Queue policies through the core's public API, with time passed in (a manual
//! clock and explicit `now`): message and queue TTL, queue expiry, length limits
//! and overflow, priorities, single active consumer, delayed messages, quorum
//! delivery limits and config policies. No test sleeps.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use bytes::Bytes;
use switchyard_core::consumer::{Consumer, ConsumerOptions, Credit, Outbox, Outgoing};
use switchyard_core::deadletter::DeathReason;
use switchyard_core::memory::MemoryMonitor;
use switchyard_core::message::{Message, Properties};
use switchyard_core::policy::{Policies, Policy, PolicyTable};
use switchyard_core::queue::{Queue, QueueOptions};
use switchyard_core::timer::{Clock, Timers, NEVER};
use switchyard_core::vhost::{QueueDeclare, VHost};
use switchyard_core::{FieldTable, FieldValue};

const T0: u64 = 1_700_000_000_000;

struct H {
    v: Arc<VHost>,
    timers: Arc<Timers>,
}

fn harness(policies: Vec<Policy>) -> H {
    let timers = Arc::new(Timers::new(Clock::Manual(AtomicU64::new(T0))));
    let v = VHost::with_env(
        "/",
        Arc::new(MemoryMonitor::new(0)),
        None,
        timers.clone(),
        Arc::new(PolicyTable::new(Policies(policies))),
    );
    H { v, timers }
}

fn table(pairs: &[(&str, FieldValue)]) -> FieldTable {
    let mut t = FieldTable::new();
    for (k, v) in pairs {
        t.insert(*k, v.clone());
    }
    t
}

fn int(n: i64) -> FieldValue {
    FieldValue::I64(n)
}

fn s(v: &str) -> FieldValue {
    FieldValue::string(v)
}

impl H {
    /// Moves the clock to `T0 + ms` and does what is due.
    fn tick(&self, ms: u64) -> u64 {
        self.timers.clock.advance_to(T0 + ms);
        self.v.tick(T0 + ms)
    }

    fn declare(&self, name: &str, args: &[(&str, FieldValue)]) -> Arc<Queue> {
        self.declare_with(name, args, false)
    }

    fn declare_with(&self, name: &str, args: &[(&str, FieldValue)], durable: bool) -> Arc<Queue> {
        self.v
            .declare_queue(QueueDeclare {
                name: name.into(),
                options: QueueOptions {
                    durable,
                    arguments: table(args),
                    ..Default::default()
                },
                connection: 1,
                ..Default::default()
            })
            .unwrap()
            .queue
    }

    /// Publishes to the default exchange at `T0 + ms`.
    fn publish(&self, queue: &str, body: &str, props: Properties, ms: u64) -> usize {
        self.timers.clock.advance_to(T0 + ms);
        let m = Message::new("", queue, props, Bytes::from(body.to_owned()));
        self.v.publish_at(m, T0 + ms).unwrap().rejected
    }

    /// With a dead-letter queue `dlq` behind the default exchange.
    fn with_dlq(&self) -> Arc<Queue> {
        self.declare("dlq", &[])
    }
}

fn body(q: &Queue) -> Option<String> {
    q.get(true)
        .map(|g| String::from_utf8(g.message.message.body.to_vec()).unwrap())
}

fn bodies(q: &Queue) -> Vec<String> {
    std::iter::from_fn(|| body(q)).collect()
}

fn dlx_args(extra: &[(&str, FieldValue)]) -> Vec<(&'static str, FieldValue)> {
    let mut a = vec![
        ("x-dead-letter-exchange", s("")),
        ("x-dead-letter-routing-key", s("dlq")),
    ];
    for (k, v) in extra {
        let k: &'static str = Box::leak(k.to_string().into_boxed_str());
        a.push((k, v.clone()));
    }
    a
}

fn death(m: &Message) -> FieldTable {
    let h = m.properties.headers.as_ref().unwrap();
    let Some(FieldValue::Array(deaths)) = h.get("x-death") else {
        panic!("no x-death in {h:?}")
    };
    deaths[0].as_table().unwrap().clone()
}

fn exp(ms: &str) -> Properties {
    Properties {
        expiration: Some(ms.into()),
        ..Default::default()
    }
}

fn consumer(id: u64, prefetch: u32) -> (Arc<Consumer>, Arc<Outbox>) {
    let outbox = Outbox::new(1000);
    let c = Consumer::new(
        id,
        ConsumerOptions {
            tag: format!("c{id}"),
            prefetch,
            ..Default::default()
        },
        Arc::new(Credit::new(0)),
        outbox.clone(),
    );
    (c, outbox)
}

fn delivered(outbox: &Outbox) -> Vec<String> {
    outbox
        .drain()
        .into_iter()
        .filter_map(|o| match o {
            Outgoing::Deliver(d) => {
                Some(String::from_utf8(d.message.message.body.to_vec()).unwrap())
            }
            Outgoing::Cancelled(_) => None,
        })
        .collect()
}

// ---- TTL ----

#[test]
fn queue_ttl_expires_at_the_deadline_and_dead_letters_as_expired() {
    let h = harness(vec![]);
    let dlq = h.with_dlq();
    let q = h.declare("q", &dlx_args(&[("x-message-ttl", int(100))]));
    h.publish("q", "a", Properties::default(), 0);
    assert_eq!(q.deadline(), T0 + 100);
    assert_eq!(h.tick(99), T0 + 100, "tick reports the next deadline");
    assert_eq!(q.message_count(), 1);
    assert_eq!(h.tick(100), NEVER);
    assert_eq!(q.message_count(), 0);
    let got = dlq.get(true).unwrap();
    let d = death(&got.message.message);
    assert_eq!(d.get_str("reason"), Some("expired"));
    assert_eq!(d.get_str("queue"), Some("q"));
    assert!(d.get("original-expiration").is_none());
}

#[test]
fn per_message_ttl_dead_letters_with_original_expiration() {
    let h = harness(vec![]);
    let dlq = h.with_dlq();
    let q = h.declare("q", &dlx_args(&[]));
    h.publish("q", "a", exp("50"), 0);
    h.tick(50);
    assert_eq!(q.message_count(), 0);
    let got = dlq.get(true).unwrap();
    assert_eq!(got.message.message.properties.expiration, None);
    let d = death(&got.message.message);
    assert_eq!(d.get_str("original-expiration"), Some("50"));
}

#[test]
fn the_lower_of_queue_and_message_ttl_applies() {
    let h = harness(vec![]);
    let q = h.declare("q", &[("x-message-ttl", int(1000))]);
    h.publish("q", "short", exp("10"), 0);
    h.tick(10);
    assert_eq!(q.message_count(), 0);
}

#[test]
fn only_the_head_expires_as_in_rabbitmq() {
    let h = harness(vec![]);
    let q = h.declare("q", &[]);
    h.publish("q", "long", exp("1000"), 0);
    h.publish("q", "short", exp("10"), 0);
    h.tick(20);
    assert_eq!(q.message_count(), 2, "the short one waits behind the head");
    h.tick(1000);
    assert_eq!(
        q.message_count(),
        0,
        "once the head goes, the expired one follows"
    );
}

#[test]
fn an_expired_message_is_never_delivered_even_before_the_tick() {
    let h = harness(vec![]);
    let q = h.declare("q", &[("x-message-ttl", int(10))]);
    h.publish("q", "a", Properties::default(), 0);
    h.publish("q", "b", Properties::default(), 5);
    h.timers.clock.advance_to(T0 + 12);
    assert_eq!(bodies(&q), vec!["b"]);
}

#[test]
fn ttl_zero_means_deliver_now_or_expire() {
    let h = harness(vec![]);
    let dlq = h.with_dlq();
    let q = h.declare("q", &dlx_args(&[("x-message-ttl", int(0))]));
    h.publish("q", "nobody", Properties::default(), 0);
    assert_eq!(q.message_count(), 0);
    assert_eq!(bodies(&dlq), vec!["nobody"]);
    let (c, out) = consumer(1, 0);
    q.add_consumer(c).unwrap();
    h.publish("q", "taken", Properties::default(), 0);
    assert_eq!(delivered(&out), vec!["taken"]);
    assert_eq!(dlq.message_count(), 0);
}

#[test]
fn a_requeued_expired_message_expires_instead_of_being_redelivered() {
    let h = harness(vec![]);
    let q = h.declare("q", &[("x-message-ttl", int(100))]);
    h.publish("q", "a", Properties::default(), 0);
    let got = q.get(false).unwrap();
    q.requeue_at(vec![got.message], T0 + 200);
    assert_eq!(q.message_count(), 0);
    assert_eq!(q.unacked_count(), 0);
}

#[test]
fn expiry_back_into_the_same_queue_is_a_cycle_and_is_dropped() {
    let h = harness(vec![]);
    let q = h.declare(
        "q",
        &[
            ("x-dead-letter-exchange", s("")),
            ("x-message-ttl", int(10)),
        ],
    );
    h.publish("q", "a", Properties::default(), 0);
    h.tick(10);
    assert_eq!(
        q.message_count(),
        0,
        "RabbitMQ drops fully automatic cycles"
    );
}

// ---- queue expiry ----

#[test]
fn an_unused_queue_expires_and_use_postpones_it() {
    let h = harness(vec![]);
    let q = h.declare("q", &[("x-expires", int(100))]);
    h.tick(60);
    // basic.get counts as use, even on an empty queue.
    assert!(q.get(true).is_none());
    h.tick(150);
    assert!(!q.is_deleted());
    // So does a re-declaration.
    h.timers.clock.advance_to(T0 + 155);
    h.declare("q", &[("x-expires", int(100))]);
    h.tick(250);
    assert!(!q.is_deleted());
    let (c, _out) = consumer(1, 0);
    q.add_consumer(c.clone()).unwrap();
    h.tick(10_000);
    assert!(!q.is_deleted(), "a queue with a consumer never expires");
    h.timers.clock.advance_to(T0 + 10_000);
    q.remove_consumer(c.id);
    h.tick(10_099);
    assert!(!q.is_deleted());
    h.tick(10_100);
    assert!(q.is_deleted());
    assert!(h.v.queue("q").is_err());
}

// ---- length limits ----

#[test]
fn drop_head_dead_letters_the_oldest_as_maxlen() {
    let h = harness(vec![]);
    let dlq = h.with_dlq();
    let q = h.declare("q", &dlx_args(&[("x-max-length", int(2))]));
    for b in ["1", "2", "3"] {
        assert_eq!(h.publish("q", b, Properties::default(), 0), 0);
    }
    assert_eq!(bodies(&q), vec!["2", "3"]);
    let got = dlq.get(true).unwrap();
    assert_eq!(
        death(&got.message.message).get_str("reason"),
        Some("maxlen")
    );
}

#[test]
fn max_length_bytes_counts_bodies() {
    let h = harness(vec![]);
    let q = h.declare("q", &[("x-max-length-bytes", int(5))]);
    h.publish("q", "abc", Properties::default(), 0);
    h.publish("q", "de", Properties::default(), 0);
    h.publish("q", "f", Properties::default(), 0);
    assert_eq!(bodies(&q), vec!["de", "f"]);
}

#[test]
fn reject_publish_refuses_and_reports_it() {
    let h = harness(vec![]);
    let dlq = h.with_dlq();
    let q = h.declare(
        "q",
        &dlx_args(&[
            ("x-max-length", int(1)),
            ("x-overflow", s("reject-publish")),
        ]),
    );
    assert_eq!(h.publish("q", "1", Properties::default(), 0), 0);
    assert_eq!(h.publish("q", "2", Properties::default(), 0), 1);
    assert_eq!(bodies(&q), vec!["1"]);
    assert_eq!(
        dlq.message_count(),
        0,
        "reject-publish does not dead-letter"
    );
    // Room again: accepted.
    assert_eq!(h.publish("q", "3", Properties::default(), 0), 0);
}

#[test]
fn reject_publish_counts_ready_messages_only() {
    let h = harness(vec![]);
    let q = h.declare(
        "q",
        &[
            ("x-max-length", int(1)),
            ("x-overflow", s("reject-publish")),
        ],
    );
    h.publish("q", "1", Properties::default(), 0);
    let _unacked = q.get(false).unwrap();
    assert_eq!(h.publish("q", "2", Properties::default(), 0), 0);
}

#[test]
fn reject_publish_dlx_refuses_and_dead_letters() {
    let h = harness(vec![]);
    let dlq = h.with_dlq();
    let q = h.declare(
        "q",
        &dlx_args(&[
            ("x-max-length", int(1)),
            ("x-overflow", s("reject-publish-dlx")),
        ]),
    );
    h.publish("q", "1", Properties::default(), 0);
    assert_eq!(h.publish("q", "2", Properties::default(), 0), 1);
    assert_eq!(bodies(&q), vec!["1"]);
    let got = dlq.get(true).unwrap();
    assert_eq!(got.message.message.body, Bytes::from_static(b"2"));
    assert_eq!(
        death(&got.message.message).get_str("reason"),
        Some("maxlen")
    );
}

// ---- priorities ----

fn prio(p: Option<u8>) -> Properties {
    Properties {
        priority: p,
        ..Default::default()
    }
}

#[test]
fn higher_priority_first_fifo_within_and_requeue_keeps_its_place() {
    let h = harness(vec![]);
    let q = h.declare("q", &[("x-max-priority", int(5))]);
    for (b, p) in [
        ("none", None),
        ("p1", Some(1)),
        ("p5a", Some(5)),
        ("p9", Some(9)),
        ("p5b", Some(5)),
    ] {
        h.publish("q", b, prio(p), 0);
    }
    // 9 counts as the maximum, 5; no priority is 0.
    let first = q.get(false).unwrap();
    assert_eq!(first.message.message.body, Bytes::from_static(b"p5a"));
    q.requeue(vec![first.message]);
    assert_eq!(bodies(&q), vec!["p5a", "p9", "p5b", "p1", "none"]);
}

#[test]
fn without_max_priority_the_priority_property_is_ignored() {
    let h = harness(vec![]);
    let q = h.declare("q", &[]);
    h.publish("q", "low", prio(Some(0)), 0);
    h.publish("q", "high", prio(Some(9)), 0);
    assert_eq!(bodies(&q), vec!["low", "high"]);
}

// ---- single active consumer ----

#[test]
fn single_active_consumer_hands_over_when_it_goes() {
    let h = harness(vec![]);
    let q = h.declare("q", &[("x-single-active-consumer", FieldValue::Bool(true))]);
    let (c1, o1) = consumer(1, 1);
    let (c2, o2) = consumer(2, 1);
    q.add_consumer(c1.clone()).unwrap();
    q.add_consumer(c2).unwrap();
    for b in ["1", "2", "3"] {
        h.publish("q", b, Properties::default(), 0);
    }
    let in_flight: Vec<_> = o1
        .drain()
        .into_iter()
        .filter_map(|o| match o {
            Outgoing::Deliver(d) => Some(d.message),
            Outgoing::Cancelled(_) => None,
        })
        .collect();
    assert_eq!(in_flight.len(), 1, "prefetch 1: the active one has one");
    assert!(delivered(&o2).is_empty(), "the other waits");
    q.remove_consumer(c1.id);
    assert!(
        delivered(&o2).is_empty(),
        "the successor waits for the leaver's unsettled delivery"
    );
    c1.release(1);
    q.requeue(in_flight);
    let (c3, o3) = consumer(3, 0);
    q.add_consumer(c3).unwrap();
    assert_eq!(delivered(&o2), vec!["1"], "returned first, in its place");
    assert!(delivered(&o3).is_empty());
}

#[test]
fn single_active_consumer_hands_over_at_once_when_nothing_is_unsettled() {
    let h = harness(vec![]);
    let q = h.declare("q", &[("x-single-active-consumer", FieldValue::Bool(true))]);
    let (c1, o1) = consumer(1, 0);
    let (c2, o2) = consumer(2, 0);
    q.add_consumer(c1.clone()).unwrap();
    q.add_consumer(c2).unwrap();
    h.publish("q", "1", Properties::default(), 0);
    let _ = o1.drain();
    c1.release(1);
    h.publish("q", "2", Properties::default(), 0);
    let _ = o1.drain();
    c1.release(1);
    q.remove_consumer(c1.id);
    h.publish("q", "3", Properties::default(), 0);
    assert_eq!(delivered(&o2), vec!["3"]);
}

// ---- delayed messages ----

fn delayed(ms: i64) -> Properties {
    Properties {
        headers: Some(table(&[("x-delay", int(ms))])),
        ..Default::default()
    }
}

#[test]
fn delayed_messages_wait_then_enter_in_due_order() {
    let h = harness(vec![]);
    let q = h.declare("q", &[]);
    h.publish("q", "late", delayed(500), 0);
    h.publish("q", "soon", delayed(100), 0);
    h.publish("q", "now", Properties::default(), 0);
    assert_eq!(q.message_count(), 1);
    assert_eq!(q.delayed_count(), 2);
    assert_eq!(q.deadline(), T0 + 100);
    assert_eq!(bodies(&q), vec!["now"]);
    assert_eq!(h.tick(99), T0 + 100);
    assert_eq!(q.message_count(), 0);
    h.tick(100);
    let got = q.get(true).unwrap();
    assert_eq!(got.message.message.body, Bytes::from_static(b"soon"));
    // Released copies carry the delay negated, so re-publishing does not delay again.
    let headers = got.message.message.properties.headers.clone().unwrap();
    assert_eq!(headers.get_i64("x-delay"), Some(-100));
    h.tick(500);
    assert_eq!(bodies(&q), vec!["late"]);
}

#[test]
fn a_delayed_message_is_delivered_to_a_waiting_consumer_when_due() {
    let h = harness(vec![]);
    let q = h.declare("q", &[]);
    let (c, out) = consumer(1, 0);
    q.add_consumer(c).unwrap();
    h.publish("q", "d", delayed(50), 0);
    assert!(delivered(&out).is_empty());
    h.tick(50);
    assert_eq!(delivered(&out), vec!["d"]);
}

#[test]
fn ttl_counts_from_the_release_of_a_delayed_message() {
    let h = harness(vec![]);
    let q = h.declare("q", &[("x-message-ttl", int(100))]);
    h.publish("q", "d", delayed(1000), 0);
    h.tick(1000);
    h.tick(1050);
    assert_eq!(q.message_count(), 1);
    h.tick(1100);
    assert_eq!(q.message_count(), 0);
}

// ---- quorum delivery limit ----

#[test]
fn quorum_delivery_limit_dead_letters_after_limit_returns() {
    let h = harness(vec![]);
    let dlq = h.with_dlq();
    let q = h.declare_with(
        "q",
        &dlx_args(&[("x-queue-type", s("quorum")), ("x-delivery-limit", int(1))]),
        true,
    );
    h.publish("q", "m", Properties::default(), 0);
    let first = q.get(false).unwrap();
    assert!(first.message.message.properties.headers.is_none());
    q.requeue(vec![first.message]);
    let second = q.get(false).unwrap();
    assert!(second.message.redelivered());
    let h2 = second.message.message.properties.headers.clone().unwrap();
    assert_eq!(h2.get_i64("x-delivery-count"), Some(1));
    q.requeue(vec![second.message]);
    assert_eq!(q.message_count(), 0);
    assert_eq!(q.unacked_count(), 0);
    let got = dlq.get(true).unwrap();
    assert_eq!(
        death(&got.message.message).get_str("reason"),
        Some(DeathReason::DeliveryLimit.as_str())
    );
}

#[test]
fn classic_queues_ignore_the_delivery_limit() {
    let h = harness(vec![]);
    let q = h.declare("q", &[("x-delivery-limit", int(0))]);
    h.publish("q", "m", Properties::default(), 0);
    let got = q.get(false).unwrap();
    q.requeue(vec![got.message]);
    assert_eq!(q.message_count(), 1);
}

// ---- policies ----

fn policy(name: &str, pattern: &str, priority: i64, def: &[(&str, FieldValue)]) -> Policy {
    Policy::new(name, "/", pattern, "queues", priority, &table(def)).unwrap()
}

#[test]
fn a_policy_sets_arguments_by_pattern_and_the_lower_limit_wins() {
    let h = harness(vec![
        policy(
            "ttl",
            "^p\\.",
            0,
            &[("message-ttl", int(100)), ("max-length", int(1))],
        ),
        policy(
            "dlx",
            "^p\\.dlx",
            1,
            &[
                ("dead-letter-exchange", s("")),
                ("dead-letter-routing-key", s("dlq")),
            ],
        ),
    ]);
    let dlq = h.with_dlq();
    let plain = h.declare(
        "p.plain",
        &[("x-message-ttl", int(50)), ("x-max-length", int(5))],
    );
    assert_eq!(plain.settings().policy.as_deref(), Some("ttl"));
    assert_eq!(plain.settings().message_ttl, Some(50), "argument lower");
    assert_eq!(plain.settings().max_length, Some(1), "policy lower");
    // Only the highest-priority policy applies: no TTL from "ttl" here.
    let dl = h.declare("p.dlx", &[("x-message-ttl", int(10))]);
    assert_eq!(dl.settings().policy.as_deref(), Some("dlx"));
    h.publish("p.dlx", "a", Properties::default(), 0);
    h.tick(10);
    assert_eq!(bodies(&dlq), vec!["a"]);
    let other = h.declare("other", &[]);
    assert_eq!(other.settings().policy, None);
}

//! Routing through the core's public API, at the scale the issue names: a topic
//! exchange with 100k bindings routes each key to exactly the queues whose
//! patterns match (the cost is benchmarked in benches/, not timed here).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use bytes::Bytes;
use switchyard_core::exchange::ExchangeOptions;
use switchyard_core::memory::MemoryMonitor;
use switchyard_core::message::{Message, Properties};
use switchyard_core::queue::QueueOptions;
use switchyard_core::vhost::{ExchangeDeclare, QueueDeclare, VHost};
use switchyard_core::FieldTable;

fn vhost() -> Arc<VHost> {
    VHost::new("/", Arc::new(MemoryMonitor::new(0)), None)
}

fn declare_queue(v: &VHost, name: &str) {
    v.declare_queue(QueueDeclare {
        name: name.into(),
        options: QueueOptions::default(),
        connection: 1,
        ..Default::default()
    })
    .unwrap();
}

fn routed_to(v: &VHost, exchange: &str, key: &str) -> Vec<String> {
    let msg = Message::new(exchange, key, Properties::default(), Bytes::new());
    let mut names: Vec<String> = v
        .route(&msg)
        .unwrap()
        .iter()
        .map(|q| q.name.clone())
        .collect();
    names.sort();
    names
}

#[test]
fn topic_exchange_with_100k_bindings_routes_exactly() {
    let v = vhost();
    v.declare_exchange(ExchangeDeclare {
        name: "sensors".into(),
        kind: "topic".into(),
        passive: false,
        options: ExchangeOptions {
            durable: false,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::new(),
        },
    })
    .unwrap();
    for q in ["per-device", "all-temps", "everything", "room-7"] {
        declare_queue(&v, q);
    }
    for i in 0..100_000 {
        v.bind_queue(
            "per-device",
            "sensors",
            &format!("sensor.{i}.*"),
            FieldTable::new(),
            1,
        )
        .unwrap();
    }
    v.bind_queue(
        "all-temps",
        "sensors",
        "sensor.*.temp",
        FieldTable::new(),
        1,
    )
    .unwrap();
    v.bind_queue("everything", "sensors", "#", FieldTable::new(), 1)
        .unwrap();
    v.bind_queue("room-7", "sensors", "sensor.7.#", FieldTable::new(), 1)
        .unwrap();
    assert_eq!(v.exchange("sensors").unwrap().binding_count(), 100_003);

    assert_eq!(
        routed_to(&v, "sensors", "sensor.4242.temp"),
        ["all-temps", "everything", "per-device"]
    );
    assert_eq!(
        routed_to(&v, "sensors", "sensor.7.humidity"),
        ["everything", "per-device", "room-7"]
    );
    assert_eq!(
        routed_to(&v, "sensors", "sensor.100000.temp"),
        ["all-temps", "everything"]
    );
    assert_eq!(routed_to(&v, "sensors", "other"), ["everything"]);

    // Unbinding one of the 100k leaves the others.
    v.unbind_queue(
        "per-device",
        "sensors",
        "sensor.4242.*",
        &FieldTable::new(),
        1,
    )
    .unwrap();
    assert_eq!(
        routed_to(&v, "sensors", "sensor.4242.temp"),
        ["all-temps", "everything"]
    );
    assert_eq!(
        routed_to(&v, "sensors", "sensor.4243.temp"),
        ["all-temps", "everything", "per-device"]
    );
}

#[test]
fn alternate_exchange_takes_what_nothing_else_routes() {
    let v = vhost();
    let x = |name: &str, kind: &str, args: FieldTable| ExchangeDeclare {
        name: name.into(),
        kind: kind.into(),
        passive: false,
        options: ExchangeOptions {
            durable: false,
            auto_delete: false,
            internal: false,
            arguments: args,
        },
    };
    v.declare_exchange(x("unrouted", "fanout", FieldTable::new()))
        .unwrap();
    let mut args = FieldTable::new();
    args.insert(
        "alternate-exchange",
        switchyard_core::FieldValue::string("unrouted"),
    );
    v.declare_exchange(x("main", "direct", args)).unwrap();
    declare_queue(&v, "orders");
    declare_queue(&v, "lost");
    v.bind_queue("orders", "main", "order", FieldTable::new(), 1)
        .unwrap();
    v.bind_queue("lost", "unrouted", "", FieldTable::new(), 1)
        .unwrap();
    assert_eq!(routed_to(&v, "main", "order"), ["orders"]);
    assert_eq!(routed_to(&v, "main", "refund"), ["lost"]);
}

#[test]
fn exchange_to_exchange_cycles_terminate_and_deliver_once() {
    let v = vhost();
    for name in ["a", "b"] {
        v.declare_exchange(ExchangeDeclare {
            name: name.into(),
            kind: "fanout".into(),
            passive: false,
            options: ExchangeOptions {
                durable: false,
                auto_delete: false,
                internal: false,
                arguments: FieldTable::new(),
            },
        })
        .unwrap();
    }
    v.bind_exchange("b", "a", "", FieldTable::new()).unwrap();
    v.bind_exchange("a", "b", "", FieldTable::new()).unwrap();
    declare_queue(&v, "q");
    v.bind_queue("q", "a", "", FieldTable::new(), 1).unwrap();
    v.bind_queue("q", "b", "", FieldTable::new(), 1).unwrap();
    assert_eq!(routed_to(&v, "a", "k"), ["q"]);
}

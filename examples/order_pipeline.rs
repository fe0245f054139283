//! The order pipeline: orders flow through payment, inventory and shipping
//! stages, each a durable queue served by competing workers with manual acks.
//! Payment fails for some orders. A failure is retried with a delay: the worker
//! publishes the order again with an `x-delay` header (500 ms, then 1 s; the
//! broker holds it, durably, until due) and acks the failed attempt. An order that
//! still fails on its third attempt is rejected without requeue, and the payment
//! queue dead-letters it to `orders.failed`, where a clerk picks it up and sees
//! why (the `x-death` header).
//!
//! Run a broker (`cargo run --release`), then:
//!
//! ```text
//! cargo run --example order_pipeline            # 20 orders
//! cargo run --example order_pipeline -- 200     # more
//! ```
//!
//! `AMQP_ADDR` (default `127.0.0.1:5672`) points it at another broker. Against
//! RabbitMQ, the delayed retry needs its delayed-message plugin; without it the
//! retries simply come back at once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments,
    BasicRejectArguments, Channel, ConfirmSelectArguments, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldTable, FieldValue};

const STAGES: [(&str, &str); 3] = [
    ("payments", "inventory"),
    ("inventory", "shipping"),
    ("shipping", ""),
];
const WORKERS_PER_STAGE: usize = 2;

async fn connect() -> Connection {
    let addr = std::env::var("AMQP_ADDR").unwrap_or_else(|_| "127.0.0.1:5672".into());
    let (host, port) = addr.rsplit_once(':').expect("AMQP_ADDR is host:port");
    Connection::open(&OpenConnectionArguments::new(
        host,
        port.parse().expect("port"),
        "guest",
        "guest",
    ))
    .await
    .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e} (is the broker running?)"))
}

fn persistent() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("text/plain")
        .finish()
}

/// A persistent retry of an order: its attempt number and the delay before it
/// comes back.
fn retry(attempt: i64, delay_ms: i64) -> BasicProperties {
    let mut headers = FieldTable::new();
    headers.insert("x-attempt".try_into().unwrap(), FieldValue::l(attempt));
    headers.insert("x-delay".try_into().unwrap(), FieldValue::l(delay_ms));
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("text/plain")
        .with_headers(headers)
        .finish()
}

/// Declares the durable queues; payments dead-letters to `orders.failed`.
async fn declare_topology(ch: &Channel) {
    let mut dlx = FieldTable::new();
    dlx.insert(
        "x-dead-letter-exchange".try_into().unwrap(),
        FieldValue::S("".try_into().unwrap()),
    );
    dlx.insert(
        "x-dead-letter-routing-key".try_into().unwrap(),
        FieldValue::S("orders.failed".try_into().unwrap()),
    );
    ch.queue_declare(
        QueueDeclareArguments::new("payments")
            .durable(true)
            .arguments(dlx)
            .finish(),
    )
    .await
    .unwrap();
    for q in ["inventory", "shipping", "shipped", "orders.failed"] {
        ch.queue_declare(QueueDeclareArguments::new(q).durable(true).finish())
            .await
            .unwrap();
    }
}

/// A worker of one stage: takes an order, does the work, hands it on, acks.
async fn worker(conn: &Connection, stage: &'static str, next: &'static str, id: usize) {
    let ch = conn.open_channel(None).await.unwrap();
    ch.basic_qos(BasicQosArguments::new(0, 5, false))
        .await
        .unwrap();
    let tag = format!("{stage}-{id}");
    let (_ctag, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(stage, &tag)
                .manual_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let (Some(deliver), Some(body)) = (msg.deliver, msg.content) else {
                break;
            };
            let order = String::from_utf8_lossy(&body).to_string();
            let number: usize = order.trim_start_matches("order-").parse().unwrap_or(0);
            let attempt = msg
                .basic_properties
                .as_ref()
                .and_then(|p| p.headers())
                .and_then(|h| h.get(&"x-attempt".try_into().unwrap()))
                .and_then(|v| match v {
                    FieldValue::l(n) => Some(*n),
                    _ => None,
                })
                .unwrap_or(1);
            tokio::time::sleep(Duration::from_millis(5)).await; // the "work"
                                                                // Orders 3, 10, 17, ... are always declined; 1, 6, 11, ... only at first.
            let declined = number % 7 == 3 || (number % 5 == 1 && attempt == 1);
            if stage == "payments" && declined {
                if attempt < 3 {
                    let delay = 500 * attempt;
                    println!("  {tag}: payment declined for {order} (attempt {attempt}); retry in {delay} ms");
                    ch.basic_publish(
                        retry(attempt + 1, delay),
                        body,
                        BasicPublishArguments::new("", "payments"),
                    )
                    .await
                    .unwrap();
                    ch.basic_ack(BasicAckArguments::new(deliver.delivery_tag(), false))
                        .await
                        .unwrap();
                } else {
                    println!(
                        "  {tag}: payment declined for {order} (attempt {attempt}); giving up"
                    );
                    ch.basic_reject(BasicRejectArguments::new(deliver.delivery_tag(), false))
                        .await
                        .unwrap();
                }
                continue;
            }
            let to = if next.is_empty() { "shipped" } else { next };
            ch.basic_publish(persistent(), body, BasicPublishArguments::new("", to))
                .await
                .unwrap();
            ch.basic_ack(BasicAckArguments::new(deliver.delivery_tag(), false))
                .await
                .unwrap();
        }
    });
}

#[tokio::main]
async fn main() {
    let orders: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let conn = connect().await;
    let setup = conn.open_channel(None).await.unwrap();
    declare_topology(&setup).await;

    for (stage, next) in STAGES {
        for id in 0..WORKERS_PER_STAGE {
            worker(&conn, stage, next, id).await;
        }
    }
    println!("workers: {WORKERS_PER_STAGE} per stage on payments -> inventory -> shipping");

    setup
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    for n in 0..orders {
        let body = format!("order-{n}").into_bytes();
        setup
            .basic_publish(
                persistent(),
                body,
                BasicPublishArguments::new("", "payments"),
            )
            .await
            .unwrap();
    }
    println!("placed {orders} orders (persistent, confirmed)");

    // Collect the outcome: shipped orders and dead-lettered ones.
    let failed_expected = (0..orders).filter(|n| n % 7 == 3).count();
    let shipped = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let out = conn.open_channel(None).await.unwrap();
    let (_t, mut done) = out
        .basic_consume_rx(BasicConsumeArguments::new("shipped", "tally").finish())
        .await
        .unwrap();
    let (_t, mut dead) = out
        .basic_consume_rx(BasicConsumeArguments::new("orders.failed", "clerk").finish())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while shipped.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < orders {
        tokio::select! {
            Some(_) = done.recv() => { shipped.fetch_add(1, Ordering::Relaxed); }
            Some(msg) = dead.recv() => {
                failed.fetch_add(1, Ordering::Relaxed);
                let order = String::from_utf8_lossy(msg.content.as_deref().unwrap_or_default()).to_string();
                let reason = msg
                    .basic_properties
                    .and_then(|p| p.headers().cloned())
                    .map(|h| format!("{h:?}"))
                    .filter(|h| h.contains("rejected"))
                    .map_or("unknown", |_| "rejected by payments");
                println!("  clerk: {order} dead-lettered ({reason})");
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    println!(
        "shipped {} of {orders}; {} failed (expected {failed_expected})",
        shipped.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    conn.close().await.unwrap();
}

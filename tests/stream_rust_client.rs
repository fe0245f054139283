//! The Rust RabbitMQ Stream client (`rabbitmq-stream-client`) against the
//! Stream protocol listener: create a stream with retention arguments, publish
//! with confirms, deduplicate with a named producer across a restart of the
//! producer, consume from first and from an offset, store and query a
//! consumer's offset, delete.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use futures_util::StreamExt;
use rabbitmq_stream_client::types::{ByteCapacity, Message, OffsetSpecification};
use rabbitmq_stream_client::Environment;
use switchyard_testkit::{start_broker, TestBroker};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

async fn environment(b: &TestBroker) -> Environment {
    let addr = b.stream_addr();
    Environment::builder()
        .host(&addr.ip().to_string())
        .port(addr.port())
        .build()
        .await
        .expect("the stream environment connects")
}

/// The bodies of the next `n` deliveries and their offsets.
async fn read(
    env: &Environment,
    stream: &str,
    offset: OffsetSpecification,
    n: usize,
) -> Vec<(u64, Vec<u8>)> {
    let mut consumer = env.consumer().offset(offset).build(stream).await.unwrap();
    let mut got = Vec::new();
    while got.len() < n {
        let delivery = timeout(WAIT, consumer.next())
            .await
            .expect("a delivery in time")
            .expect("the consumer is open")
            .expect("a delivery, not an error");
        let body = delivery
            .message()
            .data()
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        got.push((delivery.offset(), body));
    }
    consumer.handle().close().await.unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_with_confirms_and_consume() {
    let b = start_broker().await;
    let env = environment(&b).await;
    env.stream_creator()
        .max_length(ByteCapacity::MB(100))
        .create("rust-s")
        .await
        .unwrap();
    let producer = env.producer().build("rust-s").await.unwrap();
    for i in 0..50 {
        let status = producer
            .send_with_confirm(Message::builder().body(format!("m{i}")).build())
            .await
            .unwrap();
        assert!(status.confirmed(), "{:?}", status.status());
    }
    producer.close().await.unwrap();
    let got = read(&env, "rust-s", OffsetSpecification::First, 50).await;
    let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (0..50).collect::<Vec<u64>>());
    assert_eq!(got[49].1, b"m49");
    let got = read(&env, "rust-s", OffsetSpecification::Offset(45), 5).await;
    assert_eq!(got[0], (45, b"m45".to_vec()));
    // The same stream over AMQP 0-9-1: the broker's queue has the 50 messages.
    let q = b.broker().vhost("/").unwrap().queue("rust-s").unwrap();
    assert_eq!(q.message_count(), 50);
    env.delete_stream("rust-s").await.unwrap();
    assert!(b.broker().vhost("/").unwrap().queue("rust-s").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_producer_is_deduplicated_across_restarts() {
    let b = start_broker().await;
    let env = environment(&b).await;
    env.stream_creator().create("rust-dedup").await.unwrap();
    let mut producer = env.producer().name("p1").build("rust-dedup").await.unwrap();
    for i in 1..=3u64 {
        producer
            .send_with_confirm(
                Message::builder()
                    .body(format!("d{i}"))
                    .publishing_id(i)
                    .build(),
            )
            .await
            .unwrap();
    }
    producer.close().await.unwrap();
    // Restarted: an id the broker has is confirmed but not stored again.
    let mut producer = env.producer().name("p1").build("rust-dedup").await.unwrap();
    let status = producer
        .send_with_confirm(Message::builder().body("again").publishing_id(2).build())
        .await
        .unwrap();
    assert!(status.confirmed());
    producer
        .send_with_confirm(Message::builder().body("d4").publishing_id(4).build())
        .await
        .unwrap();
    producer.close().await.unwrap();
    let got = read(&env, "rust-dedup", OffsetSpecification::First, 4).await;
    let bodies: Vec<&[u8]> = got.iter().map(|(_, b)| b.as_slice()).collect();
    assert_eq!(bodies, [&b"d1"[..], b"d2", b"d3", b"d4"]);
    let q = b.broker().vhost("/").unwrap().queue("rust-dedup").unwrap();
    assert_eq!(q.message_count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stores_and_queries_its_offset() {
    let b = start_broker().await;
    let env = environment(&b).await;
    env.stream_creator().create("rust-offsets").await.unwrap();
    let producer = env.producer().build("rust-offsets").await.unwrap();
    for i in 0..10 {
        producer
            .send_with_confirm(Message::builder().body(format!("o{i}")).build())
            .await
            .unwrap();
    }
    let consumer = env
        .consumer()
        .name("tracker")
        .offset(OffsetSpecification::First)
        .build("rust-offsets")
        .await
        .unwrap();
    assert!(consumer.query_offset().await.is_err(), "nothing stored yet");
    consumer.store_offset(6).await.unwrap();
    // StoreOffset has no answer: poll until the broker has it.
    let mut stored = None;
    for _ in 0..100 {
        if let Ok(o) = consumer.query_offset().await {
            stored = Some(o);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored, Some(6));
    consumer.handle().close().await.unwrap();
}

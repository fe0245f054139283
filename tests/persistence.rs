//! Durability end to end: what a client was told is safe survives a restart and a
//! `kill -9`. The crash test runs the real binary as a child process.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_testkit::child::ChildBroker;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use switchyard_testkit::start_broker_with;

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_entities_and_persistent_messages_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let broker = start_broker_with(|c| c.data_dir = dir.clone()).await;
    {
        let conn = connect(&broker.amqp_url()).await;
        let ch = conn.create_channel().await.unwrap();
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            "orders".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare("q".into(), durable, FieldTable::default())
            .await
            .unwrap();
        ch.queue_declare(
            "transient-q".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            "q".into(),
            "orders".into(),
            "new.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for (body, props) in [
            ("one", persistent()),
            ("two", persistent()),
            ("volatile", BasicProperties::default()),
            ("three", persistent()),
        ] {
            ch.basic_publish(
                "orders".into(),
                "new.eu".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        // "one" is consumed and acked; "two" is delivered but not acked.
        let one = ch
            .basic_get("q".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(one.delivery.data, b"one");
        one.delivery.ack(BasicAckOptions::default()).await.unwrap();
        let two = ch
            .basic_get("q".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(two.delivery.data, b"two");
        assert!(!two.delivery.redelivered);
        // Closing the connection would requeue "two"; stopping the broker keeps it
        // delivered-but-unacked on disk.
        std::mem::forget(conn);
    }
    assert!(broker.stop().await);

    let broker = start_broker_with(|c| c.data_dir = dir.clone()).await;
    let conn = connect(&broker.amqp_url()).await;
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare("q".into(), passive, FieldTable::default())
        .await
        .unwrap();
    assert_eq!(
        q.message_count(),
        2,
        "the acked message is gone, the transient one too"
    );
    let err = ch
        .queue_declare("transient-q".into(), passive, FieldTable::default())
        .await;
    assert!(
        err.is_err(),
        "a non-durable queue does not survive a restart"
    );
    let ch = conn.create_channel().await.unwrap();
    let two = ch
        .basic_get("q".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(two.delivery.data, b"two");
    assert!(two.delivery.redelivered, "delivered before the restart");
    let three = ch
        .basic_get("q".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(three.delivery.data, b"three");
    assert!(
        !three.delivery.redelivered,
        "never delivered before the (clean) restart"
    );
    // The durable binding survived: publishing through the exchange still routes.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "orders".into(),
        "new.us".into(),
        BasicPublishOptions::default(),
        b"four",
        persistent(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let four = ch
        .basic_get("q".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(four.delivery.data, b"four");
    conn.close(200, "bye".into()).await.unwrap();
}

/// The broker binary on `data` as run number `run`, with the shipped
/// config's keys named in `overrides` replaced.
fn start_child_with(data: &Path, run: usize, overrides: &[(&str, &str)]) -> ChildBroker {
    ChildBroker::start_in(
        Path::new(env!("CARGO_BIN_EXE_switchyard")),
        data,
        run,
        overrides,
    )
}

/// One publisher: persistent messages with confirms until the broker dies.
/// Records every body it sent and every body the broker confirmed.
async fn publish_until_killed(
    url: String,
    name: String,
    sent: Arc<Mutex<HashSet<String>>>,
    confirmed: Arc<Mutex<HashSet<String>>>,
) {
    let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    if ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .is_err()
    {
        return;
    }
    let mut waiting = Vec::new();
    for i in 0.. {
        let body = format!("{name}-{i}");
        sent.lock().unwrap().insert(body.clone());
        let Ok(confirm) = ch
            .basic_publish(
                "".into(),
                "crash".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                persistent(),
            )
            .await
        else {
            break;
        };
        waiting.push((body, confirm));
        // A window of 32 outstanding confirms, as a real publisher would keep.
        if waiting.len() >= 32 {
            for (body, confirm) in waiting.drain(..) {
                match confirm.await {
                    Ok(c) if c.is_ack() => {
                        confirmed.lock().unwrap().insert(body);
                    }
                    _ => return,
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_kill_9_at_random_moments() {
    const ROUNDS: usize = 6;
    const PUBLISHERS: usize = 3;
    let data = tempfile::tempdir().unwrap();
    let dir: PathBuf = data.path().to_owned();
    let sent = Arc::new(Mutex::new(HashSet::new()));
    let confirmed = Arc::new(Mutex::new(HashSet::new()));
    // Bodies consumed and acked before a crash, with the redelivered flag seen.
    let mut acked: HashSet<String> = HashSet::new();

    for round in 0..ROUNDS {
        let broker = start_child_with(&dir, round, &[]);
        let conn = connect(&broker.amqp_url()).await;
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            "crash".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        // A consumer acks a few messages each round, so acks race the crash too.
        let mut consumer = ch
            .basic_consume(
                "crash".into(),
                "c".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut publishers = Vec::new();
        for p in 0..PUBLISHERS {
            publishers.push(tokio::spawn(publish_until_killed(
                broker.amqp_url(),
                format!("r{round}p{p}"),
                sent.clone(),
                confirmed.clone(),
            )));
        }
        let kill_after = Duration::from_millis(150 + rand::random::<u64>() % 600);
        let deadline = tokio::time::Instant::now() + kill_after;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                Some(Ok(d)) = consumer.next() => {
                    if d.ack(BasicAckOptions::default()).await.is_ok() {
                        acked.insert(String::from_utf8(d.data.clone()).unwrap());
                    }
                }
            }
        }
        broker.kill9();
        for p in publishers {
            let _ = tokio::time::timeout(Duration::from_secs(10), p).await;
        }
        std::mem::forget(conn);
    }

    // The last start: drain everything.
    let broker = start_child_with(&dir, ROUNDS, &[]);
    let conn = connect(&broker.amqp_url()).await;
    let ch = conn.create_channel().await.unwrap();
    let mut received: HashMap<String, Vec<bool>> = HashMap::new();
    while let Some(m) = ch
        .basic_get("crash".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        received
            .entry(String::from_utf8(m.delivery.data.clone()).unwrap())
            .or_default()
            .push(m.delivery.redelivered);
    }
    let confirmed = confirmed.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    let lost: Vec<_> = confirmed
        .iter()
        .filter(|b| !received.contains_key(*b) && !acked.contains(*b))
        .collect();
    let invented: Vec<_> = received.keys().filter(|b| !sent.contains(*b)).collect();
    let duplicated: Vec<_> = received
        .iter()
        .filter(|(_, flags)| flags.len() > 1)
        .collect();
    // A message acked before a crash may come back (its ack was not yet synced),
    // but then with the redelivered flag set.
    let unflagged_again: Vec<_> = received
        .iter()
        .filter(|(b, flags)| acked.contains(*b) && !flags.contains(&true))
        .collect();
    eprintln!(
        "crash test: {ROUNDS} kill -9 rounds, {} sent, {} confirmed, {} acked before a crash, {} recovered, lost {}",
        sent.len(),
        confirmed.len(),
        acked.len(),
        received.len(),
        lost.len()
    );
    assert!(
        confirmed.len() > 100,
        "the test must confirm a fair number of messages"
    );
    assert!(lost.is_empty(), "confirmed but lost: {lost:?}");
    assert!(invented.is_empty(), "never sent: {invented:?}");
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");
    assert!(
        unflagged_again.is_empty(),
        "acked, back again without redelivered: {unflagged_again:?}"
    );
    conn.close(200, "bye".into()).await.unwrap();
    broker.kill9();
}

/// A queue several times larger than the memory watermark: bodies beyond half
/// the watermark stay on disk, so the broker's peak memory stays bounded while
/// publishing, across a restart, and while the queue drains; every body comes
/// back intact and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_larger_than_the_memory_watermark_stays_on_disk() {
    // The alarm measures resident memory, and a debug broker alone takes ~30 MB:
    // the watermark leaves room for that.
    const WATERMARK: u64 = 48 * 1024 * 1024;
    const COUNT: usize = 1500;
    const SIZE: usize = 100 * 1024; // 150 MB in all: ~3x the watermark
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let watermark = WATERMARK.to_string();
    let overrides = [("memory_high_watermark_bytes", watermark.as_str())];
    let body = |i: usize| -> Vec<u8> {
        let mut b = vec![(i % 251) as u8; SIZE];
        b[..8].copy_from_slice(&(i as u64).to_be_bytes());
        b
    };

    let broker = start_child_with(&dir, 0, &overrides);
    let conn = connect(&broker.amqp_url()).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "big".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for i in 0..COUNT {
        let c = ch
            .basic_publish(
                "".into(),
                "big".into(),
                BasicPublishOptions::default(),
                &body(i),
                persistent(),
            )
            .await
            .unwrap();
        confirms.push(c);
        if confirms.len() == 64 {
            for c in confirms.drain(..) {
                assert!(
                    c.await.unwrap().is_ack(),
                    "no memory alarm: bodies are on disk"
                );
            }
        }
    }
    for c in confirms.drain(..) {
        assert!(c.await.unwrap().is_ack());
    }
    let peak = broker.memory_bytes("VmHWM");
    eprintln!(
        "peak RSS while publishing {} MB: {} MB",
        (COUNT * SIZE) >> 20,
        peak >> 20
    );
    assert!(peak < 3 * WATERMARK, "peak RSS {peak} while publishing");
    std::mem::forget(conn);
    broker.kill9();

    // After a crash, recovery keeps only half the watermark of bodies in memory.
    let broker = start_child_with(&dir, 1, &overrides);
    let conn = connect(&broker.amqp_url()).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(50, lapin::options::BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            "big".into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..COUNT {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("delivery {i} of {COUNT} did not come"))
            .unwrap()
            .unwrap();
        assert_eq!(d.data.len(), SIZE);
        assert_eq!(&d.data[..8], &(i as u64).to_be_bytes(), "in order");
        assert!(
            d.data[8..].iter().all(|b| *b == (i % 251) as u8),
            "body {i} intact"
        );
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let peak = broker.memory_bytes("VmHWM");
    eprintln!("peak RSS recovering and draining: {} MB", peak >> 20);
    assert!(peak < 3 * WATERMARK, "peak RSS {peak} after restart");
    conn.close(200, "bye".into()).await.unwrap();
    broker.kill9();
}

/// A message paged out to disk keeps only its queue entry in memory (issue 11):
/// everything else comes back from the store when it is delivered. Its
/// exchange, routing key, properties and headers must come back with it, both
/// when it was paged as it entered the queue and after a restart's recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_messages_come_back_whole() {
    // Paging starts at half the watermark: 20 MiB of transient bodies in
    // another queue take a debug broker (~25 MB at rest) past it, well short
    // of the alarm (the whole watermark). After the restart, a watermark of
    // 4 KiB leaves the recovered bodies (2 KiB each) on disk (the alarm it raises blocks
    // publishers only).
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let overrides = [("memory_high_watermark_bytes", "67108864")];
    let tiny = [("memory_high_watermark_bytes", "4096")];
    const COUNT: usize = 20;
    let props = |i: usize| {
        let mut headers = FieldTable::default();
        headers.insert("n".into(), lapin::types::AMQPValue::LongLongInt(i as i64));
        persistent()
            .with_content_type(format!("text/x-{i}").into())
            .with_message_id(format!("m{i}").into())
            .with_headers(headers)
    };
    let body = |i: usize| format!("body {i:<2048}").into_bytes();
    let check = |d: &lapin::message::Delivery, i: usize| {
        assert_eq!(d.exchange.as_str(), "paged.x");
        assert_eq!(d.routing_key.as_str(), format!("key.{i}"));
        assert_eq!(d.data, body(i));
        let p = &d.properties;
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some(format!("text/x-{i}").as_str())
        );
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str()),
            Some(format!("m{i}").as_str())
        );
        assert_eq!(p.delivery_mode(), &Some(2));
        let n = p
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("n").cloned());
        assert_eq!(n, Some(lapin::types::AMQPValue::LongLongInt(i as i64)));
    };

    let broker = start_child_with(&dir, 0, &overrides);
    let conn = connect(&broker.amqp_url()).await;
    let ch = conn.create_channel().await.unwrap();
    let durable = || QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        "paged.x".into(),
        ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for q in ["paged.now", "paged.later"] {
        ch.queue_declare(q.into(), durable(), FieldTable::default())
            .await
            .unwrap();
        ch.queue_bind(
            q.into(),
            "paged.x".into(),
            "key.#".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    ch.queue_declare(
        "filler".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for _ in 0..20 {
        let filler = vec![0u8; 1 << 20];
        let confirm = ch
            .basic_publish(
                "".into(),
                "filler".into(),
                BasicPublishOptions::default(),
                &filler,
                BasicProperties::default(),
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }
    for i in 0..COUNT {
        let confirm = ch
            .basic_publish(
                "paged.x".into(),
                format!("key.{i}").as_str().into(),
                BasicPublishOptions::default(),
                &body(i),
                props(i),
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }
    // Every message of `queue`, in order, checked.
    async fn get_all(
        ch: &lapin::Channel,
        queue: &str,
        count: usize,
        check: impl Fn(&lapin::message::Delivery, usize),
    ) {
        for i in 0..count {
            let d = ch
                .basic_get(
                    queue.into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("message {i} of {queue}"));
            check(&d.delivery, i);
        }
    }
    // Paged as they entered the queue.
    get_all(&ch, "paged.now", COUNT, check).await;
    std::mem::forget(conn);
    broker.kill9();

    // Recovered (bodies left on disk), then delivered.
    let broker = start_child_with(&dir, 1, &tiny);
    let conn = connect(&broker.amqp_url()).await;
    let ch = conn.create_channel().await.unwrap();
    get_all(&ch, "paged.later", COUNT, check).await;
    conn.close(200, "bye".into()).await.unwrap();
    broker.kill9();
}

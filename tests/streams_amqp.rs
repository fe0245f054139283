//! Stream queues over AMQP 0-9-1 with lapin: RabbitMQ's declare and consume
//! rules, every kind of `x-stream-offset`, the offset header on deliveries,
//! filtering, server-side offset tracking, and a restart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use switchyard_testkit::start_broker;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

async fn declare_stream(ch: &Channel, name: &str, extra: &[(&str, AMQPValue)]) {
    let mut pairs = vec![("x-queue-type", s("stream"))];
    pairs.extend_from_slice(extra);
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args(&pairs),
    )
    .await
    .unwrap();
}

/// Publishes with confirms, each confirmed before the next.
async fn publish(ch: &Channel, queue: &str, bodies: &[&str], headers: Option<FieldTable>) {
    for b in bodies {
        let mut props = BasicProperties::default();
        if let Some(h) = &headers {
            props = props.with_headers(h.clone());
        }
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b.as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
}

async fn consume(ch: &Channel, queue: &str, tag: &str, extra: &[(&str, AMQPValue)]) -> Consumer {
    ch.basic_consume(
        queue.into(),
        tag.into(),
        BasicConsumeOptions::default(),
        args(extra),
    )
    .await
    .unwrap()
}

/// Receives `n` deliveries, acking each; returns (offset header, body).
async fn take(consumer: &mut Consumer, n: usize) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let d = timeout(WAIT, consumer.next())
            .await
            .expect("a delivery in time")
            .unwrap()
            .unwrap();
        let offset = match d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-stream-offset").cloned())
        {
            Some(AMQPValue::LongLongInt(o)) => o,
            other => panic!("x-stream-offset header missing or not a long: {other:?}"),
        };
        d.ack(BasicAckOptions::default()).await.unwrap();
        out.push((offset, String::from_utf8(d.data.clone()).unwrap()));
    }
    out
}

async fn connect(url: &str) -> (Connection, Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_rules_are_rabbitmqs() {
    let broker = start_broker().await;
    let (conn, _) = connect(&broker.amqp_url()).await;
    for (durable, extra, expect) in [
        (false, vec![], "invalid property 'non-durable'"),
        (
            true,
            vec![("x-max-age", s("1A"))],
            "invalid arg 'x-max-age'",
        ),
        (
            true,
            vec![("x-single-active-consumer", AMQPValue::Boolean(true))],
            "invalid arg 'x-single-active-consumer'",
        ),
    ] {
        let ch = conn.create_channel().await.unwrap();
        let mut pairs = vec![("x-queue-type", s("stream"))];
        pairs.extend(extra);
        let err = ch
            .queue_declare(
                "s".into(),
                QueueDeclareOptions {
                    durable,
                    ..Default::default()
                },
                args(&pairs),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("PRECONDITION_FAILED") && err.contains(expect),
            "{err}"
        );
    }
    let ch = conn.create_channel().await.unwrap();
    declare_stream(&ch, "events", &[("x-max-age", s("7D"))]).await;
    // Consuming without a prefetch: 406, channel only.
    let err = ch
        .basic_consume(
            "events".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("consumer prefetch count is not set"), "{err}");
    // basic.get: 540, the connection closes.
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .basic_get("events".into(), BasicGetOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("NOT_IMPLEMENTED"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_consumers_are_refused_with_540() {
    let broker = start_broker().await;
    let (_conn, ch) = connect(&broker.amqp_url()).await;
    declare_stream(&ch, "events", &[]).await;
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let err = ch
        .basic_consume(
            "events".into(),
            "c".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("NOT_IMPLEMENTED"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_offset_spec_and_the_offset_header() {
    let broker = start_broker().await;
    let (conn, ch) = connect(&broker.amqp_url()).await;
    declare_stream(&ch, "events", &[]).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let bodies: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    publish(&ch, "events", &refs, None).await;

    let c = conn.create_channel().await.unwrap();
    // A prefetch smaller than the stream: acks give the credit back.
    c.basic_qos(3, BasicQosOptions::default()).await.unwrap();
    let mut first = consume(&c, "events", "first", &[("x-stream-offset", s("first"))]).await;
    let got = take(&mut first, 10).await;
    let want: Vec<(i64, String)> = (0..10).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(got, want);

    let mut at7 = consume(
        &c,
        "events",
        "at7",
        &[("x-stream-offset", AMQPValue::LongLongInt(7))],
    )
    .await;
    assert_eq!(take(&mut at7, 3).await, want[7..].to_vec());

    // Each publish above was its own chunk: "last" is the last message.
    let mut last = consume(&c, "events", "last", &[("x-stream-offset", s("last"))]).await;
    assert_eq!(take(&mut last, 1).await, want[9..].to_vec());

    // An interval: everything was written within the last hour.
    let mut hour = consume(&c, "events", "hour", &[("x-stream-offset", s("1h"))]).await;
    assert_eq!(take(&mut hour, 10).await, want);

    // A timestamp in the future: nothing until something new arrives.
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let mut ts = consume(
        &c,
        "events",
        "ts",
        &[("x-stream-offset", AMQPValue::Timestamp(later))],
    )
    .await;

    // The default is "next": only what is published after attaching.
    let mut next = consume(&c, "events", "next", &[]).await;
    publish(&ch, "events", &["m10"], None).await;
    assert_eq!(take(&mut next, 1).await, vec![(10, "m10".to_owned())]);
    // Every reader got the new message, and the future-timestamp one gets it too.
    assert_eq!(take(&mut first, 1).await, vec![(10, "m10".to_owned())]);
    assert_eq!(take(&mut ts, 1).await, vec![(10, "m10".to_owned())]);

    // Nack and reject only give credit back: nothing comes again.
    let n = conn.create_channel().await.unwrap();
    n.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut nacker = consume(
        &n,
        "events",
        "n",
        &[("x-stream-offset", AMQPValue::LongLongInt(8))],
    )
    .await;
    for expect in 8..11i64 {
        let d = timeout(WAIT, nacker.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let h = d.properties.headers().clone().unwrap();
        assert_eq!(
            h.inner().get("x-stream-offset"),
            Some(&AMQPValue::LongLongInt(expect))
        );
        d.nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // The queue's message count is the stream's length.
    let q = ch
        .queue_declare(
            "events".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 11);
    // The management API shows the stream's extent and its consumers' offsets.
    let url = format!("{}/queues/%2F/events", broker.api_url());
    let v: serde_json::Value = tokio::task::spawn_blocking(move || {
        reqwest::blocking::Client::new()
            .get(url)
            .basic_auth("guest", Some("guest"))
            .send()
            .unwrap()
            .json()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(v["type"], "stream");
    assert_eq!(v["messages"], 11);
    assert_eq!(v["stream"]["first_offset"], 0);
    assert_eq!(v["stream"]["last_offset"], 10);
    let consumers = v["stream"]["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 7);
    let first = consumers
        .iter()
        .find(|c| c["consumer_tag"] == "first")
        .unwrap();
    assert_eq!(first["offset"], 11, "the next offset it reads");
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtering_delivers_only_what_was_asked_for() {
    let broker = start_broker().await;
    let (conn, ch) = connect(&broker.amqp_url()).await;
    declare_stream(&ch, "fruit", &[]).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let fv = |v: &str| args(&[("x-stream-filter-value", s(v))]);
    publish(&ch, "fruit", &["a1", "a2"], Some(fv("apple"))).await;
    publish(&ch, "fruit", &["b1"], Some(fv("banana"))).await;
    publish(&ch, "fruit", &["plain"], None).await;
    publish(&ch, "fruit", &["c1"], Some(fv("cherry"))).await;

    let c = conn.create_channel().await.unwrap();
    c.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut apples = consume(
        &c,
        "fruit",
        "apples",
        &[
            ("x-stream-offset", s("first")),
            ("x-stream-filter", s("apple")),
        ],
    )
    .await;
    assert_eq!(
        take(&mut apples, 2).await,
        vec![(0, "a1".to_owned()), (1, "a2".to_owned())]
    );
    let mut mixed = consume(
        &c,
        "fruit",
        "mixed",
        &[
            ("x-stream-offset", s("first")),
            (
                "x-stream-filter",
                AMQPValue::FieldArray(FieldArray::from(vec![s("banana"), s("cherry")])),
            ),
            ("x-stream-match-unfiltered", AMQPValue::Boolean(true)),
        ],
    )
    .await;
    assert_eq!(
        take(&mut mixed, 3).await,
        vec![
            (2, "b1".to_owned()),
            (3, "plain".to_owned()),
            (4, "c1".to_owned())
        ]
    );
    // Nothing else reaches the apple consumer, even after more traffic.
    publish(&ch, "fruit", &["b2"], Some(fv("banana"))).await;
    publish(&ch, "fruit", &["a3"], Some(fv("apple"))).await;
    assert_eq!(take(&mut apples, 1).await, vec![(6, "a3".to_owned())]);
    conn.close(200, "bye".into()).await.unwrap();
}

/// tx.commit-ok promises the transaction's messages are safe: for a stream
/// it comes once the stream's log has committed them (as a confirm does),
/// and they are all there, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_committed_once_the_stream_has_its_messages() {
    let broker = start_broker().await;
    let (conn, ch) = connect(&broker.amqp_url()).await;
    declare_stream(&ch, "ledger", &[]).await;
    ch.tx_select().await.unwrap();
    for round in 0..2 {
        for b in ["debit", "credit"] {
            ch.basic_publish(
                "".into(),
                "ledger".into(),
                BasicPublishOptions::default(),
                format!("{b}-{round}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
        }
        timeout(WAIT, ch.tx_commit())
            .await
            .expect("commit-ok in time")
            .unwrap();
        assert_eq!(stream_count(&ch, "ledger").await, 2 * (round + 1));
    }
    let c = conn.create_channel().await.unwrap();
    c.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut reader = consume(&c, "ledger", "reader", &[("x-stream-offset", s("first"))]).await;
    let bodies: Vec<String> = take(&mut reader, 4)
        .await
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    assert_eq!(bodies, ["debit-0", "credit-0", "debit-1", "credit-1"]);
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_offsets_resume_where_the_consumer_acked() {
    let broker = start_broker().await;
    let (conn, ch) = connect(&broker.amqp_url()).await;
    declare_stream(&ch, "log", &[]).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish(&ch, "log", &["a", "b", "c", "d"], None).await;
    {
        let (c2, c) = connect(&broker.amqp_url()).await;
        c.basic_qos(1, BasicQosOptions::default()).await.unwrap();
        let mut reader = consume(&c, "log", "billing", &[("x-stream-offset", s("stored"))]).await;
        // Never acked before: from the first message.
        assert_eq!(
            take(&mut reader, 2).await,
            vec![(0, "a".to_owned()), (1, "b".to_owned())]
        );
        // "c" is in flight, never acked, when the connection closes: closing
        // hands it back, which must not move the stored offset past it.
        let in_flight = timeout(WAIT, reader.next())
            .await
            .expect("the next delivery in time")
            .unwrap()
            .unwrap();
        assert_eq!(in_flight.data, b"c");
        c2.close(200, "bye".into()).await.unwrap();
    }
    let (c3, c) = connect(&broker.amqp_url()).await;
    c.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut reader = consume(&c, "log", "billing", &[("x-stream-offset", s("stored"))]).await;
    assert_eq!(
        take(&mut reader, 2).await,
        vec![(2, "c".to_owned()), (3, "d".to_owned())]
    );
    c3.close(200, "bye".into()).await.unwrap();

    // Deleted with the stream: the same name declared again starts afresh.
    ch.queue_delete("log".into(), Default::default())
        .await
        .unwrap();
    declare_stream(&ch, "log", &[]).await;
    publish(&ch, "log", &["x", "y"], None).await;
    let (c4, c) = connect(&broker.amqp_url()).await;
    c.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut reader = consume(&c, "log", "billing", &[("x-stream-offset", s("stored"))]).await;
    assert_eq!(
        take(&mut reader, 2).await,
        vec![(0, "x".to_owned()), (1, "y".to_owned())]
    );
    c4.close(200, "bye".into()).await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_size_drops_whole_old_segments() {
    let broker = start_broker().await;
    let (conn, ch) = connect(&broker.amqp_url()).await;
    declare_stream(
        &ch,
        "short",
        &[
            ("x-max-length-bytes", AMQPValue::LongLongInt(2_000)),
            (
                "x-stream-max-segment-size-bytes",
                AMQPValue::LongLongInt(500),
            ),
        ],
    )
    .await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let body = "x".repeat(100);
    let bodies: Vec<&str> = (0..50).map(|_| body.as_str()).collect();
    publish(&ch, "short", &bodies, None).await;
    let q = ch
        .queue_declare(
            "short".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let kept = q.message_count();
    assert!(kept < 50 && kept > 0, "kept {kept}");
    let c = conn.create_channel().await.unwrap();
    c.basic_qos(100, BasicQosOptions::default()).await.unwrap();
    let mut reader = consume(&c, "short", "r", &[("x-stream-offset", s("first"))]).await;
    let got = take(&mut reader, kept as usize).await;
    let offsets: Vec<i64> = got.iter().map(|(o, _)| *o).collect();
    let first = 50 - i64::from(kept);
    assert_eq!(offsets, (first..50).collect::<Vec<_>>());
    conn.close(200, "bye".into()).await.unwrap();
}

/// A stream's message count, as a passive declare reports it.
async fn stream_count(ch: &Channel, name: &str) -> u32 {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// RabbitMQ's stream policy keys `max-length-bytes` and `max-age` apply to a
/// live stream at once (the smaller of argument and policy wins), and a
/// cleared policy stops trimming; a bad `max-age` is refused with RabbitMQ's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_follows_policies_on_a_live_stream() {
    use switchyard_core::admin::{MetaCommand, PolicySpec};
    use switchyard_core::{FieldTable as CoreTable, FieldValue};

    let broker = start_broker().await;
    let core = broker.broker();
    let policy = |key: &str, value: FieldValue| {
        let mut definition = CoreTable::new();
        definition.insert(key, value);
        MetaCommand::SetPolicy(PolicySpec {
            vhost: "/".into(),
            name: "retention".into(),
            pattern: "^policed$".into(),
            apply_to: "queues".into(),
            priority: 0,
            definition,
        })
    };
    let refused = core
        .apply(policy("max-age", FieldValue::LongStr("1A".into())))
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("<<\"1A\">> is not a valid max age"),
        "{refused}"
    );

    let (conn, ch) = connect(&broker.amqp_url()).await;
    declare_stream(
        &ch,
        "policed",
        &[(
            "x-stream-max-segment-size-bytes",
            AMQPValue::LongLongInt(500),
        )],
    )
    .await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let body = "x".repeat(100);
    let bodies: Vec<&str> = (0..50).map(|_| body.as_str()).collect();
    publish(&ch, "policed", &bodies, None).await;
    assert_eq!(stream_count(&ch, "policed").await, 50);

    core.apply(policy("max-length-bytes", FieldValue::I64(2_000)))
        .unwrap();
    let kept = stream_count(&ch, "policed").await;
    assert!(kept < 50 && kept > 0, "trimmed at once: kept {kept}");

    core.apply(MetaCommand::ClearPolicy {
        vhost: "/".into(),
        name: "retention".into(),
    })
    .unwrap();
    publish(&ch, "policed", &bodies, None).await;
    assert_eq!(
        stream_count(&ch, "policed").await,
        kept + 50,
        "no longer trimmed"
    );

    // By age: everything but the newest segment goes within a few seconds.
    core.apply(policy("max-age", FieldValue::LongStr("1s".into())))
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now_kept = stream_count(&ch, "policed").await;
        if now_kept < 10 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "max-age never applied: {now_kept} kept"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    conn.close(200, "bye".into()).await.unwrap();
}

/// `kill -9` while publishers wait for confirms: after the restart every
/// confirmed message is in the stream and the offsets have no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_kill_9_with_contiguous_offsets() {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    use switchyard_testkit::child::{write_config, ChildBroker};

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_switchyard"));
    let broker = ChildBroker::start(exe, &config, dir.path(), 1);
    let url = format!("amqp://guest:guest@{}/%2f", broker.amqp);
    let (conn, ch) = connect(&url).await;
    declare_stream(&ch, "crash", &[]).await;
    drop(conn);
    let confirmed = Arc::new(Mutex::new(HashSet::new()));
    let (enough_tx, enough_rx) = tokio::sync::oneshot::channel::<()>();
    let publisher = {
        let confirmed = confirmed.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let (_conn, ch) = connect(&url).await;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let mut enough = Some(enough_tx);
            let mut waiting = Vec::new();
            for i in 0u64.. {
                let body = format!("m{i}");
                let Ok(confirm) = ch
                    .basic_publish(
                        "".into(),
                        "crash".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default(),
                    )
                    .await
                else {
                    return;
                };
                waiting.push((body, confirm));
                if waiting.len() >= 32 {
                    for (body, confirm) in waiting.drain(..) {
                        match confirm.await {
                            Ok(c) if c.is_ack() => {
                                confirmed.lock().unwrap().insert(body);
                            }
                            _ => return,
                        }
                    }
                    if confirmed.lock().unwrap().len() >= 500 {
                        if let Some(tx) = enough.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            }
        })
    };
    // Kill while the publisher is still going.
    timeout(Duration::from_secs(60), enough_rx)
        .await
        .unwrap()
        .unwrap();
    broker.kill9();
    let _ = timeout(WAIT, publisher).await;

    let broker = ChildBroker::start(exe, &config, dir.path(), 2);
    let url = format!("amqp://guest:guest@{}/%2f", broker.amqp);
    let (conn, ch) = connect(&url).await;
    let q = ch
        .queue_declare(
            "crash".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let count = q.message_count() as usize;
    let confirmed = confirmed.lock().unwrap().clone();
    assert!(count >= confirmed.len(), "{count} < {}", confirmed.len());
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut reader = consume(&ch, "crash", "r", &[("x-stream-offset", s("first"))]).await;
    let got = take(&mut reader, count).await;
    for (i, (offset, body)) in got.iter().enumerate() {
        assert_eq!(*offset, i as i64, "offsets are contiguous");
        // Entries are in publish order: offset i holds message i.
        assert_eq!(body, &format!("m{i}"));
    }
    let bodies: HashSet<String> = got.into_iter().map(|(_, b)| b).collect();
    assert!(confirmed.is_subset(&bodies), "a confirmed message was lost");
    conn.close(200, "bye".into()).await.unwrap();
    broker.kill9();
}

//! End-to-end AMQP tests with the two Rust clients users pick, amqprs and lapin,
//! each against its own broker on port 0.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, ConfirmSelectArguments,
    ExchangeDeclareArguments, QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::BasicProperties;
use switchyard_testkit::{start_broker, RawClient};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

async fn amqprs_connect(port: u16) -> Connection {
    Connection::open(&OpenConnectionArguments::new(
        "127.0.0.1",
        port,
        "guest",
        "guest",
    ))
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_publish_consume_ack_through_topic_exchange() {
    let broker = start_broker().await;
    let conn = amqprs_connect(broker.amqp_addr().port()).await;
    let ch = conn.open_channel(None).await.unwrap();
    ch.exchange_declare(
        ExchangeDeclareArguments::new("readings", "topic")
            .durable(true)
            .finish(),
    )
    .await
    .unwrap();
    let (queue, _, _) = ch
        .queue_declare(QueueDeclareArguments::new("temps").durable(true).finish())
        .await
        .unwrap()
        .unwrap();
    ch.queue_bind(QueueBindArguments::new(
        &queue,
        "readings",
        "sensors.*.temp",
    ))
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();

    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("text/plain")
        .finish();
    for (key, body) in [
        ("sensors.room1.temp", "21.5"),
        ("sensors.room1.humidity", "40"),
        ("sensors.room2.temp", "19.0"),
    ] {
        ch.basic_publish(
            props.clone(),
            body.as_bytes().to_vec(),
            BasicPublishArguments::new("readings", key),
        )
        .await
        .unwrap();
    }

    let (_tag, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&queue, "c1")
                .manual_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let msg = timeout(WAIT, rx.recv())
            .await
            .expect("delivery")
            .expect("channel open");
        let deliver = msg.deliver.unwrap();
        let props = msg.basic_properties.unwrap();
        assert_eq!(props.delivery_mode(), Some(2));
        assert_eq!(props.content_type().map(String::as_str), Some("text/plain"));
        got.push((
            deliver.routing_key().clone(),
            String::from_utf8(msg.content.unwrap()).unwrap(),
        ));
        ch.basic_ack(BasicAckArguments::new(deliver.delivery_tag(), false))
            .await
            .unwrap();
    }
    assert_eq!(
        got,
        [
            ("sensors.room1.temp".to_owned(), "21.5".to_owned()),
            ("sensors.room2.temp".to_owned(), "19.0".to_owned())
        ]
    );
    // The humidity reading matched no binding.
    assert!(timeout(Duration::from_millis(200), rx.recv())
        .await
        .is_err());
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_large_message_is_split_by_frame_max_and_reassembled() {
    let broker = start_broker().await;
    let conn = amqprs_connect(broker.amqp_addr().port()).await;
    let ch = conn.open_channel(None).await.unwrap();
    let (queue, _, _) = ch
        .queue_declare(QueueDeclareArguments::new("big").finish())
        .await
        .unwrap()
        .unwrap();
    let body: Vec<u8> = (0..12 * 1024 * 1024)
        .map(|i: u32| (i % 251) as u8)
        .collect();
    ch.basic_publish(
        BasicProperties::default(),
        body.clone(),
        BasicPublishArguments::new("", &queue),
    )
    .await
    .unwrap();
    let (_tag, mut rx) = ch
        .basic_consume_rx(BasicConsumeArguments::new(&queue, "big").finish())
        .await
        .unwrap();
    let msg = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(msg.content.unwrap(), body);
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_are_redelivered_when_the_connection_dies() {
    let broker = start_broker().await;
    let port = broker.amqp_addr().port();
    let first = amqprs_connect(port).await;
    let ch = first.open_channel(None).await.unwrap();
    ch.queue_declare(QueueDeclareArguments::new("work").durable(true).finish())
        .await
        .unwrap();
    ch.basic_publish(
        BasicProperties::default(),
        b"job".to_vec(),
        BasicPublishArguments::new("", "work"),
    )
    .await
    .unwrap();
    let (_t, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new("work", "w1")
                .manual_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let msg = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert!(!msg.deliver.unwrap().redelivered());
    drop(rx);
    first.close().await.unwrap();

    let second = amqprs_connect(port).await;
    let ch = second.open_channel(None).await.unwrap();
    let (_t, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new("work", "w2")
                .manual_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let msg = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert!(
        msg.deliver.unwrap().redelivered(),
        "redelivered flag set on the second delivery"
    );
    assert_eq!(msg.content.unwrap(), b"job");
    second.close().await.unwrap();
}

mod lapin_client {
    use super::*;
    use futures_util::StreamExt;
    use lapin::options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lapin_confirms_every_publish_and_consumes_in_order() {
        let broker = start_broker().await;
        let conn = Connection::connect(&broker.amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            "orders".into(),
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
        for i in 0..500u32 {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    "orders".into(),
                    BasicPublishOptions::default(),
                    i.to_string().as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack(), "publish {i} confirmed");
        }
        let mut consumer = ch
            .basic_consume(
                "orders".into(),
                "c".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        for i in 0..500u32 {
            let delivery = timeout(WAIT, consumer.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(delivery.data, i.to_string().as_bytes());
        }
        conn.close(200, "bye".into()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lapin_sees_404_for_a_missing_queue_and_the_connection_survives() {
        let broker = start_broker().await;
        let conn = Connection::connect(&broker.amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let err = ch
            .queue_declare(
                "nope".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("NOT_FOUND - no queue 'nope' in vhost '/'"),
            "{text}"
        );
        // Only the channel closed: a new one works.
        let ch2 = conn.create_channel().await.unwrap();
        ch2.queue_declare(
            "yes".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        conn.close(200, "bye".into()).await.unwrap();
    }
}

/// A client that does not speak AMQP 0-9-1 gets the server's protocol header back
/// and a closed socket, as the spec says.
#[tokio::test]
async fn wrong_protocol_header_gets_ours_back() {
    let broker = start_broker().await;
    let mut raw = RawClient::connect(broker.amqp_addr()).await;
    raw.send(b"AMQP\x01\x01\x00\x09").await;
    let got = raw.expect_closed(WAIT).await;
    assert_eq!(got, b"AMQP\x00\x00\x09\x01");
}

/// A frame announcing more than frame_max is refused from its header: the server
/// closes with 501 before the payload is sent.
#[tokio::test]
async fn oversized_frame_is_refused_from_its_header() {
    let broker = start_broker().await;
    let mut raw = RawClient::connect(broker.amqp_addr()).await;
    raw.send(b"AMQP\x00\x00\x09\x01").await;
    let _start = raw.read_available(Duration::from_millis(500)).await;
    // A method frame header claiming 1 GiB of payload on channel 0.
    raw.send(&[1, 0, 0, 0x40, 0, 0, 0]).await;
    let got = raw.expect_closed(WAIT).await;
    // connection.close (10, 50) with reply code 501.
    let close = got.windows(6).any(|w| w == [0, 10, 0, 50, 0x01, 0xF5]);
    assert!(close, "expected connection.close 501, got {got:?}");
}

/// A 100 MB message (RabbitMQ's documented use of a 128 MiB max) goes through
/// intact: split by frame_max on the way in and out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabyte_message_round_trips() {
    let broker = start_broker().await;
    let conn = amqprs_connect(broker.amqp_addr().port()).await;
    let ch = conn.open_channel(None).await.unwrap();
    let (queue, _, _) = ch
        .queue_declare(QueueDeclareArguments::new("huge").finish())
        .await
        .unwrap()
        .unwrap();
    let body: Vec<u8> = (0..100 * 1024 * 1024)
        .map(|i: u32| (i % 253) as u8)
        .collect();
    ch.basic_publish(
        BasicProperties::default(),
        body.clone(),
        BasicPublishArguments::new("", &queue),
    )
    .await
    .unwrap();
    let (_tag, mut rx) = ch
        .basic_consume_rx(BasicConsumeArguments::new(&queue, "huge").finish())
        .await
        .unwrap();
    let msg = timeout(Duration::from_secs(60), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(msg.content.unwrap() == body, "body differs");
    conn.close().await.unwrap();
}

/// A client that negotiated heartbeats and then goes silent is dropped after two
/// missed intervals; the broker sees it as dead, not as connected forever.
#[tokio::test]
async fn silent_peer_is_dropped_after_two_missed_heartbeats() {
    use bytes::{Bytes, BytesMut};
    use switchyard_amqp::codec::{self, Method};

    let broker = start_broker().await;
    let mut raw = RawClient::connect(broker.amqp_addr()).await;
    raw.send(b"AMQP\x00\x00\x09\x01").await;
    let _start = raw.read_available(Duration::from_millis(500)).await;
    let mut out = BytesMut::new();
    let start_ok = codec::ConnectionStartOk {
        mechanism: "PLAIN".into(),
        response: Bytes::from_static(b"\0guest\0guest"),
        locale: "en_US".into(),
        ..Default::default()
    };
    codec::encode_method(&mut out, 0, &Method::from(start_ok));
    raw.send(&out).await;
    let _tune = raw.read_available(Duration::from_millis(500)).await;
    out.clear();
    let tune_ok = codec::ConnectionTuneOk {
        channel_max: 10,
        frame_max: 131072,
        heartbeat: 1,
    };
    codec::encode_method(&mut out, 0, &Method::from(tune_ok));
    let open = codec::ConnectionOpen {
        virtual_host: "/".into(),
        ..Default::default()
    };
    codec::encode_method(&mut out, 0, &Method::from(open));
    raw.send(&out).await;
    // From now on the client says nothing; the broker sends heartbeats, then closes.
    let before = std::time::Instant::now();
    let got = raw.expect_closed(Duration::from_secs(10)).await;
    let waited = before.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "closed too early: {waited:?}"
    );
    let heartbeat = [8u8, 0, 0, 0, 0, 0, 0, 0xCE];
    assert!(
        got.windows(8).any(|w| w == heartbeat),
        "the broker sent heartbeats before giving up"
    );
}

/// lapin 2.x, still what many Rust services run: its close paths must end in Ok,
/// as they do against RabbitMQ (issue 12: `conn.close` without closing the channel
/// first used to end in `IOError(Kind(ConnectionAborted))`).
mod lapin2_client {
    use super::*;
    use lapin2::options::{BasicPublishOptions, QueueDeclareOptions};
    use lapin2::types::FieldTable;
    use lapin2::{BasicProperties, Channel, Connection, ConnectionProperties};

    /// Connects, declares a queue and publishes one message, as the program in the
    /// issue does.
    async fn connect_and_publish(url: &str, queue: &str) -> (Connection, Channel) {
        let conn = timeout(
            WAIT,
            Connection::connect(url, ConnectionProperties::default()),
        )
        .await
        .unwrap()
        .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(queue, QueueDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
        ch.basic_publish(
            "",
            queue,
            BasicPublishOptions::default(),
            b"hello",
            BasicProperties::default(),
        )
        .await
        .unwrap();
        (conn, ch)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lapin2_connection_close_with_an_open_channel_is_ok() {
        let broker = start_broker().await;
        let (conn, _ch) = connect_and_publish(&broker.amqp_url(), "lapin2-a").await;
        let closed = timeout(WAIT, conn.close(0, "")).await.unwrap();
        assert!(closed.is_ok(), "conn.close: {closed:?}");
        // The message was published before the close.
        let q = broker
            .broker()
            .vhost("/")
            .unwrap()
            .queue("lapin2-a")
            .unwrap();
        assert_eq!(q.message_count(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lapin2_channel_close_then_connection_close_is_ok() {
        let broker = start_broker().await;
        let (conn, ch) = connect_and_publish(&broker.amqp_url(), "lapin2-b").await;
        let closed = timeout(WAIT, ch.close(200, "bye")).await.unwrap();
        assert!(closed.is_ok(), "channel.close: {closed:?}");
        let closed = timeout(WAIT, conn.close(200, "bye")).await.unwrap();
        assert!(closed.is_ok(), "conn.close: {closed:?}");
    }

    /// A close the broker starts (here 540 for `immediate`) reaches lapin 2 as the
    /// broker's reply, not as a broken socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lapin2_sees_the_brokers_connection_close() {
        let broker = start_broker().await;
        let (conn, ch) = connect_and_publish(&broker.amqp_url(), "lapin2-c").await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        conn.on_error(move |e| {
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(e);
            }
        });
        let _ = ch
            .basic_publish(
                "",
                "lapin2-c",
                BasicPublishOptions {
                    immediate: true,
                    ..Default::default()
                },
                b"now",
                BasicProperties::default(),
            )
            .await;
        let err = timeout(WAIT, rx).await.unwrap().unwrap();
        let text = format!("{err:?}");
        assert!(text.contains("NOT_IMPLEMENTED - immediate=true"), "{text}");
    }
}

//! Stream queues from STOMP and MQTT: STOMP SEND and MQTT PUBLISH reach a
//! stream through exchanges and bindings; STOMP SUBSCRIBE reads it from an
//! `x-stream-offset` with a prefetch, filtered, with the offset on each MESSAGE.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod mqtt;

use mqtt::{v4_client, v4_connack, v4_next, v4_opts};
use rumqttc::QoS;
use switchyard_testkit::start_broker;
use switchyard_testkit::stomp::codec::{Command, Frame};
use switchyard_testkit::stomp::StompClient;

fn body(f: &Frame) -> String {
    String::from_utf8(f.body.to_vec()).unwrap()
}

/// Receives `n` MESSAGEs, acking each; returns (x-stream-offset, body).
async fn take(c: &mut StompClient, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let m = c.recv_message().await;
        let ack = m.get("ack").unwrap().to_owned();
        out.push((
            m.get("x-stream-offset")
                .expect("x-stream-offset header")
                .to_owned(),
            body(&m),
        ));
        c.send_frame(&Frame::new(Command::Ack).header("id", ack))
            .await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stomp_and_mqtt_write_stomp_reads_from_offsets() {
    let b = start_broker().await;
    let mut w = StompClient::connect(b.stomp_addr()).await;
    // Declared from STOMP, bound to amq.topic for MQTT's publishes.
    w.with_receipt(
        Frame::new(Command::Send)
            .header("destination", "/queue/telemetry")
            .header("x-queue-type", "stream")
            .header("x-max-age", "7D")
            .body("s0".to_owned()),
    )
    .await;
    let vhost = b.broker().vhost("/").unwrap();
    vhost
        .bind_queue("telemetry", "amq.topic", "sensors.#", Default::default(), 0)
        .unwrap();
    w.with_receipt(
        Frame::new(Command::Send)
            .header("destination", "/amq/queue/telemetry")
            .header("x-stream-filter-value", "hot")
            .body("s1".to_owned()),
    )
    .await;
    let (m, mut rx, _task) = v4_client(v4_opts(b.mqtt_addr(), "sensor"));
    v4_connack(&mut rx).await;
    m.publish("sensors/room1/temp", QoS::AtLeastOnce, false, "m2")
        .await
        .unwrap();
    v4_next(&mut rx, |p| match p {
        rumqttc::Packet::PubAck(_) => Some(()),
        _ => None,
    })
    .await;
    // The PUBACK waited for the stream's own fsync: offset 2 is on disk.
    let stream = vhost.queue("telemetry").unwrap();
    let committed = *stream.stream().unwrap().log.committed().borrow();
    assert!(
        committed >= 3,
        "PUBACK before the stream committed: {committed}"
    );

    let mut r = StompClient::connect(b.stomp_addr()).await;
    r.subscribe(
        "all",
        "/amq/queue/telemetry",
        "client-individual",
        &[("prefetch-count", "1"), ("x-stream-offset", "first")],
    )
    .await;
    assert_eq!(
        take(&mut r, 3).await,
        vec![
            ("0".into(), "s0".into()),
            ("1".into(), "s1".into()),
            ("2".into(), "m2".into())
        ]
    );
    r.subscribe(
        "from2",
        "/amq/queue/telemetry",
        "client-individual",
        &[("prefetch-count", "5"), ("x-stream-offset", "offset=2")],
    )
    .await;
    assert_eq!(take(&mut r, 1).await, vec![("2".into(), "m2".into())]);
    r.subscribe(
        "hot",
        "/amq/queue/telemetry",
        "client-individual",
        &[
            ("prefetch-count", "5"),
            ("x-stream-offset", "timestamp=0"),
            ("x-stream-filter", "hot,cold"),
        ],
    )
    .await;
    assert_eq!(take(&mut r, 1).await, vec![("1".into(), "s1".into())]);
    // The filtered subscription gets nothing more; the others get a new one.
    w.send("/amq/queue/telemetry", "s3", &[]).await;
    w.send(
        "/amq/queue/telemetry",
        "s4",
        &[("x-stream-filter-value", "cold")],
    )
    .await;
    let mut got = take(&mut r, 5).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            ("3".into(), "s3".into()),
            ("3".into(), "s3".into()),
            ("4".into(), "s4".into()),
            ("4".into(), "s4".into()),
            ("4".into(), "s4".into()),
        ]
    );
    // ack:auto is no-ack, which streams refuse.
    r.send_frame(
        &Frame::new(Command::Subscribe)
            .header("id", "auto")
            .header("destination", "/amq/queue/telemetry")
            .header("prefetch-count", "5"),
    )
    .await;
    let e = r.expect_error().await;
    assert!(
        e.get("message").unwrap_or_default().contains("no-ack") || body(&e).contains("no-ack"),
        "{e:?}"
    );
}

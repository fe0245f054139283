//! STOMP <-> MQTT <-> AMQP: INTEROP.md worked examples 1 and 2 with real client
//! crates (rumqttc, amqprs) and the testkit's STOMP client, each test with its
//! own broker on port 0.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use amqprs::channel::{BasicConsumeArguments, QueueBindArguments, QueueDeclareArguments};
use amqprs::connection::{Connection, OpenConnectionArguments};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use switchyard_testkit::stomp::StompClient;
use switchyard_testkit::{start_broker, TestBroker};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn mqtt(b: &TestBroker, id: &str) -> (AsyncClient, EventLoop) {
    let addr = b.mqtt_addr();
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_credentials("guest", "guest");
    AsyncClient::new(o, 16)
}

/// Polls the event loop until `until` returns something.
async fn poll_until<T>(events: &mut EventLoop, mut until: impl FnMut(&Event) -> Option<T>) -> T {
    timeout(WAIT, async {
        loop {
            let e = events.poll().await.unwrap();
            if let Some(t) = until(&e) {
                return t;
            }
        }
    })
    .await
    .expect("MQTT event in time")
}

/// Worked example 1: MQTT publishes `sensors/room1/temp` QoS 1 -> an AMQP queue
/// bound to `amq.topic` with `sensors.*.temp` receives it persistent; a STOMP
/// client subscribed to `/topic/sensors.*.temp` receives it with
/// `destination:/topic/sensors.room1.temp` and `persistent:true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worked_example_1_mqtt_to_amqp_and_stomp() {
    let b = start_broker().await;
    let conn = Connection::open(&OpenConnectionArguments::new(
        "127.0.0.1",
        b.amqp_addr().port(),
        "guest",
        "guest",
    ))
    .await
    .unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_declare(QueueDeclareArguments::new("temps").finish())
        .await
        .unwrap();
    ch.queue_bind(QueueBindArguments::new(
        "temps",
        "amq.topic",
        "sensors.*.temp",
    ))
    .await
    .unwrap();
    let (_tag, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new("temps", "a")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let mut stomp = StompClient::connect(b.stomp_addr()).await;
    stomp
        .subscribe("t", "/topic/sensors.*.temp", "auto", &[])
        .await;

    let (client, mut events) = mqtt(&b, "sensor-1");
    client
        .publish("sensors/room1/temp", QoS::AtLeastOnce, false, "21.5")
        .await
        .unwrap();
    poll_until(&mut events, |e| {
        matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())
    })
    .await;

    let a = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(a.deliver.unwrap().routing_key(), "sensors.room1.temp");
    assert_eq!(a.basic_properties.unwrap().delivery_mode(), Some(2));
    assert_eq!(a.content.unwrap(), b"21.5");
    let m = stomp.recv_message().await;
    assert_eq!(m.get("destination"), Some("/topic/sensors.room1.temp"));
    assert_eq!(m.get("persistent"), Some("true"));
    assert_eq!(&m.body[..], b"21.5");
}

/// Worked example 2: STOMP `SEND /topic/cmd.dev42` -> an MQTT client subscribed
/// to `cmd/+` receives `cmd/dev42` at QoS 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worked_example_2_stomp_to_mqtt() {
    let b = start_broker().await;
    let (client, mut events) = mqtt(&b, "device-42");
    client.subscribe("cmd/+", QoS::AtLeastOnce).await.unwrap();
    poll_until(&mut events, |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())
    })
    .await;
    let mut stomp = StompClient::connect(b.stomp_addr()).await;
    stomp
        .send(
            "/topic/cmd.dev42",
            "reboot",
            &[("content-type", "text/plain")],
        )
        .await;
    let p = poll_until(&mut events, |e| match e {
        Event::Incoming(Packet::Publish(p)) => Some(p.clone()),
        _ => None,
    })
    .await;
    assert_eq!(p.topic, "cmd/dev42");
    assert_eq!(&p.payload[..], b"reboot");
    assert_eq!(
        p.qos,
        QoS::AtMostOnce,
        "a STOMP SEND without persistent is QoS 0"
    );
    // persistent:true is delivery-mode 2, which MQTT sees as QoS 1 (capped by
    // the subscription's QoS 1).
    stomp
        .send("/topic/cmd.dev42", "persist", &[("persistent", "true")])
        .await;
    let p = poll_until(&mut events, |e| match e {
        Event::Incoming(Packet::Publish(p)) => Some(p.clone()),
        _ => None,
    })
    .await;
    assert_eq!((&p.payload[..], p.qos), (&b"persist"[..], QoS::AtLeastOnce));
}

/// QoS 0 is delivery-mode 1: the STOMP subscriber sees no `persistent:true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_qos_0_arrives_not_persistent() {
    let b = start_broker().await;
    let (client, mut events) = mqtt(&b, "door-sensor");
    let mut stomp = StompClient::connect(b.stomp_addr()).await;
    stomp.subscribe("s", "/topic/state.#", "auto", &[]).await;
    client
        .publish("state/door", QoS::AtMostOnce, false, "open")
        .await
        .unwrap();
    poll_until(&mut events, |e| {
        matches!(e, Event::Outgoing(rumqttc::Outgoing::Publish(_))).then_some(())
    })
    .await;
    let m = stomp.recv_message().await;
    assert_eq!(m.get("destination"), Some("/topic/state.door"));
    assert_eq!(m.get("persistent"), None);
    assert_eq!(&m.body[..], b"open");
}

//! MQTT state across restarts: retained messages and persistent sessions
//! survive a graceful restart and a `kill -9`; QoS 1 messages published while
//! a persistent session was away, and ones delivered but not acknowledged
//! before the restart, reach it afterwards; a cleared retained message stays
//! cleared; an expired session does not come back. Each test has its own
//! broker on a data directory that outlives it; the crash test runs the real
//! binary as a child process.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod mqtt;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use switchyard_testkit::child::ChildBroker;

use mqtt::{
    connect_packet, publish, subscribe, v4_client, v4_connack, v4_opts, v4_publish, v4_suback,
    v5_client, v5_connack, v5_opts, v5_publish, v5_suback, Raw,
};
use switchyard_mqtt::codec::{Packet, QoS, Version};
use switchyard_testkit::start_broker_with;

const V3: Version = Version::V311;
const V5: Version = Version::V5;

/// Publishes QoS 1 with the retain flag and waits for the PUBACK.
async fn publish_retained(c: &mut Raw, topic: &str, id: u16, payload: &[u8]) {
    let mut p = publish(topic, QoS::AtLeastOnce, id, payload);
    p.retain = true;
    c.send(&Packet::Publish(p)).await;
    match c.recv().await {
        Packet::PubAck(a) => {
            assert_eq!(a.packet_id, id);
            assert!(a.reason < 0x80, "PUBACK {a:?}");
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// Subscribes with a clean session and returns the retained messages that
/// follow the SUBACK, as (topic, payload), sorted.
async fn retained_for(addr: SocketAddr, version: Version, filter: &str) -> Vec<(String, Vec<u8>)> {
    let mut c = Raw::connect(addr, version, "retained-reader").await;
    assert_eq!(
        c.subscribe(subscribe(1, filter, QoS::AtLeastOnce)).await,
        [1]
    );
    let mut got = Vec::new();
    for p in c.sync().await {
        match p {
            Packet::Publish(p) => {
                assert!(p.retain, "a retained message is sent with RETAIN");
                if p.qos != QoS::AtMostOnce {
                    c.puback(p.packet_id).await;
                }
                got.push((p.topic, p.payload.to_vec()));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    c.disconnect().await;
    got.sort();
    got
}

fn owned(pairs: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(t, p)| ((*t).to_owned(), p.to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart_and_cleared_ones_stay_cleared() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let b = start_broker_with(|c| c.data_dir = dir.clone()).await;
    let mut p = Raw::connect(b.mqtt_addr(), V5, "publisher").await;
    publish_retained(&mut p, "home/kitchen/temp", 1, b"21.5").await;
    publish_retained(&mut p, "home/hall/temp", 2, b"old").await;
    publish_retained(&mut p, "home/hall/temp", 3, b"19.0").await;
    publish_retained(&mut p, "home/garage/door", 4, b"open").await;
    // An empty retained payload clears the topic.
    publish_retained(&mut p, "home/garage/door", 5, b"").await;
    p.disconnect().await;
    assert!(b.stop().await);

    let b = start_broker_with(|c| c.data_dir = dir.clone()).await;
    let addr = b.mqtt_addr();
    for v in [V3, V5] {
        assert_eq!(
            retained_for(addr, v, "home/kitchen/temp").await,
            owned(&[("home/kitchen/temp", b"21.5")])
        );
        assert_eq!(
            retained_for(addr, v, "home/+/temp").await,
            owned(&[("home/hall/temp", b"19.0"), ("home/kitchen/temp", b"21.5")])
        );
        assert_eq!(
            retained_for(addr, v, "home/#").await,
            owned(&[("home/hall/temp", b"19.0"), ("home/kitchen/temp", b"21.5")])
        );
        assert!(retained_for(addr, v, "home/garage/door").await.is_empty());
    }
    // Cleared after the restart: still cleared after the next one.
    let mut p = Raw::connect(addr, V3, "publisher").await;
    publish_retained(&mut p, "home/hall/temp", 1, b"").await;
    p.disconnect().await;
    assert!(b.stop().await);

    let b = start_broker_with(|c| c.data_dir = dir.clone()).await;
    assert_eq!(
        retained_for(b.mqtt_addr(), V5, "#").await,
        owned(&[("home/kitchen/temp", b"21.5")])
    );
    assert!(b.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_resume_after_a_restart_with_what_was_published_while_away() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let b = start_broker_with(|c| c.data_dir = dir.clone()).await;
    let addr = b.mqtt_addr();

    // rumqttc v4: clean session false.
    let mut o4 = v4_opts(addr, "v4-dev");
    o4.set_clean_session(false);
    let (c, mut rx, task) = v4_client(o4.clone());
    assert!(!v4_connack(&mut rx).await.session_present);
    c.subscribe("alerts/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    v4_suback(&mut rx).await;
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(mqtt::WAIT, task).await;

    // rumqttc v5: clean start false with a session expiry interval.
    let mut o5 = v5_opts(addr, "v5-dev");
    o5.set_clean_start(false);
    o5.set_session_expiry_interval(Some(3600));
    let (c, mut rx, task) = v5_client(o5.clone());
    assert!(!v5_connack(&mut rx).await.session_present);
    c.subscribe("cmd/+/run", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    v5_suback(&mut rx).await;
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(mqtt::WAIT, task).await;

    // A raw v5 session that has a message delivered but not acknowledged when
    // the broker stops.
    let mut raw = {
        let mut c = connect_packet(V5, "raw-dev");
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(600);
        let (raw, ack) = Raw::connect_with(addr, c).await;
        assert!(!ack.session_present);
        raw
    };
    assert_eq!(
        raw.subscribe(subscribe(1, "jobs", QoS::AtLeastOnce)).await,
        [1]
    );

    let mut p = Raw::connect(addr, V3, "publisher").await;
    assert_eq!(p.publish_qos1("alerts/fire", 1, b"while away 4").await, 0);
    assert_eq!(p.publish_qos1("cmd/7/run", 2, b"while away 5").await, 0);
    assert_eq!(p.publish_qos1("jobs", 3, b"unacked").await, 0);
    let got = raw.recv_publish().await;
    assert_eq!(&got.payload[..], b"unacked");
    assert!(!got.dup);
    // No PUBACK: stop the broker with the message in flight.
    p.disconnect().await;
    assert!(b.stop().await);
    drop(raw);

    let b = start_broker_with(|c| c.data_dir = dir.clone()).await;
    let addr = b.mqtt_addr();
    let mut p = Raw::connect(addr, V3, "publisher").await;
    assert_eq!(
        p.publish_qos1("alerts/smoke", 1, b"after restart 4").await,
        0
    );
    assert_eq!(p.publish_qos1("cmd/8/run", 2, b"after restart 5").await, 0);
    // The recovered binding still routes by its MQTT filter: `+` takes a level
    // with a dot (issue 12).
    assert_eq!(p.publish_qos1("cmd/v2.0/run", 3, b"dotted level").await, 0);

    let o4 = {
        let mut o = v4_opts(addr, "v4-dev");
        o.set_clean_session(false);
        o
    };
    let (_c4, mut rx4, _t4) = v4_client(o4);
    assert!(v4_connack(&mut rx4).await.session_present);
    assert_eq!(&v4_publish(&mut rx4).await.payload[..], b"while away 4");
    assert_eq!(&v4_publish(&mut rx4).await.payload[..], b"after restart 4");

    let o5 = {
        let mut o = v5_opts(addr, "v5-dev");
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
        o
    };
    let (_c5, mut rx5, _t5) = v5_client(o5);
    assert!(v5_connack(&mut rx5).await.session_present);
    assert_eq!(&v5_publish(&mut rx5).await.payload[..], b"while away 5");
    assert_eq!(&v5_publish(&mut rx5).await.payload[..], b"after restart 5");
    let dotted = v5_publish(&mut rx5).await;
    assert_eq!(
        (&dotted.topic[..], &dotted.payload[..]),
        (&b"cmd/v2.0/run"[..], &b"dotted level"[..])
    );

    let mut c = connect_packet(V5, "raw-dev");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(600);
    let (mut raw, ack) = Raw::connect_with(addr, c).await;
    assert!(ack.session_present);
    let again = raw.recv_publish().await;
    assert_eq!(&again.payload[..], b"unacked");
    assert!(again.dup, "delivered before the restart: DUP");
    raw.puback(again.packet_id).await;
    assert!(raw.sync().await.is_empty());
    raw.disconnect().await;
    assert!(b.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_and_expired_sessions_do_not_come_back() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let b = start_broker_with(|c| c.data_dir = dir.clone()).await;
    let addr = b.mqtt_addr();
    let persistent = |id: &str, expiry: u32| {
        let mut c = connect_packet(V5, id);
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(expiry);
        c
    };
    // Expires while the broker runs.
    let (mut c, ack) = Raw::connect_with(addr, persistent("short", 1)).await;
    assert!(!ack.session_present);
    assert_eq!(c.subscribe(subscribe(1, "a", QoS::AtLeastOnce)).await, [1]);
    c.disconnect().await;
    // Ended by a clean start.
    let (c, _) = Raw::connect_with(addr, persistent("cleaned", 600)).await;
    c.disconnect().await;
    let mut clean = connect_packet(V5, "cleaned");
    clean.clean_start = true;
    let (c, _) = Raw::connect_with(addr, clean).await;
    c.disconnect().await;
    // Ended by a DISCONNECT that sets the expiry to 0.
    let (mut c, _) = Raw::connect_with(addr, persistent("zeroed", 600)).await;
    let mut d = switchyard_mqtt::codec::Disconnect::default();
    d.properties.session_expiry_interval = Some(0);
    c.send(&Packet::Disconnect(d)).await;
    c.expect_closed().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while b
        .broker()
        .vhost("/")
        .unwrap()
        .queue("mqtt-subscription-shortqos1")
        .is_ok()
    {
        assert!(Instant::now() < deadline, "session 'short' did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Outlives the restart: the broker is down for longer than its expiry,
    // which runs from the restart.
    let (c, _) = Raw::connect_with(addr, persistent("kept", 2)).await;
    c.disconnect().await;
    assert!(b.stop().await);
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let b = start_broker_with(|c| c.data_dir = dir.clone()).await;
    let addr = b.mqtt_addr();
    for id in ["short", "cleaned", "zeroed"] {
        let (c, ack) = Raw::connect_with(addr, persistent(id, 600)).await;
        assert!(!ack.session_present, "session '{id}' came back");
        let mut clean = connect_packet(V5, id);
        clean.clean_start = true;
        c.disconnect().await;
        Raw::connect_with(addr, clean).await.0.disconnect().await;
    }
    assert!(
        b.broker()
            .vhost("/")
            .unwrap()
            .queue("mqtt-subscription-shortqos1")
            .is_err(),
        "an expired session's queue is gone"
    );
    // "kept" (expiry 2 s) is back right after the restart...
    let (c, ack) = Raw::connect_with(addr, persistent("kept", 2)).await;
    assert!(ack.session_present);
    c.disconnect().await;
    // ...and gone 2 s after its client left again.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let (c, ack) = Raw::connect_with(addr, persistent("kept", 2)).await;
    assert!(!ack.session_present);
    c.disconnect().await;
    assert!(b.stop().await);
}

/// The broker binary on `data` (every listener on a free port) as run `run`.
fn start_child(data: &Path, run: usize) -> ChildBroker {
    ChildBroker::start_in(Path::new(env!("CARGO_BIN_EXE_switchyard")), data, run, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_and_sessions_survive_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let broker = start_child(data.path(), 0);
    let addr = broker.addr("mqtt");

    let mut c = connect_packet(V3, "crash-dev");
    c.clean_start = false;
    let (mut dev, ack) = Raw::connect_with(addr, c.clone()).await;
    assert!(!ack.session_present);
    assert_eq!(
        dev.subscribe(subscribe(1, "fleet/+/cmd", QoS::AtLeastOnce))
            .await,
        [1]
    );
    let mut p = Raw::connect(addr, V5, "crash-pub").await;
    assert_eq!(p.publish_qos1("fleet/1/cmd", 1, b"delivered").await, 0);
    let got = dev.recv_publish().await;
    assert_eq!(&got.payload[..], b"delivered");
    // Not acknowledged. The device goes away; more arrives for it.
    drop(dev);
    assert_eq!(p.publish_qos1("fleet/2/cmd", 2, b"while away").await, 0);
    // The retained write is committed before the PUBACK: kill right after it.
    publish_retained(&mut p, "fleet/1/status", 3, b"online").await;
    broker.kill9();

    let broker = start_child(data.path(), 1);
    let addr = broker.addr("mqtt");
    assert_eq!(
        retained_for(addr, V5, "fleet/+/status").await,
        owned(&[("fleet/1/status", b"online")])
    );
    let (mut dev, ack) = Raw::connect_with(addr, c).await;
    assert!(ack.session_present);
    let first = dev.recv_publish().await;
    assert_eq!(&first.payload[..], b"delivered");
    assert!(first.dup, "delivered before the crash: DUP");
    dev.puback(first.packet_id).await;
    let second = dev.recv_publish().await;
    assert_eq!(&second.payload[..], b"while away");
    dev.puback(second.packet_id).await;
    assert!(dev.sync().await.is_empty());
    dev.disconnect().await;
    broker.kill9();
}

/// Sends `p` and returns the next packet.
async fn exchange(c: &mut Raw, p: Packet) -> Packet {
    c.send(&p).await;
    c.recv().await
}

/// Issue 12 item 6: exactly once across `kill -9`, both directions. A PUBREL
/// owed for a delivery the client had PUBREC'd is re-sent when the session
/// resumes after the crash; a client's QoS 2 PUBLISH that had its PUBREC but
/// not yet its PUBREL, re-sent after the crash, is confirmed without being
/// routed a second time. Topics carry a dot inside a level, which comes back
/// exactly from the recovered log (issue 12 item 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_handshakes_survive_kill_9_in_both_directions() {
    use switchyard_mqtt::codec::Ack;
    let data = tempfile::tempdir().unwrap();
    let broker = start_child(data.path(), 0);
    let addr = broker.addr("mqtt");
    let persistent = |id: &str| {
        let mut c = connect_packet(V5, id);
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(600);
        c
    };

    // A watcher of what the device publishes, away during the crash.
    let (mut watch, _) = Raw::connect_with(addr, persistent("q2-watch")).await;
    assert_eq!(
        watch
            .subscribe(subscribe(1, "in/#", QoS::ExactlyOnce))
            .await,
        [2]
    );
    watch.disconnect().await;

    let (mut dev, ack) = Raw::connect_with(addr, persistent("q2-dev")).await;
    assert!(!ack.session_present);
    assert_eq!(
        dev.subscribe(subscribe(1, "out/#", QoS::ExactlyOnce)).await,
        [2]
    );
    // Broker -> device: the device sends PUBREC and leaves the PUBREL unanswered.
    let mut p = Raw::connect(addr, V5, "q2-pub").await;
    let rec = exchange(
        &mut p,
        Packet::Publish(publish("out/v1.2/cmd", QoS::ExactlyOnce, 1, b"out")),
    )
    .await;
    assert!(
        matches!(&rec, Packet::PubRec(a) if a.packet_id == 1 && a.reason == 0),
        "{rec:?}"
    );
    let comp = exchange(&mut p, Packet::PubRel(Ack::new(1, 0))).await;
    assert!(matches!(&comp, Packet::PubComp(_)), "{comp:?}");
    let out = dev.recv_publish().await;
    assert_eq!(
        (&out.topic[..], out.qos, &out.payload[..]),
        ("out/v1.2/cmd", QoS::ExactlyOnce, &b"out"[..])
    );
    let rel = exchange(&mut dev, Packet::PubRec(Ack::new(out.packet_id, 0))).await;
    assert!(
        matches!(&rel, Packet::PubRel(a) if a.packet_id == out.packet_id),
        "{rel:?}"
    );
    // Device -> broker: PUBREC received, PUBREL not sent yet.
    let mut inbound = publish("in/v1.2/reading", QoS::ExactlyOnce, 7, b"in");
    let rec = exchange(&mut dev, Packet::Publish(inbound.clone())).await;
    assert!(
        matches!(&rec, Packet::PubRec(a) if a.packet_id == 7 && a.reason == 0),
        "{rec:?}"
    );
    broker.kill9();

    let broker = start_child(data.path(), 1);
    let addr = broker.addr("mqtt");
    let (mut dev, ack) = Raw::connect_with(addr, persistent("q2-dev")).await;
    assert!(ack.session_present);
    // The owed PUBREL comes first, with the same packet id.
    let rel = dev.recv().await;
    assert!(
        matches!(&rel, Packet::PubRel(a) if a.packet_id == out.packet_id),
        "{rel:?}"
    );
    dev.send(&Packet::PubComp(Ack::new(out.packet_id, 0))).await;
    // The device re-sends its PUBLISH (DUP), then the PUBREL.
    inbound.dup = true;
    let rec = exchange(&mut dev, Packet::Publish(inbound)).await;
    assert!(
        matches!(&rec, Packet::PubRec(a) if a.packet_id == 7 && a.reason == 0),
        "{rec:?}"
    );
    let comp = exchange(&mut dev, Packet::PubRel(Ack::new(7, 0))).await;
    assert!(
        matches!(&comp, Packet::PubComp(a) if a.packet_id == 7 && a.reason == 0),
        "{comp:?}"
    );
    assert!(
        dev.sync().await.is_empty(),
        "the PUBCOMP ended the outgoing one"
    );
    dev.disconnect().await;

    // The watcher gets the device's message once, on its exact topic.
    let (mut watch, ack) = Raw::connect_with(addr, persistent("q2-watch")).await;
    assert!(ack.session_present);
    let got = watch.recv_publish().await;
    assert_eq!(
        (&got.topic[..], &got.payload[..]),
        ("in/v1.2/reading", &b"in"[..])
    );
    let rel = exchange(&mut watch, Packet::PubRec(Ack::new(got.packet_id, 0))).await;
    assert!(matches!(&rel, Packet::PubRel(_)), "{rel:?}");
    watch
        .send(&Packet::PubComp(Ack::new(got.packet_id, 0)))
        .await;
    assert!(watch.sync().await.is_empty(), "routed once, not twice");
    watch.disconnect().await;
    broker.kill9();
}

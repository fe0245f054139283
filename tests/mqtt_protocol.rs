//! MQTT protocol behaviour over real sockets, one broker per test, with a raw
//! client built on our codec so every flag and reason code can be asserted:
//! QoS 0/1/2 flows, retained messages, wills, sessions, takeover, keep-alive,
//! MQTT 5 features, permissions, bad input, and WebSocket framing.
// Test helpers outside #[test] functions fail a test by panicking, as tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod mqtt;

use std::time::Duration;

use bytes::Bytes;
use mqtt::{connect_packet, publish, subscribe, will, Raw};
use switchyard_mqtt::codec::{
    reason, Ack, Disconnect, Packet, Properties, QoS, SubOptions, Subscribe, Unsubscribe, Version,
};
use switchyard_testkit::config::{PermissionConfig, UserConfig};
use switchyard_testkit::start_broker;

const V3: Version = Version::V311;
const V5: Version = Version::V5;

#[tokio::test]
async fn qos_0_1_2_end_to_end_with_min_of_publish_and_subscription() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    for v in [V3, V5] {
        let mut sub = Raw::connect(addr, v, "sub").await;
        assert_eq!(
            sub.subscribe(subscribe(1, "q/two", QoS::ExactlyOnce)).await,
            [2]
        );
        assert_eq!(
            sub.subscribe(subscribe(2, "q/one", QoS::AtLeastOnce)).await,
            [1]
        );
        let mut pubr = Raw::connect(addr, v, "pub").await;
        // QoS 2 publish: PUBREC, PUBREL, PUBCOMP.
        let mut p = publish("q/two", QoS::ExactlyOnce, 7, b"exactly");
        pubr.send(&Packet::Publish(p.clone())).await;
        assert!(
            matches!(pubr.recv().await, Packet::PubRec(a) if a.packet_id == 7 && a.reason == 0)
        );
        // A resend of the same QoS 2 packet id before PUBREL is not routed again.
        p.dup = true;
        pubr.send(&Packet::Publish(p)).await;
        assert!(matches!(pubr.recv().await, Packet::PubRec(a) if a.packet_id == 7));
        pubr.send(&Packet::PubRel(Ack::new(7, 0))).await;
        assert!(
            matches!(pubr.recv().await, Packet::PubComp(a) if a.packet_id == 7 && a.reason == 0)
        );
        // The subscriber gets it once, at QoS 2, and completes the handshake.
        let got = sub.recv_publish().await;
        assert_eq!(
            (got.qos, &got.payload[..], got.dup),
            (QoS::ExactlyOnce, &b"exactly"[..], false)
        );
        sub.send(&Packet::PubRec(Ack::new(got.packet_id, 0))).await;
        assert!(matches!(sub.recv().await, Packet::PubRel(a) if a.packet_id == got.packet_id));
        sub.send(&Packet::PubComp(Ack::new(got.packet_id, 0))).await;
        assert!(sub.sync().await.is_empty(), "delivered exactly once");
        // QoS 2 publish to a QoS 1 subscription arrives at QoS 1.
        pubr.send(&Packet::Publish(publish(
            "q/one",
            QoS::ExactlyOnce,
            8,
            b"x",
        )))
        .await;
        assert!(matches!(pubr.recv().await, Packet::PubRec(_)));
        let got = sub.recv_publish().await;
        assert_eq!(got.qos, QoS::AtLeastOnce);
        sub.puback(got.packet_id).await;
        // QoS 0 publish stays QoS 0.
        pubr.send(&Packet::Publish(publish("q/two", QoS::AtMostOnce, 0, b"y")))
            .await;
        assert_eq!(sub.recv_publish().await.qos, QoS::AtMostOnce);
        pubr.disconnect().await;
        sub.disconnect().await;
    }
}

#[tokio::test]
async fn unacked_qos1_is_resent_with_dup_to_a_resumed_session() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut c = connect_packet(V3, "persist");
    c.clean_start = false;
    let (mut sub, ack) = Raw::connect_with(addr, c.clone()).await;
    assert!(!ack.session_present);
    assert_eq!(
        sub.subscribe(subscribe(1, "p/#", QoS::AtLeastOnce)).await,
        [1]
    );
    let mut pubr = Raw::connect(addr, V3, "pub").await;
    assert_eq!(pubr.publish_qos1("p/a", 1, b"first").await, 0);
    let first = sub.recv_publish().await;
    assert!(!first.dup);
    // Gone without acking; a message arrives while it is away.
    drop(sub);
    assert_eq!(pubr.publish_qos1("p/b", 2, b"second").await, 0);
    let (mut sub, ack) = Raw::connect_with(addr, c).await;
    assert!(ack.session_present, "session resumed");
    let again = sub.recv_publish().await;
    assert_eq!(
        (again.packet_id, again.dup, &again.payload[..]),
        (first.packet_id, true, &b"first"[..])
    );
    sub.puback(again.packet_id).await;
    let second = sub.recv_publish().await;
    assert_eq!(&second.payload[..], b"second");
    sub.puback(second.packet_id).await;
    assert!(sub.sync().await.is_empty());
    // A clean session drops it all.
    let (mut clean, ack) = Raw::connect_with(addr, connect_packet(V3, "persist")).await;
    assert!(!ack.session_present);
    assert_eq!(pubr.publish_qos1("p/c", 3, b"third").await, 0);
    assert!(clean.sync().await.is_empty(), "no subscription any more");
}

#[tokio::test]
async fn qos2_inflight_pubrel_is_resent_after_reconnect() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut c = connect_packet(V5, "q2");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(60);
    let (mut sub, _) = Raw::connect_with(addr, c.clone()).await;
    sub.subscribe(subscribe(1, "e/x", QoS::ExactlyOnce)).await;
    let mut pubr = Raw::connect(addr, V5, "pub").await;
    pubr.send(&Packet::Publish(publish(
        "e/x",
        QoS::ExactlyOnce,
        1,
        b"once",
    )))
    .await;
    let got = sub.recv_publish().await;
    sub.send(&Packet::PubRec(Ack::new(got.packet_id, 0))).await;
    assert!(matches!(sub.recv().await, Packet::PubRel(_)));
    drop(sub);
    let (mut sub, ack) = Raw::connect_with(addr, c).await;
    assert!(ack.session_present);
    // Only the PUBREL comes again, never the message.
    assert!(matches!(sub.recv().await, Packet::PubRel(a) if a.packet_id == got.packet_id));
    sub.send(&Packet::PubComp(Ack::new(got.packet_id, 0))).await;
    assert!(sub.sync().await.is_empty());
}

#[tokio::test]
async fn retained_set_replace_clear_and_wildcards_without_dollar_topics() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut p = Raw::connect(addr, V3, "pub").await;
    let mut retained = publish("r/a/temp", QoS::AtLeastOnce, 1, b"old");
    retained.retain = true;
    p.send(&Packet::Publish(retained.clone())).await;
    p.recv().await;
    retained.payload = Bytes::from_static(b"new");
    retained.packet_id = 2;
    p.send(&Packet::Publish(retained.clone())).await;
    p.recv().await;
    // A `$` topic (not `$SYS`, which only the broker publishes).
    let mut sys = publish("$app/x", QoS::AtMostOnce, 0, b"sys");
    sys.retain = true;
    p.send(&Packet::Publish(sys)).await;
    p.sync().await;
    for filter in ["r/a/temp", "r/+/temp", "r/#", "#"] {
        let mut s = Raw::connect(addr, V3, "s").await;
        s.subscribe(subscribe(1, filter, QoS::AtLeastOnce)).await;
        let got = s.recv_publish().await;
        assert!(got.retain, "{filter}");
        assert_eq!(
            (&got.topic[..], &got.payload[..]),
            ("r/a/temp", &b"new"[..]),
            "{filter}"
        );
        s.puback(got.packet_id).await;
        // `#` does not match `$app/x` (nor `$SYS`); nothing else is retained.
        assert!(s.sync().await.is_empty(), "{filter}");
        // A live message to a subscriber has RETAIN clear.
        p.send(&Packet::Publish(retained.clone())).await;
        p.recv().await;
        let live = s.recv_publish().await;
        assert!(!live.retain);
        s.puback(live.packet_id).await;
        s.disconnect().await;
    }
    let mut s = Raw::connect(addr, V3, "s2").await;
    s.subscribe(subscribe(1, "$app/#", QoS::AtMostOnce)).await;
    assert_eq!(&s.recv_publish().await.payload[..], b"sys");
    // An empty retained payload clears it.
    retained.payload = Bytes::new();
    p.send(&Packet::Publish(retained)).await;
    p.recv().await;
    let mut s = Raw::connect(addr, V3, "s3").await;
    s.subscribe(subscribe(1, "r/#", QoS::AtMostOnce)).await;
    assert!(s.sync().await.is_empty(), "cleared");
}

#[tokio::test]
async fn will_is_sent_on_abrupt_close_not_on_disconnect() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut watcher = Raw::connect(addr, V3, "watcher").await;
    watcher
        .subscribe(subscribe(1, "wills/#", QoS::AtLeastOnce))
        .await;
    // Clean DISCONNECT: no will.
    let mut c = connect_packet(V3, "dev1");
    c.will = Some(will("wills/dev1", b"gone", QoS::AtLeastOnce, false));
    let (dev, _) = Raw::connect_with(addr, c.clone()).await;
    dev.disconnect().await;
    assert!(watcher.sync().await.is_empty());
    // Socket dropped: the will, with its QoS.
    let (dev, _) = Raw::connect_with(addr, c).await;
    drop(dev);
    let w = watcher.recv_publish().await;
    assert_eq!(
        (&w.topic[..], &w.payload[..], w.qos),
        ("wills/dev1", &b"gone"[..], QoS::AtLeastOnce)
    );
    watcher.puback(w.packet_id).await;
    // A retained will is stored as retained.
    let mut c = connect_packet(V3, "dev2");
    c.will = Some(will("wills/dev2", b"offline", QoS::AtMostOnce, true));
    let (dev, _) = Raw::connect_with(addr, c).await;
    drop(dev);
    watcher.recv_publish().await;
    let mut late = Raw::connect(addr, V3, "late").await;
    late.subscribe(subscribe(1, "wills/dev2", QoS::AtMostOnce))
        .await;
    let r = late.recv_publish().await;
    assert!(r.retain);
    assert_eq!(&r.payload[..], b"offline");
}

#[tokio::test]
async fn v5_will_delay_disconnect_with_will_and_reconnect_cancels() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut watcher = Raw::connect(addr, V5, "watcher").await;
    watcher
        .subscribe(subscribe(1, "wills/#", QoS::AtMostOnce))
        .await;
    // DISCONNECT with reason 0x04 sends the will.
    let mut c = connect_packet(V5, "d1");
    c.will = Some(will("wills/d1", b"w04", QoS::AtMostOnce, false));
    let (mut dev, _) = Raw::connect_with(addr, c).await;
    dev.send(&Packet::Disconnect(Disconnect {
        reason: reason::DISCONNECT_WITH_WILL_MESSAGE,
        properties: Properties::default(),
    }))
    .await;
    assert_eq!(&watcher.recv_publish().await.payload[..], b"w04");
    // A 1 s will delay with a 60 s session: published after about a second.
    let mut c = connect_packet(V5, "d2");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(60);
    let mut w = will("wills/d2", b"late", QoS::AtMostOnce, false);
    w.properties.will_delay_interval = Some(1);
    w.properties.content_type = Some("text/plain".into());
    c.will = Some(w);
    let (dev, _) = Raw::connect_with(addr, c.clone()).await;
    let t0 = tokio::time::Instant::now();
    drop(dev);
    let got = watcher.recv_publish().await;
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(got.properties.content_type.as_deref(), Some("text/plain"));
    // Coming back within the delay cancels it.
    let mut c2 = c.clone();
    if let Some(w) = c2.will.as_mut() {
        w.properties.will_delay_interval = Some(2);
    }
    let (dev, _) = Raw::connect_with(addr, c2.clone()).await;
    drop(dev);
    let (dev, ack) = Raw::connect_with(addr, c2).await;
    assert!(ack.session_present);
    assert!(watcher
        .try_recv(Duration::from_millis(2600))
        .await
        .is_none());
    dev.disconnect().await;
}

#[tokio::test]
async fn takeover_disconnects_the_first_connection() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut first = Raw::connect(addr, V5, "same").await;
    let _second = Raw::connect(addr, V5, "same").await;
    let got = first.expect_closed().await;
    assert!(
        matches!(got.as_slice(), [Packet::Disconnect(d)] if d.reason == reason::SESSION_TAKEN_OVER),
        "{got:?}"
    );
    let mut first = Raw::connect(addr, V3, "same3").await;
    let _second = Raw::connect(addr, V3, "same3").await;
    assert!(first.expect_closed().await.is_empty(), "3.1.1: plain close");
}

#[tokio::test]
async fn keep_alive_closes_a_silent_client_after_one_and_a_half_intervals() {
    let b = start_broker().await;
    let mut c = connect_packet(V5, "ka");
    c.keep_alive = 1;
    let (mut raw, _) = Raw::connect_with(b.mqtt_addr(), c).await;
    let t0 = tokio::time::Instant::now();
    let got = raw.expect_closed().await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert!(
        matches!(got.as_slice(), [Packet::Disconnect(d)] if d.reason == reason::KEEP_ALIVE_TIMEOUT),
        "{got:?}"
    );
}

#[tokio::test]
async fn server_keep_alive_and_connack_properties() {
    let b = switchyard_testkit::start_broker_with(|c| c.mqtt.max_keep_alive_secs = 20).await;
    let mut c = connect_packet(V5, "");
    c.keep_alive = 0;
    c.properties.request_response_information = Some(1);
    let (_raw, ack) = Raw::connect_with(b.mqtt_addr(), c).await;
    assert_eq!(ack.code, 0);
    let p = &ack.properties;
    assert_eq!(p.server_keep_alive, Some(20));
    assert!(p
        .assigned_client_identifier
        .as_deref()
        .is_some_and(|id| !id.is_empty()));
    assert_eq!(p.receive_maximum, Some(1024));
    assert_eq!(p.topic_alias_maximum, Some(16));
    assert_eq!(p.shared_subscription_available, Some(1));
    assert!(p.response_information.is_some());
    // 3.1.1 with an empty id and persistent session: identifier rejected.
    let mut c = connect_packet(V3, "");
    c.clean_start = false;
    let (_raw, ack) = Raw::connect_with(b.mqtt_addr(), c).await;
    assert_eq!(ack.code, 2);
}

#[tokio::test]
async fn bad_credentials_auth_method_and_unsupported_version_are_refused() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut c = connect_packet(V5, "x");
    c.password = Some(Bytes::from_static(b"wrong"));
    let (_r, ack) = Raw::connect_with(addr, c.clone()).await;
    assert_eq!(ack.code, reason::BAD_USER_NAME_OR_PASSWORD);
    c.version = V3;
    let (_r, ack) = Raw::connect_with(addr, c).await;
    assert_eq!(ack.code, 4);
    let mut c = connect_packet(V5, "x");
    c.properties.authentication_method = Some("SCRAM-SHA-1".into());
    let (_r, ack) = Raw::connect_with(addr, c).await;
    assert_eq!(ack.code, reason::BAD_AUTHENTICATION_METHOD);
    // Protocol level 6: unacceptable protocol version (v3 code 1).
    let mut raw = Raw::open(addr, V3).await;
    raw.send_bytes(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 6, 2, 0, 60, 0, 0])
        .await;
    let got = raw.expect_closed().await;
    assert!(
        matches!(got.as_slice(), [Packet::ConnAck(a)] if a.code == 1),
        "{got:?}"
    );
    // `vhost:user` logs into that vhost; an unknown vhost prefix is part of the name.
    let mut c = connect_packet(V3, "vh");
    c.username = Some("/:guest".into());
    let (_r, ack) = Raw::connect_with(addr, c).await;
    assert_eq!(ack.code, 0);
}

#[tokio::test]
async fn protocol_violations_close_only_that_connection() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut bystander = Raw::connect(addr, V5, "bystander").await;
    bystander
        .subscribe(subscribe(1, "ok", QoS::AtMostOnce))
        .await;

    let mut second_connect = bytes::BytesMut::new();
    switchyard_mqtt::codec::encode_unlimited(
        &Packet::Connect(Box::new(connect_packet(V5, "again"))),
        V5,
        &mut second_connect,
    );
    let second_connect = second_connect.to_vec();
    // (bytes after CONNECT, expected v5 reason) pairs.
    let cases: Vec<(Vec<u8>, u8)> = vec![
        (vec![0x36, 3, 0, 1, b't'], reason::MALFORMED_PACKET), // QoS 3
        (vec![0x80, 6, 0, 1, 0, 1, b'a', 0], reason::MALFORMED_PACKET), // reserved flags
        (vec![0x30, 5, 0, 2, 0xc3, 0x28, 0], reason::MALFORMED_PACKET), // bad UTF-8
        (
            vec![0x30, 6, 0, 3, b'a', b'/', b'+', 0],
            reason::TOPIC_NAME_INVALID,
        ), // wildcard in a topic name
        (second_connect, reason::PROTOCOL_ERROR),              // second CONNECT
        (vec![0x20, 3, 0, 0, 0], reason::PROTOCOL_ERROR),      // CONNACK from a client
        (vec![0xf0, 2, 0, 0], reason::PROTOCOL_ERROR),         // AUTH without a method
    ];
    for (bytes, want) in cases {
        let mut raw = Raw::connect(addr, V5, "bad").await;
        raw.send_bytes(&bytes).await;
        let got = raw.expect_closed().await;
        assert!(
            matches!(got.as_slice(), [Packet::Disconnect(d)] if d.reason == want),
            "{bytes:?}: {got:?}"
        );
        // 3.1.1: the same closes without a packet.
        if want != reason::PROTOCOL_ERROR || bytes[0] != 0xf0 {
            let mut raw = Raw::connect(addr, V3, "bad3").await;
            raw.send_bytes(&bytes).await;
            assert!(raw.expect_closed().await.is_empty(), "{bytes:?}");
        }
    }
    // PUBLISH before CONNECT: closed.
    let mut raw = Raw::open(addr, V3).await;
    raw.send_bytes(&[0x30, 3, 0, 1, b't']).await;
    assert!(raw.expect_closed().await.is_empty());
    // A packet over the maximum size is refused from its fixed header alone.
    let mut raw = Raw::connect(addr, V5, "big").await;
    raw.send_bytes(&[0x30, 0xff, 0xff, 0xff, 0x7f]).await;
    let got = raw.expect_closed().await;
    assert!(
        matches!(got.as_slice(), [Packet::Disconnect(d)] if d.reason == reason::PACKET_TOO_LARGE),
        "{got:?}"
    );
    // Before login the limit is the unauthenticated one (64 KiB).
    let mut raw = Raw::open(addr, V3).await;
    raw.send_bytes(&[0x10, 0xff, 0xff, 0x10]).await;
    assert!(raw.expect_closed().await.is_empty());

    // The bystander never noticed.
    let mut p = Raw::connect(addr, V3, "p").await;
    p.send(&Packet::Publish(publish(
        "ok",
        QoS::AtMostOnce,
        0,
        b"still here",
    )))
    .await;
    assert_eq!(&bystander.recv_publish().await.payload[..], b"still here");
}

#[tokio::test]
async fn invalid_filters_are_refused() {
    let b = start_broker().await;
    let mut v5 = Raw::connect(b.mqtt_addr(), V5, "f5").await;
    let s = Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![
            ("a/#/b".into(), SubOptions::default()),
            ("ok/+".into(), SubOptions::default()),
            ("$share/g".into(), SubOptions::default()),
        ],
    };
    assert_eq!(
        v5.subscribe(s.clone()).await,
        [
            reason::TOPIC_FILTER_INVALID,
            0,
            reason::TOPIC_FILTER_INVALID
        ]
    );
    let mut v3 = Raw::connect(b.mqtt_addr(), V3, "f3").await;
    v3.send(&Packet::Subscribe(s)).await;
    assert!(v3.expect_closed().await.is_empty());
}

#[tokio::test]
async fn permissions_publish_and_subscribe() {
    let hash = switchyard_core::auth::hash_password("pw", [1, 2, 3, 4]);
    let b = switchyard_testkit::start_broker_with(|c| {
        let mut users = c.users();
        for name in ["reader", "writer"] {
            users.push(UserConfig {
                name: name.into(),
                password_hash: hash.clone(),
                tags: vec![],
                loopback_only: false,
            });
        }
        c.set_users(users);
        let mut perms = c.permissions();
        perms.push(PermissionConfig {
            user: "reader".into(),
            vhost: "/".into(),
            configure: ".*".into(),
            write: "^mqtt-".into(),
            read: ".*".into(),
        });
        perms.push(PermissionConfig {
            user: "writer".into(),
            vhost: "/".into(),
            configure: ".*".into(),
            write: ".*".into(),
            read: "^nothing$".into(),
        });
        c.set_permissions(perms);
    })
    .await;
    let addr = b.mqtt_addr();
    let login = |v, user: &str| {
        let mut c = connect_packet(v, user);
        c.username = Some(user.into());
        c.password = Some(Bytes::from_static(b"pw"));
        c
    };
    // Subscribe refused: 0x80 (3.1.1), 0x87 (5.0).
    let (mut w3, _) = Raw::connect_with(addr, login(V3, "writer")).await;
    assert_eq!(
        w3.subscribe(subscribe(1, "a", QoS::AtMostOnce)).await,
        [0x80]
    );
    let (mut w5, _) = Raw::connect_with(addr, login(V5, "writer")).await;
    assert_eq!(
        w5.subscribe(subscribe(1, "a", QoS::AtMostOnce)).await,
        [reason::NOT_AUTHORIZED]
    );
    // Publish refused: PUBACK 0x87 (5.0); disconnect (3.1.1, RabbitMQ's behaviour).
    let (mut r5, _) = Raw::connect_with(addr, login(V5, "reader")).await;
    assert_eq!(r5.publish_qos1("a", 1, b"x").await, reason::NOT_AUTHORIZED);
    let (mut r3, _) = Raw::connect_with(addr, login(V3, "reader")).await;
    r3.send(&Packet::Publish(publish("a", QoS::AtLeastOnce, 1, b"x")))
        .await;
    assert!(r3.expect_closed().await.is_empty());
}

#[tokio::test]
async fn v5_properties_subscription_ids_no_local_and_retain_options() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut me = Raw::connect(addr, V5, "me").await;
    let s = Subscribe {
        packet_id: 1,
        properties: Properties {
            subscription_identifiers: vec![42],
            ..Properties::default()
        },
        filters: vec![(
            "props/#".into(),
            SubOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 0,
            },
        )],
    };
    assert_eq!(me.subscribe(s).await, [1]);
    // My own publish is not sent back to me (no-local).
    me.send(&Packet::Publish(publish(
        "props/a",
        QoS::AtMostOnce,
        0,
        b"mine",
    )))
    .await;
    assert!(me.sync().await.is_empty());
    // Someone else's comes with every property intact.
    let mut other = Raw::connect(addr, V5, "other").await;
    let mut p = publish("props/a", QoS::AtLeastOnce, 5, b"{}");
    p.retain = true;
    p.properties = Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(100),
        content_type: Some("application/json".into()),
        response_topic: Some("re/ply".into()),
        correlation_data: Some(Bytes::from_static(b"\x01\x02")),
        user_properties: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
        ..Properties::default()
    };
    other.send(&Packet::Publish(p.clone())).await;
    assert!(matches!(other.recv().await, Packet::PubAck(a) if a.reason == 0));
    let got = me.recv_publish().await;
    assert!(got.retain, "retain as published");
    let gp = &got.properties;
    assert_eq!(gp.subscription_identifiers, [42]);
    assert_eq!(gp.payload_format_indicator, Some(1));
    assert!(gp
        .message_expiry_interval
        .is_some_and(|e| (99..=100).contains(&e)));
    assert_eq!(gp.content_type.as_deref(), Some("application/json"));
    assert_eq!(gp.response_topic.as_deref(), Some("re/ply"));
    assert_eq!(gp.correlation_data.as_deref(), Some(&b"\x01\x02"[..]));
    assert_eq!(gp.user_properties, p.properties.user_properties);
    me.puback(got.packet_id).await;
    // Retain handling 2: no retained message at subscribe; 1: only when new.
    let mut late = Raw::connect(addr, V5, "late").await;
    let rh = |id, rh| Subscribe {
        packet_id: id,
        properties: Properties::default(),
        filters: vec![(
            "props/a".into(),
            SubOptions {
                qos: QoS::AtMostOnce,
                retain_handling: rh,
                ..SubOptions::default()
            },
        )],
    };
    late.subscribe(rh(1, 2)).await;
    assert!(late.sync().await.is_empty());
    late.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 2,
        properties: Properties::default(),
        filters: vec!["props/a".into(), "never".into()],
    }))
    .await;
    assert!(
        matches!(late.recv().await, Packet::UnsubAck(u) if u.codes == [0, reason::NO_SUBSCRIPTION_EXISTED])
    );
    late.subscribe(rh(3, 1)).await;
    assert!(late.recv_publish().await.retain);
    late.subscribe(rh(4, 1)).await;
    assert!(
        late.sync().await.is_empty(),
        "existing subscription: no retained"
    );
    // A publish to a topic nobody subscribed to: 0x10 no matching subscribers.
    assert_eq!(
        other.publish_qos1("nobody/home", 6, b"x").await,
        reason::NO_MATCHING_SUBSCRIBERS
    );
}

#[tokio::test]
async fn message_expiry_drops_stale_messages() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut c = connect_packet(V5, "slow");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(60);
    let (mut sub, _) = Raw::connect_with(addr, c.clone()).await;
    sub.subscribe(subscribe(1, "exp/#", QoS::AtLeastOnce)).await;
    sub.disconnect().await;
    let mut p = Raw::connect(addr, V5, "p").await;
    let mut m = publish("exp/short", QoS::AtLeastOnce, 1, b"short");
    m.properties.message_expiry_interval = Some(1);
    p.send(&Packet::Publish(m)).await;
    p.recv().await;
    let mut m = publish("exp/long", QoS::AtLeastOnce, 2, b"long");
    m.properties.message_expiry_interval = Some(100);
    p.send(&Packet::Publish(m)).await;
    p.recv().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut sub, ack) = Raw::connect_with(addr, c).await;
    assert!(ack.session_present);
    let got = sub.recv_publish().await;
    assert_eq!(&got.payload[..], b"long");
    assert!(got
        .properties
        .message_expiry_interval
        .is_some_and(|e| e < 100));
    sub.puback(got.packet_id).await;
    assert!(sub.sync().await.is_empty(), "the expired one is gone");
}

#[tokio::test]
async fn topic_aliases_both_directions_and_limits() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut c = connect_packet(V5, "alias-sub");
    c.properties.topic_alias_maximum = Some(1);
    let (mut sub, _) = Raw::connect_with(addr, c).await;
    sub.subscribe(subscribe(1, "al/#", QoS::AtMostOnce)).await;
    let mut p = Raw::connect(addr, V5, "alias-pub").await;
    // Client -> broker: set alias 3 with a topic, then use it alone.
    let mut m = publish("al/one", QoS::AtMostOnce, 0, b"1");
    m.properties.topic_alias = Some(3);
    p.send(&Packet::Publish(m)).await;
    let mut m = publish("", QoS::AtMostOnce, 0, b"2");
    m.properties.topic_alias = Some(3);
    p.send(&Packet::Publish(m)).await;
    p.send(&Packet::Publish(publish(
        "al/two",
        QoS::AtMostOnce,
        0,
        b"3",
    )))
    .await;
    // Broker -> client: alias 1 for the first topic, then the alias alone; the
    // second topic has no alias left (limit 1).
    let a = sub.recv_publish().await;
    assert_eq!(
        (&a.topic[..], a.properties.topic_alias),
        ("al/one", Some(1))
    );
    let b2 = sub.recv_publish().await;
    assert_eq!(
        (&b2.topic[..], b2.properties.topic_alias, &b2.payload[..]),
        ("", Some(1), &b"2"[..])
    );
    let c3 = sub.recv_publish().await;
    assert_eq!((&c3.topic[..], c3.properties.topic_alias), ("al/two", None));
    // An alias above our maximum closes with 0x94.
    let mut m = publish("al/x", QoS::AtMostOnce, 0, b"x");
    m.properties.topic_alias = Some(17);
    p.send(&Packet::Publish(m)).await;
    let got = p.expect_closed().await;
    assert!(
        matches!(got.as_slice(), [Packet::Disconnect(d)] if d.reason == reason::TOPIC_ALIAS_INVALID),
        "{got:?}"
    );
}

#[tokio::test]
async fn receive_maximum_and_client_maximum_packet_size_are_honoured() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut c = connect_packet(V5, "rm");
    c.properties.receive_maximum = Some(2);
    c.properties.maximum_packet_size = Some(200);
    let (mut sub, _) = Raw::connect_with(addr, c).await;
    sub.subscribe(subscribe(1, "rm", QoS::AtLeastOnce)).await;
    let mut p = Raw::connect(addr, V5, "p").await;
    // Too large for the subscriber: dropped, never sent.
    p.publish_qos1("rm", 1, &[b'x'; 500]).await;
    for i in 0..4u16 {
        p.publish_qos1("rm", 10 + i, &[b'0' + i as u8]).await;
    }
    let first = sub.recv_publish().await;
    let second = sub.recv_publish().await;
    assert_eq!(
        (&first.payload[..], &second.payload[..]),
        (&b"0"[..], &b"1"[..])
    );
    // Only two in flight until one is acked.
    assert!(sub.sync().await.is_empty());
    sub.puback(first.packet_id).await;
    assert_eq!(&sub.recv_publish().await.payload[..], b"2");
}

#[tokio::test]
async fn shared_subscriptions_compete_across_mqtt_and_amqp() {
    use amqprs::channel::{BasicAckArguments, BasicConsumeArguments};
    use amqprs::connection::{Connection, OpenConnectionArguments};
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut m1 = Raw::connect(addr, V5, "m1").await;
    let mut m2 = Raw::connect(addr, V3, "m2").await;
    assert_eq!(
        m1.subscribe(subscribe(1, "$share/g/jobs/+", QoS::AtLeastOnce))
            .await,
        [1]
    );
    assert_eq!(
        m2.subscribe(subscribe(1, "$share/g/jobs/+", QoS::AtLeastOnce))
            .await,
        [1]
    );
    // The group's queue is an ordinary queue an AMQP consumer can join.
    let queue = "mqtt-shared-g-jobs.*";
    assert!(b.broker().vhost("/").unwrap().queue(queue).is_ok());
    let a = b.amqp_addr();
    let conn = Connection::open(&OpenConnectionArguments::new(
        &a.ip().to_string(),
        a.port(),
        "guest",
        "guest",
    ))
    .await
    .unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    let (_tag, mut rx) = ch
        .basic_consume_rx(BasicConsumeArguments::new(queue, "amqp-worker"))
        .await
        .unwrap();
    let mut p = Raw::connect(addr, V3, "p").await;
    for i in 0..9u16 {
        p.publish_qos1("jobs/x", i + 1, format!("{i}").as_bytes())
            .await;
    }
    let mut seen = Vec::new();
    for raw in [&mut m1, &mut m2] {
        for pk in raw.sync().await {
            if let Packet::Publish(pb) = pk {
                raw.puback(pb.packet_id).await;
                seen.push(String::from_utf8(pb.payload.to_vec()).unwrap());
            }
        }
    }
    let mut amqp_count = 0;
    while seen.len() < 9 {
        let msg = tokio::time::timeout(mqtt::WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        ch.basic_ack(BasicAckArguments::new(
            msg.deliver.unwrap().delivery_tag(),
            false,
        ))
        .await
        .unwrap();
        seen.push(String::from_utf8(msg.content.unwrap()).unwrap());
        amqp_count += 1;
    }
    seen.sort();
    assert_eq!(
        seen,
        (0..9).map(|i| i.to_string()).collect::<Vec<_>>(),
        "each once"
    );
    assert!(amqp_count > 0 && amqp_count < 9, "competing: {amqp_count}");
}

/// `a.b/c` and `a/b.c` have the same binding key (`a.b.c`): one group
/// subscribed to both has a queue per filter, and each subscriber gets only
/// what its own filter matches.
#[tokio::test]
async fn shared_subscriptions_on_filters_with_the_same_key_stay_apart() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut s1 = Raw::connect(addr, V5, "s1").await;
    let mut s2 = Raw::connect(addr, V5, "s2").await;
    assert_eq!(
        s1.subscribe(subscribe(1, "$share/g/a.b/c", QoS::AtLeastOnce))
            .await,
        [1]
    );
    assert_eq!(
        s2.subscribe(subscribe(1, "$share/g/a/b.c", QoS::AtLeastOnce))
            .await,
        [1]
    );
    let vhost = b.broker().vhost("/").unwrap();
    assert!(vhost.queue("mqtt-shared-g/a.b/c").is_ok());
    assert!(vhost.queue("mqtt-shared-g/a/b.c").is_ok());
    let mut p = Raw::connect(addr, V3, "p").await;
    p.publish_qos1("a.b/c", 1, b"for s1").await;
    p.publish_qos1("a/b.c", 2, b"for s2").await;
    for (raw, topic, body) in [(&mut s1, "a.b/c", "for s1"), (&mut s2, "a/b.c", "for s2")] {
        let got = raw.recv_publish().await;
        assert_eq!(
            (got.topic.as_str(), &got.payload[..]),
            (topic, body.as_bytes())
        );
        raw.puback(got.packet_id).await;
        assert!(raw.sync().await.is_empty(), "only its own filter's message");
    }
}

#[tokio::test]
async fn session_expiry_ends_a_detached_session() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut c = connect_packet(V5, "exp");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(1);
    let (mut s, _) = Raw::connect_with(addr, c.clone()).await;
    s.subscribe(subscribe(1, "x", QoS::AtLeastOnce)).await;
    s.disconnect().await;
    let vhost = b.broker().vhost("/").unwrap();
    assert!(vhost.queue("mqtt-subscription-expqos1").is_ok());
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(
        vhost.queue("mqtt-subscription-expqos1").is_err(),
        "queue deleted"
    );
    let (_s, ack) = Raw::connect_with(addr, c).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn websocket_packets_may_span_and_share_messages() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let b = start_broker().await;
    let url = format!("ws://{}/ws", b.mqtt_ws_addr());
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(b.mqtt_ws_addr())
        .await
        .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "mqtt");
    let mut bytes = bytes::BytesMut::new();
    let v = V3;
    switchyard_mqtt::codec::encode_unlimited(
        &Packet::Connect(Box::new(connect_packet(v, "ws"))),
        v,
        &mut bytes,
    );
    let connect_len = bytes.len();
    switchyard_mqtt::codec::encode_unlimited(
        &Packet::Subscribe(subscribe(1, "ws/t", QoS::AtMostOnce)),
        v,
        &mut bytes,
    );
    switchyard_mqtt::codec::encode_unlimited(
        &Packet::Publish(publish("ws/t", QoS::AtMostOnce, 0, b"over ws")),
        v,
        &mut bytes,
    );
    // CONNECT split across two messages; SUBSCRIBE and PUBLISH share the third
    // with the CONNECT's tail.
    let split = connect_len / 2;
    ws.send(Message::binary(bytes[..split].to_vec()))
        .await
        .unwrap();
    ws.send(Message::binary(bytes[split..].to_vec()))
        .await
        .unwrap();
    let mut got = bytes::BytesMut::new();
    let mut dec = switchyard_mqtt::codec::Decoder::new(usize::MAX);
    let mut prime = bytes::BytesMut::new();
    switchyard_mqtt::codec::encode_unlimited(
        &Packet::Connect(Box::new(connect_packet(v, "x"))),
        v,
        &mut prime,
    );
    dec.decode(&mut prime).unwrap();
    let mut packets = Vec::new();
    while packets.len() < 3 {
        let msg = tokio::time::timeout(mqtt::WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.extend_from_slice(&msg.into_data());
        while let Some(p) = dec.decode(&mut got).unwrap() {
            packets.push(p);
        }
    }
    assert!(matches!(&packets[0], Packet::ConnAck(a) if a.code == 0));
    assert!(matches!(&packets[1], Packet::SubAck(_)));
    assert!(matches!(&packets[2], Packet::Publish(p) if &p.payload[..] == b"over ws"));
}

//! MQTT with real Rust clients, one broker per test: rumqttc's v4 (3.1.1) and
//! v5 clients, and the cross-protocol worked examples 1-3 of INTEROP.md in both
//! directions with amqprs (AMQP) and the testkit's STOMP client.
// Test helpers outside #[test] functions fail a test by panicking, as tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod mqtt;

use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, Channel, QueueBindArguments,
    QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldName, FieldTable, FieldValue, LongStr};
use bytes::Bytes;
use mqtt::{v4_client, v4_connack, v4_opts, v4_publish, v4_suback, v5_client, v5_connack};
use mqtt::{v5_opts, v5_publish, v5_suback, WAIT};
use rumqttc::v5::mqttbytes::v5::{LastWill as LastWill5, PublishProperties};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::{LastWill, QoS};
use switchyard_testkit::{start_broker, start_broker_with, TestBroker};

async fn amqp(b: &TestBroker) -> (Connection, Channel) {
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
    (conn, ch)
}

/// Declares an exclusive server-named queue bound to amq.topic with `key`.
async fn amqp_queue(ch: &Channel, key: &str) -> String {
    let (q, _, _) = ch
        .queue_declare(QueueDeclareArguments::exclusive_server_named())
        .await
        .unwrap()
        .unwrap();
    ch.queue_bind(QueueBindArguments::new(&q, "amq.topic", key))
        .await
        .unwrap();
    q
}

fn header_str(h: &FieldTable, name: &str) -> Option<String> {
    match h.get(&FieldName::try_from(name).unwrap())? {
        FieldValue::S(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

#[tokio::test]
async fn rumqttc_v4_qos_retained_and_will() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    // A subscriber for everything under home/.
    let (sub, mut srx, _t1) = v4_client(v4_opts(addr, "v4-sub"));
    v4_connack(&mut srx).await;
    sub.subscribe("home/#", QoS::ExactlyOnce).await.unwrap();
    let ack = v4_suback(&mut srx).await;
    assert_eq!(
        ack.return_codes,
        [rumqttc::SubscribeReasonCode::Success(QoS::ExactlyOnce)]
    );
    // A publisher with a will, publishing at every QoS and one retained.
    let mut o = v4_opts(addr, "v4-pub");
    o.set_last_will(LastWill::new(
        "home/status",
        "pub died",
        QoS::AtLeastOnce,
        false,
    ));
    let (publ, mut prx, ptask) = v4_client(o);
    v4_connack(&mut prx).await;
    for (qos, body) in [
        (QoS::AtMostOnce, "q0"),
        (QoS::AtLeastOnce, "q1"),
        (QoS::ExactlyOnce, "q2"),
    ] {
        publ.publish("home/kitchen/temp", qos, false, body)
            .await
            .unwrap();
        let p = v4_publish(&mut srx).await;
        assert_eq!((p.qos, &p.payload[..]), (qos, body.as_bytes()));
        assert_eq!(p.topic, "home/kitchen/temp");
    }
    publ.publish("home/door", QoS::AtLeastOnce, true, "locked")
        .await
        .unwrap();
    assert_eq!(&v4_publish(&mut srx).await.payload[..], b"locked");
    // A late subscriber gets the retained message through a wildcard.
    let (late, mut lrx, _t2) = v4_client(v4_opts(addr, "v4-late"));
    v4_connack(&mut lrx).await;
    late.subscribe("home/+", QoS::AtLeastOnce).await.unwrap();
    let r = v4_publish(&mut lrx).await;
    assert!(r.retain);
    assert_eq!(
        (&r.topic[..], &r.payload[..]),
        ("home/door", &b"locked"[..])
    );
    // The publisher's connection dies without DISCONNECT: its will arrives.
    ptask.abort();
    drop(publ);
    drop(prx);
    let w = v4_publish(&mut srx).await;
    assert_eq!(
        (&w.topic[..], &w.payload[..]),
        ("home/status", &b"pub died"[..])
    );
}

#[tokio::test]
async fn rumqttc_v4_persistent_session_gets_what_was_published_while_away() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let mut o = v4_opts(addr, "v4-persist");
    o.set_clean_session(false);
    let (c, mut rx, task) = v4_client(o.clone());
    assert!(!v4_connack(&mut rx).await.session_present);
    c.subscribe("alerts/#", QoS::AtLeastOnce).await.unwrap();
    v4_suback(&mut rx).await;
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(WAIT, task).await;

    let (p, mut prx, _pt) = v4_client(v4_opts(addr, "v4-pub"));
    v4_connack(&mut prx).await;
    p.publish("alerts/fire", QoS::AtLeastOnce, false, "while away")
        .await
        .unwrap();
    mqtt::v4_next(&mut prx, |p| match p {
        rumqttc::Packet::PubAck(_) => Some(()),
        _ => None,
    })
    .await;

    let (_c, mut rx, _task) = v4_client(o);
    assert!(v4_connack(&mut rx).await.session_present);
    assert_eq!(&v4_publish(&mut rx).await.payload[..], b"while away");
}

#[tokio::test]
async fn rumqttc_v5_properties_and_shared_subscription() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let (sub, mut srx, _t) = v5_client(v5_opts(addr, "v5-sub"));
    v5_connack(&mut srx).await;
    sub.subscribe("dev/+/cfg", QoS5::AtLeastOnce).await.unwrap();
    v5_suback(&mut srx).await;
    let (publ, mut prx, _t2) = v5_client(v5_opts(addr, "v5-pub"));
    v5_connack(&mut prx).await;
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        content_type: Some("application/json".into()),
        response_topic: Some("dev/7/ack".into()),
        correlation_data: Some(Bytes::from_static(b"req-1")),
        user_properties: vec![("fw".into(), "1.2".into())],
        ..PublishProperties::default()
    };
    publ.publish_with_properties("dev/7/cfg", QoS5::AtLeastOnce, false, "{}", props)
        .await
        .unwrap();
    let p = v5_publish(&mut srx).await;
    let got = p.properties.unwrap();
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(got.response_topic.as_deref(), Some("dev/7/ack"));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"req-1"[..]));
    assert_eq!(got.user_properties, [("fw".to_string(), "1.2".to_string())]);
    assert_eq!(got.payload_format_indicator, Some(1));
    assert!(got.message_expiry_interval.is_some_and(|e| e <= 60));

    // Two members of a shared group share the messages.
    let (m1, mut r1, _a) = v5_client(v5_opts(addr, "m1"));
    let (m2, mut r2, _b) = v5_client(v5_opts(addr, "m2"));
    v5_connack(&mut r1).await;
    v5_connack(&mut r2).await;
    m1.subscribe("$share/workers/job", QoS5::AtLeastOnce)
        .await
        .unwrap();
    m2.subscribe("$share/workers/job", QoS5::AtLeastOnce)
        .await
        .unwrap();
    v5_suback(&mut r1).await;
    v5_suback(&mut r2).await;
    for i in 0..10 {
        publ.publish("job", QoS5::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    let mut n1 = 0;
    let mut n2 = 0;
    while n1 + n2 < 10 {
        tokio::select! {
            _ = v5_publish(&mut r1) => n1 += 1,
            _ = v5_publish(&mut r2) => n2 += 1,
        }
    }
    assert!(n1 > 0 && n2 > 0, "both members got work: {n1} {n2}");
}

#[tokio::test]
async fn rumqttc_v5_will_with_delay_and_properties() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let (w, mut wrx, _t) = v5_client(v5_opts(addr, "watcher"));
    v5_connack(&mut wrx).await;
    w.subscribe("lwt/#", QoS5::AtMostOnce).await.unwrap();
    v5_suback(&mut wrx).await;
    let mut o = v5_opts(addr, "dying");
    o.set_last_will(LastWill5::new(
        "lwt/dying",
        "bye",
        QoS5::AtMostOnce,
        false,
        Some(rumqttc::v5::mqttbytes::v5::LastWillProperties {
            delay_interval: Some(1),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: vec![("why".into(), "test".into())],
        }),
    ));
    o.set_session_expiry_interval(Some(30));
    let (c, mut crx, task) = v5_client(o);
    v5_connack(&mut crx).await;
    let t0 = tokio::time::Instant::now();
    task.abort();
    drop(c);
    let p = v5_publish(&mut wrx).await;
    assert!(t0.elapsed() >= Duration::from_millis(900));
    let props = p.properties.unwrap();
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.user_properties, [("why".into(), "test".into())]);
}

/// INTEROP.md example 1: MQTT publishes `sensors/room1/temp` QoS 1 -> an AMQP
/// queue bound with `sensors.*.temp` receives it persistent; a STOMP client on
/// `/topic/sensors.*.temp` gets `destination:/topic/sensors.room1.temp` and
/// `persistent:true`. And the reverse: AMQP publishes, MQTT receives.
#[tokio::test]
async fn worked_example_1_mqtt_to_amqp_and_stomp_and_back() {
    let b = start_broker().await;
    let (_conn, ch) = amqp(&b).await;
    let q = amqp_queue(&ch, "sensors.*.temp").await;
    let (_tag, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&q, "c")
                .manual_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let mut stomp = switchyard_testkit::stomp::StompClient::connect(b.stomp_addr()).await;
    stomp
        .subscribe("s1", "/topic/sensors.*.temp", "auto", &[])
        .await;

    let (m, mut mrx, _t) = v4_client(v4_opts(b.mqtt_addr(), "sensor-1"));
    v4_connack(&mut mrx).await;
    m.publish("sensors/room1/temp", QoS::AtLeastOnce, false, "21.5")
        .await
        .unwrap();

    let msg = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    let deliver = msg.deliver.unwrap();
    assert_eq!(deliver.routing_key(), "sensors.room1.temp");
    assert_eq!(deliver.exchange(), "amq.topic");
    assert_eq!(msg.basic_properties.unwrap().delivery_mode(), Some(2));
    assert_eq!(msg.content.unwrap(), b"21.5");
    ch.basic_ack(BasicAckArguments::new(deliver.delivery_tag(), false))
        .await
        .unwrap();

    let f = stomp.recv_message().await;
    let h = |n: &str| {
        f.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        h("destination").as_deref(),
        Some("/topic/sensors.room1.temp")
    );
    assert_eq!(h("persistent").as_deref(), Some("true"));
    assert_eq!(&f.body[..], b"21.5");

    // AMQP -> MQTT: routing key sensors.room2.temp arrives as sensors/room2/temp,
    // a persistent message at QoS 1.
    m.subscribe("sensors/+/temp", QoS::AtLeastOnce)
        .await
        .unwrap();
    v4_suback(&mut mrx).await;
    let props = BasicProperties::default().with_delivery_mode(2).finish();
    ch.basic_publish(
        props,
        b"19.0".to_vec(),
        BasicPublishArguments::new("amq.topic", "sensors.room2.temp"),
    )
    .await
    .unwrap();
    let p = v4_publish(&mut mrx).await;
    assert_eq!(
        (&p.topic[..], p.qos, &p.payload[..]),
        ("sensors/room2/temp", QoS::AtLeastOnce, &b"19.0"[..])
    );
}

/// INTEROP.md example 2: STOMP `SEND /topic/cmd.dev42` -> an MQTT client on
/// `cmd/+` receives `cmd/dev42` at QoS 0. And MQTT -> STOMP the other way.
#[tokio::test]
async fn worked_example_2_stomp_to_mqtt_and_back() {
    let b = start_broker().await;
    let (m, mut mrx, _t) = v5_client(v5_opts(b.mqtt_addr(), "dev42"));
    v5_connack(&mut mrx).await;
    m.subscribe("cmd/+", QoS5::AtLeastOnce).await.unwrap();
    v5_suback(&mut mrx).await;
    let mut stomp = switchyard_testkit::stomp::StompClient::connect(b.stomp_addr()).await;
    stomp.send("/topic/cmd.dev42", "reboot", &[]).await;
    let p = v5_publish(&mut mrx).await;
    assert_eq!(
        (&p.topic[..], p.qos, &p.payload[..]),
        (&b"cmd/dev42"[..], QoS5::AtMostOnce, &b"reboot"[..])
    );
    stomp.subscribe("s", "/topic/status.*", "auto", &[]).await;
    m.publish("status/dev42", QoS5::AtMostOnce, false, "rebooted")
        .await
        .unwrap();
    let f = stomp.recv_message().await;
    assert_eq!(&f.body[..], b"rebooted");
    assert!(f
        .headers
        .iter()
        .any(|(k, v)| k == "destination" && v == "/topic/status.dev42"));
}

/// INTEROP.md example 3: AMQP publishes to amq.topic `a.b` with header
/// `x-reply-to-topic: replies.x` and correlation-id `7` -> an MQTT 5 subscriber
/// on `a/b` sees Response Topic `replies/x` and Correlation Data `7`. And the
/// reverse: an MQTT 5 request answered by an AMQP responder.
#[tokio::test]
async fn worked_example_3_request_response_both_ways() {
    let b = start_broker().await;
    let (_conn, ch) = amqp(&b).await;
    let (m, mut mrx, _t) = v5_client(v5_opts(b.mqtt_addr(), "requester"));
    v5_connack(&mut mrx).await;
    m.subscribe("a/b", QoS5::AtMostOnce).await.unwrap();
    v5_suback(&mut mrx).await;

    let mut headers = FieldTable::new();
    headers.insert(
        FieldName::try_from("x-reply-to-topic").unwrap(),
        FieldValue::S(LongStr::try_from("replies.x").unwrap()),
    );
    headers.insert(
        FieldName::try_from("tenant").unwrap(),
        FieldValue::S(LongStr::try_from("acme").unwrap()),
    );
    let props = BasicProperties::default()
        .with_correlation_id("7")
        .with_content_type("text/plain")
        .with_headers(headers)
        .finish();
    ch.basic_publish(
        props,
        b"hello".to_vec(),
        BasicPublishArguments::new("amq.topic", "a.b"),
    )
    .await
    .unwrap();
    let p = v5_publish(&mut mrx).await;
    let pp = p.properties.unwrap();
    assert_eq!(pp.response_topic.as_deref(), Some("replies/x"));
    assert_eq!(pp.correlation_data.as_deref(), Some(&b"7"[..]));
    assert_eq!(pp.content_type.as_deref(), Some("text/plain"));
    assert!(pp
        .user_properties
        .contains(&("tenant".into(), "acme".into())));

    // MQTT 5 request -> AMQP responder -> MQTT 5 response.
    let q = amqp_queue(&ch, "rpc.time").await;
    let (_tag, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&q, "responder")
                .manual_ack(false)
                .finish(),
        )
        .await
        .unwrap();
    m.subscribe("replies/requester", QoS5::AtLeastOnce)
        .await
        .unwrap();
    v5_suback(&mut mrx).await;
    let req = PublishProperties {
        response_topic: Some("replies/requester".into()),
        correlation_data: Some(Bytes::from_static(b"c-42")),
        ..PublishProperties::default()
    };
    m.publish_with_properties("rpc/time", QoS5::AtLeastOnce, false, "now?", req)
        .await
        .unwrap();
    let msg = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    let props = msg.basic_properties.unwrap();
    let reply_key = header_str(props.headers().unwrap(), "x-reply-to-topic").unwrap();
    assert_eq!(reply_key, "replies.requester");
    assert_eq!(props.correlation_id().map(String::as_str), Some("c-42"));
    let answer = BasicProperties::default()
        .with_correlation_id("c-42")
        .finish();
    ch.basic_publish(
        answer,
        b"noon".to_vec(),
        BasicPublishArguments::new("amq.topic", &reply_key),
    )
    .await
    .unwrap();
    let resp = v5_publish(&mut mrx).await;
    assert_eq!(&resp.topic[..], b"replies/requester");
    assert_eq!(&resp.payload[..], b"noon");
    assert_eq!(
        resp.properties.unwrap().correlation_data.as_deref(),
        Some(&b"c-42"[..])
    );
}

#[tokio::test]
async fn lossless_topic_mode_round_trips_dots() {
    let b = start_broker_with(|c| {
        c.vhosts
            .push(switchyard_testkit::config::VHostConfig { name: "iot".into() });
        let mut perms = c.permissions();
        perms.push(switchyard_testkit::config::PermissionConfig {
            user: "guest".into(),
            vhost: "iot".into(),
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        });
        c.set_permissions(perms);
        c.mqtt.lossless_topic_vhosts = vec!["iot".into()];
    })
    .await;
    let addr = b.mqtt_addr();
    let opts = |id: &str| {
        let mut o = v4_opts(addr, id);
        o.set_credentials("iot:guest", "guest");
        o
    };
    let (s, mut srx, _t) = v4_client(opts("lossless-sub"));
    v4_connack(&mut srx).await;
    s.subscribe("fw/v1.2/+", QoS::AtMostOnce).await.unwrap();
    v4_suback(&mut srx).await;
    let (p, mut prx, _t2) = v4_client(opts("lossless-pub"));
    v4_connack(&mut prx).await;
    p.publish("fw/v1.2/status", QoS::AtMostOnce, false, "ok")
        .await
        .unwrap();
    // `+` over a level with a dot (escaped keys: `fw.v1%2E2.temp%2Ecelsius`).
    p.publish("fw/v1.2/temp.celsius", QoS::AtMostOnce, false, "21")
        .await
        .unwrap();
    // A topic whose levels differ only in the dot's place does not match.
    p.publish("fw/v1/2.status", QoS::AtMostOnce, false, "other")
        .await
        .unwrap();
    let got = v4_publish(&mut srx).await;
    assert_eq!(
        (&got.topic[..], &got.payload[..]),
        ("fw/v1.2/status", &b"ok"[..])
    );
    let got = v4_publish(&mut srx).await;
    assert_eq!(
        (&got.topic[..], &got.payload[..]),
        ("fw/v1.2/temp.celsius", &b"21"[..])
    );
    // The default vhost stays lossy, as RabbitMQ.
    let (d, mut drx, _t3) = v4_client(v4_opts(addr, "lossy-sub"));
    v4_connack(&mut drx).await;
    d.subscribe("fw/#", QoS::AtMostOnce).await.unwrap();
    v4_suback(&mut drx).await;
    let (dp, mut dprx, _t4) = v4_client(v4_opts(addr, "lossy-pub"));
    v4_connack(&mut dprx).await;
    dp.publish("fw/v1.2/status", QoS::AtMostOnce, false, "lossy")
        .await
        .unwrap();
    // Received on the topic that was published (issue 12), although the
    // routing key is RabbitMQ's lossy `fw.v1.2.status`.
    let got = v4_publish(&mut drx).await;
    assert_eq!(&got.topic[..], "fw/v1.2/status");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), v4_publish(&mut srx))
            .await
            .is_err(),
        "other vhost"
    );
}

/// The topic of a rumqttc v5 PUBLISH, as text.
fn topic5(p: &rumqttc::v5::mqttbytes::v5::Publish) -> String {
    String::from_utf8(p.topic.to_vec()).unwrap()
}

/// Issue 12 item 1: topics with `.`, `%` and `*` inside levels reach plain,
/// wildcard and shared subscriptions on exactly the topic the MQTT publisher
/// used, while an AMQP consumer of amq.topic sees RabbitMQ's routing key; a
/// message an AMQP publisher routed to a subscription is delivered even when its
/// rebuilt topic does not match the filter (`.` inside the filter's level).
#[tokio::test]
async fn topics_with_dots_percent_and_stars_reach_mqtt_subscribers_exactly() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let (_conn, ch) = amqp(&b).await;
    let q = amqp_queue(&ch, "plant.#").await;
    let (_tag, mut arx) = ch
        .basic_consume_rx(BasicConsumeArguments::new(&q, "c").finish())
        .await
        .unwrap();

    let (sub, mut srx, _t) = v5_client(v5_opts(addr, "dots-sub"));
    v5_connack(&mut srx).await;
    for f in ["plant/v1.2/+", "com.acme/x", "odd/#", "x/+/c"] {
        sub.subscribe(f, QoS5::AtLeastOnce).await.unwrap();
        v5_suback(&mut srx).await;
    }
    let (sh, mut shrx, _t2) = v5_client(v5_opts(addr, "dots-shared"));
    v5_connack(&mut shrx).await;
    for f in ["$share/g/com.acme/#", "$share/h/units/+/x"] {
        sh.subscribe(f, QoS5::AtLeastOnce).await.unwrap();
        v5_suback(&mut shrx).await;
    }
    let (publ, mut prx, _t3) = v5_client(v5_opts(addr, "dots-pub"));
    v5_connack(&mut prx).await;

    // Wildcard `+` over a level with a dot, and an AMQP consumer.
    // (On main it was routed, then dropped: `plant/v1/2/temp` fails the filter.)
    publ.publish("plant/v1.2/temp", QoS5::AtLeastOnce, false, "21")
        .await
        .unwrap();
    let p = v5_publish(&mut srx).await;
    assert_eq!(
        (topic5(&p).as_str(), &p.payload[..]),
        ("plant/v1.2/temp", &b"21"[..])
    );
    let m = tokio::time::timeout(WAIT, arx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.deliver.unwrap().routing_key(), "plant.v1.2.temp");

    // The issue's own example: `+` over a level that itself has a dot. RabbitMQ's
    // key `plant.v1.2.temp.celsius` cannot match `plant.v1.2.*`; the binding's
    // MQTT filter does, on the published topic.
    publ.publish("plant/v1.2/temp.celsius", QoS5::AtLeastOnce, false, "21.5")
        .await
        .unwrap();
    let p = v5_publish(&mut srx).await;
    assert_eq!(
        (topic5(&p).as_str(), &p.payload[..]),
        ("plant/v1.2/temp.celsius", &b"21.5"[..])
    );
    let m = tokio::time::timeout(WAIT, arx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.deliver.unwrap().routing_key(), "plant.v1.2.temp.celsius");

    // A plain filter with a dot, and a shared subscription with `#`.
    publ.publish("com.acme/x", QoS5::AtLeastOnce, false, "acme")
        .await
        .unwrap();
    assert_eq!(topic5(&v5_publish(&mut srx).await), "com.acme/x");
    assert_eq!(topic5(&v5_publish(&mut shrx).await), "com.acme/x");
    // A shared subscription's `+` over a dotted level.
    publ.publish("units/m.s-2/x", QoS5::AtLeastOnce, false, "g")
        .await
        .unwrap();
    assert_eq!(topic5(&v5_publish(&mut shrx).await), "units/m.s-2/x");

    // `%`, `*` and `.` inside levels under `#`.
    publ.publish("odd/50%/a*b/c.d", QoS5::AtLeastOnce, false, "odd")
        .await
        .unwrap();
    assert_eq!(topic5(&v5_publish(&mut srx).await), "odd/50%/a*b/c.d");

    // MQTT's answer, not RabbitMQ's: `x/+/c` does not take `x.b/c`, although
    // its key `x.b.c` matches the binding `x.*.c`.
    publ.publish("x.b/c", QoS5::AtLeastOnce, false, "no")
        .await
        .unwrap();
    publ.publish("x/b/c", QoS5::AtLeastOnce, false, "yes")
        .await
        .unwrap();
    let p = v5_publish(&mut srx).await;
    assert_eq!(
        (topic5(&p).as_str(), &p.payload[..]),
        ("x/b/c", &b"yes"[..])
    );

    // AMQP publishers: the key `plant.v1.2.boiler` matches the binding of
    // `plant/v1.2/+` (`plant.v1.2.*`); its topic is RabbitMQ's mapping of the key,
    // which the MQTT filter alone would not match: delivered all the same.
    for key in ["plant.v1.2.boiler", "odd.x#y"] {
        ch.basic_publish(
            BasicProperties::default(),
            key.as_bytes().to_vec(),
            BasicPublishArguments::new("amq.topic", key),
        )
        .await
        .unwrap();
    }
    assert_eq!(topic5(&v5_publish(&mut srx).await), "plant/v1/2/boiler");
    assert_eq!(topic5(&v5_publish(&mut srx).await), "odd/x#y");
}

/// Issue 12 item 1: the topic survives dead-lettering. An AMQP queue with a
/// TTL parks what an MQTT client published and dead-letters it (same routing
/// key) through a fanout exchange bound to an MQTT subscriber's queue: the
/// subscriber receives it on the published topic, although none of its own
/// filters matches (it was routed there).
#[tokio::test]
async fn dead_lettered_mqtt_message_keeps_its_topic() {
    let b = start_broker().await;
    let addr = b.mqtt_addr();
    let (_conn, ch) = amqp(&b).await;
    let (sub, mut srx, _t) = v5_client(v5_opts(addr, "dl-sub"));
    v5_connack(&mut srx).await;
    sub.subscribe("unrelated/+", QoS5::AtLeastOnce)
        .await
        .unwrap();
    v5_suback(&mut srx).await;
    ch.exchange_declare(amqprs::channel::ExchangeDeclareArguments::new(
        "dlx-f", "fanout",
    ))
    .await
    .unwrap();
    ch.queue_bind(QueueBindArguments::new(
        "mqtt-subscription-dl-subqos1",
        "dlx-f",
        "",
    ))
    .await
    .unwrap();
    let mut args = FieldTable::new();
    args.insert(
        FieldName::try_from("x-message-ttl").unwrap(),
        FieldValue::I(10),
    );
    args.insert(
        FieldName::try_from("x-dead-letter-exchange").unwrap(),
        FieldValue::S(LongStr::try_from("dlx-f").unwrap()),
    );
    ch.queue_declare(
        QueueDeclareArguments::new("parking")
            .arguments(args)
            .finish(),
    )
    .await
    .unwrap();
    ch.queue_bind(QueueBindArguments::new("parking", "amq.topic", "parked.#"))
        .await
        .unwrap();

    let (publ, mut prx, _t2) = v5_client(v5_opts(addr, "dl-pub"));
    v5_connack(&mut prx).await;
    publ.publish("parked/v1.2/x", QoS5::AtLeastOnce, false, "late")
        .await
        .unwrap();
    let p = v5_publish(&mut srx).await;
    assert_eq!(
        (topic5(&p).as_str(), &p.payload[..]),
        ("parked/v1.2/x", &b"late"[..])
    );
}

/// Issue 12 item 8: `$SYS` topics as Mosquitto publishes them, every
/// `sys_interval_secs` (1 here), retained, for users with read permission on
/// `$SYS` only, and never to a bare `#` or `+/...` (nor to AMQP consumers of
/// amq.topic).
#[tokio::test]
async fn sys_topics_are_published_retained_and_only_to_whom_may_read_them() {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
    let hash = switchyard_core::auth::hash_password("pw", [1, 2, 3, 4]);
    let b = start_broker_with(|c| {
        c.mqtt.sys_interval_secs = 1;
        let mut users = c.users();
        users.push(switchyard_testkit::config::UserConfig {
            name: "limited".into(),
            password_hash: hash.clone(),
            tags: vec![],
            loopback_only: false,
        });
        c.set_users(users);
        let mut perms = c.permissions();
        perms.push(switchyard_testkit::config::PermissionConfig {
            user: "limited".into(),
            vhost: "/".into(),
            configure: ".*".into(),
            write: ".*".into(),
            read: "^mqtt-|^amq\\.topic$".into(),
        });
        c.set_permissions(perms);
    })
    .await;
    let addr = b.mqtt_addr();
    let (_conn, ch) = amqp(&b).await;
    let q = amqp_queue(&ch, "#").await;
    let (_tag, mut arx) = ch
        .basic_consume_rx(BasicConsumeArguments::new(&q, "all").finish())
        .await
        .unwrap();

    // Everything else first: a `#` subscriber, a retained message, a publish.
    let (all, mut allrx, _t) = v5_client(v5_opts(addr, "sys-all"));
    v5_connack(&mut allrx).await;
    for f in ["#", "+/broker/#"] {
        all.subscribe(f, QoS5::AtMostOnce).await.unwrap();
        v5_suback(&mut allrx).await;
    }
    let (publ, mut prx, _t2) = v5_client(v5_opts(addr, "sys-pub"));
    v5_connack(&mut prx).await;
    publ.publish("status/door", QoS5::AtLeastOnce, true, "open")
        .await
        .unwrap();
    assert_eq!(topic5(&v5_publish(&mut allrx).await), "status/door");

    // A reader of $SYS: the retained values at once, then fresh ones each second.
    let (sys, mut sysrx, _t3) = v5_client(v5_opts(addr, "sys-reader"));
    v5_connack(&mut sysrx).await;
    sys.subscribe("$SYS/broker/#", QoS5::AtMostOnce)
        .await
        .unwrap();
    let ack = v5_suback(&mut sysrx).await;
    assert_eq!(
        ack.return_codes,
        [SubscribeReasonCode::Success(QoS5::AtMostOnce)]
    );
    let mut seen = std::collections::BTreeMap::new();
    let mut uptimes = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    // Until two rounds went by (two uptimes) and the counters show this test's
    // clients: 3 connected, 4 sessions' subscriptions, 1 retained message.
    while uptimes.len() < 3
        || seen
            .get("$SYS/broker/clients/connected")
            .map(String::as_str)
            != Some("3")
    {
        assert!(tokio::time::Instant::now() < deadline, "{seen:?}");
        let p = v5_publish(&mut sysrx).await;
        let value = String::from_utf8(p.payload.to_vec()).unwrap();
        if topic5(&p) == "$SYS/broker/uptime" {
            uptimes.insert(value.clone());
        }
        seen.insert(topic5(&p), value);
    }
    let get = |t: &str| seen.get(t).cloned().unwrap_or_default();
    assert!(get("$SYS/broker/version").starts_with("switchyard version "));
    assert!(get("$SYS/broker/uptime").ends_with(" seconds"));
    assert_eq!(get("$SYS/broker/clients/total"), "3");
    assert_eq!(get("$SYS/broker/subscriptions/count"), "3");
    assert_eq!(get("$SYS/broker/retained messages/count"), "1");
    for counter in ["$SYS/broker/messages/received", "$SYS/broker/messages/sent"] {
        assert!(
            get(counter).parse::<u64>().unwrap() >= 6,
            "{counter}: {seen:?}"
        );
    }
    assert!(get("$SYS/broker/load/messages/received/1min")
        .parse::<f64>()
        .is_ok_and(|l| l > 0.0));

    // A new subscriber gets the retained values at once (before any next round).
    let (late, mut laterx, _t4) = v5_client(v5_opts(addr, "sys-late"));
    v5_connack(&mut laterx).await;
    late.subscribe("$SYS/broker/version", QoS5::AtMostOnce)
        .await
        .unwrap();
    v5_suback(&mut laterx).await;
    let p = v5_publish(&mut laterx).await;
    assert!(p.retain, "retained");
    assert_eq!(topic5(&p), "$SYS/broker/version");

    // Without read permission on `$SYS`: refused (other topics are fine).
    let mut o = v5_opts(addr, "sys-limited");
    o.set_credentials("limited", "pw");
    let (lim, mut limrx, _t5) = v5_client(o);
    v5_connack(&mut limrx).await;
    lim.subscribe("$SYS/#", QoS5::AtMostOnce).await.unwrap();
    assert_eq!(
        v5_suback(&mut limrx).await.return_codes,
        [SubscribeReasonCode::NotAuthorized]
    );
    lim.subscribe("status/#", QoS5::AtMostOnce).await.unwrap();
    assert_eq!(
        v5_suback(&mut limrx).await.return_codes,
        [SubscribeReasonCode::Success(QoS5::AtMostOnce)]
    );

    // Rounds of $SYS went by: the `#` subscriber and the AMQP consumer of `#`
    // got none of them, their next message is the next publish.
    publ.publish("status/done", QoS5::AtMostOnce, false, "")
        .await
        .unwrap();
    assert_eq!(topic5(&v5_publish(&mut allrx).await), "status/done");
    for expected in ["status.door", "status.done"] {
        let m = tokio::time::timeout(WAIT, arx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.deliver.unwrap().routing_key(), expected);
    }

    // Only the broker publishes to `$SYS`.
    publ.publish("$SYS/broker/uptime", QoS5::AtLeastOnce, true, "0 seconds")
        .await
        .unwrap();
    // Its second QoS 1 PUBLISH (the first was status/door).
    let ack = mqtt::v5_next(&mut prx, |p| match p {
        rumqttc::v5::mqttbytes::v5::Packet::PubAck(a) if a.pkid == 2 => Some(a),
        _ => None,
    })
    .await;
    assert_eq!(
        ack.reason,
        rumqttc::v5::mqttbytes::v5::PubAckReason::NotAuthorized
    );
}

/// Issue 12 item 7 with a real client: Server Keep Alive in CONNACK when
/// `max_keep_alive_secs` is lower than the client's keep-alive, and topic
/// aliases towards a client that allows them, for topics it receives again.
#[tokio::test]
async fn rumqttc_v5_gets_server_keep_alive_and_topic_aliases() {
    let b = start_broker_with(|c| c.mqtt.max_keep_alive_secs = 20).await;
    let addr = b.mqtt_addr();
    let mut o = v5_opts(addr, "alias-sub");
    o.set_keep_alive(Duration::from_secs(60));
    o.set_topic_alias_max(Some(2));
    let (sub, mut srx, _t) = v5_client(o);
    let ack = v5_connack(&mut srx).await;
    assert_eq!(ack.properties.and_then(|p| p.server_keep_alive), Some(20));
    sub.subscribe("tele/#", QoS5::AtMostOnce).await.unwrap();
    v5_suback(&mut srx).await;
    let mut o = v5_opts(addr, "alias-pub");
    o.set_keep_alive(Duration::from_secs(10));
    let (publ, mut prx, _t2) = v5_client(o);
    let ack = v5_connack(&mut prx).await;
    // 10 s asked for, within the limit: no Server Keep Alive.
    assert_eq!(ack.properties.and_then(|p| p.server_keep_alive), None);
    for (topic, n) in [
        ("tele/a", 1),
        ("tele/b", 1),
        ("tele/a", 2),
        ("tele/c", 1),
        ("tele/b", 2),
    ] {
        publ.publish(topic, QoS5::AtMostOnce, false, format!("{n}"))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        let p = v5_publish(&mut srx).await;
        let alias = p.properties.as_ref().and_then(|p| p.topic_alias);
        got.push((topic5(&p), alias));
    }
    // A topic's first PUBLISH sets up its alias, the next ones carry the alias
    // alone (rumqttc 0.25 hands the event out before it resolves the alias).
    // Two aliases allowed: tele/c, the third topic, goes without one.
    assert_eq!(
        got,
        [
            ("tele/a".to_string(), Some(1)),
            ("tele/b".to_string(), Some(2)),
            (String::new(), Some(1)),
            ("tele/c".to_string(), None),
            (String::new(), Some(2)),
        ]
    );
}

//! End-to-end STOMP tests over real sockets, each against its own broker on port
//! 0: version negotiation, login, destinations, acks, transactions, receipts,
//! heart-beats, bad input, WebSocket framing, and crossing to AMQP (amqprs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use amqprs::channel::{
    BasicConsumeArguments, BasicPublishArguments, QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldTable, FieldValue};
use futures_util::{SinkExt, StreamExt};
use switchyard_testkit::stomp::codec::{Command, Decoder, Frame, Limits, Version};
use switchyard_testkit::stomp::StompClient;
use switchyard_testkit::{start_broker, start_broker_with, TestBroker};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(300);

async fn amqp(broker: &TestBroker) -> Connection {
    Connection::open(&OpenConnectionArguments::new(
        "127.0.0.1",
        broker.amqp_addr().port(),
        "guest",
        "guest",
    ))
    .await
    .unwrap()
}

fn body(f: &Frame) -> String {
    String::from_utf8(f.body.to_vec()).unwrap()
}

// ---- CONNECT ----

#[tokio::test]
async fn versions_are_negotiated_and_connected_says_so() {
    let b = start_broker().await;
    for (accept, want) in [
        ("1.0,1.1,1.2", "1.2"),
        ("1.1", "1.1"),
        ("1.0", "1.0"),
        ("1.1,1.0", "1.1"),
        ("", "1.0"),
    ] {
        let (c, connected) = StompClient::connect_with(b.stomp_addr(), accept, &[]).await;
        assert_eq!(
            connected.get("version"),
            Some(want),
            "accept-version {accept:?}"
        );
        assert!(connected.get("server").unwrap().starts_with("Switchyard/"));
        assert!(connected.get("session").is_some());
        c.disconnect().await;
    }
    // No common version: ERROR listing ours, then close.
    let mut c = StompClient::open(b.stomp_addr()).await;
    c.send_raw(b"CONNECT\naccept-version:2.0\nhost:/\n\n\0")
        .await;
    let e = c.expect_error().await;
    assert_eq!(e.get("version"), Some("1.0,1.1,1.2"));
    assert!(body(&e).contains("Supported protocol versions are 1.0,1.1,1.2"));
}

#[tokio::test]
async fn the_stomp_command_connects_too() {
    let b = start_broker().await;
    let mut c = StompClient::open(b.stomp_addr()).await;
    c.send_raw(b"STOMP\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0")
        .await;
    assert_eq!(c.recv().await.command, Command::Connected);
}

#[tokio::test]
async fn login_is_checked_and_the_default_user_applies_without_one() {
    let b = start_broker().await;
    let mut c = StompClient::open(b.stomp_addr()).await;
    c.send_raw(b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:wrong\n\n\0")
        .await;
    let e = c.expect_error().await;
    assert_eq!(e.get("message"), Some("access refused"));
    assert!(!body(&e).contains("wrong"), "never echo the password");
    // No login header: the configured default user (guest) logs in.
    let mut c = StompClient::open(b.stomp_addr()).await;
    c.send_raw(b"CONNECT\naccept-version:1.2\nhost:/\n\n\0")
        .await;
    assert_eq!(c.recv().await.command, Command::Connected);
    // With the default switched off a login is required.
    let b = start_broker_with(|c| c.stomp.default_user = String::new()).await;
    let mut c = StompClient::open(b.stomp_addr()).await;
    c.send_raw(b"CONNECT\naccept-version:1.2\nhost:/\n\n\0")
        .await;
    assert_eq!(
        c.expect_error().await.get("message"),
        Some("access refused")
    );
}

#[tokio::test]
async fn host_names_the_vhost_when_it_exists() {
    let b = start_broker_with(|c| {
        c.vhosts.push(switchyard_testkit::config::VHostConfig {
            name: "other".into(),
        });
        let mut p = c.permissions();
        p.push(switchyard_testkit::config::PermissionConfig {
            user: "guest".into(),
            vhost: "other".into(),
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        });
        c.set_permissions(p);
    })
    .await;
    let (mut c, _) = StompClient::connect_with(b.stomp_addr(), "1.2", &[]).await;
    // connect_with sends host:/ first; a second host header is ignored (first wins).
    c.send("/queue/in-root", "x", &[]).await;
    c.with_receipt(Frame::new(Command::Begin).header("transaction", "t"))
        .await;
    assert!(b.broker().vhost("/").unwrap().queue("in-root").is_ok());

    let mut c = StompClient::open(b.stomp_addr()).await;
    c.send_raw(b"CONNECT\naccept-version:1.2\nhost:other\n\n\0")
        .await;
    assert_eq!(c.recv().await.command, Command::Connected);
    c.with_receipt(
        Frame::new(Command::Send)
            .header("destination", "/queue/in-other")
            .body("x"),
    )
    .await;
    assert!(b.broker().vhost("other").unwrap().queue("in-other").is_ok());
    // A host that names no vhost (a server host name) means the default vhost.
    let mut c = StompClient::open(b.stomp_addr()).await;
    c.send_raw(b"CONNECT\naccept-version:1.2\nhost:broker.example.com\n\n\0")
        .await;
    assert_eq!(c.recv().await.command, Command::Connected);
    c.with_receipt(
        Frame::new(Command::Send)
            .header("destination", "/queue/in-default")
            .body("x"),
    )
    .await;
    assert!(b.broker().vhost("/").unwrap().queue("in-default").is_ok());
}

#[tokio::test]
async fn permissions_are_enforced() {
    let b = start_broker_with(|c| {
        let hash = switchyard_core_hash("pw");
        let mut users = c.users();
        users.push(switchyard_testkit::config::UserConfig {
            name: "reader".into(),
            password_hash: hash,
            tags: vec![],
            loopback_only: false,
        });
        c.set_users(users);
        let mut p = c.permissions();
        p.push(switchyard_testkit::config::PermissionConfig {
            user: "reader".into(),
            vhost: "/".into(),
            configure: "^own-.*".into(),
            write: "^own-.*".into(),
            read: ".*".into(),
        });
        c.set_permissions(p);
    })
    .await;
    let login = [("login", "reader"), ("passcode", "pw")];
    let (mut c, _) = StompClient::connect_with(b.stomp_addr(), "1.2", &login).await;
    c.subscribe("s", "/queue/own-q", "auto", &[]).await;
    c.send("/queue/secret", "x", &[("receipt", "r1")]).await;
    let e = c.expect_error().await;
    assert_eq!(e.get("message"), Some("ACCESS_REFUSED"));
    assert_eq!(e.get("receipt-id"), Some("r1"));
    assert!(
        body(&e).contains("access to queue 'secret' in vhost '/' refused for user 'reader'"),
        "{}",
        body(&e)
    );
    // Publishing to amq.topic needs write on it.
    let (mut c, _) = StompClient::connect_with(b.stomp_addr(), "1.2", &login).await;
    c.send("/topic/a.b", "x", &[]).await;
    let e = c.expect_error().await;
    assert!(
        body(&e).contains("access to exchange 'amq.topic' in vhost '/' refused"),
        "{}",
        body(&e)
    );
}

fn switchyard_core_hash(password: &str) -> String {
    // The testkit's config types take RabbitMQ hashes; compute one the same way
    // (base64(salt ++ sha256(salt ++ password))) through the broker's CLI helper.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["hash-password", password])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

// ---- SEND / SUBSCRIBE / destinations ----

#[tokio::test]
async fn queue_destinations_declare_and_deliver_to_competing_consumers() {
    let b = start_broker().await;
    let mut c1 = StompClient::connect(b.stomp_addr()).await;
    let mut c2 = StompClient::connect(b.stomp_addr()).await;
    c1.subscribe("a", "/queue/work", "auto", &[]).await;
    c2.subscribe("b", "work", "auto", &[]).await; // a bare name is /queue/<name>
    let q = b.broker().vhost("/").unwrap().queue("work").unwrap();
    assert!(q.options.durable, "/queue/ queues are durable by default");
    let mut p = StompClient::connect(b.stomp_addr()).await;
    for i in 0..4 {
        p.send("/queue/work", &format!("job {i}"), &[]).await;
    }
    let mut bodies = Vec::new();
    for c in [&mut c1, &mut c2] {
        for _ in 0..2 {
            let m = c.recv_message().await;
            assert_eq!(m.get("destination"), Some("/queue/work"));
            assert!(m.get("message-id").is_some());
            assert_eq!(m.get("content-length"), Some("5"));
            bodies.push(body(&m));
        }
    }
    bodies.sort();
    assert_eq!(bodies, ["job 0", "job 1", "job 2", "job 3"]);
}

#[tokio::test]
async fn topic_subscriptions_see_the_concrete_destination_and_go_away() {
    let b = start_broker().await;
    let mut s = StompClient::connect(b.stomp_addr()).await;
    s.subscribe("t1", "/topic/sensors.*.temp", "auto", &[])
        .await;
    let mut p = StompClient::connect(b.stomp_addr()).await;
    p.send("/topic/sensors.room1.temp", "21.5", &[]).await;
    p.send("/topic/sensors.room1.humidity", "40", &[]).await;
    p.send("/topic/sensors.room2.temp", "19", &[]).await;
    let m = s.recv_message().await;
    assert_eq!(m.get("destination"), Some("/topic/sensors.room1.temp"));
    assert_eq!(m.get("subscription"), Some("t1"));
    assert_eq!(body(&m), "21.5");
    assert_eq!(
        s.recv_message().await.get("destination"),
        Some("/topic/sensors.room2.temp")
    );
    assert!(s.recv_within(QUIET).await.is_none());
    // The subscription's queue is server-named and goes with UNSUBSCRIBE.
    let vhost = b.broker().vhost("/").unwrap();
    let before = vhost.queues().len();
    assert_eq!(before, 1);
    s.with_receipt(Frame::new(Command::Unsubscribe).header("id", "t1"))
        .await;
    assert_eq!(vhost.queues().len(), 0);
}

#[tokio::test]
async fn durable_topic_subscriptions_resume_after_reconnect() {
    let b = start_broker().await;
    let mut s = StompClient::connect(b.stomp_addr()).await;
    let durable = [("durable", "true"), ("auto-delete", "false")];
    s.subscribe("d1", "/topic/news.#", "client", &durable).await;
    s.disconnect().await;
    let mut p = StompClient::connect(b.stomp_addr()).await;
    p.send(
        "/topic/news.sport",
        "missed while away",
        &[("persistent", "true")],
    )
    .await;
    p.with_receipt(Frame::new(Command::Begin).header("transaction", "sync"))
        .await;
    let mut s = StompClient::connect(b.stomp_addr()).await;
    s.subscribe("d1", "/topic/news.#", "client", &durable).await;
    let m = s.recv_message().await;
    assert_eq!(body(&m), "missed while away");
    assert_eq!(m.get("persistent"), Some("true"));
    s.send_frame(&Frame::new(Command::Ack).header("id", m.get("ack").unwrap()))
        .await;
    // UNSUBSCRIBE with durable:true ends it for good: the queue is deleted.
    s.with_receipt(
        Frame::new(Command::Unsubscribe)
            .header("id", "d1")
            .header("durable", "true"),
    )
    .await;
    assert!(b.broker().vhost("/").unwrap().queues().is_empty());
}

#[tokio::test]
async fn exchange_and_amq_queue_destinations() {
    let b = start_broker().await;
    let mut s = StompClient::connect(b.stomp_addr()).await;
    s.subscribe("f", "/exchange/amq.fanout", "auto", &[]).await;
    s.subscribe("d", "/exchange/amq.direct/route-1", "auto", &[])
        .await;
    let mut p = StompClient::connect(b.stomp_addr()).await;
    p.send("/exchange/amq.fanout", "to all", &[]).await;
    p.send("/exchange/amq.direct/route-1", "routed", &[]).await;
    p.send("/exchange/amq.direct/route-2", "nobody", &[]).await;
    let mut got: Vec<(String, String)> = Vec::new();
    for _ in 0..2 {
        let m = s.recv_message().await;
        got.push((m.get("destination").unwrap().to_owned(), body(&m)));
    }
    got.sort();
    assert_eq!(
        got,
        [
            ("/exchange/amq.direct/route-1".into(), "routed".into()),
            ("/exchange/amq.fanout/".into(), "to all".into()),
        ]
    );
    assert!(s.recv_within(QUIET).await.is_none());
    // /amq/queue/ uses an existing queue and never declares one.
    p.send("/queue/existing", "kept", &[]).await;
    s.subscribe("e", "/amq/queue/existing", "auto", &[]).await;
    let m = s.recv_message().await;
    assert_eq!(body(&m), "kept");
    assert_eq!(m.get("destination"), Some("/queue/existing"));
    s.send_frame(
        &Frame::new(Command::Subscribe)
            .header("id", "x")
            .header("destination", "/amq/queue/missing"),
    )
    .await;
    let e = s.expect_error().await;
    assert_eq!(e.get("message"), Some("NOT_FOUND"));
    assert!(body(&e).contains("no queue 'missing'"), "{}", body(&e));
    // An exchange that does not exist is an ERROR for SEND too.
    p.send("/exchange/nope/k", "x", &[]).await;
    assert_eq!(p.expect_error().await.get("message"), Some("NOT_FOUND"));
}

#[tokio::test]
async fn escaped_slashes_in_destinations() {
    let b = start_broker().await;
    let mut c = StompClient::connect(b.stomp_addr()).await;
    c.subscribe("s", "/queue/a%2Fb", "auto", &[]).await;
    c.send("/queue/a%2Fb", "slash", &[]).await;
    let m = c.recv_message().await;
    assert_eq!(m.get("destination"), Some("/queue/a%2Fb"));
    assert!(b.broker().vhost("/").unwrap().queue("a/b").is_ok());
}

#[tokio::test]
async fn queue_arguments_come_from_headers() {
    let b = start_broker().await;
    let mut c = StompClient::connect(b.stomp_addr()).await;
    c.with_receipt(
        Frame::new(Command::Send)
            .header("destination", "/queue/limited")
            .header("x-max-length", "2")
            .header("x-message-ttl", "60000")
            .header("durable", "false")
            .body("1"),
    )
    .await;
    let q = b.broker().vhost("/").unwrap().queue("limited").unwrap();
    assert!(!q.options.durable);
    assert_eq!(q.options.arguments.get_i64("x-max-length"), Some(2));
    assert_eq!(q.options.arguments.get_i64("x-message-ttl"), Some(60000));
    // Queue arguments are consumed, not passed on as message headers.
    c.subscribe("s", "/queue/limited", "auto", &[]).await;
    let m = c.recv_message().await;
    assert!(m.get("x-max-length").is_none());
    // Declaring it again with other properties is refused as AMQP would.
    c.send("/queue/limited", "x", &[("durable", "true")]).await;
    let e = c.expect_error().await;
    assert_eq!(e.get("message"), Some("PRECONDITION_FAILED"));
    assert!(
        body(&e).contains("inequivalent arg 'durable'"),
        "{}",
        body(&e)
    );
}

// ---- ACK / NACK / prefetch ----

async fn fill(b: &TestBroker, queue: &str, n: usize) {
    let mut p = StompClient::connect(b.stomp_addr()).await;
    for i in 0..n {
        p.send(&format!("/queue/{queue}"), &format!("m{i}"), &[])
            .await;
    }
    p.disconnect().await;
}

#[tokio::test]
async fn client_ack_is_cumulative_and_unacked_messages_return() {
    let b = start_broker().await;
    fill(&b, "cq", 3).await;
    let mut c = StompClient::connect(b.stomp_addr()).await;
    c.subscribe("s", "/queue/cq", "client", &[]).await;
    let ms: Vec<Frame> = vec![
        c.recv_message().await,
        c.recv_message().await,
        c.recv_message().await,
    ];
    // ACK of the second settles the first two.
    c.with_receipt(Frame::new(Command::Ack).header("id", ms[1].get("ack").unwrap()))
        .await;
    let q = b.broker().vhost("/").unwrap().queue("cq").unwrap();
    assert_eq!(q.unacked_count(), 1);
    drop(c);
    // The unacked third comes back, marked redelivered.
    let mut c = StompClient::connect(b.stomp_addr()).await;
    c.subscribe("s", "/queue/cq", "client-individual", &[])
        .await;
    let m = c.recv_message().await;
    assert_eq!(body(&m), "m2");
    assert_eq!(m.get("redelivered"), Some("true"));
}

#[tokio::test]
async fn client_individual_acks_one_and_nack_requeues_or_dead_letters() {
    let b = start_broker().await;
    let mut c = StompClient::connect(b.stomp_addr()).await;
    // A queue that dead-letters to another through the default exchange.
    c.subscribe("dead", "/queue/dlq", "auto", &[]).await;
    let args = [
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", "dlq"),
    ];
    c.subscribe("s", "/queue/iq", "client-individual", &args)
        .await;
    for i in 0..3 {
        c.send("/queue/iq", &format!("m{i}"), &[]).await;
    }
    let m0 = c.recv_message().await;
    let m1 = c.recv_message().await;
    let m2 = c.recv_message().await;
    c.send_frame(&Frame::new(Command::Ack).header("id", m1.get("ack").unwrap()))
        .await;
    // NACK (requeue by default): m0 comes again, redelivered.
    c.send_frame(&Frame::new(Command::Nack).header("id", m0.get("ack").unwrap()))
        .await;
    let again = c.recv_message().await;
    assert_eq!(body(&again), "m0");
    assert_eq!(again.get("redelivered"), Some("true"));
    // NACK requeue:false dead-letters.
    c.send_frame(
        &Frame::new(Command::Nack)
            .header("id", m2.get("ack").unwrap())
            .header("requeue", "false"),
    )
    .await;
    let dead = c.recv_message().await;
    assert_eq!(dead.get("subscription"), Some("dead"));
    assert_eq!(body(&dead), "m2");
    // Acking an unknown id is an ERROR.
    c.send_frame(&Frame::new(Command::Ack).header("id", "999999"))
        .await;
    assert_eq!(
        c.expect_error().await.get("message"),
        Some("unknown message")
    );
}

#[tokio::test]
async fn ack_uses_message_id_in_1_1_and_1_0() {
    let b = start_broker().await;
    fill(&b, "old", 2).await;
    for version in ["1.0", "1.1"] {
        let (mut c, _) = StompClient::connect_with(b.stomp_addr(), version, &[]).await;
        c.subscribe("s", "/queue/old", "client-individual", &[])
            .await;
        let m = c.recv_message().await;
        assert!(m.get("ack").is_none(), "no ack header before 1.2");
        c.with_receipt(
            Frame::new(Command::Ack)
                .header("subscription", "s")
                .header("message-id", m.get("message-id").unwrap()),
        )
        .await;
        c.disconnect().await;
    }
    let q = b.broker().vhost("/").unwrap().queue("old").unwrap();
    assert_eq!((q.message_count(), q.unacked_count()), (0, 0));
}

#[tokio::test]
async fn prefetch_count_bounds_unacked_deliveries() {
    let b = start_broker().await;
    fill(&b, "pq", 5).await;
    let mut c = StompClient::connect(b.stomp_addr()).await;
    c.subscribe(
        "s",
        "/queue/pq",
        "client-individual",
        &[("prefetch-count", "2")],
    )
    .await;
    let a = c.recv_message().await;
    let _b2 = c.recv_message().await;
    assert!(c.recv_within(QUIET).await.is_none(), "only 2 in flight");
    c.send_frame(&Frame::new(Command::Ack).header("id", a.get("ack").unwrap()))
        .await;
    assert_eq!(body(&c.recv_message().await), "m2");
    assert!(c.recv_within(QUIET).await.is_none());
}

// ---- transactions / receipts / disconnect ----

#[tokio::test]
async fn transactions_cover_send_and_ack() {
    let b = start_broker().await;
    let mut s = StompClient::connect(b.stomp_addr()).await;
    s.subscribe("s", "/queue/txq", "client-individual", &[])
        .await;
    let mut p = StompClient::connect(b.stomp_addr()).await;
    p.send_frame(&Frame::new(Command::Begin).header("transaction", "t1"))
        .await;
    p.send("/queue/txq", "one", &[("transaction", "t1")]).await;
    p.send("/queue/txq", "two", &[("transaction", "t1")]).await;
    p.with_receipt(Frame::new(Command::Begin).header("transaction", "t2"))
        .await;
    assert!(
        s.recv_within(QUIET).await.is_none(),
        "nothing before COMMIT"
    );
    p.send("/queue/txq", "aborted", &[("transaction", "t2")])
        .await;
    p.with_receipt(Frame::new(Command::Abort).header("transaction", "t2"))
        .await;
    p.with_receipt(Frame::new(Command::Commit).header("transaction", "t1"))
        .await;
    let m1 = s.recv_message().await;
    let m2 = s.recv_message().await;
    assert_eq!((body(&m1), body(&m2)), ("one".into(), "two".into()));
    assert!(
        s.recv_within(QUIET).await.is_none(),
        "the aborted SEND never arrives"
    );
    // An ACK inside a transaction takes effect at COMMIT; ABORT drops it.
    let q = b.broker().vhost("/").unwrap().queue("txq").unwrap();
    s.send_frame(&Frame::new(Command::Begin).header("transaction", "a"))
        .await;
    s.send_frame(
        &Frame::new(Command::Ack)
            .header("id", m1.get("ack").unwrap())
            .header("transaction", "a"),
    )
    .await;
    s.with_receipt(Frame::new(Command::Abort).header("transaction", "a"))
        .await;
    assert_eq!(q.unacked_count(), 2);
    s.send_frame(&Frame::new(Command::Begin).header("transaction", "c"))
        .await;
    for m in [&m1, &m2] {
        s.send_frame(
            &Frame::new(Command::Ack)
                .header("id", m.get("ack").unwrap())
                .header("transaction", "c"),
        )
        .await;
    }
    assert_eq!(q.unacked_count(), 2);
    s.with_receipt(Frame::new(Command::Commit).header("transaction", "c"))
        .await;
    assert_eq!(q.unacked_count(), 0);
    // Unknown transactions are errors.
    p.send_frame(&Frame::new(Command::Commit).header("transaction", "nope"))
        .await;
    assert_eq!(
        p.expect_error().await.get("message"),
        Some("transaction error")
    );
}

#[tokio::test]
async fn receipts_follow_any_frame_and_disconnect_closes_after_its_receipt() {
    let b = start_broker().await;
    let mut c = StompClient::connect(b.stomp_addr()).await;
    c.send_raw(b"SUBSCRIBE\nid:1\ndestination:/queue/r\nreceipt:sub-1\n\n\0SEND\ndestination:/queue/r\nreceipt:send-1\npersistent:true\n\nhi\0")
        .await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let f = c.recv().await;
        seen.push(match f.command {
            Command::Receipt => f.get("receipt-id").unwrap().to_owned(),
            Command::Message => body(&f),
            other => panic!("{other:?}"),
        });
    }
    // The SEND's receipt is written when it is routed, so it may precede or
    // follow the delivery; the SUBSCRIBE's comes first.
    assert_eq!(seen[0], "sub-1");
    assert!(seen.contains(&"send-1".to_owned()) && seen.contains(&"hi".to_owned()));
    c.send_raw(b"DISCONNECT\nreceipt:bye\n\n\0").await;
    let r = c.recv().await;
    assert_eq!(
        (r.command, r.get("receipt-id")),
        (Command::Receipt, Some("bye"))
    );
    c.expect_closed().await;
}

// ---- heart-beats ----

#[tokio::test]
async fn heartbeats_flow_and_a_silent_client_is_dropped() {
    let b = start_broker_with(|c| c.stomp.heartbeat_min_ms = 50).await;
    let (mut c, connected) =
        StompClient::connect_with(b.stomp_addr(), "1.2", &[("heart-beat", "100,100")]).await;
    // The broker sends every 100 ms (it asked for 100) and expects one every 100.
    assert_eq!(connected.get("heart-beat"), Some("100,100"));
    // Beats arrive as bare EOLs, which the decoder skips; the connection stays
    // open only while we beat too.
    for _ in 0..5 {
        c.send_raw(b"\n").await;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(!c.is_closed());
    let mut raw = vec![0u8; 64];
    use tokio::io::AsyncReadExt;
    let n = timeout(WAIT, c.stream().read(&mut raw))
        .await
        .unwrap()
        .unwrap();
    assert!(
        n > 0 && raw[..n].iter().all(|&b| b == b'\n'),
        "{:?}",
        &raw[..n]
    );
    // Now silence: dropped after two missed intervals.
    let started = std::time::Instant::now();
    c.expect_closed().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    // The minimum bounds what a client can ask for.
    let (_c, connected) =
        StompClient::connect_with(b.stomp_addr(), "1.2", &[("heart-beat", "1,1")]).await;
    assert_eq!(connected.get("heart-beat"), Some("50,50"));
    let (_c, connected) =
        StompClient::connect_with(b.stomp_addr(), "1.2", &[("heart-beat", "0,0")]).await;
    assert_eq!(connected.get("heart-beat"), Some("0,0"));
}

// ---- bad input ----

#[tokio::test]
async fn bad_input_gets_an_error_and_only_that_connection_closes() {
    let b = start_broker_with(|c| {
        c.stomp.max_frame_size = 1024;
        c.stomp.max_headers = 10;
    })
    .await;
    let mut bystander = StompClient::connect(b.stomp_addr()).await;
    bystander.subscribe("s", "/queue/by", "auto", &[]).await;
    let cases: Vec<(&[u8], &str, &str)> = vec![
        (
            b"SEND\ndestination:/queue/x\n\nhi\0",
            "not connected",
            "must be CONNECT",
        ),
        (b"FROB\n\n\0", "unknown command", "unknown command 'FROB'"),
    ];
    for (bytes, message, detail) in cases {
        let mut c = StompClient::open(b.stomp_addr()).await;
        c.send_raw(bytes).await;
        let e = c.expect_error().await;
        assert_eq!(e.get("message"), Some(message));
        assert!(body(&e).contains(detail), "{}", body(&e));
        assert_eq!(e.get("content-type"), Some("text/plain"));
    }
    let connected_cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"FROB\n\n\0".to_vec(), "unknown command", "FROB"),
        (
            b"SEND\n\nno destination\0".to_vec(),
            "missing header",
            "'destination'",
        ),
        (
            b"SUBSCRIBE\ndestination:/queue/a\n\n\0".to_vec(),
            "missing header",
            "'id'",
        ),
        (
            b"SEND\ndestination:/queue/a\nbad line\n\n\0".to_vec(),
            "malformed frame",
            "no ':'",
        ),
        (
            b"SEND\ndestination:/queue/a\nx:\\q\n\n\0".to_vec(),
            "bad header escape",
            "'\\q'",
        ),
        (
            b"SEND\ndestination:/queue/a\ncontent-length:ten\n\n\0".to_vec(),
            "invalid content-length",
            "'ten'",
        ),
        (
            b"SEND\ndestination:/queue/a\ncontent-length:5000\n\n".to_vec(),
            "frame too large",
            "5000 bytes",
        ),
        (
            [b"SEND\ndestination:/queue/a\n\n".to_vec(), vec![b'z'; 2000]].concat(),
            "frame too large",
            "1024",
        ),
        (
            [b"SEND\n".to_vec(), b"h:v\n".repeat(11)].concat(),
            "too many headers",
            "10",
        ),
        (
            b"SEND\ndestination:/bogus/a\n\n\0".to_vec(),
            "invalid destination",
            "/bogus/a",
        ),
        (
            b"SEND\ndestination:/queue/a\npriority:high\n\n\0".to_vec(),
            "invalid header",
            "priority",
        ),
        (
            b"SUBSCRIBE\nid:1\ndestination:/queue/a\nack:sometimes\n\n\0".to_vec(),
            "invalid header",
            "ack:sometimes",
        ),
        (
            b"MESSAGE\ndestination:/queue/a\n\n\0".to_vec(),
            "unexpected frame",
            "server frame",
        ),
        (
            b"CONNECT\naccept-version:1.2\n\n\0".to_vec(),
            "already connected",
            "twice",
        ),
        (
            b"UNSUBSCRIBE\nid:nope\n\n\0".to_vec(),
            "unknown subscription",
            "'nope'",
        ),
    ];
    for (bytes, message, detail) in connected_cases {
        let mut c = StompClient::connect(b.stomp_addr()).await;
        c.send_raw(&bytes).await;
        let e = c.expect_error().await;
        assert_eq!(
            e.get("message"),
            Some(message),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        assert!(body(&e).contains(detail), "{} / {}", body(&e), detail);
    }
    // The bystander still works.
    let mut p = StompClient::connect(b.stomp_addr()).await;
    p.send("/queue/by", "still here", &[]).await;
    assert_eq!(body(&bystander.recv_message().await), "still here");
}

#[tokio::test]
async fn a_connection_that_never_connects_is_closed() {
    let b = start_broker_with(|c| c.limits.handshake_timeout_secs = 1).await;
    let mut c = StompClient::open(b.stomp_addr()).await;
    c.expect_closed().await;
}

// ---- header mapping and AMQP interop ----

#[tokio::test]
async fn send_headers_become_amqp_properties_and_back() {
    let b = start_broker().await;
    let conn = amqp(&b).await;
    let ch = conn.open_channel(None).await.unwrap();
    let (queue, _, _) = ch
        .queue_declare(QueueDeclareArguments::new("props").finish())
        .await
        .unwrap()
        .unwrap();
    let (_tag, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&queue, "c")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let mut c = StompClient::connect(b.stomp_addr()).await;
    c.send(
        "/queue/props",
        "payload",
        &[
            ("content-type", "application/json"),
            ("content-encoding", "utf-8"),
            ("persistent", "true"),
            ("priority", "7"),
            ("correlation-id", "corr-1"),
            ("reply-to", "/queue/answers"),
            ("expiration", "60000"),
            ("amqp-message-id", "mid-1"),
            ("timestamp", "1700000000"),
            ("type", "order.created"),
            ("user-id", "guest"),
            ("app-id", "web"),
            ("x-trace", "abc"),
            ("x-trace", "ignored"),
        ],
    )
    .await;
    let msg = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    let p = msg.basic_properties.unwrap();
    assert_eq!(
        p.content_type().map(String::as_str),
        Some("application/json")
    );
    assert_eq!(p.content_encoding().map(String::as_str), Some("utf-8"));
    assert_eq!(p.delivery_mode(), Some(2));
    assert_eq!(p.priority(), Some(7));
    assert_eq!(p.correlation_id().map(String::as_str), Some("corr-1"));
    assert_eq!(p.reply_to().map(String::as_str), Some("/queue/answers"));
    assert_eq!(p.expiration().map(String::as_str), Some("60000"));
    assert_eq!(p.message_id().map(String::as_str), Some("mid-1"));
    assert_eq!(p.timestamp(), Some(1_700_000_000));
    assert_eq!(p.message_type().map(String::as_str), Some("order.created"));
    assert_eq!(p.user_id().map(String::as_str), Some("guest"));
    assert_eq!(p.app_id().map(String::as_str), Some("web"));
    let headers = p.headers().unwrap();
    let trace = headers
        .as_ref()
        .iter()
        .find(|(k, _)| k.as_ref() == "x-trace")
        .map(|(_, v)| v.clone());
    assert!(
        matches!(trace, Some(FieldValue::S(ref s)) if s.as_ref() == "abc"),
        "{trace:?}"
    );
    assert_eq!(msg.content.unwrap(), b"payload");

    // And AMQP -> STOMP.
    c.subscribe("s", "/queue/from-amqp", "auto", &[]).await;
    let mut table = FieldTable::new();
    table.insert(
        "x-origin".try_into().unwrap(),
        FieldValue::S("amqp".try_into().unwrap()),
    );
    table.insert("count".try_into().unwrap(), FieldValue::I(42));
    let props = BasicProperties::default()
        .with_content_type("text/plain")
        .with_delivery_mode(2)
        .with_correlation_id("c-9")
        .with_reply_to("amq.gen-reply")
        .with_message_id("m-9")
        .with_headers(table)
        .finish();
    ch.basic_publish(
        props,
        b"from amqp".to_vec(),
        BasicPublishArguments::new("", "from-amqp"),
    )
    .await
    .unwrap();
    let m = c.recv_message().await;
    assert_eq!(body(&m), "from amqp");
    assert_eq!(m.get("destination"), Some("/queue/from-amqp"));
    assert_eq!(m.get("content-type"), Some("text/plain"));
    assert_eq!(m.get("persistent"), Some("true"));
    assert_eq!(m.get("correlation-id"), Some("c-9"));
    assert_eq!(m.get("reply-to"), Some("/reply-queue/amq.gen-reply"));
    assert_eq!(m.get("amqp-message-id"), Some("m-9"));
    assert_eq!(m.get("x-origin"), Some("amqp"));
    assert_eq!(m.get("count"), Some("42"));
}

/// INTEROP.md worked example 4: STOMP SEND to `/queue/rpc` with
/// `reply-to:/temp-queue/r1` -> an AMQP worker sees `reply_to` set to the real
/// reply queue, answers through the default exchange, the STOMP client gets it.
#[tokio::test]
async fn worked_example_4_rpc_over_a_temp_queue() {
    let b = start_broker().await;
    let conn = amqp(&b).await;
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_declare(QueueDeclareArguments::new("rpc").durable(true).finish())
        .await
        .unwrap();
    let (_tag, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new("rpc", "worker")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let mut c = StompClient::connect(b.stomp_addr()).await;
    c.send(
        "/queue/rpc",
        "what is 6*7?",
        &[("reply-to", "/temp-queue/r1"), ("correlation-id", "q1")],
    )
    .await;
    let req = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    let props = req.basic_properties.unwrap();
    let reply_to = props.reply_to().unwrap().clone();
    assert!(reply_to.starts_with("amq.gen-"), "{reply_to}");
    assert!(b.broker().vhost("/").unwrap().queue(&reply_to).is_ok());
    ch.basic_publish(
        BasicProperties::default()
            .with_correlation_id(props.correlation_id().unwrap())
            .finish(),
        b"42".to_vec(),
        BasicPublishArguments::new("", &reply_to),
    )
    .await
    .unwrap();
    let m = c.recv_message().await;
    assert_eq!(body(&m), "42");
    assert_eq!(m.get("subscription"), Some("/temp-queue/r1"));
    assert_eq!(m.get("correlation-id"), Some("q1"));
    // The temp queue is private and goes with the connection.
    drop(c);
    let vhost = b.broker().vhost("/").unwrap();
    for _ in 0..100 {
        if vhost.queue(&reply_to).is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        vhost.queue(&reply_to).is_err(),
        "temp queue deleted on close"
    );
}

/// INTEROP.md worked example 1, AMQP and STOMP half (the MQTT publisher's part
/// is tested where the MQTT adapter lives): a persistent publish to `amq.topic`
/// key `sensors.room1.temp` reaches an AMQP queue bound with `sensors.*.temp`
/// and a STOMP subscriber of `/topic/sensors.*.temp` with
/// `destination:/topic/sensors.room1.temp` and `persistent:true`.
#[tokio::test]
async fn worked_example_1_topic_fan_out_to_amqp_and_stomp() {
    let b = start_broker().await;
    let conn = amqp(&b).await;
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
    let mut s = StompClient::connect(b.stomp_addr()).await;
    s.subscribe("t", "/topic/sensors.*.temp", "auto", &[]).await;
    ch.basic_publish(
        BasicProperties::default().with_delivery_mode(2).finish(),
        b"21.5".to_vec(),
        BasicPublishArguments::new("amq.topic", "sensors.room1.temp"),
    )
    .await
    .unwrap();
    let a = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(a.basic_properties.unwrap().delivery_mode(), Some(2));
    let m = s.recv_message().await;
    assert_eq!(m.get("destination"), Some("/topic/sensors.room1.temp"));
    assert_eq!(m.get("persistent"), Some("true"));
    assert_eq!(body(&m), "21.5");
}

#[tokio::test]
async fn header_escapes_survive_a_trip_through_the_broker() {
    let b = start_broker().await;
    for version in ["1.1", "1.2"] {
        let (mut c, _) = StompClient::connect_with(b.stomp_addr(), version, &[]).await;
        let q = format!("/queue/esc-{version}");
        c.subscribe("s", &q, "auto", &[]).await;
        c.send(&q, "b", &[("x-odd", "a:b\nc\\d")]).await;
        let m = c.recv_message().await;
        assert_eq!(m.get("x-odd"), Some("a:b\nc\\d"), "{version}");
    }
}

#[tokio::test]
async fn binary_bodies_with_nul_survive() {
    let b = start_broker().await;
    let mut c = StompClient::connect(b.stomp_addr()).await;
    c.subscribe("s", "/queue/bin", "auto", &[]).await;
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    c.send_frame(
        &Frame::new(Command::Send)
            .header("destination", "/queue/bin")
            .header("content-length", payload.len().to_string())
            .body(payload.clone()),
    )
    .await;
    let m = c.recv_message().await;
    assert_eq!(&m.body[..], &payload[..]);
}

// ---- WebSocket ----

async fn ws_connect(
    b: &TestBroker,
    protocol: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let addr = b.stomp_ws_addr();
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        protocol
    );
    ws
}

/// Reads WebSocket messages until `n` STOMP frames are decoded; reports whether
/// all messages were text.
async fn ws_frames(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    n: usize,
) -> (Vec<Frame>, bool) {
    use tokio_tungstenite::tungstenite::Message;
    let mut d = Decoder::new(Limits::default());
    d.set_version(Version::V1_2);
    let mut buf = bytes::BytesMut::new();
    let mut frames = Vec::new();
    let mut all_text = true;
    while frames.len() < n {
        match timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Text(t) => buf.extend_from_slice(t.as_bytes()),
            Message::Binary(b) => {
                all_text = false;
                buf.extend_from_slice(&b)
            }
            _ => continue,
        }
        while let Some(f) = d.decode(&mut buf).unwrap() {
            frames.push(f);
        }
    }
    (frames, all_text)
}

#[tokio::test]
async fn websocket_frames_may_span_and_share_messages_and_text_gets_text() {
    use tokio_tungstenite::tungstenite::Message;
    let b = start_broker().await;
    let mut ws = ws_connect(&b, "v12.stomp").await;
    // CONNECT split over three text messages.
    for part in ["CONN", "ECT\naccept-version:1.2\nho", "st:/\n\n\0"] {
        ws.send(Message::text(part)).await.unwrap();
    }
    let (f, text) = ws_frames(&mut ws, 1).await;
    assert_eq!(f[0].command, Command::Connected);
    assert!(text, "text in, text out");
    // SUBSCRIBE and two SENDs in one message.
    ws.send(Message::text(
        "SUBSCRIBE\nid:w\ndestination:/topic/ws.#\nreceipt:s\n\n\0\
         SEND\ndestination:/topic/ws.a\n\none\0\nSEND\ndestination:/topic/ws.b\n\ntwo\0",
    ))
    .await
    .unwrap();
    let (f, _) = ws_frames(&mut ws, 3).await;
    assert_eq!(f[0].command, Command::Receipt);
    let bodies: Vec<String> = f[1..].iter().map(body).collect();
    assert_eq!(bodies, ["one", "two"]);
    // A binary body from another client comes as a binary message.
    let mut c = StompClient::connect(b.stomp_addr()).await;
    c.send_frame(
        &Frame::new(Command::Send)
            .header("destination", "/topic/ws.bin")
            .header("content-length", "3")
            .body(vec![0xff, 0, 0xfe]),
    )
    .await;
    let (f, text) = ws_frames(&mut ws, 1).await;
    assert_eq!(&f[0].body[..], &[0xff, 0, 0xfe]);
    assert!(!text);
}

#[tokio::test]
async fn websocket_binary_messages_and_older_subprotocols() {
    use tokio_tungstenite::tungstenite::Message;
    let b = start_broker().await;
    let mut ws = ws_connect(&b, "v11.stomp").await;
    ws.send(Message::binary(
        b"CONNECT\naccept-version:1.1\nhost:/\n\n\0SUBSCRIBE\nid:1\ndestination:/queue/wsq\nreceipt:r\n\n\0".to_vec(),
    ))
    .await
    .unwrap();
    let (f, text) = ws_frames(&mut ws, 2).await;
    assert_eq!(f[0].get("version"), Some("1.1"));
    assert_eq!(f[1].command, Command::Receipt);
    assert!(!text, "binary in, binary out");
    // Bad input over WebSocket: ERROR, then the socket closes.
    ws.send(Message::binary(b"BOGUS\n\n\0".to_vec()))
        .await
        .unwrap();
    let (f, _) = ws_frames(&mut ws, 1).await;
    assert_eq!(f[0].command, Command::Error);
    let end = timeout(WAIT, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(end.is_ok());
}

#[tokio::test]
async fn a_deleted_queue_ends_its_subscription_with_an_error() {
    use amqprs::channel::QueueDeleteArguments;
    let b = start_broker().await;
    let mut c = StompClient::connect(b.stomp_addr()).await;
    c.subscribe("s", "/queue/doomed", "auto", &[]).await;
    let conn = amqp(&b).await;
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_delete(QueueDeleteArguments::new("doomed"))
        .await
        .unwrap();
    let e = c.expect_error().await;
    assert_eq!(e.get("message"), Some("subscription cancelled"));
    assert_eq!(e.get("subscription"), Some("s"));
}

#[tokio::test]
async fn the_memory_alarm_stops_reading_from_publishers_until_consumers_drain() {
    let b = start_broker().await;
    let mut p = StompClient::connect(b.stomp_addr()).await;
    // A publisher (the alarm blocks publishers only)...
    p.with_receipt(
        Frame::new(Command::Send)
            .header("destination", "/queue/mem")
            .body("first"),
    )
    .await;
    // ...then the queue fills past the watermark (straight through the core, so
    // the publisher's own reads are not what trips it). The alarm measures this
    // process's memory: the watermark goes 16 MiB above what it uses now, and the
    // queue takes 20 MiB.
    let memory = b.broker().memory.clone();
    memory.set_high_watermark(memory.level() + 16 * 1024 * 1024);
    let q = b.broker().vhost("/").unwrap().queue("mem").unwrap();
    for _ in 0..20 {
        q.publish(switchyard_core::Message::new(
            "",
            "mem",
            Default::default(),
            bytes::Bytes::from(vec![b'x'; 1024 * 1024]),
        ));
    }
    assert!(b.broker().memory.alarm());
    // Blocked: this frame is not even read while the alarm is on.
    p.send_frame(
        &Frame::new(Command::Send)
            .header("destination", "/queue/elsewhere")
            .header("receipt", "after-alarm")
            .body("later"),
    )
    .await;
    assert!(p.recv_within(QUIET).await.is_none());
    // A consumer is still served, and draining the queue clears the alarm.
    let mut c = StompClient::connect(b.stomp_addr()).await;
    c.subscribe("s", "/queue/mem", "auto", &[]).await;
    for _ in 0..21 {
        c.recv_message().await;
    }
    let r = p.recv().await;
    assert_eq!(r.command, Command::Receipt);
    assert_eq!(r.get("receipt-id"), Some("after-alarm"));
}

#[test]
fn the_shipped_config_documents_the_stomp_defaults() {
    use switchyard_testkit::config::{Config, StompConfig};
    let c = Config::embedded().unwrap();
    assert_eq!(c.listeners.stomp, Some("0.0.0.0:61613".parse().unwrap()));
    assert_eq!(c.listeners.stomp_ws, Some("0.0.0.0:15674".parse().unwrap()));
    let d = StompConfig::default();
    let s = &c.stomp;
    assert_eq!(
        (
            &s.default_vhost,
            &s.default_user,
            &s.default_pass,
            s.max_frame_size,
            s.max_headers,
            s.max_header_length,
            s.heartbeat_min_ms,
            &s.ws_path
        ),
        (
            &d.default_vhost,
            &d.default_user,
            &d.default_pass,
            d.max_frame_size,
            d.max_headers,
            d.max_header_length,
            d.heartbeat_min_ms,
            &d.ws_path
        )
    );
    let e = Config::from_str("[stomp]\ndefault_vhost = \"/nope\"\n", "t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("stomp.default_vhost"), "{e}");
    let e = Config::from_str("[stomp]\nws_path = \"ws\"\n", "t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("stomp.ws_path"), "{e}");
}

#[tokio::test]
async fn send_reaches_another_connections_exclusive_queue_but_subscribe_does_not() {
    let b = start_broker().await;
    let mut owner = StompClient::connect(b.stomp_addr()).await;
    owner
        .subscribe("s", "/queue/mine", "auto", &[("exclusive", "true")])
        .await;
    let mut other = StompClient::connect(b.stomp_addr()).await;
    other.send("/queue/mine", "for the owner", &[]).await;
    assert_eq!(body(&owner.recv_message().await), "for the owner");
    other
        .send_frame(
            &Frame::new(Command::Subscribe)
                .header("id", "x")
                .header("destination", "/queue/mine"),
        )
        .await;
    assert_eq!(
        other.expect_error().await.get("message"),
        Some("RESOURCE_LOCKED")
    );
}

//! Flow control and the measured memory alarm (issue 11), over real sockets:
//! a publisher feeding a queue whose consumer has fallen behind stops being read
//! until the consumer catches up, without slowing publishers that feed other
//! queues; and the memory alarm fires from measured memory, not from what the
//! queues hold.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use switchyard_testkit::stomp::codec::{Command, Frame};
use switchyard_testkit::stomp::StompClient;
use switchyard_testkit::{start_broker, start_broker_with, TestBroker};

/// How long silence must last to count as "not read".
const QUIET: Duration = Duration::from_millis(300);
/// 64 KiB bodies, 300 of them: the backlog of a consumer that holds 10
/// unacknowledged passes flow control's byte mark (8 MiB) after 138.
const BODY: usize = 64 * 1024;
const COUNT: usize = 300;
/// The slow consumer's prefetch: it takes 10 messages and acknowledges none
/// until the test lets it drain.
const PREFETCH: &str = "10";

/// Waits for `condition` (state of the broker seen from the test), checking
/// every 10 ms, failing after 20 s.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A consumer that subscribes to `/queue/slow` and acknowledges nothing, and a
/// publisher (in its own task) that sends `COUNT` messages there and then one
/// with a receipt; returns once the queue is behind. The task yields the
/// publisher once it got its receipt.
async fn slow_consumer_and_flooding_publisher(
    b: &TestBroker,
) -> (StompClient, tokio::task::JoinHandle<StompClient>) {
    let mut consumer = StompClient::connect(b.stomp_addr()).await;
    consumer
        .subscribe(
            "s",
            "/queue/slow",
            "client-individual",
            &[("prefetch-count", PREFETCH)],
        )
        .await;
    let mut publisher = StompClient::connect(b.stomp_addr()).await;
    let body = "x".repeat(BODY);
    let task = tokio::spawn(async move {
        for _ in 0..COUNT {
            publisher.send("/queue/slow", &body, &[]).await;
        }
        publisher
            .with_receipt(
                Frame::new(Command::Send)
                    .header("destination", "/queue/slow")
                    .body("last"),
            )
            .await;
        publisher
    });
    let q = b.broker().vhost("/").unwrap().queue("slow").unwrap();
    eventually("the slow queue falls behind", || q.flow_behind()).await;
    (consumer, task)
}

async fn ack(consumer: &mut StompClient, m: &Frame) {
    let id = m.get("ack").expect("STOMP 1.2 MESSAGE has an ack header");
    consumer
        .send_frame(&Frame::new(Command::Ack).header("id", id))
        .await;
}

#[tokio::test]
async fn a_publisher_into_a_lagging_queue_is_paused_and_resumes_when_the_consumer_drains() {
    let b = start_broker().await;
    let (mut consumer, publisher) = slow_consumer_and_flooding_publisher(&b).await;
    let q = b.broker().vhost("/").unwrap().queue("slow").unwrap();
    // Paused: the queue stops growing although the publisher has more to send.
    let held = q.message_count();
    tokio::time::sleep(QUIET).await;
    assert!(
        q.message_count() <= held,
        "still read: {held} -> {}",
        q.message_count()
    );
    assert!(!publisher.is_finished(), "the publisher got its receipt");
    assert!(held < COUNT, "the whole flood was taken in: {held}");
    // The consumer catches up: the publisher is read again, and everything
    // arrives, in order, the receipted message last.
    for _ in 0..COUNT {
        let m = consumer.recv_message().await;
        assert_eq!(m.body.len(), BODY);
        ack(&mut consumer, &m).await;
    }
    let last = consumer.recv_message().await;
    assert_eq!(&last.body[..], b"last");
    ack(&mut consumer, &last).await;
    let _publisher = tokio::time::timeout(Duration::from_secs(20), publisher)
        .await
        .expect("the publisher was not resumed")
        .unwrap();
    assert!(!q.flow_behind());
}

#[tokio::test]
async fn a_slow_consumer_on_one_queue_does_not_block_a_publisher_feeding_another() {
    let b = start_broker().await;
    let (_consumer, flooding) = slow_consumer_and_flooding_publisher(&b).await;
    let mut other = StompClient::connect(b.stomp_addr()).await;
    let mut reader = StompClient::connect(b.stomp_addr()).await;
    reader.subscribe("o", "/queue/other", "auto", &[]).await;
    for i in 0..50 {
        // with_receipt fails the test if the RECEIPT does not come.
        other
            .with_receipt(
                Frame::new(Command::Send)
                    .header("destination", "/queue/other")
                    .body(format!("m{i}")),
            )
            .await;
        assert_eq!(
            &reader.recv_message().await.body[..],
            format!("m{i}").as_bytes()
        );
    }
    assert!(
        !flooding.is_finished(),
        "the flooding publisher is still paused"
    );
    flooding.abort();
}

#[tokio::test]
async fn the_memory_alarm_fires_from_measured_memory() {
    // 1 MiB is less than this process uses before any message is queued: only
    // a measurement can set the alarm.
    let b = start_broker_with(|c| c.limits.memory_high_watermark_bytes = 1024 * 1024).await;
    let memory = b.broker().memory.clone();
    assert_eq!(memory.used(), 0, "no message queued");
    assert!(memory.resident().is_some_and(|r| r > 1024 * 1024));
    assert!(
        memory.memory_alarm(),
        "measured memory is over the watermark"
    );

    let mut p = StompClient::connect(b.stomp_addr()).await;
    // A connection is blocked once it publishes: its first SEND is taken...
    p.with_receipt(
        Frame::new(Command::Send)
            .header("destination", "/queue/m")
            .body("first"),
    )
    .await;
    // ...the next one is not read while the alarm is on.
    p.send_frame(
        &Frame::new(Command::Send)
            .header("destination", "/queue/m")
            .header("receipt", "after")
            .body("second"),
    )
    .await;
    assert!(p.recv_within(QUIET).await.is_none());
    // Raising the watermark above what is measured clears it.
    memory.set_high_watermark(memory.level() * 4);
    assert!(!memory.alarm());
    let r = p.recv().await;
    assert_eq!(r.command, Command::Receipt);
    assert_eq!(r.get("receipt-id"), Some("after"));
}

/// A connection that only consumes is never told about the memory alarm: the
/// alarm blocks publishers (RabbitMQ tells only them). Told `connection.blocked`,
/// lapin stops writing altogether (acks and heartbeats), and a consumer draining
/// a backlog while the alarm is on would be closed for missed heartbeats: the
/// CI failure of `persistence::queue_larger_than_the_memory_watermark_stays_on_disk`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_consumer_is_not_blocked_by_the_alarm() {
    use futures_util::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    const COUNT: usize = 12;

    let b = start_broker().await;
    let publisher = Connection::connect(&b.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = publisher.create_channel().await.unwrap();
    ch.queue_declare(
        "backlog".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..COUNT {
        let confirm = ch
            .basic_publish(
                "".into(),
                "backlog".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }

    // A 1 s heartbeat: two missed ones end the connection after 2 s.
    let url = format!("{}?heartbeat=1", b.amqp_url());
    let consumer = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let cch = consumer.create_channel().await.unwrap();
    cch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut deliveries = cch
        .basic_consume(
            "backlog".into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    // The alarm goes on while the consumer drains, for longer than two heartbeats.
    let memory = b.broker().memory.clone();
    memory.set_high_watermark(1024 * 1024);
    assert!(memory.alarm(), "measured memory is over 1 MiB");
    for i in 0..COUNT {
        let d = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
            .await
            .unwrap_or_else(|_| panic!("delivery {i} did not come"))
            .unwrap()
            .unwrap();
        assert_eq!(d.data, format!("m{i}").as_bytes());
        tokio::time::sleep(Duration::from_millis(300)).await;
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert!(memory.alarm(), "the alarm stayed on throughout");
    assert!(consumer.status().connected(), "the consumer was not closed");
    memory.set_high_watermark(usize::MAX / 2);
}

/// Small bodies get an allocation of their own where each adapter makes them
/// a message (issue 11): two messages read with one read do not share, and so
/// do not keep alive, the connection's read buffer, whatever the protocol.
#[tokio::test]
async fn small_bodies_do_not_keep_their_read_buffer_alive_in_any_protocol() {
    use switchyard_amqp::codec as amqp;
    use switchyard_core::vhost::QueueDeclare;
    use switchyard_testkit::amqp::AmqpRaw;
    use switchyard_testkit::RawClient;

    let b = start_broker().await;
    let vhost = b.broker().vhost("/").unwrap();
    for q in ["small-amqp", "small-stomp", "small-mqtt"] {
        vhost
            .declare_queue(QueueDeclare {
                name: q.into(),
                ..QueueDeclare::default()
            })
            .unwrap();
    }
    vhost
        .bind_queue("small-mqtt", "amq.topic", "small", Default::default(), 0)
        .unwrap();
    let body = [b'x'; 16];

    // AMQP: two basic.publish with their header and body frames, one write.
    let mut amqp_client = AmqpRaw::open(b.amqp_addr(), "guest", "guest", "/")
        .await
        .unwrap();
    amqp_client.open_channel(1).await.unwrap();
    let mut frames = bytes::BytesMut::new();
    for _ in 0..2 {
        let publish = amqp::Method::from(amqp::BasicPublish {
            routing_key: "small-amqp".into(),
            ..Default::default()
        });
        let props = switchyard_core::Properties::default();
        amqp::encode_content(
            &mut frames,
            1,
            &publish,
            &props,
            &bytes::Bytes::copy_from_slice(&body),
            131_072,
        );
    }
    amqp_client.send_raw(&frames).await;

    // STOMP: two SENDs, one write.
    let mut stomp = RawClient::connect(b.stomp_addr()).await;
    stomp
        .send(b"CONNECT\naccept-version:1.2\nhost:/\n\n\0")
        .await;
    let connected = stomp.read_available(Duration::from_secs(5)).await;
    assert!(connected.starts_with(b"CONNECTED"), "{connected:?}");
    let send = [
        &b"SEND\ndestination:/queue/small-stomp\ncontent-length:16\n\n"[..],
        &body,
        b"\0",
    ]
    .concat();
    stomp.send(&[send.clone(), send].concat()).await;

    // MQTT 3.1.1: CONNECT, then two QoS 0 PUBLISHes to `small`, one write.
    let mut mqtt = RawClient::connect(b.mqtt_addr()).await;
    mqtt.send(b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01c")
        .await;
    assert_eq!(mqtt.read_exact(4).await, b"\x20\x02\x00\x00");
    let publish = [&b"\x30\x17\x00\x05small"[..], &body].concat();
    mqtt.send(&[publish.clone(), publish].concat()).await;

    for q in ["small-amqp", "small-stomp", "small-mqtt"] {
        let queue = vhost.queue(q).unwrap();
        eventually(&format!("two messages in {q}"), || {
            queue.message_count() == 2
        })
        .await;
        for peeked in queue.peek(2) {
            assert_eq!(&peeked.message.body[..], &body[..], "{q}");
            // Only this message holds its body: no read buffer behind it.
            assert!(
                peeked.message.body.is_unique(),
                "{q}: a slice of a shared buffer"
            );
        }
    }
}

/// A drained backlog gives its memory back to the system (issue 11): the
/// ready list's room and the allocator's free pages (glibc's `malloc_trim`
/// once the memory monitor counts enough retained). The broker runs as a child
/// process, so its resident set is its own.
#[tokio::test]
async fn a_purged_backlog_gives_its_memory_back() {
    use switchyard_amqp::codec as amqp;
    use switchyard_testkit::amqp::AmqpRaw;
    use switchyard_testkit::child::ChildBroker;

    const MESSAGES: u32 = 300_000;
    let dir = tempfile::tempdir().unwrap();
    let child = ChildBroker::start_in(
        std::path::Path::new(env!("CARGO_BIN_EXE_switchyard")),
        dir.path(),
        1,
        &[],
    );
    let rss_kb = || child.memory_bytes("VmRSS") / 1024;
    let mut c = AmqpRaw::open(child.addr("amqp"), "guest", "guest", "/")
        .await
        .unwrap();
    c.open_channel(1).await.unwrap();
    /// Declares `backlog` (passively: only asks) and returns its message count.
    async fn declare(c: &mut AmqpRaw, passive: bool) -> u32 {
        let method = amqp::Method::from(amqp::QueueDeclare {
            queue: "backlog".into(),
            passive,
            ..Default::default()
        });
        c.send(1, method).await;
        loop {
            match c.next_method().await {
                Some((_, amqp::Method::QueueDeclareOk(ok))) => return ok.message_count,
                Some(_) => continue,
                None => panic!("the broker closed the connection"),
            }
        }
    }
    declare(&mut c, false).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kb();

    let publish = amqp::Method::from(amqp::BasicPublish {
        routing_key: "backlog".into(),
        ..Default::default()
    });
    let props = switchyard_core::Properties::default();
    let body = bytes::Bytes::from_static(&[b'x'; 16]);
    for _ in 0..MESSAGES / 10_000 {
        let mut frames = bytes::BytesMut::new();
        for _ in 0..10_000 {
            amqp::encode_content(&mut frames, 1, &publish, &props, &body, 131_072);
        }
        c.send_raw(&frames).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = declare(&mut c, true).await;
        if n == MESSAGES {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} of {MESSAGES} queued"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let full = rss_kb();
    assert!(
        full > idle + 40_000,
        "the backlog should be visible: {idle} kB idle, {full} kB with it"
    );

    c.send(
        1,
        amqp::Method::from(amqp::QueuePurge {
            queue: "backlog".into(),
            ..Default::default()
        }),
    )
    .await;
    let goal = idle + (full - idle) / 4;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = rss_kb();
        if now <= goal {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {now} kB resident after the purge ({idle} kB idle, {full} kB full)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

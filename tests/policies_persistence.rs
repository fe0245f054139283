//! Queue policies across a restart: a persistent delayed message keeps its due
//! time, a message TTL keeps counting from when the message arrived, and config
//! policies apply to recovered queues. Waits are bounded; nothing asserts on
//! elapsed time (due times are compared as the broker computed them).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use switchyard_server::config::{Config, EMBEDDED_CONFIG};
use switchyard_testkit::{start_broker_with, TestBroker};

async fn channel(broker: &TestBroker) -> (Connection, Channel) {
    let conn = Connection::connect(&broker.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, ch)
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

async fn declare_durable(ch: &Channel, name: &str, args: FieldTable) {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(name.into(), durable, args).await.unwrap();
}

async fn publish(ch: &Channel, queue: &str, body: &str, props: BasicProperties) {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        props.with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// The next message of `queue`, within 20 s.
async fn next_message(ch: &Channel, queue: &str) -> lapin::message::Delivery {
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("no message within 20 s")
        .unwrap()
        .unwrap()
}

fn deadline_of(broker: &TestBroker, queue: &str) -> u64 {
    broker
        .broker()
        .vhost("/")
        .unwrap()
        .queue(queue)
        .unwrap()
        .deadline()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_persistent_message_survives_a_restart_with_its_due_time() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let broker = start_broker_with(|c| c.data_dir = dir.clone()).await;
    let due = {
        let (_conn, ch) = channel(&broker).await;
        declare_durable(&ch, "delayed", FieldTable::default()).await;
        let headers = table(&[("x-delay", AMQPValue::LongLongInt(5000))]);
        publish(
            &ch,
            "delayed",
            "later",
            BasicProperties::default().with_headers(headers),
        )
        .await;
        let q = broker
            .broker()
            .vhost("/")
            .unwrap()
            .queue("delayed")
            .unwrap();
        assert_eq!((q.message_count(), q.delayed_count()), (0, 1));
        q.deadline()
    };
    assert!(broker.stop().await);

    let broker = start_broker_with(|c| c.data_dir = dir.clone()).await;
    let q = broker
        .broker()
        .vhost("/")
        .unwrap()
        .queue("delayed")
        .unwrap();
    // Recovered still delayed (a restart takes far less than the 5 s delay), with
    // the same due time rather than one restarted from boot.
    assert_eq!((q.message_count(), q.delayed_count()), (0, 1));
    assert_eq!(q.deadline(), due);
    let (_conn, ch) = channel(&broker).await;
    let d = next_message(&ch, "delayed").await;
    assert_eq!(d.data, b"later");
    let headers = d.properties.headers().clone().unwrap();
    assert_eq!(
        headers.inner().get("x-delay"),
        Some(&AMQPValue::LongLongInt(-5000))
    );
    assert!(broker.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_ttl_keeps_counting_from_arrival_across_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let broker = start_broker_with(|c| c.data_dir = dir.clone()).await;
    let expires = {
        let (_conn, ch) = channel(&broker).await;
        declare_durable(&ch, "dlq", FieldTable::default()).await;
        let args = table(&[
            ("x-message-ttl", AMQPValue::LongInt(4000)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("dlq")),
        ]);
        declare_durable(&ch, "ttl", args).await;
        publish(&ch, "ttl", "short-lived", BasicProperties::default()).await;
        deadline_of(&broker, "ttl")
    };
    assert!(broker.stop().await);

    let broker = start_broker_with(|c| c.data_dir = dir.clone()).await;
    let q = broker.broker().vhost("/").unwrap().queue("ttl").unwrap();
    assert_eq!(q.settings().message_ttl, Some(4000));
    // Still there (a restart takes far less than the 4 s TTL), expiring when it
    // was going to before the restart.
    assert_eq!(q.message_count(), 1);
    assert_eq!(
        q.deadline(),
        expires,
        "the expiry is the one set on arrival"
    );
    let (_conn, ch) = channel(&broker).await;
    let d = next_message(&ch, "dlq").await;
    assert_eq!(d.data, b"short-lived");
    let headers = d.properties.headers().clone().unwrap();
    assert_eq!(
        headers.inner().get("x-first-death-reason"),
        Some(&text("expired"))
    );
    assert!(broker.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_policy_applies_to_recovered_queues() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let broker = start_broker_with(|c| c.data_dir = dir.clone()).await;
    {
        let (_conn, ch) = channel(&broker).await;
        declare_durable(&ch, "pol.dlq", FieldTable::default()).await;
        declare_durable(&ch, "pol.orders", FieldTable::default()).await;
        publish(&ch, "pol.orders", "old", BasicProperties::default()).await;
        assert_eq!(
            broker
                .broker()
                .vhost("/")
                .unwrap()
                .queue("pol.orders")
                .unwrap()
                .settings()
                .policy
                .clone(),
            None
        );
    }
    assert!(broker.stop().await);

    let with_policy = Config::from_str(
        &format!(
            "{EMBEDDED_CONFIG}\n[[policies]]\nname = \"short\"\npattern = \"^pol\\\\.orders$\"\n\
             definition = {{ \"message-ttl\" = 100, \"dead-letter-exchange\" = \"\", \
             \"dead-letter-routing-key\" = \"pol.dlq\" }}\n"
        ),
        "test",
    )
    .unwrap()
    .policies;
    let broker = start_broker_with(|c| {
        c.data_dir = dir.clone();
        c.policies = with_policy;
    })
    .await;
    let q = broker
        .broker()
        .vhost("/")
        .unwrap()
        .queue("pol.orders")
        .unwrap();
    assert_eq!(q.settings().policy.as_deref(), Some("short"));
    let (_conn, ch) = channel(&broker).await;
    let d = next_message(&ch, "pol.dlq").await;
    assert_eq!(d.data, b"old");
    assert!(broker.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_publish_nacks_exactly_the_refused_publishes_of_a_pipeline() {
    use lapin::Confirmation;
    let broker = start_broker_with(|_| {}).await;
    let (_conn, ch) = channel(&broker).await;
    let args = table(&[
        ("x-max-length", AMQPValue::LongInt(2)),
        ("x-overflow", text("reject-publish")),
    ]);
    declare_durable(&ch, "bounded", args).await;
    // Six publishes in flight at once, every other one persistent (its confirm
    // waits for the fsync): acks (with `multiple`) and nacks must come out in
    // sequence-number order.
    let mut pending = Vec::new();
    for i in 0..6 {
        let persistent = i % 2 == 0;
        let props = if persistent {
            BasicProperties::default().with_delivery_mode(2)
        } else {
            BasicProperties::default()
        };
        pending.push(
            ch.basic_publish(
                "".into(),
                "bounded".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                props,
            )
            .await
            .unwrap(),
        );
    }
    let mut outcomes = Vec::new();
    for p in pending {
        outcomes.push(match p.await.unwrap() {
            Confirmation::Ack(_) => "ack",
            Confirmation::Nack(_) => "nack",
            Confirmation::NotRequested => "none",
        });
    }
    assert_eq!(outcomes, ["ack", "ack", "nack", "nack", "nack", "nack"]);
    assert!(broker.stop().await);
}

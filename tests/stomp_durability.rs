//! STOMP and durability: a RECEIPT for a persistent SEND means the message is on
//! disk, and INTEROP.md worked example 5 (an AMQP publisher's confirmed
//! persistent message survives `kill -9` and reaches a STOMP subscriber of
//! `/amq/queue/<q>` after the restart). The broker runs as a child process so it
//! can be killed for real.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use switchyard_testkit::child::ChildBroker;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use switchyard_testkit::stomp::codec::{Command as Stomp, Frame};
use switchyard_testkit::stomp::StompClient;

/// The broker binary on `data` (every listener on a free port) as run `run`.
fn start_child(data: &Path, run: usize) -> ChildBroker {
    ChildBroker::start_in(Path::new(env!("CARGO_BIN_EXE_switchyard")), data, run, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipted_persistent_sends_survive_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let broker = start_child(data.path(), 1);
    let mut c = StompClient::connect(broker.addr("stomp")).await;
    // Receipts are asked for in one burst; each comes only after the fsync that
    // covers its message (one fsync may cover many).
    let n = 200;
    let mut burst = bytes::BytesMut::new();
    for i in 0..n {
        Frame::new(Stomp::Send)
            .header("destination", "/queue/durable-q")
            .header("persistent", "true")
            .header("receipt", format!("r{i}"))
            .body(format!("m{i}"))
            .encode(c.version(), &mut burst);
    }
    c.send_raw(&burst).await;
    for i in 0..n {
        let r = c.recv().await;
        assert_eq!(r.command, Stomp::Receipt);
        // Receipts come in frame order.
        assert_eq!(r.get("receipt-id"), Some(format!("r{i}").as_str()));
    }
    broker.kill9();

    let broker = start_child(data.path(), 2);
    let mut c = StompClient::connect(broker.addr("stomp")).await;
    c.subscribe("s", "/amq/queue/durable-q", "client-individual", &[])
        .await;
    for i in 0..n {
        let m = c.recv_message().await;
        assert_eq!(String::from_utf8(m.body.to_vec()).unwrap(), format!("m{i}"));
        assert_eq!(m.get("persistent"), Some("true"));
    }
    broker.kill9();
}

/// INTEROP.md worked example 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worked_example_5_amqp_confirmed_message_reaches_stomp_after_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let broker = start_child(data.path(), 1);
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
    ch.basic_publish(
        "".into(),
        "orders".into(),
        BasicPublishOptions::default(),
        b"order #1",
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("text/plain".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    std::mem::forget(conn);
    broker.kill9();

    let broker = start_child(data.path(), 2);
    let mut c = StompClient::connect(broker.addr("stomp")).await;
    c.subscribe("s", "/amq/queue/orders", "auto", &[]).await;
    let m = c.recv_message().await;
    assert_eq!(&m.body[..], b"order #1");
    assert_eq!(m.get("destination"), Some("/queue/orders"));
    assert_eq!(m.get("persistent"), Some("true"));
    assert_eq!(m.get("content-type"), Some("text/plain"));
    broker.kill9();
}

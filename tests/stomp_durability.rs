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

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use switchyard_testkit::stomp::codec::{Command as Stomp, Frame};
use switchyard_testkit::stomp::StompClient;

struct ChildBroker {
    child: Child,
    amqp: SocketAddr,
    stomp: SocketAddr,
}

/// Starts the binary on `data` with AMQP and STOMP on free ports.
fn start_child(data: &Path, run: usize) -> ChildBroker {
    let config = data.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[listeners]\namqp = \"127.0.0.1:0\"\nstomp = \"127.0.0.1:0\"\n",
            data.join("data")
        ),
    )
    .unwrap();
    let ready = data.join(format!("ready-{run}.json"));
    let log = std::fs::File::create(data.join(format!("broker-{run}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("--config")
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "broker did not start; see {}",
            data.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let addr = |name: &str| -> SocketAddr {
        let key = format!("\"{name}\":\"");
        let start = text.find(&key).unwrap() + key.len();
        let end = text[start..].find('"').unwrap() + start;
        text[start..end].parse().unwrap()
    };
    ChildBroker {
        child,
        amqp: addr("amqp"),
        stomp: addr("stomp"),
    }
}

fn kill9(mut broker: ChildBroker) {
    Command::new("kill")
        .arg("-9")
        .arg(broker.child.id().to_string())
        .status()
        .unwrap();
    broker.child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipted_persistent_sends_survive_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let broker = start_child(data.path(), 1);
    let mut c = StompClient::connect(broker.stomp).await;
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
    kill9(broker);

    let broker = start_child(data.path(), 2);
    let mut c = StompClient::connect(broker.stomp).await;
    c.subscribe("s", "/amq/queue/durable-q", "client-individual", &[])
        .await;
    for i in 0..n {
        let m = c.recv_message().await;
        assert_eq!(String::from_utf8(m.body.to_vec()).unwrap(), format!("m{i}"));
        assert_eq!(m.get("persistent"), Some("true"));
    }
    kill9(broker);
}

/// INTEROP.md worked example 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worked_example_5_amqp_confirmed_message_reaches_stomp_after_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let broker = start_child(data.path(), 1);
    let conn = Connection::connect(
        &format!("amqp://guest:guest@{}/%2f", broker.amqp),
        ConnectionProperties::default(),
    )
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
    kill9(broker);

    let broker = start_child(data.path(), 2);
    let mut c = StompClient::connect(broker.stomp).await;
    c.subscribe("s", "/amq/queue/orders", "auto", &[]).await;
    let m = c.recv_message().await;
    assert_eq!(&m.body[..], b"order #1");
    assert_eq!(m.get("destination"), Some("/queue/orders"));
    assert_eq!(m.get("persistent"), Some("true"));
    assert_eq!(m.get("content-type"), Some("text/plain"));
    kill9(broker);
}

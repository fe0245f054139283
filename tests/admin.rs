//! Runtime administration end to end, over real sockets: commands applied to a
//! running broker (`Broker::apply`, what the HTTP API calls) take effect for
//! AMQP, MQTT and STOMP clients at once, close the connections they must, and
//! survive a restart and `kill -9`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod mqtt;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable as LapinTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use switchyard_core::admin::{MetaCommand, PolicySpec, UserLimits, VhostLimits, SHA256};
use switchyard_core::auth::hash_password;
use switchyard_core::connections::protocol;
use switchyard_core::{FieldTable, FieldValue};
use switchyard_mqtt::codec::{self as mqttc, Packet, Version};
use switchyard_testkit::amqp::{AmqpRaw, Closed};
use switchyard_testkit::stomp::codec::{Command, Frame as StompFrame};
use switchyard_testkit::stomp::StompClient;
use switchyard_testkit::{start_broker, start_broker_with, TestBroker};

fn put_user(name: &str, password: &str) -> MetaCommand {
    MetaCommand::PutUser {
        name: name.into(),
        password_hash: hash_password(password, [3, 1, 4, 1]),
        hashing_algorithm: SHA256.into(),
        tags: vec![],
    }
}

fn permissions(user: &str, vhost: &str, write: &str) -> MetaCommand {
    MetaCommand::SetPermissions {
        user: user.into(),
        vhost: vhost.into(),
        configure: ".*".into(),
        write: write.into(),
        read: ".*".into(),
    }
}

fn amqp_url(b: &TestBroker, user: &str, password: &str, vhost: &str) -> String {
    let a = b.amqp_addr();
    let vhost = vhost.replace('/', "%2f");
    format!("amqp://{user}:{password}@{a}/{vhost}")
}

async fn lapin(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap()
}

fn mqtt_connect(user: &str, password: &str, version: Version, id: &str) -> mqttc::Connect {
    let mut c = mqtt::connect_packet(version, id);
    c.username = Some(user.into());
    c.password = Some(bytes::Bytes::from(password.to_owned()));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_created_at_runtime_logs_in_over_amqp_mqtt_and_stomp() {
    let b = start_broker().await;
    let core = b.broker();
    // Unknown before the command: refused as RabbitMQ refuses a bad login.
    let refused = AmqpRaw::open(b.amqp_addr(), "bob", "s3cret", "/")
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code, 403);

    core.apply(put_user("bob", "s3cret")).unwrap();
    core.apply(permissions("bob", "/", ".*")).unwrap();

    // AMQP with a real client.
    let conn = lapin(&amqp_url(&b, "bob", "s3cret", "/")).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "bob.q".into(),
        QueueDeclareOptions::default(),
        LapinTable::default(),
    )
    .await
    .unwrap();
    // MQTT 3.1.1 and 5.0.
    let (m4, ack) = mqtt::Raw::connect_with(
        b.mqtt_addr(),
        mqtt_connect("bob", "s3cret", Version::V311, "bob-4"),
    )
    .await;
    assert_eq!(ack.code, 0);
    let (_m5, ack) = mqtt::Raw::connect_with(
        b.mqtt_addr(),
        mqtt_connect("bob", "s3cret", Version::V5, "bob-5"),
    )
    .await;
    assert_eq!(ack.code, 0);
    // STOMP 1.2.
    let (_stomp, connected) = StompClient::connect_with(
        b.stomp_addr(),
        "1.2",
        &[("login", "bob"), ("passcode", "s3cret")],
    )
    .await;
    assert_eq!(connected.command, Command::Connected);

    // The registry lists each with RabbitMQ's protocol string.
    let mut protocols: Vec<&str> = core
        .connections()
        .list()
        .iter()
        .filter(|c| c.info.user == "bob")
        .map(|c| c.info.protocol)
        .collect();
    protocols.sort_unstable();
    assert_eq!(
        protocols,
        vec![
            protocol::AMQP_091,
            protocol::MQTT_311,
            protocol::MQTT_50,
            protocol::STOMP_12
        ]
    );
    let amqp = core
        .connections()
        .list()
        .into_iter()
        .find(|c| c.info.protocol == protocol::AMQP_091)
        .unwrap();
    assert_eq!(amqp.info.local, b.amqp_addr());
    assert!(amqp
        .info
        .name()
        .ends_with(&format!(" -> {}", b.amqp_addr())));
    assert_eq!(amqp.channel_count(), 1);
    assert!(amqp.info.client_properties.get("product").is_some());
    m4.disconnect().await;
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_permissions_refuse_the_next_publish() {
    let b = start_broker().await;
    let core = b.broker();
    core.apply(put_user("bob", "pw")).unwrap();
    core.apply(permissions("bob", "/", ".*")).unwrap();

    let conn = lapin(&amqp_url(&b, "bob", "pw", "/")).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publish = |ch: lapin::Channel| async move {
        ch.basic_publish(
            "amq.topic".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await?
        .await
    };
    publish(ch.clone()).await.unwrap();
    let mut stomp = StompClient::connect_with(
        b.stomp_addr(),
        "1.2",
        &[("login", "bob"), ("passcode", "pw")],
    )
    .await
    .0;
    stomp.send("/topic/k", "fine", &[("receipt", "r1")]).await;
    assert_eq!(stomp.recv().await.command, Command::Receipt);

    // Write rights only on exchanges named `^allowed`: amq.topic is refused.
    core.apply(permissions("bob", "/", "^allowed")).unwrap();
    let e = publish(ch.clone()).await.unwrap_err().to_string();
    assert!(
        e.contains("access to exchange 'amq.topic' in vhost '/' refused for user 'bob'"),
        "{e}"
    );
    stomp.send("/topic/k", "refused", &[]).await;
    let error = stomp.expect_error().await;
    assert!(
        String::from_utf8_lossy(&error.body).contains("access to exchange 'amq.topic'"),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_set_at_runtime_trims_a_live_queue_and_clearing_it_lifts_it() {
    let b = start_broker().await;
    let core = b.broker();
    let conn = lapin(&b.amqp_url()).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let declare = |ch: lapin::Channel| async move {
        ch.queue_declare(
            "live".into(),
            QueueDeclareOptions::default(),
            LapinTable::default(),
        )
        .await
        .unwrap()
        .message_count()
    };
    declare(ch.clone()).await;
    for i in 0..10 {
        ch.basic_publish(
            "".into(),
            "live".into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    assert_eq!(declare(ch.clone()).await, 10);
    let mut definition = FieldTable::new();
    definition.insert("max-length", FieldValue::I64(3));
    core.apply(MetaCommand::SetPolicy(PolicySpec {
        vhost: "/".into(),
        name: "cap".into(),
        pattern: "^live$".into(),
        apply_to: "queues".into(),
        priority: 0,
        definition,
    }))
    .unwrap();
    assert_eq!(declare(ch.clone()).await, 3, "trimmed at once");
    let head = ch
        .basic_get("live".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head.delivery.data, b"m7", "the oldest were dropped");
    core.apply(MetaCommand::ClearPolicy {
        vhost: "/".into(),
        name: "cap".into(),
    })
    .unwrap();
    for _ in 0..5 {
        ch.basic_publish(
            "".into(),
            "live".into(),
            BasicPublishOptions::default(),
            b"more",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    assert_eq!(declare(ch.clone()).await, 7, "the limit is lifted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_user_closes_its_connections_the_way_of_each_protocol() {
    let b = start_broker().await;
    let core = b.broker();
    core.apply(put_user("bob", "pw")).unwrap();
    core.apply(permissions("bob", "/", ".*")).unwrap();
    let mut amqp = AmqpRaw::open(b.amqp_addr(), "bob", "pw", "/")
        .await
        .unwrap();
    let (mut m5, _) =
        mqtt::Raw::connect_with(b.mqtt_addr(), mqtt_connect("bob", "pw", Version::V5, "b5")).await;
    let (mut m4, _) = mqtt::Raw::connect_with(
        b.mqtt_addr(),
        mqtt_connect("bob", "pw", Version::V311, "b4"),
    )
    .await;
    let mut stomp = StompClient::connect_with(
        b.stomp_addr(),
        "1.2",
        &[("login", "bob"), ("passcode", "pw")],
    )
    .await
    .0;
    // Someone else's connection stays.
    let mut guest = AmqpRaw::open(b.amqp_addr(), "guest", "guest", "/")
        .await
        .unwrap();

    core.apply(MetaCommand::DeleteUser { name: "bob".into() })
        .unwrap();
    assert_eq!(
        amqp.expect_connection_close().await,
        Closed {
            code: 320,
            text: "CONNECTION_FORCED - user 'bob' is deleted".into()
        }
    );
    let last = m5.expect_closed().await;
    match last.last() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, 0x98),
        other => panic!("expected DISCONNECT 0x98, got {other:?}"),
    }
    let before_close = m4.expect_closed().await;
    assert!(before_close.is_empty(), "3.1.1 has no server DISCONNECT");
    let error = stomp.expect_error().await;
    assert_eq!(error.get("message"), Some("Connection forced"));
    stomp.expect_closed().await;
    // Gone for good: a new login is refused.
    assert_eq!(
        AmqpRaw::open(b.amqp_addr(), "bob", "pw", "/")
            .await
            .err()
            .unwrap()
            .code,
        403
    );
    assert!(guest.open_channel(1).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_with_rabbitmq_texts_over_amqp_mqtt_and_stomp() {
    let b = start_broker().await;
    let core = b.broker();
    core.apply(MetaCommand::SetVhostLimits {
        vhost: "/".into(),
        limits: VhostLimits {
            max_connections: Some(1),
            max_queues: None,
        },
    })
    .unwrap();
    let mut first = AmqpRaw::open(b.amqp_addr(), "guest", "guest", "/")
        .await
        .unwrap();
    assert_eq!(
        AmqpRaw::open(b.amqp_addr(), "guest", "guest", "/")
            .await
            .err()
            .unwrap(),
        Closed {
            code: 530,
            text: "NOT_ALLOWED - access to vhost '/' refused for user 'guest': connection limit (1) is reached".into()
        }
    );
    let (_, ack) = mqtt::Raw::connect_with(
        b.mqtt_addr(),
        mqtt_connect("guest", "guest", Version::V5, "over"),
    )
    .await;
    assert_eq!(ack.code, 0x97, "quota exceeded");
    let mut stomp = StompClient::open(b.stomp_addr()).await;
    stomp
        .send_frame(
            &StompFrame::new(Command::Connect)
                .header("accept-version", "1.2")
                .header("host", "/")
                .header("login", "guest")
                .header("passcode", "guest"),
        )
        .await;
    let error = stomp.expect_error().await;
    assert_eq!(error.get("message"), Some("Bad CONNECT"));
    assert_eq!(
        String::from_utf8_lossy(&error.body),
        "Connection refused: vhost connection limit reached"
    );

    core.apply(MetaCommand::ClearVhostLimit {
        vhost: "/".into(),
        limit: None,
    })
    .unwrap();
    core.apply(MetaCommand::SetUserLimits {
        user: "guest".into(),
        limits: UserLimits {
            max_connections: None,
            max_channels: Some(1),
        },
    })
    .unwrap();
    first.open_channel(1).await.unwrap();
    assert_eq!(
        first.open_channel(2).await.unwrap_err(),
        Closed {
            code: 530,
            text: "NOT_ALLOWED - number of channels opened for user 'guest' has reached the maximum allowed user limit of 1".into()
        }
    );
    core.apply(MetaCommand::SetVhostLimits {
        vhost: "/".into(),
        limits: VhostLimits {
            max_connections: None,
            max_queues: Some(0),
        },
    })
    .unwrap();
    let conn = lapin(&b.amqp_url()).await;
    let ch = conn.create_channel().await.unwrap();
    let e = ch
        .queue_declare(
            "nope".into(),
            QueueDeclareOptions::default(),
            LapinTable::default(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot declare queue 'nope': queue limit in vhost '/' (0) is reached"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_deleted_at_runtime_is_gone_with_its_durable_queues_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let b = start_broker_with(|c| c.data_dir = dir.clone()).await;
    let core = b.broker();
    core.apply(MetaCommand::PutVhost {
        name: "shop".into(),
        description: "to be deleted".into(),
        tags: vec![],
        default_queue_type: None,
    })
    .unwrap();
    core.apply(permissions("guest", "shop", ".*")).unwrap();
    core.apply(MetaCommand::PutVhost {
        name: "kept".into(),
        description: String::new(),
        tags: vec![],
        default_queue_type: None,
    })
    .unwrap();
    core.apply(permissions("guest", "kept", ".*")).unwrap();
    for vhost in ["shop", "kept"] {
        let conn = lapin(&amqp_url(&b, "guest", "guest", vhost)).await;
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        ch.queue_declare(
            "orders".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            LapinTable::default(),
        )
        .await
        .unwrap();
        ch.basic_publish(
            "".into(),
            "orders".into(),
            BasicPublishOptions::default(),
            b"persistent",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        conn.close(200, "bye".into()).await.unwrap();
    }
    let mut in_shop = AmqpRaw::open(b.amqp_addr(), "guest", "guest", "shop")
        .await
        .unwrap();
    core.apply(MetaCommand::DeleteVhost {
        name: "shop".into(),
    })
    .unwrap();
    assert_eq!(
        in_shop.expect_connection_close().await,
        Closed {
            code: 320,
            text: "CONNECTION_FORCED - vhost 'shop' is deleted".into()
        }
    );
    // The broker (and its store) must be released before the restart.
    drop(core);
    assert!(b.stop().await);

    let b = start_broker_with(|c| c.data_dir = dir.clone()).await;
    let core = b.broker();
    assert!(!core.has_vhost("shop"), "the deletion survived the restart");
    let refused = AmqpRaw::open(b.amqp_addr(), "guest", "guest", "shop")
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code, 530);
    let kept = core.queue_infos(Some("kept")).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].messages_ready, 1);
    // The same name again is a new, empty vhost.
    core.apply(MetaCommand::PutVhost {
        name: "shop".into(),
        description: String::new(),
        tags: vec![],
        default_queue_type: None,
    })
    .unwrap();
    assert!(core.queue_infos(Some("shop")).unwrap().is_empty());
    assert!(b.stop().await);
}

/// The environment variable that turns [`child_applies_commands_then_waits`]
/// into the child process of the kill -9 test: the path of its config file.
const CHILD_CONFIG: &str = "SWITCHYARD_ADMIN_TEST_CHILD_CONFIG";
/// The file the child writes once every command was applied.
const CHILD_READY: &str = "SWITCHYARD_ADMIN_TEST_CHILD_READY";

/// Durable queues the child declares in one bulk metadata change.
const BULK_QUEUES: usize = 20;

/// The runtime changes the kill -9 test makes, in the child.
fn runtime_changes() -> Vec<MetaCommand> {
    let mut definition = FieldTable::new();
    definition.insert("max-length", FieldValue::I64(2));
    vec![
        MetaCommand::PutVhost {
            name: "shop".into(),
            description: "made at runtime".into(),
            tags: vec![],
            default_queue_type: None,
        },
        put_user("bob", "pw"),
        // May publish through the default exchange only.
        permissions("bob", "shop", "^amq\\.default$"),
        MetaCommand::SetPolicy(PolicySpec {
            vhost: "shop".into(),
            name: "cap".into(),
            pattern: "^q$".into(),
            apply_to: "queues".into(),
            priority: 0,
            definition,
        }),
        // A boot definition deleted at runtime stays deleted.
        MetaCommand::DeleteUser {
            name: "guest".into(),
        },
    ]
}

/// Not a test by itself: the child process of
/// `runtime_changes_survive_kill_9_of_the_broker`, which runs this test binary
/// with [`CHILD_CONFIG`] set. It starts the broker from that config (the same
/// code the binary runs), applies [`runtime_changes`], says so in
/// [`CHILD_READY`] and waits to be killed. Without the variable it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_applies_commands_then_waits() {
    let (Ok(config), Ok(ready)) = (std::env::var(CHILD_CONFIG), std::env::var(CHILD_READY)) else {
        return;
    };
    let config = switchyard_server::Config::load(std::path::Path::new(&config)).unwrap();
    let server = switchyard_server::start(config).await.unwrap();
    for command in runtime_changes() {
        server.broker().apply(command).unwrap();
    }
    // A bulk change (what a definitions import does): durable once
    // `bulk_metadata` returns, though each declare inside did not sync.
    let shop = server.broker().vhost("shop").unwrap();
    let store = server.broker().store().unwrap();
    store
        .bulk_metadata(&mut || {
            for i in 0..BULK_QUEUES {
                shop.declare_queue(switchyard_core::vhost::QueueDeclare {
                    name: format!("bulk-{i}"),
                    options: switchyard_core::queue::QueueOptions {
                        durable: true,
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .unwrap();
            }
        })
        .unwrap();
    let amqp = server.local_addrs()["amqp"];
    std::fs::write(&ready, format!("{{\"amqp\":\"{amqp}\"}}")).unwrap();
    // Killed here by the parent (SIGKILL): nothing is shut down or flushed.
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_changes_survive_kill_9_of_the_broker() {
    use switchyard_testkit::child::{write_config, ChildBroker};
    let data = tempfile::tempdir().unwrap();
    let dir = data.path();
    let config = write_config(dir);

    // The child: this test binary, running only the child "test".
    let ready = dir.join("child-ready.json");
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "child_applies_commands_then_waits",
            "--nocapture",
        ])
        .env(CHILD_CONFIG, &config)
        .env(CHILD_READY, &ready);
    let child = ChildBroker::spawn(command, dir, "child", &ready);
    // Every apply returned before the ready file was written.
    child.kill9();

    // The real binary on the same data directory and config.
    let broker = ChildBroker::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_switchyard")),
        &config,
        dir,
        1,
    );
    let addr: std::net::SocketAddr = broker.amqp.parse().unwrap();
    // guest (a boot definition) was deleted at runtime: not created again.
    assert_eq!(
        AmqpRaw::open(addr, "guest", "guest", "/")
            .await
            .err()
            .unwrap()
            .code,
        403
    );
    // bob, his vhost, his rights and the vhost's policy are there.
    let url = format!("amqp://bob:pw@{addr}/shop");
    let conn = lapin(&url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        "q".into(),
        QueueDeclareOptions::default(),
        LapinTable::default(),
    )
    .await
    .unwrap();
    for _ in 0..5 {
        ch.basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let count = ch
        .queue_declare(
            "q".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            LapinTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(count, 2, "the runtime policy's max-length");
    for i in 0..BULK_QUEUES {
        ch.queue_declare(
            format!("bulk-{i}").as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            LapinTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("bulk-{i} after kill -9: {e}"));
    }
    let e = ch
        .basic_publish(
            "amq.topic".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("access to exchange 'amq.topic' in vhost 'shop' refused for user 'bob'"),
        "{e}"
    );
    broker.kill9();
}

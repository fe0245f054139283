//! The management HTTP API through RabbitMQ's own typed Rust client
//! (`rabbitmq_http_client`, what rabbitmqadmin v2 is built on): every response
//! is decoded into its serde structs, so a missing field or a wrong JSON type
//! fails the test. Covers every endpoint family of MANAGEMENT.md §0.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use rabbitmq_http_client::blocking_api::Client;
use rabbitmq_http_client::commons::{
    BindingDestinationType, ExchangeType, PaginationParams, PolicyTarget, SupportedProtocol,
    UserLimitTarget, VirtualHostLimitTarget,
};
use rabbitmq_http_client::password_hashing;
use rabbitmq_http_client::requests::{
    BindingDeletionParams, EnforcedLimitParams, ExchangeParams, Permissions, PolicyParams,
    QueueParams, TopicPermissions, UserParams, VirtualHostParams,
};
use serde_json::{json, Map, Value};
use switchyard_testkit::BlockingBroker;

type Api = Client<String, String, String>;

fn client(b: &BlockingBroker, user: &str, password: &str) -> Api {
    Client::new(b.broker().api_url(), user.to_owned(), password.to_owned())
}

fn args(v: Value) -> Option<Map<String, Value>> {
    match v {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

#[test]
fn overview_nodes_whoami_and_health_checks_decode() {
    let b = BlockingBroker::start();
    let api = client(&b, "guest", "guest");
    let overview = api.overview().unwrap();
    assert_eq!(overview.rabbitmq_version, "4.1.0");
    assert!(overview
        .listeners
        .iter()
        .any(|l| l.port == u32::from(b.broker().amqp_addr().port())));
    let nodes = api.list_nodes().unwrap();
    assert_eq!(nodes.len(), 1);
    assert!(!nodes[0].being_drained);
    api.get_node_info(&nodes[0].name).unwrap();
    // Measured, not placeholders: threads, descriptors, the listeners' sockets,
    // memory and disk of this very process.
    let node: Value = reqwest::blocking::Client::new()
        .get(format!("{}/nodes", b.broker().api_url()))
        .basic_auth("guest", Some("guest"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let node = &node[0];
    let positive = |k: &str| node[k].as_u64().is_some_and(|n| n > 0);
    for k in [
        "proc_used",
        "proc_total",
        "fd_used",
        "fd_total",
        "sockets_used",
        "sockets_total",
        "mem_used",
        "disk_free",
        "tokio_workers",
        "tokio_tasks",
    ] {
        assert!(positive(k), "{k}: {node}");
    }
    assert!(node["run_queue"].is_u64(), "{node}");
    assert!(node["proc_used"].as_u64() <= node["proc_total"].as_u64());
    assert!(node["sockets_used"].as_u64() <= node["fd_used"].as_u64());
    let me = api.current_user().unwrap();
    assert_eq!(me.name, "guest");
    assert_eq!(me.tags, vec!["administrator".to_owned()].into());

    api.health_check_cluster_wide_alarms().unwrap();
    api.health_check_local_alarms().unwrap();
    api.health_check_port_listener(b.broker().amqp_addr().port())
        .unwrap();
    api.health_check_protocol_listener(SupportedProtocol::AMQP)
        .unwrap();
    // No MQTT-over-TLS listener: a failed check (503), which the client reports.
    assert!(api
        .health_check_protocol_listener(SupportedProtocol::MQTTWithTLS)
        .is_err());
    assert!(api.health_check_port_listener(1).is_err());
}

#[test]
fn vhosts_users_permissions_and_limits_round_trip() {
    let b = BlockingBroker::start();
    let api = client(&b, "guest", "guest");
    api.create_vhost(&VirtualHostParams {
        name: "shop-1",
        description: Some("the shop"),
        tags: Some(vec!["prod", "eu"]),
        default_queue_type: None,
        tracing: false,
    })
    .unwrap();
    let v = api.get_vhost("shop-1").unwrap();
    assert_eq!(v.description.as_deref(), Some("the shop"));
    assert!(api
        .list_vhosts()
        .unwrap()
        .iter()
        .any(|v| v.name == "shop-1"));

    // rabbitmqadmin v2 hashes on the client and sends only the hash.
    let salt = password_hashing::salt();
    let hash = password_hashing::base64_encoded_salted_password_hash_sha256(&salt, "s3cret");
    api.create_user(&UserParams {
        name: "ann",
        password_hash: &hash,
        tags: "management",
    })
    .unwrap();
    let ann = api.get_user("ann").unwrap();
    assert_eq!(ann.tags, vec!["management".to_owned()].into());
    assert!(api.list_users().unwrap().iter().any(|u| u.name == "ann"));
    assert!(api
        .list_users_without_permissions()
        .unwrap()
        .iter()
        .any(|u| u.name == "ann"));

    api.declare_permissions(&Permissions {
        user: "ann",
        vhost: "shop-1",
        configure: "^ann-.*",
        read: ".*",
        write: ".*",
    })
    .unwrap();
    let p = api.get_permissions("shop-1", "ann").unwrap();
    assert_eq!(p.configure, "^ann-.*");
    assert!(api.list_permissions().unwrap().len() >= 2);
    // The vhost's creator (guest) got full permissions in it, as in RabbitMQ.
    assert_eq!(api.list_permissions_in("shop-1").unwrap().len(), 2);
    assert_eq!(api.list_permissions_of("ann").unwrap().len(), 1);
    api.declare_topic_permissions(&TopicPermissions {
        user: "ann",
        vhost: "shop-1",
        exchange: "amq.topic",
        write: "^orders\\.",
        read: ".*",
    })
    .unwrap();
    let tp = api.get_topic_permissions_of("shop-1", "ann").unwrap();
    assert_eq!(tp.write, "^orders\\.");
    assert_eq!(api.list_topic_permissions().unwrap().len(), 1);

    // The user logs in to the API with its own password.
    let as_ann = client(&b, "ann", "s3cret");
    assert_eq!(as_ann.current_user().unwrap().name, "ann");
    assert!(
        as_ann.list_users().is_err(),
        "management users are not admins"
    );

    api.set_vhost_limit(
        "shop-1",
        EnforcedLimitParams::new(VirtualHostLimitTarget::MaxQueues, 5),
    )
    .unwrap();
    let limits = api.list_vhost_limits("shop-1").unwrap();
    assert_eq!(limits.len(), 1);
    assert_eq!(limits[0].limits.get("max-queues"), Some(&json!(5)));
    assert_eq!(api.list_all_vhost_limits().unwrap().len(), 1);
    api.clear_vhost_limit("shop-1", VirtualHostLimitTarget::MaxQueues)
        .unwrap();
    assert!(api.list_vhost_limits("shop-1").unwrap().is_empty());
    api.set_user_limit(
        "ann",
        EnforcedLimitParams::new(UserLimitTarget::MaxConnections, 3),
    )
    .unwrap();
    assert_eq!(api.list_user_limits("ann").unwrap().len(), 1);
    assert_eq!(api.list_all_user_limits().unwrap().len(), 1);
    api.clear_user_limit("ann", UserLimitTarget::MaxConnections)
        .unwrap();

    api.clear_topic_permissions("shop-1", "ann", false).unwrap();
    api.clear_permissions("shop-1", "ann", false).unwrap();
    assert!(api.get_permissions("shop-1", "ann").is_err());
    api.delete_user("ann", false).unwrap();
    assert!(api.get_user("ann").is_err());
    api.delete_vhost("shop-1", false).unwrap();
    assert!(api.get_vhost("shop-1").is_err());
    // Idempotent deletes treat 404 as done; strict ones report it.
    api.delete_vhost("shop-1", true).unwrap();
    assert!(api.delete_vhost("shop-1", false).is_err());
}

#[test]
fn exchanges_queues_bindings_publish_get_and_purge() {
    let b = BlockingBroker::start();
    let api = client(&b, "guest", "guest");
    api.declare_exchange(
        "/",
        &ExchangeParams::durable("orders-x", ExchangeType::Topic, None),
    )
    .unwrap();
    let x = api.get_exchange_info("/", "orders-x").unwrap();
    assert_eq!(x.exchange_type, "topic");
    assert!(api
        .list_exchanges_in("/")
        .unwrap()
        .iter()
        .any(|x| x.name == "amq.direct"));
    api.declare_queue(
        "/",
        &QueueParams::new_durable_classic_queue("orders-q", args(json!({"x-max-length": 100}))),
    )
    .unwrap();
    api.declare_queue("/", &QueueParams::new_quorum_queue("work-q", None))
        .unwrap();
    let q = api.get_queue_info("/", "work-q").unwrap();
    assert_eq!(q.queue_type, "quorum");
    api.bind_queue("/", "orders-q", "orders-x", Some("new.*"), None)
        .unwrap();
    api.bind_exchange("/", "amq.fanout", "orders-x", Some("#"), None)
        .unwrap();
    let bindings = api.list_queue_bindings("/", "orders-q").unwrap();
    assert!(bindings
        .iter()
        .any(|b| b.source == "orders-x" && b.routing_key == "new.*"));
    assert!(api
        .list_exchange_bindings_with_source("/", "orders-x")
        .unwrap()
        .iter()
        .any(|b| b.destination == "amq.fanout"));
    assert!(api
        .list_exchange_bindings_with_destination("/", "amq.fanout")
        .unwrap()
        .iter()
        .any(|b| b.source == "orders-x"));
    assert!(!api.list_bindings_in("/").unwrap().is_empty());
    assert!(!api.list_bindings().unwrap().is_empty());

    let routed = api
        .publish_message("/", "orders-x", "new.eu", "hello", Map::new())
        .unwrap();
    assert!(routed.routed);
    let unrouted = api
        .publish_message("/", "orders-x", "old.eu", "nobody", Map::new())
        .unwrap();
    assert!(!unrouted.routed);
    let got = api
        .get_messages("/", "orders-q", 1, "ack_requeue_true")
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, "hello");
    assert_eq!(got[0].routing_key, "new.eu");
    // Requeued: it is still there, and marked redelivered on the next get.
    let again = api
        .get_messages("/", "orders-q", 1, "ack_requeue_false")
        .unwrap();
    assert!(again[0].redelivered);
    assert_eq!(
        api.get_queue_info("/", "orders-q").unwrap().message_count,
        0
    );

    api.publish_message("/", "orders-x", "new.us", "two", Map::new())
        .unwrap();
    let info = api.get_queue_info("/", "orders-q").unwrap();
    assert_eq!(info.message_count, 1);
    api.purge_queue("/", "orders-q").unwrap();
    assert_eq!(
        api.get_queue_info("/", "orders-q").unwrap().message_count,
        0
    );

    let paged = api
        .list_queues_paged(&PaginationParams {
            page: Some(1),
            page_size: Some(1),
        })
        .unwrap();
    assert_eq!(paged.len(), 1);
    assert!(api.list_queues().unwrap().len() >= 2);

    api.delete_binding(
        &BindingDeletionParams {
            virtual_host: "/",
            source: "orders-x",
            destination: "orders-q",
            destination_type: BindingDestinationType::Queue,
            routing_key: "new.*",
            arguments: None,
        },
        false,
    )
    .unwrap();
    assert!(!api
        .list_queue_bindings("/", "orders-q")
        .unwrap()
        .iter()
        .any(|b| b.source == "orders-x"));
    api.delete_queue("/", "orders-q", false).unwrap();
    api.delete_exchange("/", "orders-x", false).unwrap();
    assert!(api.get_queue_info("/", "orders-q").is_err());
    assert!(api.get_exchange_info("/", "orders-x").is_err());
}

#[test]
fn policies_operator_policies_parameters_and_definitions() {
    let b = BlockingBroker::start();
    let api = client(&b, "guest", "guest");
    let mut def = Map::new();
    def.insert("max-length".into(), json!(10));
    api.declare_policy(&PolicyParams {
        vhost: "/",
        name: "cap",
        pattern: "^capped\\.",
        apply_to: PolicyTarget::Queues,
        priority: 1,
        definition: def.clone(),
    })
    .unwrap();
    let p = api.get_policy("/", "cap").unwrap();
    assert_eq!(p.pattern, "^capped\\.");
    assert_eq!(api.list_policies().unwrap().len(), 1);
    assert_eq!(api.list_policies_in("/").unwrap().len(), 1);
    api.declare_operator_policy(&PolicyParams {
        vhost: "/",
        name: "op-cap",
        pattern: ".*",
        apply_to: PolicyTarget::Queues,
        priority: 0,
        definition: def,
    })
    .unwrap();
    assert_eq!(api.list_operator_policies().unwrap().len(), 1);
    api.get_operator_policy("/", "op-cap").unwrap();
    api.delete_operator_policy("/", "op-cap", false).unwrap();

    assert!(api.list_runtime_parameters().unwrap().is_empty());
    assert!(api.list_global_runtime_parameters().unwrap().len() == 1);

    api.declare_queue(
        "/",
        &QueueParams::new_durable_classic_queue("capped.one", None),
    )
    .unwrap();
    let exported: Value =
        serde_json::from_str(&api.export_cluster_wide_definitions().unwrap()).unwrap();
    assert_eq!(exported["policies"][0]["name"], "cap");
    assert!(exported["queues"]
        .as_array()
        .unwrap()
        .iter()
        .any(|q| q["name"] == "capped.one"));
    let typed = api.export_cluster_wide_definitions_as_data().unwrap();
    assert!(typed.users.iter().any(|u| u.name == "guest"));
    let vhost_defs = api.export_vhost_definitions_as_data("/").unwrap();
    assert!(vhost_defs.queues.iter().any(|q| q.name == "capped.one"));

    // What was exported imports back after deletion.
    api.delete_queue("/", "capped.one", false).unwrap();
    api.delete_policy("/", "cap", false).unwrap();
    api.import_cluster_wide_definitions(exported).unwrap();
    api.get_queue_info("/", "capped.one").unwrap();
    api.get_policy("/", "cap").unwrap();
}

#[test]
fn connections_channels_and_consumers_lists_decode() {
    let b = BlockingBroker::start();
    let api = client(&b, "guest", "guest");
    // Whatever the adapters register, the lists must decode.
    api.list_connections().unwrap();
    api.list_channels().unwrap();
    api.list_consumers().unwrap();
    assert!(api.close_connection("nope", Some("bye"), false).is_err());
}

/// What a channel really does shows in `/api/channels`, and each consumer
/// names its channel and connection (`channel_details`), in `/api/consumers`
/// and in the queue's `consumer_details`: lapin sets a prefetch, turns on
/// confirms, publishes and leaves three deliveries unacknowledged.
#[test]
fn channels_report_prefetch_confirms_and_unacked_and_consumers_their_channel() {
    use futures_util::StreamExt;
    use lapin::options::{
        BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let b = BlockingBroker::start();
    let api = client(&b, "guest", "guest");
    let url = b.broker().amqp_url();
    let (conn, ch, tx_ch, mut consumer) = b.block_on(async {
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            "cd.q".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.basic_qos(7, BasicQosOptions::default()).await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let consumer = ch
            .basic_consume(
                "cd.q".into(),
                "cd-tag".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        // A second channel: a channel-wide prefetch, a transaction holding
        // one publish.
        let tx_ch = conn.create_channel().await.unwrap();
        tx_ch
            .basic_qos(11, BasicQosOptions { global: true })
            .await
            .unwrap();
        tx_ch.tx_select().await.unwrap();
        tx_ch
            .basic_publish(
                "".into(),
                "nowhere".into(),
                BasicPublishOptions::default(),
                b"held",
                BasicProperties::default(),
            )
            .await
            .unwrap();
        for i in 0..3u8 {
            ch.basic_publish(
                "".into(),
                "cd.q".into(),
                BasicPublishOptions::default(),
                &[i],
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        (conn, ch, tx_ch, consumer)
    });
    // Three deliveries received and not acked.
    b.block_on(async {
        for _ in 0..3 {
            consumer.next().await.unwrap().unwrap();
        }
    });
    // tx.select-ok came back after the publish frames were sent: one more
    // round trip makes sure the broker handled that publish too.
    b.block_on(tx_ch.basic_qos(11, BasicQosOptions { global: true }))
        .unwrap();

    let connections = api.list_connections().unwrap();
    assert_eq!(connections.len(), 1);
    let connection = &connections[0];
    // lapin accepts the server's channel_max (2047 by default) and frame_max.
    assert_eq!(connection.channel_max, Some(2047));
    let raw: Value = reqwest::blocking::Client::new()
        .get(format!("{}/connections", b.broker().api_url()))
        .basic_auth("guest", Some("guest"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(raw[0]["frame_max"], 131_072, "{raw}");
    assert_eq!(raw[0]["auth_mechanism"], "PLAIN", "{raw}");
    assert!(raw[0]["timeout"].is_u64(), "{raw}");
    let channels = api.list_channels().unwrap();
    assert_eq!(channels.len(), 2, "{channels:?}");
    let consuming = channels
        .iter()
        .find(|c| c.id == u32::from(ch.id()))
        .unwrap();
    assert_eq!(consuming.prefetch_count, 7);
    assert!(consuming.has_publisher_confirms_enabled);
    assert_eq!(consuming.messages_unacknowledged, 3);
    assert_eq!(consuming.messages_unconfirmed, 0);
    assert_eq!(consuming.consumer_count, 1);
    assert_eq!(consuming.connection_details.name, connection.name);

    // The fields RabbitMQ has and the typed client does not decode.
    let raw: Value = reqwest::blocking::Client::new()
        .get(format!("{}/channels", b.broker().api_url()))
        .basic_auth("guest", Some("guest"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let tx_raw = raw
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["number"] == json!(tx_ch.id()))
        .unwrap();
    assert_eq!(tx_raw["transactional"], json!(true));
    assert_eq!(tx_raw["confirm"], json!(false));
    assert_eq!(tx_raw["global_prefetch_count"], json!(11));
    assert_eq!(tx_raw["messages_uncommitted"], json!(1));

    let consumers = api.list_consumers().unwrap();
    assert_eq!(consumers.len(), 1);
    let details = consumers[0].channel_details.as_ref().unwrap();
    assert_eq!(details.id, u32::from(ch.id()));
    assert_eq!(details.connection_name, connection.name);
    assert_eq!(details.name, consuming.name);
    assert_eq!(details.username, "guest");
    assert_eq!(Some(details.client_port), connection.client_port);
    assert!(!details.node.is_empty());

    let queue: Value = reqwest::blocking::Client::new()
        .get(format!("{}/queues/%2F/cd.q", b.broker().api_url()))
        .basic_auth("guest", Some("guest"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let cd = &queue["consumer_details"];
    assert_eq!(cd.as_array().unwrap().len(), 1, "{queue}");
    assert_eq!(cd[0]["consumer_tag"], json!("cd-tag"));
    assert_eq!(
        cd[0]["channel_details"]["connection_name"],
        json!(connection.name)
    );
    assert_eq!(cd[0]["channel_details"]["number"], json!(ch.id()));

    // RabbitMQ's light listings: definitions only, or with the queue totals.
    let light = |query: &str| -> Value {
        reqwest::blocking::Client::new()
            .get(format!("{}/queues/%2F?{query}", b.broker().api_url()))
            .basic_auth("guest", Some("guest"))
            .send()
            .unwrap()
            .json::<Value>()
            .unwrap()[0]
            .clone()
    };
    assert!(queue.get("message_stats").is_some(), "{queue}");
    let bare = light("disable_stats=true");
    assert_eq!(bare["name"], json!("cd.q"));
    assert!(
        bare.get("message_stats").is_none() && bare.get("messages").is_none(),
        "{bare}"
    );
    let totals = light("disable_stats=true&enable_queue_totals=true");
    assert_eq!(totals["messages"], json!(3), "{totals}");
    assert!(totals.get("message_stats").is_none(), "{totals}");

    b.block_on(conn.close(200, "bye".into())).unwrap();
}

/// An MQTT connection shows its one channel: its subscription and its
/// in-flight window.
#[test]
fn an_mqtt_session_shows_as_one_channel() {
    let b = BlockingBroker::start();
    let api = client(&b, "guest", "guest");
    let mqtt = b.broker().mqtt_addr();
    let opts = rumqttc::MqttOptions::new("chan-view", mqtt.ip().to_string(), mqtt.port());
    let (mqtt_client, mut events) = rumqttc::AsyncClient::new(opts, 10);
    let (tx, rx) = std::sync::mpsc::channel();
    let poller = b.spawn(async move {
        while let Ok(e) = events.poll().await {
            if let rumqttc::Event::Incoming(p) = e {
                let _ = tx.send(format!("{p:?}"));
            }
        }
    });
    let wait_for = |what: &str| loop {
        let p = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        if p.starts_with(what) {
            return;
        }
    };
    wait_for("ConnAck");
    b.block_on(mqtt_client.subscribe("chan/view", rumqttc::QoS::AtLeastOnce))
        .unwrap();
    wait_for("SubAck");

    let channels = api.list_channels().unwrap();
    assert_eq!(channels.len(), 1, "{channels:?}");
    let c = &channels[0];
    assert_eq!(c.consumer_count, 1);
    // The broker's default `[mqtt] max_inflight_messages` (Mosquitto's).
    assert_eq!(c.prefetch_count, 20);
    assert!(c.has_publisher_confirms_enabled);
    let connections = api.list_connections().unwrap();
    assert_eq!(c.connection_details.name, connections[0].name);
    let consumers = api.list_consumers().unwrap();
    let details = consumers[0].channel_details.as_ref().unwrap();
    assert_eq!(details.name, c.name);

    b.block_on(mqtt_client.disconnect()).unwrap();
    poller.abort();
}

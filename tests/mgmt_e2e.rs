//! Runtime administration over HTTP, end to end with real clients: a user made
//! with the management API logs in over AMQP, MQTT and STOMP, is listed under
//! `/api/connections` with RabbitMQ's protocol strings, loses its write
//! permission over HTTP and is refused its next publish, and is disconnected by
//! `DELETE /api/connections/{name}`; a policy set over HTTP trims a live queue;
//! `peek` browses without consuming.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::{json, Value};
use switchyard_testkit::stomp::codec::Command;
use switchyard_testkit::stomp::StompClient;
use switchyard_testkit::BlockingBroker;

struct Http {
    client: Client,
    api: String,
}

impl Http {
    fn new(b: &BlockingBroker) -> Http {
        Http {
            client: Client::new(),
            api: b.broker().api_url(),
        }
    }
    fn put(&self, path: &str, body: Value) -> StatusCode {
        self.client
            .put(format!("{}{path}", self.api))
            .basic_auth("guest", Some("guest"))
            .json(&body)
            .send()
            .unwrap()
            .status()
    }
    fn get(&self, path: &str) -> Value {
        let r = self
            .client
            .get(format!("{}{path}", self.api))
            .basic_auth("guest", Some("guest"))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r.json().unwrap()
    }
    fn post(&self, path: &str, body: Value) -> Value {
        let r = self
            .client
            .post(format!("{}{path}", self.api))
            .basic_auth("guest", Some("guest"))
            .json(&body)
            .send()
            .unwrap();
        assert!(r.status().is_success(), "POST {path}: {}", r.status());
        r.json().unwrap()
    }
}

/// Polls `f` until it returns `Some`, for what the broker does after an HTTP
/// call returned (a connection's close, an adapter registering).
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connections_by_protocol(http: &Http) -> Vec<(String, String, String)> {
    let mut v: Vec<(String, String, String)> = http
        .get("/connections")
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["protocol"].as_str().unwrap().to_owned(),
                c["user"].as_str().unwrap().to_owned(),
                c["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_user_made_over_http_logs_in_everywhere_and_is_governed_over_http() {
    let b = BlockingBroker::start();
    let http = Http::new(&b);
    assert_eq!(
        http.put("/users/app", json!({"password": "app-pw", "tags": ""})),
        StatusCode::CREATED
    );
    assert_eq!(
        http.put(
            "/permissions/%2F/app",
            json!({"configure": ".*", "write": ".*", "read": ".*"})
        ),
        StatusCode::CREATED
    );

    // AMQP.
    let amqp = b.broker().amqp_addr();
    let conn = b.block_on(async {
        Connection::connect(
            &format!("amqp://app:app-pw@{amqp}/%2f"),
            ConnectionProperties::default(),
        )
        .await
        .unwrap()
    });
    let ch = b.block_on(conn.create_channel()).unwrap();
    b.block_on(ch.queue_declare(
        "app-q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .unwrap();
    b.block_on(ch.confirm_select(ConfirmSelectOptions::default()))
        .unwrap();
    let publish = |body: &'static [u8]| {
        b.block_on(async {
            ch.basic_publish(
                "".into(),
                "app-q".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await?
            .await
        })
    };
    publish(b"one").unwrap();

    // MQTT 3.1.1, kept polled so the connection stays open.
    let mqtt = b.broker().mqtt_addr();
    let mut opts = rumqttc::MqttOptions::new("app-device", amqp.ip().to_string(), mqtt.port());
    opts.set_credentials("app", "app-pw");
    let (mqtt_client, mut events) = rumqttc::AsyncClient::new(opts, 10);
    let (acked_tx, acked_rx) = std::sync::mpsc::channel();
    let poller = b.block_on(async {
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                        let _ = acked_tx.send(Ok(ack.code));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = acked_tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        })
    });
    let code = acked_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(code, Ok(rumqttc::ConnectReturnCode::Success));

    // STOMP 1.2.
    let stomp_addr = b.broker().stomp_addr();
    let mut stomp = b.block_on(async {
        StompClient::connect_with(
            stomp_addr,
            "1.2",
            &[("login", "app"), ("passcode", "app-pw")],
        )
        .await
        .0
    });

    // All three are listed, with RabbitMQ's protocol strings and the user.
    let listed = eventually("three connections of app", || {
        let c: Vec<_> = connections_by_protocol(&http)
            .into_iter()
            .filter(|(_, user, _)| user == "app")
            .collect();
        (c.len() == 3).then_some(c)
    });
    let protocols: Vec<&str> = listed.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(protocols, ["AMQP 0-9-1", "MQTT 3-1-1", "STOMP 1-2"]);
    let overview = http.get("/overview");
    assert!(overview["object_totals"]["connections"].as_u64().unwrap() >= 3);

    // Write permission taken away over HTTP: the next publish is refused (403).
    assert_eq!(
        http.put(
            "/permissions/%2F/app",
            json!({"configure": ".*", "write": "^$", "read": ".*"})
        ),
        StatusCode::NO_CONTENT
    );
    let refused = publish(b"two").unwrap_err().to_string();
    assert!(refused.contains("ACCESS_REFUSED"), "{refused}");

    // Closing the STOMP connection over HTTP, with a reason its client is told.
    let (_, _, stomp_name) = listed
        .iter()
        .find(|(p, _, _)| p == "STOMP 1-2")
        .unwrap()
        .clone();
    let r = http
        .client
        .delete(format!(
            "{}/connections/{}",
            http.api,
            percent_encode(&stomp_name)
        ))
        .basic_auth("guest", Some("guest"))
        .header("X-Reason", "maintenance window")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let error = b.block_on(stomp.recv());
    assert_eq!(error.command, Command::Error);
    assert!(
        format!("{error:?}").contains("maintenance window"),
        "{error:?}"
    );
    eventually("the STOMP connection to leave the list", || {
        (!connections_by_protocol(&http)
            .iter()
            .any(|(p, _, _)| p == "STOMP 1-2"))
        .then_some(())
    });
    b.block_on(mqtt_client.disconnect()).unwrap();
    poller.abort();
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

#[test]
fn a_policy_set_over_http_trims_a_live_queue_and_peek_does_not_consume() {
    let b = BlockingBroker::start();
    let http = Http::new(&b);
    assert_eq!(
        http.put("/queues/%2F/live.q", json!({"durable": true})),
        StatusCode::CREATED
    );
    for i in 0..10 {
        let routed = http.post(
            "/exchanges/%2F/amq.default/publish",
            json!({"routing_key": "live.q", "payload": format!("m{i}"),
                   "payload_encoding": "string", "properties": {"delivery_mode": 2}}),
        );
        assert_eq!(routed, json!({"routed": true}));
    }
    // Peek: the head, twice, unchanged, and nothing is redelivered.
    for _ in 0..2 {
        let peeked = http.get("/queues/%2F/live.q/peek?count=3");
        let bodies: Vec<&str> = peeked
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["payload"].as_str().unwrap())
            .collect();
        assert_eq!(bodies, ["m0", "m1", "m2"]);
        assert!(peeked
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["redelivered"] == json!(false)));
    }
    let q = http.get("/queues/%2F/live.q");
    assert_eq!(
        (
            q["messages_ready"].as_u64(),
            q["messages_unacknowledged"].as_u64()
        ),
        (Some(10), Some(0))
    );

    assert_eq!(
        http.put(
            "/policies/%2F/cap",
            json!({"pattern": "^live\\.", "definition": {"max-length": 3}, "apply-to": "queues"})
        ),
        StatusCode::CREATED
    );
    let q = http.get("/queues/%2F/live.q");
    assert_eq!(q["messages"], json!(3));
    assert_eq!(q["policy"], json!("cap"));
    // The oldest were dropped (drop-head): the newest three remain.
    let got = http.post(
        "/queues/%2F/live.q/get",
        json!({"count": 5, "ackmode": "ack_requeue_false", "encoding": "auto"}),
    );
    let bodies: Vec<&str> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["m7", "m8", "m9"]);
}

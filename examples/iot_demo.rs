//! The IoT demo: simulated MQTT sensors publish temperature readings; an AMQP
//! analytics service computes per-device aggregates and raises alerts that go
//! back to the devices over MQTT.
//!
//! ```text
//! sensor dev-N  --MQTT PUBLISH sensors/dev-N/temp (QoS 1)-->  amq.topic
//!   amq.topic  --sensors.*.temp-->  AMQP queue "iot-analytics"  -->  analytics service
//!   analytics  --AMQP publish amq.topic key alerts.dev-N (persistent)-->  amq.topic
//!   amq.topic  --MQTT subscription alerts/dev-N (QoS 1)-->  sensor dev-N
//! ```
//!
//! MQTT topics and AMQP routing keys are the same thing with `/` and `.` swapped
//! (INTEROP.md), and a persistent AMQP message arrives at MQTT QoS 1.
//!
//! Run a broker (`cargo run --release`), then `cargo run --example iot_demo`, or
//! run everything in one process with `cargo run --example iot_demo -- --embedded`.
//! `MQTT_ADDR` (default `127.0.0.1:1883`) and `AMQP_ADDR` (default
//! `127.0.0.1:5672`) point it elsewhere; `--seconds N` sets how long it runs
//! (default 15). It exits with an error if no alert made the round trip.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, QueueBindArguments,
    QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::BasicProperties;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Readings above this raise an alert.
const THRESHOLD: f64 = 30.0;
const DEVICES: [&str; 3] = ["dev-1", "dev-2", "dev-3"];

fn env_addr(name: &str, default: &str) -> SocketAddr {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .parse()
        .unwrap_or_else(|e| panic!("{name}: not an address: {e}"))
}

/// One simulated device: publishes a reading every 300 ms (dev-3 runs hot and
/// keeps warming up) and prints the alerts the analytics service sends it.
async fn sensor(
    mqtt: SocketAddr,
    id: &'static str,
    alerts: Arc<AtomicUsize>,
    stop: tokio::time::Instant,
) {
    let mut opts = MqttOptions::new(id, mqtt.ip().to_string(), mqtt.port());
    opts.set_credentials("guest", "guest");
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(opts, 32);
    client
        .subscribe(format!("alerts/{id}"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let publisher = client.clone();
    tokio::spawn(async move {
        let mut temp: f64 = if id == "dev-3" { 27.0 } else { 21.0 };
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        while tokio::time::Instant::now() < stop {
            tick.tick().await;
            // A small random walk; the hot device drifts upwards.
            temp += rand::random::<f64>() - if id == "dev-3" { 0.3 } else { 0.5 };
            let body = format!("{temp:.2}");
            if publisher
                .publish(format!("sensors/{id}/temp"), QoS::AtLeastOnce, false, body)
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = publisher.disconnect().await;
    });
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                alerts.fetch_add(1, Ordering::Relaxed);
                println!(
                    "  [{id}] ALERT via MQTT {} (QoS {:?}): {}",
                    p.topic,
                    p.qos,
                    String::from_utf8_lossy(&p.payload)
                );
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// The AMQP analytics service: consumes every temperature reading, keeps a
/// rolling average per device, prints aggregates, and publishes an alert to
/// `amq.topic` with key `alerts.<device>` when a reading crosses the threshold.
async fn analytics(
    amqp: SocketAddr,
    stop: tokio::time::Instant,
    ready: tokio::sync::oneshot::Sender<()>,
) -> usize {
    let conn = Connection::open(&OpenConnectionArguments::new(
        &amqp.ip().to_string(),
        amqp.port(),
        "guest",
        "guest",
    ))
    .await
    .unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_declare(
        QueueDeclareArguments::new("iot-analytics")
            .durable(false)
            .finish(),
    )
    .await
    .unwrap();
    ch.queue_bind(QueueBindArguments::new(
        "iot-analytics",
        "amq.topic",
        "sensors.*.temp",
    ))
    .await
    .unwrap();
    let (_tag, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new("iot-analytics", "analytics")
                .manual_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    println!("analytics: consuming 'iot-analytics' (amq.topic, sensors.*.temp)");
    let _ = ready.send(());
    let mut windows: HashMap<String, Vec<f64>> = HashMap::new();
    let mut seen = 0usize;
    let mut raised = 0usize;
    while let Ok(Some(msg)) = tokio::time::timeout_at(stop, rx.recv()).await {
        let deliver = msg.deliver.unwrap();
        // Routing key sensors.<device>.temp: MQTT topic sensors/<device>/temp.
        let device = deliver
            .routing_key()
            .split('.')
            .nth(1)
            .unwrap_or("?")
            .to_owned();
        let value: f64 = String::from_utf8_lossy(msg.content.as_deref().unwrap_or_default())
            .parse()
            .unwrap_or(f64::NAN);
        let persistent = msg
            .basic_properties
            .as_ref()
            .and_then(|p| p.delivery_mode())
            == Some(2);
        ch.basic_ack(BasicAckArguments::new(deliver.delivery_tag(), false))
            .await
            .unwrap();
        let w = windows.entry(device.clone()).or_default();
        w.push(value);
        if w.len() > 10 {
            w.remove(0);
        }
        seen += 1;
        if seen.is_multiple_of(15) {
            let summary: Vec<String> = windows
                .iter()
                .map(|(d, w)| format!("{d} avg {:.2}", w.iter().sum::<f64>() / w.len() as f64))
                .collect();
            println!(
                "analytics: {seen} readings (persistent: {persistent}); {}",
                summary.join(", ")
            );
        }
        if value > THRESHOLD {
            let text = format!("{value:.2} > {THRESHOLD}: cool down");
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("text/plain")
                .finish();
            ch.basic_publish(
                props,
                text.into_bytes(),
                BasicPublishArguments::new("amq.topic", &format!("alerts.{device}")),
            )
            .await
            .unwrap();
            raised += 1;
        }
    }
    println!("analytics: {seen} readings, {raised} alerts raised");
    let _ = conn.close().await;
    raised
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    // `--embedded`: a broker in this process (the test kit's, on free ports).
    let embedded = if args.iter().any(|a| a == "--embedded") {
        Some(switchyard_testkit::start_broker().await)
    } else {
        None
    };
    let (mqtt, amqp) = match &embedded {
        Some(b) => (b.mqtt_addr(), b.amqp_addr()),
        None => (
            env_addr("MQTT_ADDR", "127.0.0.1:1883"),
            env_addr("AMQP_ADDR", "127.0.0.1:5672"),
        ),
    };
    println!("iot demo: MQTT {mqtt}, AMQP {amqp}, {seconds} s, alert above {THRESHOLD}");
    let stop = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let service = tokio::spawn(analytics(amqp, stop + Duration::from_millis(500), ready_tx));
    // The sensors start once the service's queue is bound, so no reading is lost.
    ready.await.unwrap();
    let alerts = Arc::new(AtomicUsize::new(0));
    for id in DEVICES {
        tokio::spawn(sensor(mqtt, id, alerts.clone(), stop));
    }
    let raised = service.await.unwrap();
    let received = alerts.load(Ordering::Relaxed);
    println!(
        "iot demo: {raised} alerts raised over AMQP, {received} received by devices over MQTT"
    );
    if received == 0 {
        eprintln!("iot demo: no alert made the round trip");
        std::process::exit(1);
    }
}

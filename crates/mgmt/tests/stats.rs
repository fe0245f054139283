//! Message statistics and Prometheus metrics end to end: a real AMQP client
//! (lapin) publishes, consumes, gets and acks on a broker on port 0; the
//! counters, rates and `message_stats` JSON must say exactly that, and a scrape
//! of the Prometheus router served on its own port-0 listener must carry the
//! same figures, pass `promtool check metrics`, and hold exactly one
//! `rabbitmq_identity_info` series.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::process::Stdio;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use switchyard_core::stats::{Protocol, Range, Stat};
use switchyard_mgmt::{Management, NodeInfo};
use switchyard_testkit::http::http_get;
use switchyard_testkit::start_broker;

/// Serves the Prometheus router on 127.0.0.1 port 0 until the test ends.
async fn serve_prometheus(m: Management) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, switchyard_mgmt::prometheus_router(m))
            .await
            .unwrap();
    });
    addr
}

/// Runs `promtool check metrics` on a scrape: `None` when promtool is not
/// installed (scripts/install-test-deps installs it), else its exit code and
/// output.
async fn promtool_check(scrape: &str) -> Option<(i32, String)> {
    let scrape = scrape.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = match std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("cannot run promtool: {e}"),
        };
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(scrape.as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some((out.status.code().unwrap_or(-1), text))
    })
    .await
    .unwrap()
}

/// The value of the one series whose name-and-labels text is `series`.
fn value_of(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_rates_and_prometheus_follow_real_traffic() {
    let broker = start_broker().await;
    let core = broker.broker();
    let conn = Connection::connect(&broker.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "work".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // The baseline sample: rates are measured from here.
    let t0 = 1_000_000_000_000;
    core.sample_stats_now(t0);

    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..10u8 {
        ch.basic_publish(
            "".into(),
            "work".into(),
            BasicPublishOptions::default(),
            &[i; 16],
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    // One unroutable mandatory publish (returned) and one not (dropped).
    for mandatory in [true, false] {
        ch.basic_publish(
            "amq.direct".into(),
            "nowhere".into(),
            BasicPublishOptions {
                mandatory,
                ..Default::default()
            },
            b"lost",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    ch.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "work".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..10 {
        let d = consumer.next().await.unwrap().unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    // basic.get on the empty queue: get-empty. Its reply also proves the acks
    // before it were handled (one channel, frames in order).
    let got = ch
        .basic_get("work".into(), BasicGetOptions::default())
        .await
        .unwrap();
    assert!(got.is_none());

    // What the queue counted.
    let q = core.vhost("/").unwrap().queue("work").unwrap();
    let (counts, lengths) = q.counters();
    assert_eq!(counts.get(Stat::Publish), 10);
    assert_eq!(counts.get(Stat::Deliver), 10);
    assert_eq!(counts.get(Stat::Ack), 10);
    assert_eq!(counts.get(Stat::GetEmpty), 1);
    assert_eq!(lengths.messages, 0);

    // What the channel counted.
    let channel = core
        .stats
        .sources()
        .into_iter()
        .find(|s| s.is_channel)
        .expect("the channel is registered");
    let c = channel.snapshot();
    assert_eq!(c.get(Stat::Publish), 12);
    assert_eq!(c.get(Stat::Confirm), 12);
    assert_eq!(c.get(Stat::ReturnUnroutable), 1);
    assert_eq!(c.get(Stat::DropUnroutable), 1);
    assert_eq!(c.get(Stat::Deliver), 10);
    assert_eq!(c.get(Stat::Ack), 10);
    assert_eq!(c.get(Stat::GetEmpty), 1);
    // What the channel is set to and has in flight (published by its session
    // before the get-empty reply went out).
    let st = channel.state();
    assert_eq!(st.prefetch_count, 5);
    assert!(st.confirm && !st.transactional);
    assert_eq!(
        (st.messages_unacknowledged, st.messages_unconfirmed),
        (0, 0)
    );
    let channel_label = format!(
        "{{channel=\"{} ({})\"}}",
        channel.connection, channel.channel
    );

    // Five seconds later (time is passed in): rates over the interval.
    core.sample_stats_now(t0 + 5_000);
    let ms = serde_json::to_value(q.message_stats(None)).unwrap();
    assert_eq!(ms["publish"], 10);
    assert_eq!(ms["publish_details"]["rate"], 2.0);
    assert_eq!(ms["deliver_get"], 10);
    assert_eq!(ms["deliver_get_details"]["rate"], 2.0);
    assert_eq!(ms["ack_details"]["rate"], 2.0);
    assert!(ms.get("get").is_none(), "no activity, no key: {ms}");
    let with_samples = serde_json::to_value(q.message_stats(Some(Range {
        age_ms: 60_000,
        incr_ms: 5_000,
    })))
    .unwrap();
    let samples = with_samples["publish_details"]["samples"]
        .as_array()
        .unwrap();
    assert_eq!(samples[0]["sample"], 10);
    assert_eq!(samples[0]["timestamp"], t0 + 5_000);
    assert_eq!(samples[1]["sample"], 0);

    let x = core.vhost("/").unwrap().exchange("amq.direct").unwrap();
    let xs = serde_json::to_value(x.message_stats(None)).unwrap();
    assert_eq!(xs["publish_in"], 2);
    assert!(xs.get("publish_out").is_none(), "nothing routed: {xs}");

    let overview = serde_json::to_value(core.message_stats(None)).unwrap();
    assert_eq!(overview["publish"], 12);
    assert_eq!(overview["publish_details"]["rate"], 2.4);
    assert_eq!(overview["confirm"], 12);
    assert_eq!(overview["return_unroutable"], 1);
    assert_eq!(overview["deliver_get"], 10);
    let vhost = serde_json::to_value(core.vhost("/").unwrap().message_stats(None)).unwrap();
    assert_eq!(vhost["ack"], 10);
    let amqp = core.stats.protocol_message_stats(Protocol::Amqp091, None);
    assert_eq!(amqp.count("publish"), Some(12));
    assert_eq!(amqp.rate("publish"), 2.4);

    // Prometheus, served as on its own listener.
    let addr = serve_prometheus(Management::new(core.clone(), NodeInfo::local())).await;
    let r = http_get(addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let scrape = r.body;
    let identity: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("rabbitmq_identity_info{"))
        .collect();
    assert_eq!(identity.len(), 1, "{identity:?}");
    assert!(identity[0].contains("rabbitmq_endpoint=\"aggregated\""));
    assert!(identity[0].contains("rabbitmq_node=\"switchyard@"));
    let v = |s: &str| value_of(&scrape, s).unwrap_or_else(|| panic!("no series {s}"));
    assert_eq!(
        v("rabbitmq_global_messages_received_total{protocol=\"amqp091\"}"),
        12.0
    );
    assert_eq!(
        v("rabbitmq_global_messages_received_confirm_total{protocol=\"amqp091\"}"),
        12.0
    );
    assert_eq!(
        v("rabbitmq_global_messages_confirmed_total{protocol=\"amqp091\"}"),
        12.0
    );
    assert_eq!(
        v("rabbitmq_global_messages_routed_total{protocol=\"amqp091\"}"),
        10.0
    );
    assert_eq!(
        v("rabbitmq_global_messages_unroutable_returned_total{protocol=\"amqp091\"}"),
        1.0
    );
    assert_eq!(
        v("rabbitmq_global_messages_delivered_consume_manual_ack_total{protocol=\"amqp091\",queue_type=\"rabbit_classic_queue\"}"),
        10.0
    );
    assert_eq!(
        v("rabbitmq_global_messages_acknowledged_total{protocol=\"amqp091\",queue_type=\"rabbit_classic_queue\"}"),
        10.0
    );
    assert_eq!(
        v("rabbitmq_global_messages_get_empty_total{protocol=\"amqp091\",queue_type=\"rabbit_classic_queue\"}"),
        1.0
    );
    assert_eq!(v("rabbitmq_global_consumers{protocol=\"amqp091\"}"), 1.0);
    // Ten 16-byte bodies and two 4-byte ones, all in the first bucket.
    assert_eq!(
        v("rabbitmq_message_size_bytes_bucket{protocol=\"amqp091\",le=\"100\"}"),
        12.0
    );
    assert_eq!(
        v("rabbitmq_message_size_bytes_bucket{protocol=\"amqp091\",le=\"+Inf\"}"),
        12.0
    );
    assert_eq!(
        v("rabbitmq_message_size_bytes_sum{protocol=\"amqp091\"}"),
        168.0
    );
    assert_eq!(v("rabbitmq_connections"), 1.0);
    assert_eq!(v("rabbitmq_channels"), 1.0);
    assert_eq!(v("rabbitmq_queues"), 1.0);
    assert_eq!(v("rabbitmq_consumers"), 1.0);
    assert_eq!(v("rabbitmq_queues_created_total"), 1.0);
    assert_eq!(v("rabbitmq_alarms_memory_used_watermark"), 0.0);
    assert!(v("rabbitmq_process_resident_memory_bytes") > 0.0);
    assert!(v("rabbitmq_process_open_fds") > 0.0);
    assert!(v("rabbitmq_connection_incoming_bytes_total") > 0.0);

    let per_object = http_get(addr, "/metrics/per-object").await.body;
    assert_eq!(
        per_object
            .lines()
            .filter(|l| l.starts_with("rabbitmq_identity_info{"))
            .count(),
        1
    );
    assert!(per_object.contains("rabbitmq_endpoint=\"per-object\""));
    assert_eq!(
        value_of(
            &per_object,
            "rabbitmq_queue_messages_published_total{vhost=\"/\",queue=\"work\"}"
        ),
        Some(10.0)
    );
    assert_eq!(
        value_of(
            &per_object,
            "rabbitmq_queue_consumers{vhost=\"/\",queue=\"work\"}"
        ),
        Some(1.0)
    );
    assert!(per_object.contains("rabbitmq_channel_messages_published_total{channel=\""));
    assert_eq!(
        value_of(
            &per_object,
            &format!("rabbitmq_channel_prefetch{channel_label}")
        ),
        Some(5.0)
    );
    assert_eq!(
        value_of(
            &per_object,
            &format!("rabbitmq_channel_messages_unacked{channel_label}")
        ),
        Some(0.0)
    );

    for (endpoint, text) in [("/metrics", &scrape), ("/metrics/per-object", &per_object)] {
        match promtool_check(text).await {
            None => eprintln!(
                "SKIPPED promtool check of {endpoint}: promtool is not installed (scripts/install-test-deps installs Debian's prometheus package)"
            ),
            Some((code, out)) => assert_eq!(code, 0, "promtool check metrics {endpoint}:\n{out}"),
        }
    }
    conn.close(200, "bye".into()).await.unwrap();
}

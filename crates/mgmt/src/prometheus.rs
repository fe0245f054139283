//! Prometheus exposition on its own listener (MANAGEMENT.md §7): `GET /metrics`
//! (aggregated) and `GET /metrics/per-object`, in rabbitmq_prometheus's names,
//! types and labels, so Grafana's RabbitMQ-Overview dashboard (10991) works
//! unchanged.
//!
//! The whole scrape is written straight into one `String`: no per-queue
//! allocation, no intermediate metric objects. Queue gauges take each queue's
//! lock once, briefly (as `queue.declare-ok` does); counters come from the
//! statistics of `switchyard_core::stats`. Exactly one `rabbitmq_identity_info`
//! series per scrape: every dashboard panel joins on it.
//!
//! Choices where rabbitmq_prometheus has no equivalent: per-object channel
//! series are labelled `channel="<connection id> (<channel>)"` (the connection
//! id of the management API, as RabbitMQ uses its connection name);
//! `erlang_version` in `rabbitmq_build_info` is `none`.

use std::fmt::{Display, Write};
use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use switchyard_core::stats::{
    self, DeadReason, Protocol, ProtocolTotals, QueueType, Snapshot, Stat, SIZE_BUCKETS,
};
use switchyard_core::Broker;

use crate::Management;

/// The text exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn router(state: Management) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(aggregated))
        .route("/metrics/per-object", get(per_object))
        .with_state(state)
}

async fn aggregated(
    axum::extract::State(m): axum::extract::State<Management>,
) -> impl IntoResponse {
    respond(&m, false)
}

async fn per_object(
    axum::extract::State(m): axum::extract::State<Management>,
) -> impl IntoResponse {
    respond(&m, true)
}

fn respond(m: &Management, per_object: bool) -> impl IntoResponse {
    let mut body = render(&m.broker, per_object, &Identity::of_node());
    if let Some(cluster) = &m.node.cluster {
        body = raft_series(body, &cluster.status(), per_object);
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body)
}

/// The metadata group's Raft figures, under RabbitMQ's `rabbitmq_raft_*`
/// names with the label RabbitMQ gives its own metadata store's Ra cluster
/// (`raft_cluster="rabbitmq_metadata"`, Khepri); in per-object mode also each
/// quorum queue's group this node is a member of, labelled `vhost` and `queue`
/// as rabbitmq_prometheus labels a quorum queue's Ra figures.
fn raft_series(body: String, status: &switchyard_cluster::Status, per_object: bool) -> String {
    let mut out = Out { s: body };
    let metadata = [("raft_cluster", "rabbitmq_metadata")];
    let groups: &[switchyard_cluster::GroupStatus] = if per_object { &status.quorum } else { &[] };
    type Figure = fn(&switchyard_cluster::GroupStatus) -> u64;
    let series: [(&str, &str, u64, Figure); 4] = [
        (
            "rabbitmq_raft_term",
            "Current Raft term number",
            status.term,
            |g| g.term,
        ),
        (
            "rabbitmq_raft_commit_index",
            "Raft commit index (the last entry applied on this node)",
            status.last_applied,
            |g| g.applied,
        ),
        (
            "rabbitmq_raft_last_written_index",
            "Last fully written and fsynced Raft log index",
            status.last_log_index,
            |g| g.last_log_index,
        ),
        (
            "rabbitmq_raft_snapshot_index",
            "Raft snapshot index",
            status.snapshot_index,
            |g| g.snapshot_index,
        ),
    ];
    for (name, help, value, of_group) in series {
        out.family(name, "gauge", help);
        out.sample(name, &metadata, value);
        for g in groups {
            let labels = [("vhost", g.vhost.as_str()), ("queue", g.queue.as_str())];
            out.sample(name, &labels, of_group(g));
        }
    }
    let name = "rabbitmq_raft_commit_latency_seconds";
    out.family(
        name,
        "gauge",
        "Time taken by the last write proposed through this node to be committed and applied",
    );
    out.sample(name, &metadata, Micros(status.commit_latency_us));
    for g in groups {
        let labels = [("vhost", g.vhost.as_str()), ("queue", g.queue.as_str())];
        out.sample(name, &labels, Micros(g.commit_latency_us));
    }
    out.s
}

/// Microseconds shown as seconds with six decimals, without floats.
struct Micros(u64);

impl Display for Micros {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

/// Who this node is, for `rabbitmq_identity_info`.
#[derive(Debug, Clone)]
pub struct Identity {
    pub node: String,
    pub cluster: String,
    pub cluster_permanent_id: String,
}

impl Identity {
    /// This node: `switchyard@<hostname>`, a cluster of its own name.
    pub fn of_node() -> Self {
        let node = stats::process::node_name();
        Identity {
            cluster: node.clone(),
            cluster_permanent_id: format!("switchyard-{:016x}", fnv1a(node.as_bytes())),
            node,
        }
    }
}

/// A stable hash (FNV-1a), so the permanent id survives restarts.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes `s` as a label value: backslash, double quote and newline escaped.
struct Escaped<'a>(&'a str);

impl Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// The exposition being written.
struct Out {
    s: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.s, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One series; `labels` are (name, value) pairs.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.s.push_str(name);
        if !labels.is_empty() {
            self.s.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.s.push(',');
                }
                let _ = write!(self.s, "{k}=\"{}\"", Escaped(v));
            }
            self.s.push('}');
        }
        let _ = writeln!(self.s, " {value}");
    }

    /// A family with one unlabelled series.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// How a series' value is read from what was gathered.
type Value<T> = fn(&T) -> u64;
/// A family of series: name, help text, value.
type Family<T> = (&'static str, &'static str, Value<T>);

/// Per-queue figures gathered in one pass.
#[derive(Default)]
struct QueueTotals {
    ready: u64,
    unacked: u64,
    consumers: u64,
    published: u64,
    queues: u64,
}

/// Renders the whole scrape. `per_object`: queue and channel series carry
/// their own labels instead of being summed.
pub fn render(broker: &Broker, per_object: bool, id: &Identity) -> String {
    let vhosts = broker.vhosts();
    let queue_count: usize = vhosts.iter().map(|v| v.queue_count()).sum();
    // ~400 bytes per queue in per-object mode; a few KB otherwise.
    let mut out = Out {
        s: String::with_capacity(if per_object {
            16 * 1024 + queue_count * 400
        } else {
            16 * 1024
        }),
    };
    let node = broker.stats.as_ref();
    let endpoint = if per_object {
        "per-object"
    } else {
        "aggregated"
    };

    out.family(
        "rabbitmq_identity_info",
        "untyped",
        "RabbitMQ node & cluster identity info",
    );
    out.sample(
        "rabbitmq_identity_info",
        &[
            ("rabbitmq_node", &id.node),
            ("rabbitmq_cluster", &id.cluster),
            ("rabbitmq_cluster_permanent_id", &id.cluster_permanent_id),
            ("rabbitmq_endpoint", endpoint),
        ],
        1,
    );
    let version = env!("CARGO_PKG_VERSION");
    out.family(
        "rabbitmq_build_info",
        "untyped",
        "RabbitMQ & Erlang/OTP version info",
    );
    out.sample(
        "rabbitmq_build_info",
        &[
            ("rabbitmq_version", version),
            ("prometheus_plugin_version", version),
            ("prometheus_client_version", version),
            ("erlang_version", "none"),
            ("product_name", "Switchyard"),
            ("product_version", version),
        ],
        1,
    );

    // ---- the process ----
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    out.single(
        "rabbitmq_erlang_uptime_seconds",
        "gauge",
        "Node uptime",
        Secs(now_ms.saturating_sub(node.started_ms)),
    );
    out.single(
        "rabbitmq_process_resident_memory_bytes",
        "gauge",
        "Memory used in bytes",
        stats::process::resident_bytes(),
    );
    out.single(
        "rabbitmq_resident_memory_limit_bytes",
        "gauge",
        "Memory high watermark in bytes",
        broker.memory.high_watermark(),
    );
    if let Some((free, limit)) = broker.memory.disk() {
        out.single(
            "rabbitmq_disk_space_available_bytes",
            "gauge",
            "Disk space available in bytes",
            free,
        );
        out.single(
            "rabbitmq_disk_space_available_limit_bytes",
            "gauge",
            "Free disk space low watermark in bytes",
            limit,
        );
    }
    out.single(
        "rabbitmq_process_open_fds",
        "gauge",
        "Open file descriptors",
        stats::process::open_fds(),
    );
    out.single(
        "rabbitmq_process_max_fds",
        "gauge",
        "Open file descriptors limit",
        stats::process::max_fds(),
    );
    out.single(
        "rabbitmq_alarms_memory_used_watermark",
        "untyped",
        "is 1 if VM memory watermark alarm is in effect",
        u8::from(broker.memory.memory_alarm()),
    );
    out.single(
        "rabbitmq_alarms_free_disk_space_watermark",
        "untyped",
        "is 1 if free disk space watermark alarm is in effect",
        u8::from(broker.memory.disk_alarm()),
    );

    // ---- churn ----
    let opened = node
        .connections_opened
        .load(std::sync::atomic::Ordering::Relaxed);
    let closed = node
        .connections_closed
        .load(std::sync::atomic::Ordering::Relaxed);
    out.single(
        "rabbitmq_connections",
        "gauge",
        "Connections currently open",
        opened.saturating_sub(closed),
    );
    out.single(
        "rabbitmq_channels",
        "gauge",
        "Channels currently open",
        node.channel_count(),
    );
    out.single(
        "rabbitmq_connections_opened_total",
        "counter",
        "Total number of connections opened",
        opened,
    );
    out.single(
        "rabbitmq_connections_closed_total",
        "counter",
        "Total number of connections closed or terminated",
        closed,
    );
    out.single(
        "rabbitmq_channels_opened_total",
        "counter",
        "Total number of channels opened",
        node.channels_opened
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    out.single(
        "rabbitmq_channels_closed_total",
        "counter",
        "Total number of channels closed",
        node.channels_closed
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    let churn = |f: fn(&stats::Churn) -> &std::sync::atomic::AtomicU64| -> u64 {
        vhosts
            .iter()
            .map(|v| &v.churn)
            .chain(std::iter::once(&node.retired_churn))
            .map(|c| f(c).load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    };
    out.single(
        "rabbitmq_queues_declared_total",
        "counter",
        "Total number of queues declared",
        churn(|c| &c.declared),
    );
    out.single(
        "rabbitmq_queues_created_total",
        "counter",
        "Total number of queues created",
        churn(|c| &c.created),
    );
    out.single(
        "rabbitmq_queues_deleted_total",
        "counter",
        "Total number of queues deleted",
        churn(|c| &c.deleted),
    );

    // ---- queues ----
    let mut totals = QueueTotals::default();
    if per_object {
        queue_series(&mut out, &vhosts, &mut totals);
    } else {
        for v in &vhosts {
            for q in v.queues() {
                let (c, l) = q.counters();
                totals.ready += l.ready;
                totals.unacked += l.unacked;
                totals.published += c.get(Stat::Publish);
                totals.consumers += q.consumer_count() as u64;
                totals.queues += 1;
            }
        }
        out.single(
            "rabbitmq_queue_messages_ready",
            "gauge",
            "Messages ready to be delivered to consumers",
            totals.ready,
        );
        out.single(
            "rabbitmq_queue_messages_unacked",
            "gauge",
            "Messages delivered to consumers but not yet acknowledged",
            totals.unacked,
        );
        out.single(
            "rabbitmq_queue_messages",
            "gauge",
            "Sum of ready and unacknowledged messages - total queue depth",
            totals.ready + totals.unacked,
        );
        out.single(
            "rabbitmq_queue_consumers",
            "gauge",
            "Consumers on a queue",
            totals.consumers,
        );
        out.single(
            "rabbitmq_queue_messages_published_total",
            "counter",
            "Total number of messages published to queues",
            totals.published,
        );
    }
    out.single(
        "rabbitmq_queues",
        "gauge",
        "Queues available",
        totals.queues,
    );
    out.single(
        "rabbitmq_consumers",
        "gauge",
        "Consumers currently connected",
        totals.consumers,
    );

    // ---- global counters per protocol ----
    let protocols = node.protocol_totals();
    global_series(&mut out, &protocols);
    dead_letter_series(&mut out, &vhosts, node);
    size_histogram(&mut out, &protocols);
    let (mut recv, mut send) = (0u64, 0u64);
    for t in &protocols {
        let all = t.all();
        recv += all.get(Stat::RecvOct);
        send += all.get(Stat::SendOct);
    }
    out.single(
        "rabbitmq_connection_incoming_bytes_total",
        "counter",
        "Total number of bytes received on a connection",
        recv,
    );
    out.single(
        "rabbitmq_connection_outgoing_bytes_total",
        "counter",
        "Total number of bytes sent on a connection",
        send,
    );
    if per_object {
        channel_series(&mut out, node);
    }
    out.s
}

/// Milliseconds shown as seconds with three decimals, without floats.
struct Secs(u64);

impl Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

/// Per-object queue series: each family once, one series per queue.
fn queue_series(
    out: &mut Out,
    vhosts: &[Arc<switchyard_core::vhost::VHost>],
    totals: &mut QueueTotals,
) {
    // One pass takes every queue's figures (one lock each); the families are
    // then written from this compact list.
    struct Row {
        vhost: usize,
        queue: Arc<switchyard_core::queue::Queue>,
        ready: u64,
        unacked: u64,
        consumers: u64,
        published: u64,
    }
    let mut rows = Vec::new();
    for (vi, v) in vhosts.iter().enumerate() {
        for q in v.queues() {
            let (c, l) = q.counters();
            let consumers = q.consumer_count() as u64;
            totals.ready += l.ready;
            totals.unacked += l.unacked;
            totals.consumers += consumers;
            totals.queues += 1;
            rows.push(Row {
                vhost: vi,
                ready: l.ready,
                unacked: l.unacked,
                consumers,
                published: c.get(Stat::Publish),
                queue: q,
            });
        }
    }
    let families: [(&str, &str, &str, Value<Row>); 5] = [
        (
            "rabbitmq_queue_messages_ready",
            "gauge",
            "Messages ready to be delivered to consumers",
            |r| r.ready,
        ),
        (
            "rabbitmq_queue_messages_unacked",
            "gauge",
            "Messages delivered to consumers but not yet acknowledged",
            |r| r.unacked,
        ),
        (
            "rabbitmq_queue_messages",
            "gauge",
            "Sum of ready and unacknowledged messages - total queue depth",
            |r| r.ready + r.unacked,
        ),
        (
            "rabbitmq_queue_consumers",
            "gauge",
            "Consumers on a queue",
            |r| r.consumers,
        ),
        (
            "rabbitmq_queue_messages_published_total",
            "counter",
            "Total number of messages published to queues",
            |r| r.published,
        ),
    ];
    for (name, kind, help, value) in families {
        out.family(name, kind, help);
        for r in &rows {
            let vhost = vhosts.get(r.vhost).map_or("", |v| v.name.as_str());
            out.sample(
                name,
                &[("vhost", vhost), ("queue", &r.queue.name)],
                value(r),
            );
        }
    }
}

/// `rabbitmq_global_*`: per protocol, and per queue type for deliveries.
fn global_series(out: &mut Out, protocols: &[ProtocolTotals]) {
    let per_protocol: [Family<ProtocolTotals>; 6] = [
        (
            "rabbitmq_global_messages_received_total",
            "Total number of messages received from publishers",
            |t| t.all().get(Stat::Publish),
        ),
        (
            "rabbitmq_global_messages_received_confirm_total",
            "Total number of messages received from publishers expecting confirmations",
            |t| t.all().get(Stat::PublishConfirm),
        ),
        (
            "rabbitmq_global_messages_confirmed_total",
            "Total number of messages confirmed to publishers",
            |t| t.all().get(Stat::Confirm),
        ),
        (
            "rabbitmq_global_messages_routed_total",
            "Total number of messages routed to queues or streams",
            |t| {
                let a = t.all();
                a.get(Stat::Publish)
                    .saturating_sub(a.get(Stat::DropUnroutable))
                    .saturating_sub(a.get(Stat::ReturnUnroutable))
            },
        ),
        (
            "rabbitmq_global_messages_unroutable_dropped_total",
            "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
            |t| t.all().get(Stat::DropUnroutable),
        ),
        (
            "rabbitmq_global_messages_unroutable_returned_total",
            "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
            |t| t.all().get(Stat::ReturnUnroutable),
        ),
    ];
    for (name, help, value) in per_protocol {
        out.family(name, "counter", help);
        for (p, t) in Protocol::ALL.iter().zip(protocols) {
            out.sample(name, &[("protocol", p.label())], value(t));
        }
    }
    let gauges: [Family<ProtocolTotals>; 2] = [
        (
            "rabbitmq_global_publishers",
            "Current number of publishers",
            |t| t.publishers,
        ),
        (
            "rabbitmq_global_consumers",
            "Current number of consumers",
            |t| t.consumers,
        ),
    ];
    for (name, help, value) in gauges {
        out.family(name, "gauge", help);
        for (p, t) in Protocol::ALL.iter().zip(protocols) {
            out.sample(name, &[("protocol", p.label())], value(t));
        }
    }
    let per_type: [Family<Snapshot>; 8] = [
        (
            "rabbitmq_global_messages_delivered_total",
            "Total number of messages delivered to consumers",
            Snapshot::deliver_get,
        ),
        (
            "rabbitmq_global_messages_delivered_consume_manual_ack_total",
            "Total number of messages delivered to consumers using basic.consume with manual acknowledgment",
            |s| s.get(Stat::Deliver),
        ),
        (
            "rabbitmq_global_messages_delivered_consume_auto_ack_total",
            "Total number of messages delivered to consumers using basic.consume with automatic acknowledgment",
            |s| s.get(Stat::DeliverNoAck),
        ),
        (
            "rabbitmq_global_messages_delivered_get_manual_ack_total",
            "Total number of messages delivered to consumers using basic.get with manual acknowledgment",
            |s| s.get(Stat::Get),
        ),
        (
            "rabbitmq_global_messages_delivered_get_auto_ack_total",
            "Total number of messages delivered to consumers using basic.get with automatic acknowledgment",
            |s| s.get(Stat::GetNoAck),
        ),
        (
            "rabbitmq_global_messages_get_empty_total",
            "Total number of times basic.get operations fetched no message",
            |s| s.get(Stat::GetEmpty),
        ),
        (
            "rabbitmq_global_messages_redelivered_total",
            "Total number of messages redelivered to consumers",
            |s| s.get(Stat::Redeliver),
        ),
        (
            "rabbitmq_global_messages_acknowledged_total",
            "Total number of messages acknowledged by consumers",
            |s| s.get(Stat::Ack),
        ),
    ];
    for (name, help, value) in per_type {
        out.family(name, "counter", help);
        for (p, t) in Protocol::ALL.iter().zip(protocols) {
            for qt in QueueType::ALL {
                out.sample(
                    name,
                    &[("protocol", p.label()), ("queue_type", qt.label())],
                    value(t.for_queue_type(qt)),
                );
            }
        }
    }
}

/// `rabbitmq_global_messages_dead_lettered_<reason>_total`.
fn dead_letter_series(
    out: &mut Out,
    vhosts: &[Arc<switchyard_core::vhost::VHost>],
    node: &stats::NodeStats,
) {
    for reason in DeadReason::ALL {
        let name = format!(
            "rabbitmq_global_messages_dead_lettered_{}_total",
            reason.label()
        );
        out.family(
            &name,
            "counter",
            &format!(
                "Total number of messages dead-lettered due to {}",
                reason.label()
            ),
        );
        for qt in QueueType::ALL {
            for (dlx, strategy) in [(true, "at_most_once"), (false, "disabled")] {
                let n: u64 = vhosts
                    .iter()
                    .map(|v| &v.dead_lettered)
                    .chain(std::iter::once(&node.retired_dead_lettered))
                    .map(|d| d.get(qt, reason, dlx))
                    .sum();
                out.sample(
                    &name,
                    &[
                        ("queue_type", qt.label()),
                        ("dead_letter_strategy", strategy),
                    ],
                    n,
                );
            }
        }
    }
}

/// `rabbitmq_message_size_bytes`, a histogram per protocol with plain-number
/// `le` bounds (what the dashboard's queries match).
fn size_histogram(out: &mut Out, protocols: &[ProtocolTotals]) {
    let name = "rabbitmq_message_size_bytes";
    out.family(
        name,
        "histogram",
        "Size of messages received from publishers",
    );
    let mut le = String::with_capacity(12);
    for (p, t) in Protocol::ALL.iter().zip(protocols) {
        let mut cumulative = 0u64;
        for (i, bound) in SIZE_BUCKETS.iter().enumerate() {
            cumulative += t.sizes.buckets.get(i).copied().unwrap_or(0);
            le.clear();
            let _ = write!(le, "{bound}");
            out.sample(
                "rabbitmq_message_size_bytes_bucket",
                &[("protocol", p.label()), ("le", &le)],
                cumulative,
            );
        }
        let count = t.sizes.count();
        out.sample(
            "rabbitmq_message_size_bytes_bucket",
            &[("protocol", p.label()), ("le", "+Inf")],
            count,
        );
        out.sample(
            "rabbitmq_message_size_bytes_sum",
            &[("protocol", p.label())],
            t.sizes.sum,
        );
        out.sample(
            "rabbitmq_message_size_bytes_count",
            &[("protocol", p.label())],
            count,
        );
    }
}

/// Per-object channel series (AMQP channels; RabbitMQ's `channel` label).
fn channel_series(out: &mut Out, node: &stats::NodeStats) {
    let mut channels: Vec<_> = node
        .sources()
        .into_iter()
        .filter(|s| s.is_channel)
        .collect();
    channels.sort_by_key(|s| (s.connection, s.channel));
    let labels: Vec<String> = channels
        .iter()
        .map(|s| format!("{} ({})", s.connection, s.channel))
        .collect();
    let snaps: Vec<Snapshot> = channels.iter().map(|s| s.snapshot()).collect();
    let families: [Family<Snapshot>; 10] = [
        (
            "rabbitmq_channel_messages_published_total",
            "Total number of messages published into an exchange on a channel",
            |s| s.get(Stat::Publish),
        ),
        (
            "rabbitmq_channel_messages_confirmed_total",
            "Total number of messages published into an exchange and confirmed on the channel",
            |s| s.get(Stat::Confirm),
        ),
        (
            "rabbitmq_channel_messages_unroutable_returned_total",
            "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
            |s| s.get(Stat::ReturnUnroutable),
        ),
        (
            "rabbitmq_channel_messages_unroutable_dropped_total",
            "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
            |s| s.get(Stat::DropUnroutable),
        ),
        (
            "rabbitmq_channel_messages_delivered_ack_total",
            "Total number of messages delivered to consumers in manual acknowledgement mode",
            |s| s.get(Stat::Deliver),
        ),
        (
            "rabbitmq_channel_messages_delivered_total",
            "Total number of messages delivered to consumers in automatic acknowledgement mode",
            |s| s.get(Stat::DeliverNoAck),
        ),
        (
            "rabbitmq_channel_get_ack_total",
            "Total number of messages fetched with basic.get in manual acknowledgement mode",
            |s| s.get(Stat::Get),
        ),
        (
            "rabbitmq_channel_get_total",
            "Total number of messages fetched with basic.get in automatic acknowledgement mode",
            |s| s.get(Stat::GetNoAck),
        ),
        (
            "rabbitmq_channel_messages_redelivered_total",
            "Total number of messages redelivered to consumers",
            |s| s.get(Stat::Redeliver),
        ),
        (
            "rabbitmq_channel_messages_acked_total",
            "Total number of messages acknowledged by consumers",
            |s| s.get(Stat::Ack),
        ),
    ];
    for (name, help, value) in families {
        out.family(name, "counter", help);
        for (label, snap) in labels.iter().zip(&snaps) {
            out.sample(name, &[("channel", label)], value(snap));
        }
    }
    out.family(
        "rabbitmq_channel_consumers",
        "gauge",
        "Consumers on a channel",
    );
    for (label, s) in labels.iter().zip(&channels) {
        out.sample(
            "rabbitmq_channel_consumers",
            &[("channel", label)],
            s.consumers(),
        );
    }
    let states: Vec<stats::ChannelState> = channels.iter().map(|s| s.state()).collect();
    let gauges: [Family<stats::ChannelState>; 5] = [
        (
            "rabbitmq_channel_messages_unacked",
            "Delivered but not yet acknowledged messages",
            |s| s.messages_unacknowledged,
        ),
        (
            "rabbitmq_channel_messages_unconfirmed",
            "Published but not yet confirmed messages",
            |s| s.messages_unconfirmed,
        ),
        (
            "rabbitmq_channel_messages_uncommitted",
            "Messages received in a transaction but not yet committed",
            |s| s.messages_uncommitted,
        ),
        (
            "rabbitmq_channel_acks_uncommitted",
            "Message acknowledgements in a transaction not yet committed",
            |s| s.acks_uncommitted,
        ),
        (
            "rabbitmq_channel_prefetch",
            "Total limit of unacknowledged messages for all consumers on a channel",
            |s| s.global_prefetch_count.max(s.prefetch_count),
        ),
    ];
    for (name, help, value) in gauges {
        out.family(name, "gauge", help);
        for (label, st) in labels.iter().zip(&states) {
            out.sample(name, &[("channel", label)], value(st));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(Escaped("a\"b\\c\nd").to_string(), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn uptime_has_three_decimals() {
        assert_eq!(Secs(12_345).to_string(), "12.345");
        assert_eq!(Secs(7).to_string(), "0.007");
    }
}

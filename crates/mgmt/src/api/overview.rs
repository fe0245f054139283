//! `/api/overview`, `/api/whoami`, `/api/nodes`, `/api/cluster-name` and the small
//! endpoints tools call before anything else (`/api/extensions`,
//! `/api/aliveness-test/{v}`).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use super::{object_response, ApiError, ApiResult, Caller};
use crate::Management;

/// The RabbitMQ version reported to clients: the API shapes here are 4.x's
/// (`being_drained`, `MQTT 3-1-1`), and clients pick shapes by this number.
pub(crate) const RABBITMQ_VERSION: &str = "4.1.0";
pub(crate) const PRODUCT_NAME: &str = "Switchyard";
pub(crate) const PRODUCT_VERSION: &str = env!("CARGO_PKG_VERSION");

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/overview", get(overview))
        .route("/whoami", get(whoami))
        .route("/nodes", get(nodes))
        .route("/nodes/{node}", get(one_node))
        .route("/cluster-name", get(cluster_name))
        .route("/extensions", get(extensions))
        .route("/aliveness-test/{vhost}", get(aliveness))
}

/// Ready, unacknowledged and total messages over every queue, and the object counts.
fn totals(m: &Management) -> (u64, u64, usize, usize, usize) {
    let (mut ready, mut unacked, mut queues, mut exchanges, mut consumers) = (0u64, 0u64, 0, 0, 0);
    for vhost in super::all_vhosts(m) {
        for q in vhost.queues() {
            ready += q.message_count() as u64;
            unacked += q.unacked_count() as u64;
            consumers += q.consumer_count();
            queues += 1;
        }
        exchanges += vhost.exchanges().len();
    }
    (ready, unacked, queues, exchanges, consumers)
}

pub(crate) fn listeners(m: &Management) -> Vec<Value> {
    m.node
        .listeners
        .iter()
        .map(|l| {
            json!({
                "node": m.node.name,
                "protocol": l.protocol,
                "ip_address": l.addr.ip().to_string(),
                "port": l.addr.port(),
            })
        })
        .collect()
}

async fn overview(
    State(m): State<Management>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let (ready, unacked, queues, exchanges, consumers) = totals(&m);
    let (connections, channels) = super::connection_totals(&m);
    let mut body = json!({
        "management_version": RABBITMQ_VERSION,
        "rates_mode": "basic",
        "exchange_types": [
            {"name": "direct", "description": "AMQP direct exchange, as per the AMQP specification", "enabled": true},
            {"name": "fanout", "description": "AMQP fanout exchange, as per the AMQP specification", "enabled": true},
            {"name": "headers", "description": "AMQP headers exchange, as per the AMQP specification", "enabled": true},
            {"name": "topic", "description": "AMQP topic exchange, as per the AMQP specification", "enabled": true},
        ],
        "product_version": PRODUCT_VERSION,
        "product_name": PRODUCT_NAME,
        "rabbitmq_version": RABBITMQ_VERSION,
        "cluster_name": m.node.cluster_name,
        "erlang_version": "none",
        "erlang_full_version": "none (Switchyard is written in Rust)",
        "disable_stats": false,
        "enable_queue_totals": true,
        "node": m.node.name,
        "queue_totals": {
            "messages": ready + unacked,
            "messages_details": {"rate": 0.0},
            "messages_ready": ready,
            "messages_ready_details": {"rate": 0.0},
            "messages_unacknowledged": unacked,
            "messages_unacknowledged_details": {"rate": 0.0},
        },
        "object_totals": {
            "connections": connections,
            "channels": channels,
            "queues": queues,
            "exchanges": exchanges,
            "consumers": consumers,
        },
        "listeners": listeners(&m),
        "contexts": [{"node": m.node.name, "description": "RabbitMQ Management", "path": "/", "port": management_port(&m)}],
    });
    let ranges = super::Ranges::parse(&q);
    if let Some(stats) = super::message_stats_json(&m.broker.message_stats(ranges.msg)) {
        if let Value::Object(map) = &mut body {
            map.insert("message_stats".into(), stats);
        }
    }
    let lengths = m.broker.stats.history.length_details(ranges.lengths);
    if let (Ok(Value::Object(details)), Some(Value::Object(totals))) =
        (serde_json::to_value(&lengths), body.get_mut("queue_totals"))
    {
        totals.extend(details);
    }
    let _ = caller;
    Ok(object_response(body, &q))
}

fn management_port(m: &Management) -> u16 {
    m.node
        .listeners
        .iter()
        .find(|l| l.protocol == "http")
        .map_or(15672, |l| l.addr.port())
}

async fn whoami(caller: Caller) -> ApiResult {
    Ok(super::json(json!({
        "name": caller.name,
        "tags": caller.tags,
        "is_internal_user": true,
    })))
}

/// This node as `/api/nodes` shows it. Every figure is measured when asked:
/// RabbitMQ's Erlang processes become this process's OS threads
/// (`proc_used`/`proc_total`: `Threads` of `/proc/self/status` against the
/// `Max processes` limit), its scheduler run queue the tokio runtime's global
/// queue (tasks waiting for a worker), and its sockets the descriptors that
/// are sockets. The tokio figures are added as `tokio_*` fields.
fn node(m: &Management) -> Value {
    use switchyard_core::stats::process;
    let uptime = super::now_ms().saturating_sub(m.node.started_ms);
    let memory = &m.broker.memory;
    let processors = std::thread::available_parallelism().map_or(1, usize::from);
    let fd_total = process::max_fds();
    let mem_used = match process::resident_bytes() {
        0 => memory.used() as u64,
        rss => rss,
    };
    let (run_queue, tasks, workers) = match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            let rt = h.metrics();
            (
                rt.global_queue_depth(),
                rt.num_alive_tasks(),
                rt.num_workers(),
            )
        }
        Err(_) => (0, 0, 0),
    };
    json!({
        "name": m.node.name,
        "type": "disc",
        "running": true,
        "being_drained": false,
        // RabbitMQ's typed client decodes it as u32: cap rather than fail its decode.
        "uptime": uptime.min(u64::from(u32::MAX)),
        "os_pid": std::process::id().to_string(),
        "fd_used": process::open_fds(),
        "fd_total": fd_total,
        "sockets_used": process::open_sockets(),
        "sockets_total": fd_total,
        "proc_used": process::threads(),
        "proc_total": process::max_threads(),
        "mem_used": mem_used,
        "mem_calculation_strategy": "rss",
        "mem_limit": memory.high_watermark(),
        "mem_alarm": memory.memory_alarm(),
        "disk_free": disk_free(m),
        "disk_free_limit": m.node.disk_free_limit,
        "disk_free_alarm": memory.disk_alarm(),
        "run_queue": run_queue,
        "processors": processors,
        "tokio_workers": workers,
        "tokio_tasks": tasks,
        "rates_mode": "basic",
        "enabled_plugins": ["rabbitmq_management", "rabbitmq_prometheus", "rabbitmq_mqtt", "rabbitmq_stomp", "rabbitmq_web_mqtt", "rabbitmq_web_stomp"],
        "applications": [],
        "contexts": [],
        "partitions": [],
        "rabbitmq_version": RABBITMQ_VERSION,
        "product_name": PRODUCT_NAME,
        "product_version": PRODUCT_VERSION,
        "erlang_version": "none",
    })
}

/// How long `/api/nodes` waits for a peer's status before showing it as not
/// running.
const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Every node: this one, and on a clustered node each member of the cluster,
/// with its Raft view under `cluster` (a member that does not answer within
/// [`PEER_TIMEOUT`] is shown as RabbitMQ shows a stopped node: `running: false`).
async fn all_nodes(m: &Management) -> Vec<Value> {
    let Some(cluster) = &m.node.cluster else {
        return vec![node(m)];
    };
    let mut out = Vec::new();
    for (member, status) in cluster.members(PEER_TIMEOUT).await {
        let mut v = if member.name == cluster.node() {
            node(m)
        } else {
            json!({
                "name": member.name,
                "type": "disc",
                "running": status.is_some(),
                "being_drained": false,
                "rabbitmq_version": RABBITMQ_VERSION,
                "product_name": PRODUCT_NAME,
                "product_version": PRODUCT_VERSION,
            })
        };
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "cluster".to_owned(),
                json!({
                    "address": member.addr,
                    "voter": member.voter,
                    "leader": member.leader,
                    "raft_state": status.as_ref().map(|s| s.state.clone()),
                    "term": status.as_ref().map(|s| s.term),
                    "last_log_index": status.as_ref().map(|s| s.last_log_index),
                    "last_applied": status.as_ref().map(|s| s.last_applied),
                }),
            );
        }
        out.push(v);
    }
    out
}

async fn nodes(State(m): State<Management>, caller: Caller) -> ApiResult {
    caller.require_monitor()?;
    Ok(super::json(Value::Array(all_nodes(&m).await)))
}

async fn one_node(
    State(m): State<Management>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_monitor()?;
    let found = all_nodes(&m)
        .await
        .into_iter()
        .find(|n| n["name"].as_str() == Some(name.as_str()));
    Ok(object_response(found.ok_or_else(ApiError::not_found)?, &q))
}

async fn cluster_name(State(m): State<Management>, _caller: Caller) -> ApiResult {
    Ok(super::json(json!({"name": m.node.cluster_name})))
}

async fn extensions(_caller: Caller) -> ApiResult {
    Ok(super::json(json!([])))
}

/// pyrabbit2's `is_alive`: `{"status":"ok"}` when the vhost is there (RabbitMQ 4.1
/// made it a no-op too).
async fn aliveness(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_vhost(&m, &vhost)?;
    Ok(super::json(json!({"status": "ok"})))
}

/// Free bytes on the file system of the data directory (the working directory
/// when none is known); 0 when it cannot be read.
fn disk_free(m: &Management) -> u64 {
    let dir = m
        .node
        .data_dir
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    fs4::available_space(&dir).unwrap_or(0)
}

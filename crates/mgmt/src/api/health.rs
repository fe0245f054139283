//! `/api/health/checks/...` (MANAGEMENT.md §6): 200 with `{"status":"ok"}`, or
//! 503 with `{"status":"failed","reason":..}` and the details RabbitMQ gives.
//! Never a 500: a check that cannot pass is a failed check.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{ApiError, ApiResult, Caller};
use crate::Management;

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/health/checks/alarms", get(alarms))
        .route("/health/checks/local-alarms", get(local_alarms))
        .route("/health/checks/port-listener/{port}", get(port_listener))
        .route(
            "/health/checks/protocol-listener/{protocols}",
            get(protocol_listener),
        )
        .route("/health/checks/virtual-hosts", get(virtual_hosts))
        .route("/health/checks/node-is-quorum-critical", get(always_ok))
        .route("/health/checks/is-in-service", get(unauthenticated_ok))
        .route(
            "/health/checks/ready-to-serve-clients",
            get(unauthenticated_ok),
        )
        .route(
            "/health/checks/below-node-connection-limit",
            get(unauthenticated_ok),
        )
}

fn ok(extra: Value) -> Response {
    let mut body = json!({"status": "ok"});
    if let (Value::Object(map), Value::Object(more)) = (&mut body, extra) {
        map.extend(more);
    }
    Json(body).into_response()
}

fn failed(reason: &str, extra: Value) -> Response {
    let mut body = json!({"status": "failed", "reason": reason});
    if let (Value::Object(map), Value::Object(more)) = (&mut body, extra) {
        map.extend(more);
    }
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// The alarms in effect on this node, as `[{node, resource}]`.
fn active_alarms(m: &Management) -> Vec<Value> {
    let memory = &m.broker.memory;
    let mut out = Vec::new();
    if memory.memory_alarm() {
        out.push(json!({"node": m.node.name, "resource": "memory"}));
    }
    if memory.disk_alarm() {
        out.push(json!({"node": m.node.name, "resource": "disk space"}));
    }
    out
}

async fn alarms(State(m): State<Management>, _caller: Caller) -> ApiResult {
    let alarms = active_alarms(&m);
    Ok(if alarms.is_empty() {
        ok(json!({}))
    } else {
        failed(
            "There are alarms in effect in the cluster",
            json!({"alarms": alarms}),
        )
    })
}

async fn local_alarms(State(m): State<Management>, _caller: Caller) -> ApiResult {
    let alarms = active_alarms(&m);
    Ok(if alarms.is_empty() {
        ok(json!({}))
    } else {
        failed(
            "There are alarms in effect on the node",
            json!({"alarms": alarms}),
        )
    })
}

async fn port_listener(
    State(m): State<Management>,
    _caller: Caller,
    Path(port): Path<String>,
) -> ApiResult {
    let port: u16 = port
        .parse()
        .map_err(|_| ApiError::bad_request("Invalid port"))?;
    let ports: Vec<u16> = m.node.listeners.iter().map(|l| l.addr.port()).collect();
    Ok(if ports.contains(&port) {
        ok(json!({"port": port}))
    } else {
        failed(
            "No active listener",
            json!({"missing": port, "ports": ports}),
        )
    })
}

/// RabbitMQ's normalisation of the protocol names a client may ask for.
fn normalize_protocol(p: &str) -> String {
    let p = p.trim().to_ascii_lowercase();
    match p.as_str() {
        "amqp091" | "amqp0-9-1" | "amqp0.9.1" | "amqp10" | "amqp1.0" | "amqp1-0" | "amqp" => {
            "amqp".into()
        }
        "amqps" | "amqp/ssl" => "amqp/ssl".into(),
        "mqtt311" | "mqtt3.1.1" | "mqtt3-1-1" | "mqtt31" | "mqtt3.1" | "mqtt5" | "mqtt50"
        | "mqtt5.0" | "mqtt" => "mqtt".into(),
        "mqtts" | "mqtt/ssl" => "mqtt/ssl".into(),
        "stomp1.0" | "stomp1.1" | "stomp1.2" | "stomp10" | "stomp11" | "stomp12" | "stomp" => {
            "stomp".into()
        }
        "stomps" | "stomp/ssl" => "stomp/ssl".into(),
        "web-mqtt" | "http/web-mqtt" => "http/web-mqtt".into(),
        "web-stomp" | "http/web-stomp" => "http/web-stomp".into(),
        "management" | "ui" | "http" => "http".into(),
        "prometheus" | "http/prometheus" => "http/prometheus".into(),
        _ => p,
    }
}

async fn protocol_listener(
    State(m): State<Management>,
    _caller: Caller,
    Path(protocols): Path<String>,
) -> ApiResult {
    let wanted: Vec<String> = protocols
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(normalize_protocol)
        .collect();
    let active: Vec<String> = m
        .node
        .listeners
        .iter()
        .map(|l| l.protocol.clone())
        .collect();
    let missing: Vec<&String> = wanted.iter().filter(|p| !active.contains(p)).collect();
    Ok(if missing.is_empty() {
        ok(json!({"protocols": wanted}))
    } else {
        failed(
            "No active listener",
            json!({"missing": missing, "protocols": active}),
        )
    })
}

/// Every vhost of this broker runs as long as the broker does: there is no
/// per-vhost supervisor that could be down.
async fn virtual_hosts(_caller: Caller) -> ApiResult {
    Ok(ok(json!({})))
}

async fn always_ok(_caller: Caller) -> ApiResult {
    Ok(ok(json!({})))
}

async fn unauthenticated_ok() -> Response {
    ok(json!({}))
}

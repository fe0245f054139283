//! `/api/connections` (every protocol, with RabbitMQ's protocol strings),
//! `/api/channels` and `/api/consumers`. Users see their own connections and
//! channels; monitors and administrators see all.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use switchyard_core::connections::Connection;
use switchyard_core::stats::Source;

use super::{
    list_response, no_content, object_response, table_to_json, ApiError, ApiResult, Caller, Key,
    ListQuery, Ranges, Row,
};
use crate::Management;

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/connections", get(list))
        .route("/connections/{name}", get(show).delete(close))
        .route("/connections/{name}/channels", get(channels_of))
        .route("/vhosts/{vhost}/connections", get(list_vhost))
        .route("/vhosts/{vhost}/channels", get(channels_vhost))
        .route("/channels", get(channels))
        .route("/channels/{name}", get(channel))
        .route("/consumers", get(consumers))
        .route("/consumers/{vhost}", get(consumers_vhost))
}

struct ConnectionRow(Arc<Connection>);

fn render_connection(m: &Management, c: &Connection) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let i = &c.info;
    json!({
        "name": i.name,
        "node": m.node.name,
        "protocol": i.protocol,
        "user": i.user,
        "vhost": i.vhost,
        "connected_at": i.connected_at,
        "client_properties": table_to_json(&i.client_properties),
        "host": i.local.ip().to_string(),
        "port": i.local.port(),
        "peer_host": i.peer.ip().to_string(),
        "peer_port": i.peer.port(),
        "channels": c.channel_count(),
        "state": if c.close_requested() { "closing" } else { "running" },
        "type": "network",
        "ssl": i.tls,
        "websocket": i.websocket,
        "auth_mechanism": "PLAIN",
        "recv_oct": c.recv_oct.load(Relaxed),
        "send_oct": c.send_oct.load(Relaxed),
        "recv_cnt": c.recv_cnt.load(Relaxed),
        "send_cnt": c.send_cnt.load(Relaxed),
        "user_who_performed_action": i.user,
    })
}

impl Row for ConnectionRow {
    fn name(&self) -> &str {
        &self.0.info.name
    }
    fn key(&self, field: &str) -> Option<Key> {
        let i = &self.0.info;
        Some(match field {
            "name" => Key::Str(i.name.clone()),
            "vhost" => Key::Str(i.vhost.clone()),
            "user" => Key::Str(i.user.clone()),
            "protocol" => Key::Str(i.protocol.to_owned()),
            "connected_at" => Key::Num(i.connected_at as f64),
            "channels" => Key::Num(f64::from(self.0.channel_count())),
            _ => return None,
        })
    }
    fn render(&self, m: &Management) -> Value {
        render_connection(m, &self.0)
    }
}

/// The connections this caller may see.
fn visible(m: &Management, caller: &Caller) -> Vec<Arc<Connection>> {
    m.broker
        .connections()
        .list()
        .into_iter()
        .filter(|c| caller.is_monitor() || c.info.user == caller.name)
        .collect()
}

async fn list(
    State(m): State<Management>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let rows = visible(&m, &caller)
        .into_iter()
        .map(ConnectionRow)
        .collect();
    list_response(&m, rows, &ListQuery::parse(&q)?, &["name"])
}

async fn list_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_vhost(&m, &vhost)?;
    let rows = visible(&m, &caller)
        .into_iter()
        .filter(|c| c.info.vhost == vhost)
        .map(ConnectionRow)
        .collect();
    list_response(&m, rows, &ListQuery::parse(&q)?, &["name"])
}

fn find(m: &Management, caller: &Caller, name: &str) -> ApiResult<Arc<Connection>> {
    m.broker
        .connections()
        .by_name(name)
        .filter(|c| caller.is_monitor() || c.info.user == caller.name)
        .ok_or_else(ApiError::not_found)
}

async fn show(
    State(m): State<Management>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let c = find(&m, &caller, &name)?;
    Ok(object_response(render_connection(&m, &c), &q))
}

/// DELETE: asks the connection to close, with the `X-Reason` header as the
/// reason its client is told (AMQP connection.close 320, MQTT 5 DISCONNECT,
/// STOMP ERROR). Administrators may close any connection, others their own.
async fn close(
    State(m): State<Management>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let c = m
        .broker
        .connections()
        .by_name(&name)
        .filter(|c| caller.is_admin() || c.info.user == caller.name)
        .ok_or_else(ApiError::not_found)?;
    let reason = headers
        .get("x-reason")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .unwrap_or("Closed via management plugin");
    m.broker.connections().close(c.id, reason);
    Ok(no_content())
}

// ---- channels ----

struct ChannelRow {
    source: Arc<Source>,
    connection: Arc<Connection>,
    ranges: Ranges,
}

fn channel_name(c: &Connection, number: u16) -> String {
    format!("{} ({number})", c.info.name)
}

fn render_channel(m: &Management, r: &ChannelRow) -> Value {
    let c = &r.connection;
    let mut v = json!({
        "name": channel_name(c, r.source.channel),
        "number": r.source.channel,
        "node": m.node.name,
        "connection_details": {
            "name": c.info.name,
            "peer_host": c.info.peer.ip().to_string(),
            "peer_port": c.info.peer.port(),
        },
        "vhost": r.source.vhost,
        "user": c.info.user,
        "state": "running",
        "consumer_count": r.source.consumers(),
        // Not tracked per channel by the core yet: reported as RabbitMQ's
        // defaults for a channel that did not ask for them.
        "confirm": false,
        "transactional": false,
        "prefetch_count": 0,
        "global_prefetch_count": 0,
        "messages_unacknowledged": 0,
        "messages_unconfirmed": 0,
        "messages_uncommitted": 0,
        "acks_uncommitted": 0,
    });
    super::add_stats(&mut v, Some(&r.source.message_stats(r.ranges.msg)), None);
    v
}

impl Row for ChannelRow {
    fn name(&self) -> &str {
        &self.connection.info.name
    }
    fn key(&self, field: &str) -> Option<Key> {
        Some(match field {
            "name" => Key::Str(channel_name(&self.connection, self.source.channel)),
            "vhost" => Key::Str(self.source.vhost.clone()),
            "number" => Key::Num(f64::from(self.source.channel)),
            _ => return None,
        })
    }
    fn render(&self, m: &Management) -> Value {
        render_channel(m, self)
    }
}

fn channel_rows(m: &Management, caller: &Caller, q: &HashMap<String, String>) -> Vec<ChannelRow> {
    let ranges = Ranges::parse(q);
    let connections: HashMap<u64, Arc<Connection>> =
        visible(m, caller).into_iter().map(|c| (c.id, c)).collect();
    m.broker
        .stats
        .sources()
        .into_iter()
        .filter(|s| s.is_channel)
        .filter_map(|source| {
            let connection = connections.get(&source.connection)?.clone();
            Some(ChannelRow {
                source,
                connection,
                ranges,
            })
        })
        .collect()
}

async fn channels(
    State(m): State<Management>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let rows = channel_rows(&m, &caller, &q);
    list_response(&m, rows, &ListQuery::parse(&q)?, &["name"])
}

async fn channels_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_vhost(&m, &vhost)?;
    let rows = channel_rows(&m, &caller, &q)
        .into_iter()
        .filter(|r| r.source.vhost == vhost)
        .collect();
    list_response(&m, rows, &ListQuery::parse(&q)?, &["name"])
}

async fn channels_of(
    State(m): State<Management>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    find(&m, &caller, &name)?;
    let rows = channel_rows(&m, &caller, &q)
        .into_iter()
        .filter(|r| r.connection.info.name == name)
        .collect();
    list_response(&m, rows, &ListQuery::parse(&q)?, &["name"])
}

async fn channel(
    State(m): State<Management>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let row = channel_rows(&m, &caller, &q)
        .into_iter()
        .find(|r| channel_name(&r.connection, r.source.channel) == name)
        .ok_or_else(ApiError::not_found)?;
    Ok(object_response(render_channel(&m, &row), &q))
}

// ---- consumers ----

fn consumer_list(m: &Management, caller: &Caller, vhost: Option<&str>) -> Value {
    let mut out = Vec::new();
    for v in super::visible_vhosts(m, caller, vhost) {
        let mut queues = v.queues();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        for q in queues {
            for c in q.consumers() {
                let o = &c.options;
                out.push(json!({
                    "consumer_tag": o.tag,
                    "queue": {"name": q.name, "vhost": q.vhost},
                    "channel_details": {"number": o.channel, "node": m.node.name},
                    "active": c.is_active(),
                    "activity_status": if c.is_active() { "up" } else { "suspended" },
                    "ack_required": !o.no_ack,
                    "prefetch_count": o.prefetch,
                    "exclusive": o.exclusive,
                    "arguments": table_to_json(&o.arguments),
                    "consumer_timeout": 0,
                }));
            }
        }
    }
    Value::Array(out)
}

async fn consumers(State(m): State<Management>, caller: Caller) -> ApiResult {
    Ok(super::json(consumer_list(&m, &caller, None)))
}

async fn consumers_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_vhost(&m, &vhost)?;
    Ok(super::json(consumer_list(&m, &caller, Some(&vhost))))
}

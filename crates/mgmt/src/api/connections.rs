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
use switchyard_core::connections::{protocol, Connection};
use switchyard_core::queue::Queue;
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

/// A listed connection and its name, built for the listing (the registry
/// keeps none).
struct ConnectionRow(Arc<Connection>, String);

impl ConnectionRow {
    fn new(c: Arc<Connection>) -> Self {
        let name = c.info.name();
        ConnectionRow(c, name)
    }
}

fn render_connection(m: &Management, c: &Connection) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let i = &c.info;
    json!({
        "name": i.name(),
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
        "auth_mechanism": i.auth_mechanism,
        "channel_max": i.channel_max,
        "frame_max": i.frame_max,
        "timeout": i.timeout,
        "recv_oct": c.recv_oct.load(Relaxed),
        "send_oct": c.send_oct.load(Relaxed),
        "recv_cnt": c.recv_cnt.load(Relaxed),
        "send_cnt": c.send_cnt.load(Relaxed),
        "user_who_performed_action": i.user,
    })
}

impl Row for ConnectionRow {
    fn name(&self) -> &str {
        &self.1
    }
    fn key(&self, field: &str) -> Option<Key> {
        let i = &self.0.info;
        Some(match field {
            "name" => Key::Str(self.1.clone()),
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
        .map(ConnectionRow::new)
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
        .map(ConnectionRow::new)
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
    /// The connection's name, built for the listing.
    connection_name: String,
    ranges: Ranges,
}

impl ChannelRow {
    /// The number the API shows: the AMQP channel, or 1 for the one channel
    /// of an MQTT or STOMP connection (RabbitMQ 3.x numbered it so).
    fn number(&self) -> u16 {
        display_number(&self.connection, self.source.channel)
    }
}

/// The channel number shown for `channel` of connection `c`.
fn display_number(c: &Connection, channel: u16) -> u16 {
    if c.info.protocol == protocol::AMQP_091 {
        channel
    } else {
        1
    }
}

fn channel_name(c: &Connection, number: u16) -> String {
    format!("{} ({number})", c.info.name())
}

/// RabbitMQ's `connection_details` of a channel.
fn connection_details(c: &Connection) -> Value {
    json!({
        "name": c.info.name(),
        "peer_host": c.info.peer.ip().to_string(),
        "peer_port": c.info.peer.port(),
    })
}

/// RabbitMQ's `channel_details` of a consumer.
fn channel_details(m: &Management, c: &Connection, number: u16) -> Value {
    json!({
        "name": channel_name(c, number),
        "number": number,
        "node": m.node.name,
        "connection_name": c.info.name(),
        "peer_host": c.info.peer.ip().to_string(),
        "peer_port": c.info.peer.port(),
        "user": c.info.user,
    })
}

fn render_channel(m: &Management, r: &ChannelRow) -> Value {
    let c = &r.connection;
    let st = r.source.state();
    let mut v = json!({
        "name": channel_name(c, r.number()),
        "number": r.number(),
        "node": m.node.name,
        "connection_details": connection_details(c),
        "vhost": r.source.vhost,
        "user": c.info.user,
        "user_who_performed_action": c.info.user,
        "state": if c.close_requested() { "closing" } else { "running" },
        "consumer_count": r.source.consumers(),
        "confirm": st.confirm,
        "transactional": st.transactional,
        "prefetch_count": st.prefetch_count,
        "global_prefetch_count": st.global_prefetch_count,
        "messages_unacknowledged": st.messages_unacknowledged,
        "messages_unconfirmed": st.messages_unconfirmed,
        "messages_uncommitted": st.messages_uncommitted,
        "acks_uncommitted": st.acks_uncommitted,
        "pending_raft_commands": 0,
    });
    super::add_stats(&mut v, Some(&r.source.message_stats(r.ranges.msg)), None);
    v
}

impl Row for ChannelRow {
    fn name(&self) -> &str {
        &self.connection_name
    }
    fn key(&self, field: &str) -> Option<Key> {
        let num = |n: u64| Key::Num(n as f64);
        let st = || self.source.state();
        Some(match field {
            "name" => Key::Str(channel_name(&self.connection, self.number())),
            "vhost" => Key::Str(self.source.vhost.clone()),
            "user" => Key::Str(self.connection.info.user.clone()),
            "number" => Key::Num(f64::from(self.number())),
            "consumer_count" => num(self.source.consumers()),
            "prefetch_count" => num(st().prefetch_count),
            "global_prefetch_count" => num(st().global_prefetch_count),
            "messages_unacknowledged" => num(st().messages_unacknowledged),
            "messages_unconfirmed" => num(st().messages_unconfirmed),
            "confirm" => Key::Bool(st().confirm),
            "transactional" => Key::Bool(st().transactional),
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
        // AMQP channels, and the one session of each MQTT and STOMP
        // connection (an AMQP connection's own source, channel 0, is not one).
        .filter(|s| s.is_channel || s.protocol_is_session())
        .filter_map(|source| {
            let connection = connections.get(&source.connection)?.clone();
            Some(ChannelRow {
                source,
                connection_name: connection.info.name(),
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
        .filter(|r| r.connection_name == name)
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
        .find(|r| channel_name(&r.connection, r.number()) == name)
        .ok_or_else(ApiError::not_found)?;
    Ok(object_response(render_channel(&m, &row), &q))
}

// ---- consumers ----

/// A queue's consumers as `/api/consumers` and a queue's `consumer_details`
/// show them, with RabbitMQ's `channel_details` (the connection found by the
/// outbox the consumer delivers to).
pub(crate) fn consumer_json(
    m: &Management,
    q: &Queue,
    by_outbox: &HashMap<usize, Arc<Connection>>,
) -> Vec<Value> {
    q.consumers()
        .into_iter()
        .map(|c| {
            let o = &c.options;
            let channel_details = by_outbox.get(&c.outbox_id()).map_or_else(
                // Connection gone or not yet registered: RabbitMQ's empty details.
                || json!({}),
                |conn| channel_details(m, conn, display_number(conn, o.channel)),
            );
            json!({
                "consumer_tag": o.tag,
                "queue": {"name": q.name, "vhost": q.vhost},
                "channel_details": channel_details,
                "active": c.is_active(),
                "activity_status": if c.is_active() { "up" } else { "suspended" },
                "ack_required": !o.no_ack,
                "prefetch_count": o.prefetch,
                "exclusive": o.exclusive,
                "arguments": table_to_json(&o.arguments),
                "consumer_timeout": 0,
            })
        })
        .collect()
}

/// Every live connection by the identity of its outbox.
pub(crate) fn connections_by_outbox(m: &Management) -> HashMap<usize, Arc<Connection>> {
    m.broker
        .connections()
        .list()
        .into_iter()
        .map(|c| (c.outbox_id(), c))
        .collect()
}

fn consumer_list(m: &Management, caller: &Caller, vhost: Option<&str>) -> Value {
    let by_outbox = connections_by_outbox(m);
    let mut out = Vec::new();
    for v in super::visible_vhosts(m, caller, vhost) {
        let mut queues = v.queues();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        for q in queues {
            out.extend(consumer_json(m, &q, &by_outbox));
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

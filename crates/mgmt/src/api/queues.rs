//! `/api/queues`: list (paged, sorted, filtered on the server), declare, delete,
//! purge, get, and `peek` (browse without consuming: beyond RabbitMQ).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::routing::{delete as delete_route, get, post};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use switchyard_core::auth::{Access, Resource};
use switchyard_core::deadletter::DeathReason;
use switchyard_core::queue::{Queue, QueueOptions};
use switchyard_core::vhost::QueueDeclare;
use switchyard_core::Message;

use super::add_stats;
use super::exchanges::properties_to_json;
use super::{
    body_object, created_or_updated, field_arguments, field_bool, field_str, field_u64,
    list_response, no_content, object_response, table_to_json, ApiError, ApiResult, Caller, Key,
    ListQuery, Ranges, Row,
};
use crate::Management;

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/queues", get(list_all))
        .route("/queues/{vhost}", get(list_vhost))
        .route(
            "/queues/{vhost}/{queue}",
            get(show).put(declare).delete(delete),
        )
        .route("/queues/{vhost}/{queue}/contents", delete_route(purge))
        .route("/queues/{vhost}/{queue}/get", post(get_messages))
        .route("/queues/{vhost}/{queue}/peek", get(peek))
}

/// A queue as a list row. Counts are read once, when the row is made, so that
/// sorting by them and rendering agree.
pub(crate) struct QueueRow {
    pub queue: Arc<Queue>,
    pub ranges: Ranges,
}

/// The queue type as RabbitMQ names it.
pub(crate) fn queue_type(q: &Queue) -> &'static str {
    if q.stream().is_some() {
        "stream"
    } else if q.settings().quorum {
        "quorum"
    } else {
        "classic"
    }
}

impl Row for QueueRow {
    fn name(&self) -> &str {
        &self.queue.name
    }
    fn key(&self, field: &str) -> Option<Key> {
        let q = &self.queue;
        let num = |n: usize| Key::Num(n as f64);
        Some(match field {
            "name" => Key::Str(q.name.clone()),
            "vhost" => Key::Str(q.vhost.clone()),
            "type" => Key::Str(queue_type(q).to_owned()),
            "durable" => Key::Bool(q.options.durable),
            "auto_delete" => Key::Bool(q.options.auto_delete),
            "exclusive" => Key::Bool(q.options.exclusive),
            "policy" => q.settings().policy.clone().map_or(Key::None, Key::Str),
            "messages" => num(ready_count(q) + q.unacked_count()),
            "messages_ready" => num(ready_count(q)),
            "messages_unacknowledged" => num(q.unacked_count()),
            "consumers" => num(q.consumer_count()),
            _ => return None,
        })
    }
    fn render(&self, m: &Management) -> Value {
        render(m, &self.queue, self.ranges)
    }
}

/// Ready messages as listed. A clustered quorum queue's are its log's (ready
/// there or checked out to any node), less what is unacked on this node, not
/// only what this node holds.
fn ready_count(q: &Queue) -> usize {
    match q.quorum_link().and_then(|l| l.log_message_count()) {
        Some(total) => total.saturating_sub(q.unacked_count()),
        None => q.message_count(),
    }
}

/// A clustered quorum queue's group as this node sees it.
fn quorum_group(m: &Management, q: &Queue) -> Option<switchyard_cluster::GroupStatus> {
    q.quorum_link()?;
    m.node.cluster.as_ref()?.quorum_group(&q.vhost, &q.name)
}

pub(crate) fn render(m: &Management, q: &Queue, ranges: Ranges) -> Value {
    let ready = ready_count(q);
    let unacked = q.unacked_count();
    let consumers = q.consumer_count();
    let mut v = json!({
        "name": q.name,
        "vhost": q.vhost,
        "type": queue_type(q),
        "durable": q.options.durable,
        "auto_delete": q.options.auto_delete,
        "exclusive": q.options.exclusive,
        "arguments": table_to_json(&q.options.arguments),
        "node": m.node.name,
        "state": "running",
        "consumers": consumers,
        "consumer_capacity": if consumers > 0 { 1.0 } else { 0.0 },
        "consumer_utilisation": if consumers > 0 { 1.0 } else { 0.0 },
        "messages": ready + unacked,
        "messages_details": {"rate": 0.0},
        "messages_ready": ready,
        "messages_ready_details": {"rate": 0.0},
        "messages_unacknowledged": unacked,
        "messages_unacknowledged_details": {"rate": 0.0},
        "messages_delayed": q.delayed_count(),
        "policy": q.settings().policy.clone(),
        "operator_policy": null,
        "effective_policy_definition": {},
        "exclusive_consumer_tag": null,
    });
    if let (Some(g), Some(obj)) = (quorum_group(m, q), v.as_object_mut()) {
        // A clustered quorum queue: its group's members and leader by node
        // name, as RabbitMQ lists a quorum queue's (`node` is the leader there).
        if let Some(leader) = &g.leader {
            obj.insert("leader".into(), json!(leader));
            obj.insert("node".into(), json!(leader));
        }
        obj.insert("members".into(), json!(g.members));
    }
    if let (Some(s), Some(obj)) = (q.stream(), v.as_object_mut()) {
        // A stream's extent and where each consumer reads (beyond RabbitMQ,
        // which shows these only in its stream plugin's pages).
        let b = s.log.bounds();
        let consumers: Vec<Value> = s
            .consumer_offsets()
            .into_iter()
            .map(|(c, offset)| {
                json!({
                    "consumer_tag": c.tag(),
                    "channel": c.options.channel,
                    "offset": offset,
                    "prefetch_count": c.options.prefetch,
                    "in_flight": c.in_flight(),
                })
            })
            .collect();
        obj.insert(
            "stream".into(),
            json!({
                "first_offset": b.first,
                "last_offset": b.next.checked_sub(1),
                "last_chunk_offset": b.last_chunk,
                "next_offset": b.next,
                "bytes": b.bytes,
                "segments": b.segments,
                "consumers": consumers,
            }),
        );
        obj.insert("message_bytes".into(), json!(b.bytes));
    }
    add_stats(
        &mut v,
        Some(&q.message_stats(ranges.msg)),
        Some(&q.history.length_details(ranges.lengths)),
    );
    v
}

fn rows(
    m: &Management,
    caller: &Caller,
    vhost: Option<&str>,
    q: &HashMap<String, String>,
) -> Vec<QueueRow> {
    let ranges = Ranges::parse(q);
    super::visible_vhosts(m, caller, vhost)
        .into_iter()
        .flat_map(|v| v.queues())
        .map(|queue| QueueRow { queue, ranges })
        .collect()
}

async fn list_all(
    State(m): State<Management>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let query = ListQuery::parse(&q)?;
    list_response(&m, rows(&m, &caller, None, &q), &query, &["vhost", "name"])
}

async fn list_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_vhost(&m, &vhost)?;
    let query = ListQuery::parse(&q)?;
    list_response(
        &m,
        rows(&m, &caller, Some(&vhost), &q),
        &query,
        &["vhost", "name"],
    )
}

fn find(
    m: &Management,
    caller: &Caller,
    vhost: &str,
    queue: &str,
) -> ApiResult<(Arc<switchyard_core::vhost::VHost>, Arc<Queue>)> {
    let v = caller.require_vhost(m, vhost)?;
    let q = v.queue(queue).map_err(|_| ApiError::not_found())?;
    Ok((v, q))
}

async fn show(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, queue)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let (_, queue) = find(&m, &caller, &vhost, &queue)?;
    let mut v = render(&m, &queue, Ranges::parse(&q));
    // The single-queue GET adds its consumers, as RabbitMQ's does.
    let by_outbox = super::connections::connections_by_outbox(&m);
    let consumers = super::connections::consumer_json(&m, &queue, &by_outbox);
    if let Some(o) = v.as_object_mut() {
        let exclusive = queue
            .consumers()
            .into_iter()
            .find(|c| c.options.exclusive)
            .map(|c| c.options.tag.clone());
        o.insert("exclusive_consumer_tag".into(), json!(exclusive));
        o.insert("consumer_details".into(), Value::Array(consumers));
    }
    Ok(object_response(v, &q))
}

/// PUT: `queue.declare` as the caller. The type comes only from
/// `arguments["x-queue-type"]`; `exclusive` cannot be declared over HTTP.
async fn declare(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, queue)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let v = caller.require_vhost(&m, &vhost)?;
    let body = body_object(&body)?;
    let options = QueueOptions {
        durable: field_bool(&body, "durable")?.unwrap_or(true),
        exclusive: false,
        auto_delete: field_bool(&body, "auto_delete")?.unwrap_or(false),
        arguments: field_arguments(&body, "arguments")?,
    };
    caller.check(&m, &vhost, Access::Configure, Resource::Queue, &queue)?;
    let existed = v.queue(&queue).is_ok();
    v.declare_queue(QueueDeclare {
        name: queue,
        passive: false,
        options,
        connection: super::http_connection(&m),
        server_named: false,
    })?;
    Ok(created_or_updated(!existed))
}

async fn delete(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, queue)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let (v, _) = find(&m, &caller, &vhost, &queue)?;
    caller.check(&m, &vhost, Access::Configure, Resource::Queue, &queue)?;
    let if_unused = q.get("if-unused").is_some_and(|s| s == "true");
    let if_empty = q.get("if-empty").is_some_and(|s| s == "true");
    v.delete_queue(&queue, if_unused, if_empty, super::http_connection(&m))?;
    Ok(no_content())
}

async fn purge(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, queue)): Path<(String, String)>,
) -> ApiResult {
    let (v, _) = find(&m, &caller, &vhost, &queue)?;
    caller.check(&m, &vhost, Access::Read, Resource::Queue, &queue)?;
    v.purge_queue(&queue, super::http_connection(&m))?;
    Ok(no_content())
}

/// What happens to messages fetched by the get endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckMode {
    AckRequeue,
    Ack,
    RejectRequeue,
    Reject,
}

/// A message body for JSON: as text when `auto` allows and it is UTF-8, else base64.
pub(crate) fn payload_json(
    body: &[u8],
    auto: bool,
    truncate: Option<usize>,
) -> (Value, &'static str) {
    let body = match truncate {
        Some(n) => body.get(..n).unwrap_or(body),
        None => body,
    };
    match (auto, std::str::from_utf8(body)) {
        (true, Ok(text)) => (Value::from(text), "string"),
        _ => (
            Value::from(base64::engine::general_purpose::STANDARD.encode(body)),
            "base64",
        ),
    }
}

fn message_json(
    message: &Message,
    redelivered: bool,
    remaining: usize,
    auto: bool,
    truncate: Option<usize>,
) -> Value {
    let (payload, encoding) = payload_json(&message.body, auto, truncate);
    json!({
        "payload_bytes": message.body.len(),
        "redelivered": redelivered,
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "message_count": remaining,
        "properties": properties_to_json(&message.properties),
        "payload": payload,
        "payload_encoding": encoding,
    })
}

/// `encoding`: `auto` (text when UTF-8) or `base64`.
fn parse_encoding(body: &serde_json::Map<String, Value>) -> ApiResult<bool> {
    match field_str(body, "encoding")?.unwrap_or("auto") {
        "auto" => Ok(true),
        "base64" => Ok(false),
        other => Err(ApiError::bad_request(format!(
            "encoding must be \"auto\" or \"base64\", got \"{other}\""
        ))),
    }
}

/// POST get: takes up to `count` messages as `basic.get` would, then requeues,
/// acknowledges or rejects them all as `ackmode` says.
async fn get_messages(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, queue)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let (v, q) = find(&m, &caller, &vhost, &queue)?;
    let body = body_object(&body)?;
    let count = field_u64(&body, "count")?.unwrap_or(1);
    let mode = match field_str(&body, "ackmode")? {
        Some("ack_requeue_true") => AckMode::AckRequeue,
        Some("ack_requeue_false") => AckMode::Ack,
        Some("reject_requeue_true") => AckMode::RejectRequeue,
        Some("reject_requeue_false") => AckMode::Reject,
        None => {
            // pyrabbit2 sends the old `requeue` flag instead.
            if field_bool(&body, "requeue")?.unwrap_or(true) {
                AckMode::AckRequeue
            } else {
                AckMode::Ack
            }
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!("unknown ackmode '{other}'")));
        }
    };
    let auto = parse_encoding(&body)?;
    let truncate = field_u64(&body, "truncate")?.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    caller.check(&m, &vhost, Access::Read, Resource::Queue, &queue)?;
    v.check_owner(&q, super::http_connection(&m))?;
    let mut taken = Vec::new();
    let mut out = Vec::new();
    for _ in 0..count {
        let Some(got) = q.get(false) else { break };
        out.push(message_json(
            &got.message.message,
            got.message.redelivered(),
            got.remaining,
            auto,
            truncate,
        ));
        taken.push(got.message);
    }
    match mode {
        AckMode::AckRequeue | AckMode::RejectRequeue => q.requeue(taken),
        AckMode::Ack => q.settle(&taken),
        AckMode::Reject => {
            let now_secs = super::now_ms() / 1000;
            v.dead_letter(&q, &taken, DeathReason::Rejected, now_secs);
        }
    }
    Ok(super::json(Value::Array(out)))
}

/// GET peek: the first `count` ready messages (default 1, at most 1000), copied
/// without taking, redelivering or reordering anything.
async fn peek(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, queue)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    const MAX_PEEK: usize = 1000;
    let (_, queue_ref) = find(&m, &caller, &vhost, &queue)?;
    let count = match q.get("count") {
        None => 1,
        Some(s) => s
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("count must be a positive integer"))?,
    };
    if count == 0 || count > MAX_PEEK {
        return Err(ApiError::bad_request(format!(
            "count must be 1..={MAX_PEEK}"
        )));
    }
    let auto = match q.get("encoding").map(String::as_str) {
        None | Some("auto") => true,
        Some("base64") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "encoding must be \"auto\" or \"base64\", got \"{other}\""
            )))
        }
    };
    let truncate = q
        .get("truncate")
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| ApiError::bad_request("truncate must be an integer"))
        })
        .transpose()?;
    // Browsing reads messages: the same permission as basic.get.
    caller.check(&m, &vhost, Access::Read, Resource::Queue, &queue)?;
    let peeked = queue_ref.peek(count);
    let total = queue_ref.message_count();
    let out: Vec<Value> = peeked
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut v = message_json(
                &p.message,
                p.redelivered,
                total.saturating_sub(i + 1),
                auto,
                truncate,
            );
            if let Value::Object(map) = &mut v {
                map.insert("position".into(), Value::from(i + 1));
                map.insert("delivery_count".into(), Value::from(p.delivery_count));
            }
            v
        })
        .collect();
    Ok(super::json(Value::Array(out)))
}

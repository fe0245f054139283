//! `/api/definitions` and `/api/definitions/{vhost}`: export and import in
//! RabbitMQ's JSON (MANAGEMENT.md §5), so a file exported from RabbitMQ imports
//! here and an export from here imports into RabbitMQ.
//!
//! Import is an additive merge in RabbitMQ's order (users, vhosts, permissions,
//! exchanges, topic permissions, global parameters, policies, parameters,
//! queues, bindings), stopping at the first object that cannot be applied with
//! a 400 that names it. What Switchyard has no use for (shovel and federation
//! parameters, global parameters other than `cluster_name`) is skipped and
//! listed in a 200 answer's `skipped`, never silently dropped; a file with
//! nothing skipped answers 204 as RabbitMQ does.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use switchyard_core::admin::{MetaCommand, UserLimits, VhostLimits};
use switchyard_core::exchange::ExchangeOptions;
use switchyard_core::field::FieldValue;
use switchyard_core::queue::QueueOptions;
use switchyard_core::vhost::{ExchangeDeclare, QueueDeclare, VHost};

use super::bindings::vhost_bindings;
use super::limits::limits_map;
use super::overview::{PRODUCT_NAME, PRODUCT_VERSION, RABBITMQ_VERSION};
use super::queues::queue_type;
use super::{
    field_arguments, field_bool, field_str, no_content, table_to_json, ApiError, ApiResult, Caller,
};
use crate::Management;

/// Largest definitions file accepted (axum's default body limit is 2 MB; a
/// cluster with thousands of queues exports more than that).
const MAX_DEFINITIONS_BYTES: usize = 256 * 1024 * 1024;

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/definitions", get(export_all).post(import_all))
        .route("/definitions/{vhost}", get(export_vhost).post(import_vhost))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_DEFINITIONS_BYTES))
}

// ---- export ----

/// Exchanges a definitions file leaves out: the default exchange and `amq.*`.
fn exported_exchange(name: &str) -> bool {
    !name.is_empty() && !name.starts_with("amq.")
}

fn exchanges_of(v: &VHost, with_vhost: bool) -> Vec<Value> {
    let mut xs: Vec<_> = v
        .exchanges()
        .into_iter()
        .filter(|x| exported_exchange(&x.name))
        .collect();
    xs.sort_by(|a, b| a.name.cmp(&b.name));
    xs.iter()
        .map(|x| {
            let mut o = json!({
                "name": x.name,
                "type": x.kind.as_str(),
                "durable": x.options.durable,
                "auto_delete": x.options.auto_delete,
                "internal": x.options.internal,
                "arguments": table_to_json(&x.options.arguments),
            });
            if with_vhost {
                put(&mut o, "vhost", Value::from(v.name.clone()));
            }
            o
        })
        .collect()
}

fn queues_of(v: &VHost, with_vhost: bool) -> Vec<Value> {
    let mut qs: Vec<_> = v
        .queues()
        .into_iter()
        .filter(|q| !q.options.exclusive)
        .collect();
    qs.sort_by(|a, b| a.name.cmp(&b.name));
    qs.iter()
        .map(|q| {
            let mut o = json!({
                "name": q.name,
                "type": queue_type(q),
                "durable": q.options.durable,
                "auto_delete": q.options.auto_delete,
                "arguments": table_to_json(&q.options.arguments),
            });
            if with_vhost {
                put(&mut o, "vhost", Value::from(v.name.clone()));
            }
            o
        })
        .collect()
}

fn bindings_of(v: &VHost, with_vhost: bool) -> Vec<Value> {
    vhost_bindings(v)
        .into_iter()
        .filter(|b| !b.source.is_empty())
        .map(|b| {
            let mut o = json!({
                "source": b.source,
                "destination": b.destination,
                "destination_type": b.destination_type,
                "routing_key": b.routing_key,
                "arguments": table_to_json(&b.arguments),
            });
            if with_vhost {
                put(&mut o, "vhost", Value::from(b.vhost));
            }
            o
        })
        .collect()
}

fn put(o: &mut Value, k: &str, v: Value) {
    if let Value::Object(map) = o {
        map.insert(k.to_owned(), v);
    }
}

fn policies_of(m: &Management, vhost: Option<&str>) -> Vec<Value> {
    m.broker
        .policies()
        .iter()
        .filter(|p| vhost.is_none_or(|v| p.vhost == v))
        .map(|p| {
            let mut o = super::policies::render(p);
            if vhost.is_some() {
                if let Value::Object(map) = &mut o {
                    map.remove("vhost");
                }
            }
            o
        })
        .collect()
}

fn vhost_limits(m: &Management, vhost: &str) -> Map<String, Value> {
    m.broker
        .vhost_limits()
        .iter()
        .find(|l| l.vhost == vhost)
        .map(|l| limits_map(&l.limits))
        .unwrap_or_default()
}

/// Answers with the document, as an attachment when `?download=<file>` asks.
fn document(doc: Value, q: &HashMap<String, String>) -> Response {
    let mut response = Json(doc).into_response();
    if let Some(file) = q.get("download").filter(|f| !f.is_empty()) {
        let safe: String = file
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
            .collect();
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
            response
                .headers_mut()
                .insert(header::CONTENT_DISPOSITION, v);
        }
    }
    response
}

async fn export_all(
    State(m): State<Management>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_admin()?;
    let b = &m.broker;
    let user_limits: HashMap<String, UserLimits> = b
        .user_limits()
        .into_iter()
        .map(|l| (l.user, l.limits))
        .collect();
    let users: Vec<Value> = b
        .users()
        .iter()
        .map(|u| {
            let mut o = super::users::render(u);
            let mut limits = Map::new();
            if let Some(l) = user_limits.get(&u.name) {
                if let Some(n) = l.max_connections {
                    limits.insert("max-connections".into(), Value::from(n));
                }
                if let Some(n) = l.max_channels {
                    limits.insert("max-channels".into(), Value::from(n));
                }
            }
            put(&mut o, "limits", Value::Object(limits));
            o
        })
        .collect();
    let mut vhost_infos = b.vhost_infos();
    vhost_infos.sort_by(|a, c| a.name.cmp(&c.name));
    let vhosts: Vec<Value> = vhost_infos
        .iter()
        .map(|v| {
            let dqt = v.default_queue_type.as_deref().unwrap_or("classic");
            json!({
                "name": v.name,
                "description": v.description,
                "tags": v.tags,
                "default_queue_type": dqt,
                "limits": vhost_limits(&m, &v.name),
                "metadata": {"description": v.description, "tags": v.tags, "default_queue_type": dqt},
            })
        })
        .collect();
    let live = super::all_vhosts(&m);
    let doc = json!({
        "rabbit_version": RABBITMQ_VERSION,
        "rabbitmq_version": RABBITMQ_VERSION,
        "product_name": PRODUCT_NAME,
        "product_version": PRODUCT_VERSION,
        "rabbitmq_definition_format": "cluster",
        "original_cluster_name": m.node.cluster_name,
        "explanation": format!("Definitions of cluster '{}'", m.node.cluster_name),
        "users": users,
        "vhosts": vhosts,
        "permissions": b.permissions().iter().map(super::permissions::render).collect::<Vec<_>>(),
        "topic_permissions": b.topic_permissions().iter().map(super::permissions::render_topic).collect::<Vec<_>>(),
        "parameters": [],
        "global_parameters": [{"name": "cluster_name", "value": m.node.cluster_name}],
        "policies": policies_of(&m, None),
        "queues": live.iter().flat_map(|v| queues_of(v, true)).collect::<Vec<_>>(),
        "exchanges": live.iter().flat_map(|v| exchanges_of(v, true)).collect::<Vec<_>>(),
        "bindings": live.iter().flat_map(|v| bindings_of(v, true)).collect::<Vec<_>>(),
    });
    Ok(document(doc, &q))
}

async fn export_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_admin()?;
    let info = m
        .broker
        .vhost_info(&vhost)
        .ok_or_else(ApiError::not_found)?;
    let v = m.broker.vhost(&vhost).map_err(|_| ApiError::not_found())?;
    let dqt = info.default_queue_type.as_deref().unwrap_or("classic");
    let doc = json!({
        "rabbit_version": RABBITMQ_VERSION,
        "rabbitmq_version": RABBITMQ_VERSION,
        "product_name": PRODUCT_NAME,
        "product_version": PRODUCT_VERSION,
        "rabbitmq_definition_format": "single_virtual_host",
        "original_vhost_name": vhost,
        "explanation": format!("Definitions of virtual host '{vhost}'"),
        "metadata": {"description": info.description, "tags": info.tags, "default_queue_type": dqt},
        "description": info.description,
        "default_queue_type": dqt,
        "limits": vhost_limits(&m, &vhost),
        "parameters": [],
        "policies": policies_of(&m, Some(&vhost)),
        "queues": queues_of(&v, false),
        "exchanges": exchanges_of(&v, false),
        "bindings": bindings_of(&v, false),
    });
    Ok(document(doc, &q))
}

// ---- import ----

/// What an import did not apply, for the answer.
#[derive(Default)]
struct Report {
    skipped: Vec<String>,
}

fn parse_document(body: &[u8]) -> ApiResult<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request("failed_to_parse_json: not an object")),
        Err(e) => Err(ApiError::bad_request(format!("failed_to_parse_json: {e}"))),
    }
}

/// The entries of one top-level list (absent: none).
fn entries<'a>(doc: &'a Map<String, Value>, key: &str) -> ApiResult<Vec<&'a Map<String, Value>>> {
    match doc.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::Object(o) => Ok(o),
                other => Err(ApiError::bad_request(format!(
                    "{key}: expected objects, got {other}"
                ))),
            })
            .collect(),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key}: expected an array, got {other}"
        ))),
    }
}

fn name_of<'a>(o: &'a Map<String, Value>, what: &str, key: &str) -> ApiResult<&'a str> {
    field_str(o, key)?.ok_or_else(|| ApiError::bad_request(format!("{what} without '{key}'")))
}

/// Prefixes an error's reason with the object it concerns.
fn about(what: String) -> impl Fn(ApiError) -> ApiError {
    move |e| e.context(&what)
}

impl ApiError {
    fn context(mut self, what: &str) -> Self {
        self.reason = format!("{what}: {}", self.reason);
        self
    }
}

fn limits_of(o: &Map<String, Value>) -> ApiResult<Map<String, Value>> {
    match o.get("limits") {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(l)) => Ok(l.clone()),
        Some(Value::Array(a)) if a.is_empty() => Ok(Map::new()),
        Some(other) => Err(ApiError::bad_request(format!(
            "limits: expected an object, got {other}"
        ))),
    }
}

fn limit(l: &Map<String, Value>, key: &str) -> ApiResult<Option<i64>> {
    match l.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("{key}: expected an integer"))),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("{key}: expected an integer"))),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key}: expected an integer, got {other}"
        ))),
    }
}

fn import_vhost_limits(m: &Management, vhost: &str, l: &Map<String, Value>) -> ApiResult<()> {
    let limits = VhostLimits {
        max_connections: limit(l, "max-connections")?,
        max_queues: limit(l, "max-queues")?,
    };
    if !limits.is_empty() {
        m.broker.apply(MetaCommand::SetVhostLimits {
            vhost: vhost.to_owned(),
            limits,
        })?;
    }
    Ok(())
}

/// The vhost an entity entry belongs to: its own `vhost` in a cluster file (a
/// missing one is RabbitMQ's `invalid_definitions_file`), the URL's otherwise.
fn entry_vhost<'a>(
    o: &'a Map<String, Value>,
    only: Option<&'a str>,
    what: &str,
) -> ApiResult<&'a str> {
    match only {
        Some(v) => Ok(v),
        None => field_str(o, "vhost")?.ok_or_else(|| {
            ApiError::bad_request(format!(
                "invalid_definitions_file: {what} without a vhost in a cluster-wide import (import it into /api/definitions/{{vhost}})"
            ))
        }),
    }
}

fn live_vhost(m: &Management, name: &str) -> ApiResult<std::sync::Arc<VHost>> {
    m.broker.vhost(name).map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            format!("vhost_not_found: {name}"),
        )
    })
}

fn import(m: &Management, doc: &Map<String, Value>, only: Option<&str>) -> ApiResult<Report> {
    let mut report = Report::default();
    // Reject orphans before changing anything (RabbitMQ's any_orphaned_in_doc).
    if only.is_none() {
        for key in ["queues", "exchanges", "bindings"] {
            for o in entries(doc, key)? {
                entry_vhost(o, None, key)?;
            }
        }
    }
    if only.is_none() {
        for u in entries(doc, "users")? {
            let name = name_of(u, "user", "name")?;
            let existing = m.broker.user_info(name);
            let cmd = super::users::user_command(name, u, existing.as_ref())
                .map_err(about(format!("user '{name}'")))?;
            m.broker
                .apply(cmd)
                .map_err(|e| ApiError::from(e).context(&format!("user '{name}'")))?;
            let l = limits_of(u)?;
            let limits = UserLimits {
                max_connections: limit(&l, "max-connections")?,
                max_channels: limit(&l, "max-channels")?,
            };
            if !limits.is_empty() {
                m.broker.apply(MetaCommand::SetUserLimits {
                    user: name.to_owned(),
                    limits,
                })?;
            }
        }
        for v in entries(doc, "vhosts")? {
            let name = name_of(v, "vhost", "name")?;
            let existing = m.broker.vhost_info(name);
            let cmd = super::vhosts::vhost_command(name, v, existing.as_ref())
                .map_err(about(format!("vhost '{name}'")))?;
            m.broker
                .apply(cmd)
                .map_err(|e| ApiError::from(e).context(&format!("vhost '{name}'")))?;
            import_vhost_limits(m, name, &limits_of(v)?)?;
        }
        for p in entries(doc, "permissions")? {
            let user = name_of(p, "permission", "user")?;
            let vhost = name_of(p, "permission", "vhost")?;
            let pat = |k: &str| field_str(p, k).map(|s| s.unwrap_or_default().to_owned());
            m.broker
                .apply(MetaCommand::SetPermissions {
                    user: user.to_owned(),
                    vhost: vhost.to_owned(),
                    configure: pat("configure")?,
                    write: pat("write")?,
                    read: pat("read")?,
                })
                .map_err(|e| {
                    ApiError::from(e).context(&format!("permissions of '{user}' in '{vhost}'"))
                })?;
        }
    } else if let Some(vhost) = only {
        // A vhost file carries the vhost's own limits and metadata.
        import_vhost_limits(m, vhost, &limits_of(doc)?)?;
    }
    for x in entries(doc, "exchanges")? {
        let vhost = entry_vhost(x, only, "exchange")?;
        let name = name_of(x, "exchange", "name")?;
        let what = format!("exchange '{name}' in vhost '{vhost}'");
        if !exported_exchange(name) {
            report.skipped.push(format!("{what}: predeclared"));
            continue;
        }
        let v = live_vhost(m, vhost)?;
        let kind = field_str(x, "type")?.unwrap_or("direct").to_owned();
        v.declare_exchange(ExchangeDeclare {
            name: name.to_owned(),
            kind,
            passive: false,
            options: ExchangeOptions {
                durable: field_bool(x, "durable")?.unwrap_or(true),
                auto_delete: field_bool(x, "auto_delete")?.unwrap_or(false),
                internal: field_bool(x, "internal")?.unwrap_or(false),
                arguments: field_arguments(x, "arguments")?,
            },
        })
        .map_err(|e| ApiError::from(e).context(&what))?;
    }
    if only.is_none() {
        for p in entries(doc, "topic_permissions")? {
            let user = name_of(p, "topic permission", "user")?;
            let vhost = name_of(p, "topic permission", "vhost")?;
            let pat = |k: &str| field_str(p, k).map(|s| s.unwrap_or_default().to_owned());
            m.broker
                .apply(MetaCommand::SetTopicPermissions {
                    user: user.to_owned(),
                    vhost: vhost.to_owned(),
                    exchange: pat("exchange")?,
                    write: pat("write")?,
                    read: pat("read")?,
                })
                .map_err(|e| {
                    ApiError::from(e)
                        .context(&format!("topic permissions of '{user}' in '{vhost}'"))
                })?;
        }
        for g in entries(doc, "global_parameters")? {
            let name = field_str(g, "name")?.unwrap_or_default();
            // RabbitMQ's own bookkeeping (`internal_cluster_id`) and the cluster
            // name belong to the cluster that exported them.
            if name.starts_with("internal") || name == "cluster_name" {
                continue;
            }
            report.skipped.push(format!(
                "global parameter '{name}': global parameters are not settable in Switchyard"
            ));
        }
    }
    for p in entries(doc, "policies")? {
        let vhost = entry_vhost(p, only, "policy")?;
        let name = name_of(p, "policy", "name")?;
        let what = format!("policy '{name}' in vhost '{vhost}'");
        let spec = super::policies::policy_spec(vhost, name, p).map_err(about(what.clone()))?;
        m.broker
            .apply(MetaCommand::SetPolicy(spec))
            .map_err(|e| ApiError::from(e).context(&what))?;
    }
    for p in entries(doc, "parameters")? {
        let component = field_str(p, "component")?.unwrap_or_default();
        let name = field_str(p, "name")?.unwrap_or_default();
        let vhost = only.or(field_str(p, "vhost")?).unwrap_or_default();
        if component == "vhost-limits" {
            // RabbitMQ 3.x exports a vhost's limits as this runtime parameter.
            let limits = match p.get("value") {
                Some(Value::Object(l)) => l.clone(),
                _ => Map::new(),
            };
            import_vhost_limits(m, vhost, &limits)
                .map_err(about(format!("limits of vhost '{vhost}'")))?;
            continue;
        }
        report.skipped.push(format!(
            "parameter '{name}' in vhost '{vhost}': {}",
            super::parameters::unsupported_reason(component)
        ));
    }
    for q in entries(doc, "queues")? {
        let vhost = entry_vhost(q, only, "queue")?;
        let name = name_of(q, "queue", "name")?;
        let what = format!("queue '{name}' in vhost '{vhost}'");
        if name.starts_with("amq.") {
            report
                .skipped
                .push(format!("{what}: the 'amq.' prefix is reserved"));
            continue;
        }
        let v = live_vhost(m, vhost)?;
        let mut arguments = field_arguments(q, "arguments")?;
        match field_str(q, "type")? {
            None | Some("classic") => {}
            Some("quorum") => {
                if arguments.get("x-queue-type").is_none() {
                    arguments.insert("x-queue-type", FieldValue::string("quorum"));
                }
            }
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "{what}: queue type '{other}' is not supported"
                )))
            }
        }
        v.declare_queue(QueueDeclare {
            name: name.to_owned(),
            passive: false,
            options: QueueOptions {
                durable: field_bool(q, "durable")?.unwrap_or(true),
                exclusive: false,
                auto_delete: field_bool(q, "auto_delete")?.unwrap_or(false),
                arguments,
            },
            connection: super::http_connection(m),
            server_named: false,
        })
        .map_err(|e| ApiError::from(e).context(&what))?;
    }
    for b in entries(doc, "bindings")? {
        let vhost = entry_vhost(b, only, "binding")?;
        let source = field_str(b, "source")?.unwrap_or_default();
        let destination = name_of(b, "binding", "destination")?;
        let routing_key = field_str(b, "routing_key")?.unwrap_or_default();
        let arguments = field_arguments(b, "arguments")?;
        let what = format!("binding '{source}' -> '{destination}' in vhost '{vhost}'");
        let v = live_vhost(m, vhost)?;
        let result = match field_str(b, "destination_type")?.unwrap_or("queue") {
            "queue" => v.bind_queue(
                destination,
                source,
                routing_key,
                arguments,
                super::http_connection(m),
            ),
            "exchange" => v.bind_exchange(destination, source, routing_key, arguments),
            other => {
                return Err(ApiError::bad_request(format!(
                    "{what}: destination_type '{other}'"
                )))
            }
        };
        result.map_err(|e| ApiError::from(e).context(&what))?;
    }
    Ok(report)
}

/// Imports on a blocking thread (a big file takes seconds and must not hold
/// a runtime worker) with the store's metadata writes made durable by one
/// sync at the end instead of one per object. The answer goes out after that
/// sync, so a 204 still means every imported object survives a crash.
async fn import_in_bulk(
    m: Management,
    doc: Map<String, Value>,
    only: Option<String>,
) -> ApiResult<Report> {
    let internal = |e: String| {
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e,
        )
    };
    tokio::task::spawn_blocking(move || {
        let mut result = None;
        let mut work = || result = Some(import(&m, &doc, only.as_deref()));
        match m.broker.store() {
            Some(store) => store
                .bulk_metadata(&mut work)
                .map_err(|e| internal(format!("cannot sync the imported definitions: {e}")))?,
            None => work(),
        }
        result.unwrap_or_else(|| Err(internal("the import did not run".to_owned())))
    })
    .await
    .map_err(|e| internal(format!("the import stopped: {e}")))?
}

fn answer(report: Report) -> Response {
    if report.skipped.is_empty() {
        no_content()
    } else {
        for s in &report.skipped {
            tracing::warn!(skipped = %s, "definitions import");
        }
        Json(json!({"status": "ok", "skipped": report.skipped})).into_response()
    }
}

/// The definitions document of a request: JSON, or the `file` part of a
/// `multipart/form-data` upload (the web UI's import form).
fn request_document(headers: &axum::http::HeaderMap, body: &[u8]) -> ApiResult<Map<String, Value>> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if let Some(boundary) = content_type
        .strip_prefix("multipart/form-data")
        .and_then(|rest| rest.split("boundary=").nth(1))
    {
        let boundary = boundary.trim_matches('"');
        let part = multipart_file(body, boundary)
            .ok_or_else(|| ApiError::bad_request("multipart upload without a 'file' part"))?;
        return parse_document(part);
    }
    parse_document(body)
}

/// The body of the part named `file` of a multipart body.
fn multipart_file<'a>(body: &'a [u8], boundary: &str) -> Option<&'a [u8]> {
    let delimiter = format!("--{boundary}");
    let text_positions = find_all(body, delimiter.as_bytes());
    for pair in text_positions.windows(2) {
        let (start, end) = (*pair.first()?, *pair.get(1)?);
        let part = body.get(start + delimiter.len()..end)?;
        let split = find_all(part, b"\r\n\r\n").into_iter().next()?;
        let head = std::str::from_utf8(part.get(..split)?).ok()?;
        if head.contains("name=\"file\"") {
            let content = part.get(split + 4..)?;
            return Some(content.strip_suffix(b"\r\n").unwrap_or(content));
        }
    }
    None
}

fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return Vec::new();
    }
    (0..=haystack.len() - needle.len())
        .filter(|&i| haystack.get(i..i + needle.len()) == Some(needle))
        .collect()
}

async fn import_all(
    State(m): State<Management>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    let doc = request_document(&headers, &body)?;
    Ok(answer(import_in_bulk(m, doc, None).await?))
}

async fn import_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    if m.broker.vhost_info(&vhost).is_none() {
        return Err(ApiError::not_found());
    }
    let doc = request_document(&headers, &body)?;
    Ok(answer(import_in_bulk(m, doc, Some(vhost)).await?))
}

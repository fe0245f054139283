//! `/api/mqtt/...`: the MQTT view RabbitMQ lacks. Sessions (client id, clean or
//! persistent, expiry, subscriptions, queued and in-flight counts) and retained
//! messages (list, read, delete), read through the core's protocol-neutral
//! session directory, which the MQTT adapter registers. The topic of a
//! retained message is one path segment, percent-encoded (`a%2Fb`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use switchyard_core::sessions::{RetainedView, SessionDirectory, SessionView};

use super::exchanges::properties_to_json;
use super::{
    list_response, no_content, object_response, ApiError, ApiResult, Caller, Key, ListQuery, Row,
};
use crate::Management;

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/mqtt/sessions", get(sessions))
        .route("/mqtt/sessions/{vhost}", get(sessions_vhost))
        .route("/mqtt/sessions/{vhost}/{client_id}", get(session))
        .route("/mqtt/retained", get(retained))
        .route("/mqtt/retained/{vhost}", get(retained_vhost))
        .route(
            "/mqtt/retained/{vhost}/{topic}",
            get(retained_one).delete(retained_delete),
        )
}

fn directory(m: &Management) -> ApiResult<Arc<dyn SessionDirectory>> {
    m.broker
        .session_directories
        .get("mqtt")
        .ok_or_else(ApiError::not_found)
}

struct SessionRow(SessionView);

fn render_session(s: &SessionView) -> Value {
    json!({
        "vhost": s.vhost,
        "client_id": s.client_id,
        "connected": s.connected,
        "clean_session": !s.persistent,
        "persistent": s.persistent,
        "expiry_interval": s.expiry_secs,
        "expires_in_ms": s.expires_in_ms,
        "protocol": s.protocol,
        "subscriptions": s.subscriptions.iter().map(|sub| json!({
            "filter": sub.filter,
            "qos": sub.qos,
            "share": sub.share,
            "queue": sub.queue,
        })).collect::<Vec<_>>(),
        "messages_queued": s.queued,
        "messages_in_flight": s.in_flight,
    })
}

impl Row for SessionRow {
    fn name(&self) -> &str {
        &self.0.client_id
    }
    fn key(&self, field: &str) -> Option<Key> {
        let s = &self.0;
        Some(match field {
            "client_id" | "name" => Key::Str(s.client_id.clone()),
            "vhost" => Key::Str(s.vhost.clone()),
            "connected" => Key::Bool(s.connected),
            "persistent" => Key::Bool(s.persistent),
            "messages_queued" => Key::Num(s.queued as f64),
            "messages_in_flight" => Key::Num(s.in_flight as f64),
            _ => return None,
        })
    }
    fn render(&self, _m: &Management) -> Value {
        render_session(&self.0)
    }
}

fn session_rows(
    m: &Management,
    caller: &Caller,
    vhost: Option<&str>,
) -> ApiResult<Vec<SessionRow>> {
    Ok(directory(m)?
        .sessions(&m.broker)
        .into_iter()
        .filter(|s| vhost.is_none_or(|v| s.vhost == v))
        .filter(|s| caller.sees_vhost(m, &s.vhost))
        .map(SessionRow)
        .collect())
}

async fn sessions(
    State(m): State<Management>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let rows = session_rows(&m, &caller, None)?;
    list_response(&m, rows, &ListQuery::parse(&q)?, &["vhost", "client_id"])
}

async fn sessions_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_vhost(&m, &vhost)?;
    let rows = session_rows(&m, &caller, Some(&vhost))?;
    list_response(&m, rows, &ListQuery::parse(&q)?, &["vhost", "client_id"])
}

async fn session(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, client_id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_vhost(&m, &vhost)?;
    let s = session_rows(&m, &caller, Some(&vhost))?
        .into_iter()
        .find(|s| s.0.client_id == client_id)
        .ok_or_else(ApiError::not_found)?;
    Ok(object_response(render_session(&s.0), &q))
}

/// A retained message; the payload only when asked for (`with_payload`).
fn render_retained(r: &RetainedView, with_payload: bool) -> Value {
    let mut v = json!({
        "vhost": r.vhost,
        "topic": r.topic,
        "payload_bytes": r.message.body.len(),
        "properties": properties_to_json(&r.message.properties),
    });
    if with_payload {
        if let Value::Object(map) = &mut v {
            let (payload, encoding) = super::queues::payload_json(&r.message.body, true, None);
            map.insert("payload".into(), payload);
            map.insert("payload_encoding".into(), Value::from(encoding));
        }
    }
    v
}

fn retained_list(m: &Management, caller: &Caller, vhost: Option<&str>) -> ApiResult<Value> {
    let mut all: Vec<RetainedView> = directory(m)?
        .retained(vhost)
        .into_iter()
        .filter(|r| caller.sees_vhost(m, &r.vhost))
        .collect();
    all.sort_by(|a, b| (&a.vhost, &a.topic).cmp(&(&b.vhost, &b.topic)));
    Ok(Value::Array(
        all.iter().map(|r| render_retained(r, false)).collect(),
    ))
}

async fn retained(State(m): State<Management>, caller: Caller) -> ApiResult {
    Ok(super::json(retained_list(&m, &caller, None)?))
}

async fn retained_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_vhost(&m, &vhost)?;
    Ok(super::json(retained_list(&m, &caller, Some(&vhost))?))
}

async fn retained_one(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, topic)): Path<(String, String)>,
) -> ApiResult {
    caller.require_vhost(&m, &vhost)?;
    let r = directory(&m)?
        .retained(Some(&vhost))
        .into_iter()
        .find(|r| r.topic == topic)
        .ok_or_else(ApiError::not_found)?;
    Ok(super::json(render_retained(&r, true)))
}

/// DELETE: clears the topic's retained message, as an empty retained PUBLISH
/// would. Administrators only.
async fn retained_delete(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, topic)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    caller.require_vhost(&m, &vhost)?;
    match directory(&m)?.delete_retained(&vhost, &topic) {
        Ok(true) => Ok(no_content()),
        Ok(false) => Err(ApiError::not_found()),
        Err(e) => Err(ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("cannot delete the retained message: {e}"),
        )),
    }
}

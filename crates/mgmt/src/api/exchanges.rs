//! `/api/exchanges`: list, declare, delete, and publish through an exchange.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use serde_json::{json, Map, Value};
use switchyard_core::auth::{Access, Resource};
use switchyard_core::exchange::{Exchange, ExchangeOptions};
use switchyard_core::message::{Message, Properties};
use switchyard_core::vhost::ExchangeDeclare;

use super::{
    body_object, created_or_updated, exchange_name, field_arguments, field_bool, field_str,
    list_response, no_content, object_response, table_to_json, ApiError, ApiResult, Caller, Key,
    ListQuery, Ranges, Row,
};
use crate::Management;

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/exchanges", get(list_all))
        .route("/exchanges/{vhost}", get(list_vhost))
        .route(
            "/exchanges/{vhost}/{exchange}",
            get(show).put(declare).delete(delete),
        )
        .route("/exchanges/{vhost}/{exchange}/publish", post(publish))
}

/// An exchange of a vhost, as a list row.
pub(crate) struct ExchangeRow {
    pub vhost: String,
    pub exchange: Arc<Exchange>,
    pub ranges: Ranges,
}

impl Row for ExchangeRow {
    fn name(&self) -> &str {
        &self.exchange.name
    }
    fn key(&self, field: &str) -> Option<Key> {
        let x = &self.exchange;
        Some(match field {
            "name" => Key::Str(x.name.clone()),
            "vhost" => Key::Str(self.vhost.clone()),
            "type" => Key::Str(x.kind.as_str().to_owned()),
            "durable" => Key::Bool(x.options.durable),
            "auto_delete" => Key::Bool(x.options.auto_delete),
            "internal" => Key::Bool(x.options.internal),
            _ => return None,
        })
    }
    fn render(&self, m: &Management) -> Value {
        render(m, &self.vhost, &self.exchange, self.ranges)
    }
}

pub(crate) fn render(_m: &Management, vhost: &str, x: &Exchange, ranges: Ranges) -> Value {
    let mut v = json!({
        "name": x.name,
        "vhost": vhost,
        "type": x.kind.as_str(),
        "durable": x.options.durable,
        "auto_delete": x.options.auto_delete,
        "internal": x.options.internal,
        "arguments": table_to_json(&x.options.arguments),
        "user_who_performed_action": "",
    });
    super::add_stats(&mut v, Some(&x.message_stats(ranges.msg)), None);
    v
}

fn rows(
    m: &Management,
    caller: &Caller,
    vhost: Option<&str>,
    q: &HashMap<String, String>,
) -> Vec<ExchangeRow> {
    let ranges = Ranges::parse(q);
    super::visible_vhosts(m, caller, vhost)
        .into_iter()
        .flat_map(|v| {
            v.exchanges().into_iter().map(move |x| ExchangeRow {
                vhost: v.name.clone(),
                exchange: x,
                ranges,
            })
        })
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

async fn show(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, exchange)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let v = caller.require_vhost(&m, &vhost)?;
    let x = v
        .exchange(exchange_name(&exchange))
        .map_err(|_| ApiError::not_found())?;
    Ok(object_response(
        render(&m, &vhost, &x, Ranges::parse(&q)),
        &q,
    ))
}

/// PUT: `exchange.declare` as the caller, with AMQP's permission checks.
async fn declare(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, exchange)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let v = caller.require_vhost(&m, &vhost)?;
    let body = body_object(&body)?;
    let name = exchange_name(&exchange).to_owned();
    let kind = field_str(&body, "type")?
        .ok_or_else(|| ApiError::bad_request("key_missing: type"))?
        .to_owned();
    let options = ExchangeOptions {
        durable: field_bool(&body, "durable")?.unwrap_or(true),
        auto_delete: field_bool(&body, "auto_delete")?.unwrap_or(false),
        internal: field_bool(&body, "internal")?.unwrap_or(false),
        arguments: field_arguments(&body, "arguments")?,
    };
    if name.is_empty() {
        return Err(switchyard_core::CoreError::access_refused(
            "operation not permitted on the default exchange",
        )
        .into());
    }
    caller.check(&m, &vhost, Access::Configure, Resource::Exchange, &name)?;
    if let Some(ae) = options.arguments.get_str("alternate-exchange") {
        caller.check(&m, &vhost, Access::Write, Resource::Exchange, ae)?;
    }
    let existed = v.exchange(&name).is_ok();
    v.declare_exchange(ExchangeDeclare {
        name,
        kind,
        passive: false,
        options,
    })?;
    Ok(created_or_updated(!existed))
}

async fn delete(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, exchange)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let v = caller.require_vhost(&m, &vhost)?;
    let name = exchange_name(&exchange);
    v.exchange(name).map_err(|_| ApiError::not_found())?;
    caller.check(&m, &vhost, Access::Configure, Resource::Exchange, name)?;
    let if_unused = q.get("if-unused").is_some_and(|s| s == "true");
    v.delete_exchange(name, if_unused)?;
    Ok(no_content())
}

/// POST publish: `{"routing_key","payload","payload_encoding","properties"}` ->
/// `{"routed": bool}`, through the same route call as an AMQP basic.publish.
async fn publish(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, exchange)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let v = caller.require_vhost(&m, &vhost)?;
    let body = body_object(&body)?;
    let name = exchange_name(&exchange).to_owned();
    v.exchange(&name).map_err(|_| ApiError::not_found())?;
    let routing_key = field_str(&body, "routing_key")?
        .unwrap_or_default()
        .to_owned();
    let payload = field_str(&body, "payload")?.unwrap_or_default();
    let payload = match field_str(&body, "payload_encoding")?.unwrap_or("string") {
        "string" => Bytes::copy_from_slice(payload.as_bytes()),
        "base64" => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(payload.trim())
                .map_err(|e| ApiError::bad_request(format!("payload is not base64: {e}")))?,
        ),
        other => {
            return Err(ApiError::bad_request(format!(
                "payload_encoding must be \"string\" or \"base64\", got \"{other}\""
            )))
        }
    };
    let properties = match body.get("properties") {
        None | Some(Value::Null) => Properties::default(),
        Some(Value::Object(p)) => properties_from_json(p)?,
        Some(Value::Array(a)) if a.is_empty() => Properties::default(),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "properties: expected an object, got {other}"
            )))
        }
    };
    // The permission is named after `amq.default` for the default exchange, as
    // the AMQP adapter does.
    let permission_name = if name.is_empty() {
        "amq.default"
    } else {
        &name
    };
    caller.check(
        &m,
        &vhost,
        Access::Write,
        Resource::Exchange,
        permission_name,
    )?;
    if let Some(user_id) = properties.user_id.as_deref() {
        if user_id != caller.name {
            return Err(ApiError::bad_request(format!(
                "PRECONDITION_FAILED - user_id property set to '{user_id}' but authenticated user was '{}'",
                caller.name
            )));
        }
    }
    if let Some(exp) = properties.expiration.as_deref() {
        if exp.parse::<u64>().is_err() {
            return Err(ApiError::bad_request(format!(
                "PRECONDITION_FAILED - invalid expiration '{exp}'"
            )));
        }
    }
    let mut message = Message::new(name, routing_key, properties, payload);
    let now = super::now_ms();
    if let Some(msg) = Arc::get_mut(&mut message) {
        msg.received_ms = Some(now).into();
    }
    let routed = v.publish_at(message, now)?;
    Ok(super::json(json!({"routed": routed.queues > 0})))
}

/// Message properties from the JSON the management API takes (RabbitMQ's
/// `rabbit_mgmt_format:to_basic_properties`): unknown keys are refused, as there.
pub(crate) fn properties_from_json(p: &Map<String, Value>) -> ApiResult<Properties> {
    let mut props = Properties::default();
    let text = |k: &str, v: &Value| -> ApiResult<String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(ApiError::bad_request(format!(
                "properties.{k}: expected a string, got {other}"
            ))),
        }
    };
    let number = |k: &str, v: &Value| -> ApiResult<u64> {
        match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .ok_or_else(|| ApiError::bad_request(format!("properties.{k}: expected an integer")))
    };
    for (k, v) in p {
        if v.is_null() {
            continue;
        }
        match k.as_str() {
            "content_type" => props.content_type = Some(text(k, v)?),
            "content_encoding" => props.content_encoding = Some(text(k, v)?),
            "correlation_id" => props.correlation_id = Some(text(k, v)?),
            "reply_to" => props.reply_to = Some(text(k, v)?),
            "expiration" => props.expiration = Some(text(k, v)?),
            "message_id" => props.message_id = Some(text(k, v)?),
            "type" => props.kind = Some(text(k, v)?),
            "user_id" => props.user_id = Some(text(k, v)?),
            "app_id" => props.app_id = Some(text(k, v)?),
            "cluster_id" => props.cluster_id = Some(text(k, v)?),
            "timestamp" => props.timestamp = Some(number(k, v)?),
            "delivery_mode" => {
                let n = number(k, v)?;
                props.delivery_mode = Some(
                    u8::try_from(n)
                        .map_err(|_| ApiError::bad_request("properties.delivery_mode: 1 or 2"))?,
                );
            }
            "priority" => {
                let n = number(k, v)?;
                props.priority = Some(
                    u8::try_from(n)
                        .map_err(|_| ApiError::bad_request("properties.priority: 0..=255"))?,
                );
            }
            "headers" => match v {
                Value::Object(h) => props.headers = Some(super::json_to_table(h)),
                Value::Array(a) if a.is_empty() => {}
                other => {
                    return Err(ApiError::bad_request(format!(
                        "properties.headers: expected an object, got {other}"
                    )))
                }
            },
            other => {
                return Err(ApiError::bad_request(format!(
                    "properties: unknown property '{other}'"
                )))
            }
        }
    }
    Ok(props)
}

/// Properties as the get endpoint returns them (only those set).
pub(crate) fn properties_to_json(p: &Properties) -> Value {
    let mut map = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            map.insert(k.to_owned(), v);
        }
    };
    put("content_type", p.content_type.clone().map(Value::from));
    put(
        "content_encoding",
        p.content_encoding.clone().map(Value::from),
    );
    put("headers", p.headers.as_ref().map(table_to_json));
    put("delivery_mode", p.delivery_mode.map(Value::from));
    put("priority", p.priority.map(Value::from));
    put("correlation_id", p.correlation_id.clone().map(Value::from));
    put("reply_to", p.reply_to.clone().map(Value::from));
    put("expiration", p.expiration.clone().map(Value::from));
    put("message_id", p.message_id.clone().map(Value::from));
    put("timestamp", p.timestamp.map(Value::from));
    put("type", p.kind.clone().map(Value::from));
    put("user_id", p.user_id.clone().map(Value::from));
    put("app_id", p.app_id.clone().map(Value::from));
    put("cluster_id", p.cluster_id.clone().map(Value::from));
    Value::Object(map)
}

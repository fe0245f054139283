//! `/api/vhost-limits`: `max-connections` and `max-queues` per vhost (user
//! limits live with the users). Reads need vhost access, changes an
//! administrator.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};
use switchyard_core::admin::{MetaCommand, VhostLimits};

use super::users::limit_value;
use super::{body_object, json, no_content, ApiError, ApiResult, Caller};
use crate::Management;

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/vhost-limits", get(list))
        .route("/vhost-limits/{vhost}", get(of_vhost))
        .route(
            "/vhost-limits/{vhost}/{name}",
            axum::routing::put(put).delete(delete),
        )
}

/// A vhost's limits as a `{"max-connections": n, ...}` map.
pub(crate) fn limits_map(limits: &VhostLimits) -> Map<String, Value> {
    let mut value = Map::new();
    if let Some(n) = limits.max_connections {
        value.insert("max-connections".into(), Value::from(n));
    }
    if let Some(n) = limits.max_queues {
        value.insert("max-queues".into(), Value::from(n));
    }
    value
}

fn listed(m: &Management, caller: &Caller, vhost: Option<&str>) -> Value {
    Value::Array(
        m.broker
            .vhost_limits()
            .iter()
            .filter(|l| vhost.is_none_or(|v| l.vhost == v))
            .filter(|l| caller.sees_vhost(m, &l.vhost))
            .map(|l| json!({"vhost": l.vhost, "value": limits_map(&l.limits)}))
            .collect(),
    )
}

async fn list(State(m): State<Management>, caller: Caller) -> ApiResult {
    Ok(json(listed(&m, &caller, None)))
}

async fn of_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_vhost(&m, &vhost)?;
    Ok(json(listed(&m, &caller, Some(&vhost))))
}

async fn put(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    if m.broker.vhost_info(&vhost).is_none() {
        return Err(ApiError::not_found());
    }
    let value = limit_value(&body_object(&body)?)?;
    let mut limits = VhostLimits::default();
    match name.as_str() {
        "max-connections" => limits.max_connections = Some(value),
        "max-queues" => limits.max_queues = Some(value),
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown vhost limit '{other}' (max-connections, max-queues)"
            )))
        }
    }
    m.broker
        .apply(MetaCommand::SetVhostLimits { vhost, limits })?;
    Ok(no_content())
}

async fn delete(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    if m.broker.vhost_info(&vhost).is_none() {
        return Err(ApiError::not_found());
    }
    m.broker.apply(MetaCommand::ClearVhostLimit {
        vhost,
        limit: Some(name),
    })?;
    Ok(no_content())
}

//! `/api/policies` and `/api/operator-policies`. Setting one applies it to the
//! live queues at once (the core's `SetPolicy` command).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};
use switchyard_core::admin::{MetaCommand, PolicyInfo, PolicySpec};

use super::{
    body_object, created_or_updated, field_str, json, json_to_table, no_content, object_response,
    table_to_json, ApiError, ApiResult, Caller,
};
use crate::Management;

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/policies", get(list))
        .route("/policies/{vhost}", get(list_vhost))
        .route(
            "/policies/{vhost}/{name}",
            get(show).put(put).delete(delete),
        )
        .route("/operator-policies", get(op_list))
        .route("/operator-policies/{vhost}", get(op_list_vhost))
        .route(
            "/operator-policies/{vhost}/{name}",
            get(op_show).put(op_put).delete(op_delete),
        )
}

pub(crate) fn render(p: &PolicyInfo) -> Value {
    json!({
        "vhost": p.vhost,
        "name": p.name,
        "pattern": p.pattern,
        "apply-to": p.apply_to,
        "priority": p.priority,
        "definition": table_to_json(&p.definition),
    })
}

fn policies(m: &Management, operator: bool) -> Vec<PolicyInfo> {
    if operator {
        m.broker.operator_policies()
    } else {
        m.broker.policies()
    }
}

fn listed(m: &Management, caller: &Caller, operator: bool, vhost: Option<&str>) -> Value {
    Value::Array(
        policies(m, operator)
            .iter()
            .filter(|p| vhost.is_none_or(|v| p.vhost == v))
            .filter(|p| caller.sees_vhost(m, &p.vhost))
            .map(render)
            .collect(),
    )
}

fn find(m: &Management, operator: bool, vhost: &str, name: &str) -> ApiResult<PolicyInfo> {
    policies(m, operator)
        .into_iter()
        .find(|p| p.vhost == vhost && p.name == name)
        .ok_or_else(ApiError::not_found)
}

/// A policy from a PUT body or a definitions entry.
pub(crate) fn policy_spec(
    vhost: &str,
    name: &str,
    body: &Map<String, Value>,
) -> ApiResult<PolicySpec> {
    let pattern = field_str(body, "pattern")?
        .ok_or_else(|| ApiError::bad_request("key_missing: pattern"))?
        .to_owned();
    let definition = match body.get("definition") {
        Some(Value::Object(d)) => json_to_table(d),
        _ => return Err(ApiError::bad_request("key_missing: definition")),
    };
    let priority = match body.get("priority") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| ApiError::bad_request("priority: expected an integer"))?,
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map_err(|_| ApiError::bad_request("priority: expected an integer"))?,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "priority: expected an integer, got {other}"
            )))
        }
    };
    let apply_to = field_str(body, "apply-to")?.unwrap_or("all").to_owned();
    Ok(PolicySpec {
        vhost: vhost.to_owned(),
        name: name.to_owned(),
        pattern,
        apply_to,
        priority,
        definition,
    })
}

async fn list(State(m): State<Management>, caller: Caller) -> ApiResult {
    Ok(json(listed(&m, &caller, false, None)))
}

async fn list_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_vhost(&m, &vhost)?;
    Ok(json(listed(&m, &caller, false, Some(&vhost))))
}

async fn show(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_vhost(&m, &vhost)?;
    Ok(object_response(
        render(&find(&m, false, &vhost, &name)?),
        &q,
    ))
}

async fn put(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    caller.require_policymaker()?;
    caller.require_vhost(&m, &vhost)?;
    let spec = policy_spec(&vhost, &name, &body_object(&body)?)?;
    let existed = find(&m, false, &vhost, &name).is_ok();
    m.broker.apply(MetaCommand::SetPolicy(spec))?;
    Ok(created_or_updated(!existed))
}

async fn delete(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    caller.require_policymaker()?;
    caller.require_vhost(&m, &vhost)?;
    find(&m, false, &vhost, &name)?;
    m.broker.apply(MetaCommand::ClearPolicy { vhost, name })?;
    Ok(no_content())
}

async fn op_list(State(m): State<Management>, caller: Caller) -> ApiResult {
    caller.require_policymaker()?;
    Ok(json(listed(&m, &caller, true, None)))
}

async fn op_list_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_policymaker()?;
    caller.require_vhost(&m, &vhost)?;
    Ok(json(listed(&m, &caller, true, Some(&vhost))))
}

async fn op_show(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_policymaker()?;
    caller.require_vhost(&m, &vhost)?;
    Ok(object_response(render(&find(&m, true, &vhost, &name)?), &q))
}

async fn op_put(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    caller.require_vhost(&m, &vhost)?;
    let spec = policy_spec(&vhost, &name, &body_object(&body)?)?;
    let existed = find(&m, true, &vhost, &name).is_ok();
    m.broker.apply(MetaCommand::SetOperatorPolicy(spec))?;
    Ok(created_or_updated(!existed))
}

async fn op_delete(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    caller.require_vhost(&m, &vhost)?;
    find(&m, true, &vhost, &name)?;
    m.broker
        .apply(MetaCommand::ClearOperatorPolicy { vhost, name })?;
    Ok(no_content())
}

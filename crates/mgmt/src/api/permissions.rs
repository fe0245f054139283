//! `/api/permissions` and `/api/topic-permissions` (administrators only), and
//! the per-vhost and per-user lists of both.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use switchyard_core::admin::{MetaCommand, PermissionInfo, TopicPermissionInfo};

use super::{
    body_object, created_or_updated, field_str, json, no_content, object_response, ApiError,
    ApiResult, Caller,
};
use crate::Management;

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/permissions", get(list))
        .route(
            "/permissions/{vhost}/{user}",
            get(show).put(put).delete(delete),
        )
        .route("/topic-permissions", get(list_topic))
        .route(
            "/topic-permissions/{vhost}/{user}",
            get(show_topic).put(put_topic).delete(delete_topic),
        )
        .route("/vhosts/{vhost}/permissions", get(of_vhost))
        .route("/vhosts/{vhost}/topic-permissions", get(topic_of_vhost))
        .route("/users/{user}/permissions", get(of_user))
        .route("/users/{user}/topic-permissions", get(topic_of_user))
}

pub(crate) fn render(p: &PermissionInfo) -> Value {
    json!({
        "user": p.user,
        "vhost": p.vhost,
        "configure": p.configure,
        "write": p.write,
        "read": p.read,
    })
}

pub(crate) fn render_topic(p: &TopicPermissionInfo) -> Value {
    json!({
        "user": p.user,
        "vhost": p.vhost,
        "exchange": p.exchange,
        "write": p.write,
        "read": p.read,
    })
}

fn all(m: &Management, keep: impl Fn(&PermissionInfo) -> bool) -> Value {
    Value::Array(
        m.broker
            .permissions()
            .iter()
            .filter(|p| keep(p))
            .map(render)
            .collect(),
    )
}

fn all_topic(m: &Management, keep: impl Fn(&TopicPermissionInfo) -> bool) -> Value {
    Value::Array(
        m.broker
            .topic_permissions()
            .iter()
            .filter(|p| keep(p))
            .map(render_topic)
            .collect(),
    )
}

async fn list(State(m): State<Management>, caller: Caller) -> ApiResult {
    caller.require_admin()?;
    Ok(json(all(&m, |_| true)))
}

async fn list_topic(State(m): State<Management>, caller: Caller) -> ApiResult {
    caller.require_admin()?;
    Ok(json(all_topic(&m, |_| true)))
}

fn vhost_exists(m: &Management, vhost: &str) -> ApiResult<()> {
    m.broker
        .vhost_info(vhost)
        .map(|_| ())
        .ok_or_else(ApiError::not_found)
}

fn user_exists(m: &Management, user: &str) -> ApiResult<()> {
    m.broker
        .user_info(user)
        .map(|_| ())
        .ok_or_else(ApiError::not_found)
}

async fn of_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    vhost_exists(&m, &vhost)?;
    Ok(json(all(&m, |p| p.vhost == vhost)))
}

async fn topic_of_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    vhost_exists(&m, &vhost)?;
    Ok(json(all_topic(&m, |p| p.vhost == vhost)))
}

async fn of_user(
    State(m): State<Management>,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    user_exists(&m, &user)?;
    Ok(json(all(&m, |p| p.user == user)))
}

async fn topic_of_user(
    State(m): State<Management>,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    user_exists(&m, &user)?;
    Ok(json(all_topic(&m, |p| p.user == user)))
}

/// GET one user's permissions in one vhost: an object (RabbitMQ).
async fn show(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_admin()?;
    let p = m
        .broker
        .permissions()
        .into_iter()
        .find(|p| p.vhost == vhost && p.user == user)
        .ok_or_else(ApiError::not_found)?;
    Ok(object_response(render(&p), &q))
}

/// A pattern field: present and a string (RabbitMQ requires all three).
fn pattern<'a>(body: &'a serde_json::Map<String, Value>, key: &str) -> ApiResult<&'a str> {
    field_str(body, key)?.ok_or_else(|| ApiError::bad_request(format!("key_missing: {key}")))
}

async fn put(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    let body = body_object(&body)?;
    vhost_exists(&m, &vhost)?;
    user_exists(&m, &user)?;
    let existed = m
        .broker
        .permissions()
        .iter()
        .any(|p| p.vhost == vhost && p.user == user);
    m.broker.apply(MetaCommand::SetPermissions {
        configure: pattern(&body, "configure")?.to_owned(),
        write: pattern(&body, "write")?.to_owned(),
        read: pattern(&body, "read")?.to_owned(),
        user,
        vhost,
    })?;
    Ok(created_or_updated(!existed))
}

async fn delete(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    if !m
        .broker
        .permissions()
        .iter()
        .any(|p| p.vhost == vhost && p.user == user)
    {
        return Err(ApiError::not_found());
    }
    m.broker
        .apply(MetaCommand::ClearPermissions { user, vhost })?;
    Ok(no_content())
}

/// GET one user's topic permissions in one vhost: an **array**, one entry per
/// exchange (RabbitMQ, and what rabbit-hole decodes).
async fn show_topic(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    let found = all_topic(&m, |p| p.vhost == vhost && p.user == user);
    if found.as_array().is_some_and(Vec::is_empty) {
        return Err(ApiError::not_found());
    }
    Ok(json(found))
}

async fn put_topic(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    let body = body_object(&body)?;
    vhost_exists(&m, &vhost)?;
    user_exists(&m, &user)?;
    let exchange = pattern(&body, "exchange")?.to_owned();
    let existed = m
        .broker
        .topic_permissions()
        .iter()
        .any(|p| p.vhost == vhost && p.user == user && p.exchange == exchange);
    m.broker.apply(MetaCommand::SetTopicPermissions {
        write: pattern(&body, "write")?.to_owned(),
        read: pattern(&body, "read")?.to_owned(),
        exchange,
        user,
        vhost,
    })?;
    Ok(created_or_updated(!existed))
}

async fn delete_topic(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_admin()?;
    let exchange = q.get("exchange").cloned();
    if !m.broker.topic_permissions().iter().any(|p| {
        p.vhost == vhost && p.user == user && exchange.as_ref().is_none_or(|x| &p.exchange == x)
    }) {
        return Err(ApiError::not_found());
    }
    m.broker.apply(MetaCommand::ClearTopicPermissions {
        user,
        vhost,
        exchange,
    })?;
    Ok(no_content())
}

//! `/api/users`, `/api/whoami`'s data, and `/api/user-limits`. A plain password
//! is hashed here, on arrival (RabbitMQ's salted SHA-256), so the command the
//! core stores and replays carries only the hash.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use switchyard_core::admin::{MetaCommand, UserInfo, UserLimits};
use switchyard_core::auth::{hash_password, random_salt};

use super::vhosts::parse_tags;
use super::{
    body_object, created_or_updated, field_str, json, list_response, no_content, object_response,
    ApiError, ApiResult, Caller, Key, ListQuery, Row,
};
use crate::Management;

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/users", get(list))
        .route("/users/without-permissions", get(without_permissions))
        .route("/users/bulk-delete", post(bulk_delete))
        .route("/users/{user}", get(show).put(put).delete(delete))
        .route("/user-limits", get(list_limits))
        .route("/user-limits/{user}", get(user_limits))
        .route(
            "/user-limits/{user}/{name}",
            axum::routing::put(put_limit).delete(delete_limit),
        )
}

pub(crate) fn render(u: &UserInfo) -> Value {
    json!({
        "name": u.name,
        "password_hash": u.password_hash,
        "hashing_algorithm": if u.hashing_algorithm.is_empty() {
            switchyard_core::admin::SHA256
        } else {
            u.hashing_algorithm.as_str()
        },
        "tags": u.tags,
        "limits": {},
    })
}

struct UserRow(UserInfo);

impl Row for UserRow {
    fn name(&self) -> &str {
        &self.0.name
    }
    fn key(&self, field: &str) -> Option<Key> {
        match field {
            "name" => Some(Key::Str(self.0.name.clone())),
            _ => None,
        }
    }
    fn render(&self, _m: &Management) -> Value {
        render(&self.0)
    }
}

async fn list(
    State(m): State<Management>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_admin()?;
    let rows = m.broker.users().into_iter().map(UserRow).collect();
    list_response(&m, rows, &ListQuery::parse(&q)?, &["name"])
}

async fn without_permissions(State(m): State<Management>, caller: Caller) -> ApiResult {
    caller.require_admin()?;
    let permitted: Vec<String> = m.broker.permissions().into_iter().map(|p| p.user).collect();
    let users: Vec<Value> = m
        .broker
        .users()
        .iter()
        .filter(|u| !permitted.contains(&u.name))
        .map(render)
        .collect();
    Ok(json(Value::Array(users)))
}

async fn show(
    State(m): State<Management>,
    caller: Caller,
    Path(user): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_admin()?;
    let u = m.broker.user_info(&user).ok_or_else(ApiError::not_found)?;
    Ok(object_response(render(&u), &q))
}

/// The command a PUT body (or a definitions entry) asks for: `password` (hashed
/// here), or `password_hash` with an optional `hashing_algorithm`; neither keeps
/// an existing user's password, and gives a new user none (no password login).
pub(crate) fn user_command(
    name: &str,
    body: &serde_json::Map<String, Value>,
    existing: Option<&UserInfo>,
) -> ApiResult<MetaCommand> {
    let tags = parse_tags(body.get("tags"))?;
    let (password_hash, hashing_algorithm) = match (
        field_str(body, "password")?,
        field_str(body, "password_hash")?,
    ) {
        (Some(password), _) => (
            hash_password(password, random_salt()),
            switchyard_core::admin::SHA256.to_owned(),
        ),
        (None, Some(hash)) => (
            hash.to_owned(),
            field_str(body, "hashing_algorithm")?
                .unwrap_or(switchyard_core::admin::SHA256)
                .to_owned(),
        ),
        (None, None) => existing.map_or_else(
            || (String::new(), switchyard_core::admin::SHA256.to_owned()),
            |u| (u.password_hash.clone(), u.hashing_algorithm.clone()),
        ),
    };
    Ok(MetaCommand::PutUser {
        name: name.to_owned(),
        password_hash,
        hashing_algorithm,
        tags: tags
            .or_else(|| existing.map(|u| u.tags.clone()))
            .unwrap_or_default(),
    })
}

async fn put(
    State(m): State<Management>,
    caller: Caller,
    Path(user): Path<String>,
    body: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    let body = body_object(&body)?;
    let existing = m.broker.user_info(&user);
    let cmd = user_command(&user, &body, existing.as_ref())?;
    m.broker.apply(cmd)?;
    Ok(created_or_updated(existing.is_none()))
}

async fn delete(
    State(m): State<Management>,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    if m.broker.user_info(&user).is_none() {
        return Err(ApiError::not_found());
    }
    m.broker.apply(MetaCommand::DeleteUser { name: user })?;
    Ok(no_content())
}

async fn bulk_delete(State(m): State<Management>, caller: Caller, body: Bytes) -> ApiResult {
    caller.require_admin()?;
    let body = body_object(&body)?;
    let Some(Value::Array(users)) = body.get("users") else {
        return Err(ApiError::bad_request("users: expected an array of names"));
    };
    for u in users {
        let Value::String(name) = u else {
            return Err(ApiError::bad_request("users: expected an array of names"));
        };
        if m.broker.user_info(name).is_some() {
            m.broker
                .apply(MetaCommand::DeleteUser { name: name.clone() })?;
        }
    }
    Ok(no_content())
}

fn user_limits_json(user: &str, limits: &UserLimits) -> Value {
    let mut value = serde_json::Map::new();
    if let Some(n) = limits.max_connections {
        value.insert("max-connections".into(), Value::from(n));
    }
    if let Some(n) = limits.max_channels {
        value.insert("max-channels".into(), Value::from(n));
    }
    json!({"user": user, "value": value})
}

async fn list_limits(State(m): State<Management>, caller: Caller) -> ApiResult {
    caller.require_admin()?;
    let all: Vec<Value> = m
        .broker
        .user_limits()
        .iter()
        .map(|l| user_limits_json(&l.user, &l.limits))
        .collect();
    Ok(json(Value::Array(all)))
}

async fn user_limits(
    State(m): State<Management>,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    if m.broker.user_info(&user).is_none() {
        return Err(ApiError::not_found());
    }
    let all: Vec<Value> = m
        .broker
        .user_limits()
        .iter()
        .filter(|l| l.user == user)
        .map(|l| user_limits_json(&l.user, &l.limits))
        .collect();
    Ok(json(Value::Array(all)))
}

/// `{"value": n}`, the number as JSON or a string.
pub(crate) fn limit_value(body: &serde_json::Map<String, Value>) -> ApiResult<i64> {
    match body.get("value") {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| ApiError::bad_request("value: expected an integer")),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map_err(|_| ApiError::bad_request("value: expected an integer")),
        _ => Err(ApiError::bad_request("value: expected an integer")),
    }
}

async fn put_limit(
    State(m): State<Management>,
    caller: Caller,
    Path((user, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    let value = limit_value(&body_object(&body)?)?;
    let mut limits = UserLimits::default();
    match name.as_str() {
        "max-connections" => limits.max_connections = Some(value),
        "max-channels" => limits.max_channels = Some(value),
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown user limit '{other}' (max-connections, max-channels)"
            )))
        }
    }
    m.broker
        .apply(MetaCommand::SetUserLimits { user, limits })?;
    Ok(no_content())
}

async fn delete_limit(
    State(m): State<Management>,
    caller: Caller,
    Path((user, name)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    m.broker.apply(MetaCommand::ClearUserLimit {
        user,
        limit: Some(name),
    })?;
    Ok(no_content())
}

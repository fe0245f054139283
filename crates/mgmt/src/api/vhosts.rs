//! `/api/vhosts`: list, show, create or update (PUT), delete, and the vhost's
//! permission lists. Changes go through the core's admin commands.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};
use switchyard_core::admin::{MetaCommand, VhostInfo};

use super::{
    body_object, created_or_updated, field_str, list_response, no_content, object_response,
    ApiError, ApiResult, Caller, Key, ListQuery, Ranges, Row,
};
use crate::Management;

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/vhosts", get(list))
        .route("/vhosts/{vhost}", get(show).put(put).delete(delete))
}

pub(crate) struct VhostRow {
    pub info: VhostInfo,
    pub ranges: Ranges,
}

impl Row for VhostRow {
    fn name(&self) -> &str {
        &self.info.name
    }
    fn key(&self, field: &str) -> Option<Key> {
        Some(match field {
            "name" => Key::Str(self.info.name.clone()),
            "description" => Key::Str(self.info.description.clone()),
            _ => return None,
        })
    }
    fn render(&self, m: &Management) -> Value {
        render(m, &self.info, self.ranges)
    }
}

pub(crate) fn render(m: &Management, info: &VhostInfo, ranges: Ranges) -> Value {
    let default_queue_type = info.default_queue_type.as_deref().unwrap_or("classic");
    let mut v = json!({
        "name": info.name,
        "description": info.description,
        "tags": info.tags,
        "default_queue_type": default_queue_type,
        "metadata": {
            "description": info.description,
            "tags": info.tags,
            "default_queue_type": default_queue_type,
        },
        "tracing": false,
        "protected_from_deletion": false,
        "cluster_state": {m.node.name.clone(): "running"},
    });
    if let Ok(vhost) = m.broker.vhost(&info.name) {
        let (mut ready, mut unacked) = (0usize, 0usize);
        for q in vhost.queues() {
            ready += q.message_count();
            unacked += q.unacked_count();
        }
        if let Value::Object(map) = &mut v {
            map.insert("messages".into(), Value::from(ready + unacked));
            map.insert("messages_ready".into(), Value::from(ready));
            map.insert("messages_unacknowledged".into(), Value::from(unacked));
        }
        super::add_stats(
            &mut v,
            Some(&vhost.message_stats(ranges.msg)),
            Some(&vhost.history.length_details(ranges.lengths)),
        );
    }
    v
}

async fn list(
    State(m): State<Management>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let ranges = Ranges::parse(&q);
    let rows = m
        .broker
        .vhost_infos()
        .into_iter()
        .filter(|v| caller.sees_vhost(&m, &v.name))
        .map(|info| VhostRow { info, ranges })
        .collect();
    list_response(&m, rows, &ListQuery::parse(&q)?, &["name"])
}

async fn show(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller.require_vhost(&m, &vhost)?;
    let info = m
        .broker
        .vhost_info(&vhost)
        .ok_or_else(ApiError::not_found)?;
    Ok(object_response(render(&m, &info, Ranges::parse(&q)), &q))
}

/// Tags as clients send them: an array, or one string of comma-separated tags
/// (`"a,b"`, `"a, b"`); always returned as arrays.
pub(crate) fn parse_tags(v: Option<&Value>) -> ApiResult<Option<Vec<String>>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(
            s.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
        )),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| match t {
                Value::String(s) => Ok(s.trim().to_owned()),
                other => Err(ApiError::bad_request(format!(
                    "tags: expected strings, got {other}"
                ))),
            })
            .filter(|t| t.as_ref().map_or(true, |s| !s.is_empty()))
            .collect::<ApiResult<Vec<String>>>()
            .map(Some),
        Some(other) => Err(ApiError::bad_request(format!(
            "tags: expected a string or an array, got {other}"
        ))),
    }
}

/// The vhost fields of a PUT body or a definitions file: top level or under
/// `metadata`, the top level winning.
pub(crate) fn vhost_command(
    name: &str,
    body: &Map<String, Value>,
    existing: Option<&VhostInfo>,
) -> ApiResult<MetaCommand> {
    let empty = Map::new();
    let metadata = match body.get("metadata") {
        Some(Value::Object(md)) => md,
        _ => &empty,
    };
    let description = match field_str(body, "description")? {
        Some(d) => Some(d.to_owned()),
        None => field_str(metadata, "description")?.map(str::to_owned),
    };
    let tags = match parse_tags(body.get("tags"))? {
        Some(t) => Some(t),
        None => parse_tags(metadata.get("tags"))?,
    };
    let default_queue_type = match field_str(body, "default_queue_type")? {
        Some(t) => Some(t.to_owned()),
        None => field_str(metadata, "default_queue_type")?.map(str::to_owned),
    };
    if let Some(t) = default_queue_type.as_deref() {
        if !matches!(t, "classic" | "quorum" | "undefined") {
            return Err(ApiError::bad_request(format!(
                "default_queue_type '{t}' is not supported (classic or quorum)"
            )));
        }
    }
    Ok(MetaCommand::PutVhost {
        name: name.to_owned(),
        description: description
            .or_else(|| existing.map(|e| e.description.clone()))
            .unwrap_or_default(),
        tags: tags
            .or_else(|| existing.map(|e| e.tags.clone()))
            .unwrap_or_default(),
        default_queue_type: default_queue_type
            .filter(|t| t != "undefined")
            .or_else(|| existing.and_then(|e| e.default_queue_type.clone())),
    })
}

async fn put(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
    body: Bytes,
) -> ApiResult {
    caller.require_admin()?;
    let body = body_object(&body)?;
    let existing = m.broker.vhost_info(&vhost);
    let cmd = vhost_command(&vhost, &body, existing.as_ref())?;
    m.broker.apply(cmd)?;
    if existing.is_none() {
        // RabbitMQ grants the user who created a vhost full permissions in it, so
        // `declare vhost` then `declare queue` works for the same administrator.
        m.broker.apply(MetaCommand::SetPermissions {
            user: caller.name.clone(),
            vhost: vhost.clone(),
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        })?;
    }
    Ok(created_or_updated(existing.is_none()))
}

async fn delete(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    if m.broker.vhost_info(&vhost).is_none() {
        return Err(ApiError::not_found());
    }
    m.broker.apply(MetaCommand::DeleteVhost { name: vhost })?;
    Ok(no_content())
}

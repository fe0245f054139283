//! The HTTP API under `/api`, shaped as RabbitMQ's management plugin (MANAGEMENT.md).
//!
//! Routing matches the raw (still percent-encoded) path, so a `%2F` stays inside its
//! segment; each captured segment is then percent-decoded on its own (axum's `Path`
//! does exactly that, and leaves `+` alone), which is what cowboy does for RabbitMQ.
//! Every handler authenticates with HTTP Basic ([`Caller`]) and checks the level its
//! endpoint needs (MANAGEMENT.md §1). Declares, deletes, purges, publishes and gets
//! call the same core functions as the AMQP adapter, after the same permission
//! checks, so errors and their texts are the ones an AMQP client sees.
//!
//! One file per resource family; this one holds what they share: errors, the
//! authenticated caller, lenient body parsing, JSON <-> field tables, and server-side
//! paging, sorting and filtering of lists.

mod bindings;
mod connections;
mod definitions;
mod exchanges;
mod health;
mod limits;
mod mqtt;
mod overview;
mod parameters;
mod permissions;
mod policies;
mod queues;
mod users;
mod vhosts;

use std::cmp::Ordering;
use std::collections::HashMap;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde_json::{Map, Value};
use switchyard_core::auth::{Access, Resource};
use switchyard_core::field::{FieldTable, FieldValue};
use switchyard_core::stats::{MessageStats, Range};
use switchyard_core::{CoreError, ErrorKind};

use crate::Management;

/// The whole `/api` router. Routes inside are relative to `/api`; an unknown
/// `/api` path answers RabbitMQ's JSON 404, and everything outside `/api` is
/// left to the UI's router.
pub fn router(state: Management) -> axum::Router {
    let api = axum::Router::new()
        .merge(overview::routes())
        .merge(exchanges::routes())
        .merge(queues::routes())
        .merge(bindings::routes())
        .merge(health::routes())
        .merge(vhosts::routes())
        .merge(users::routes())
        .merge(permissions::routes())
        .merge(policies::routes())
        .merge(limits::routes())
        .merge(parameters::routes())
        .merge(definitions::routes())
        .merge(connections::routes())
        .merge(mqtt::routes())
        .fallback(|| async { ApiError::not_found() });
    axum::Router::new().nest("/api", api).with_state(state)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// ---- errors ----

/// An error answer: `{"error": .., "reason": ..}` with RabbitMQ's status code.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    status: StatusCode,
    error: String,
    reason: String,
}

pub(crate) type ApiResult<T = Response> = Result<T, ApiError>;

impl ApiError {
    pub(crate) fn new(status: StatusCode, error: &str, reason: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.to_owned(),
            reason: reason.into(),
        }
    }
    /// RabbitMQ's answer for a missing object.
    pub(crate) fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Object Not Found", "Not Found")
    }
    pub(crate) fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }
    pub(crate) fn unauthorized(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "not_authorized", reason)
    }
}

impl From<CoreError> for ApiError {
    /// RabbitMQ's mapping of an AMQP error met by a request (`direct_request`):
    /// not found is 404, refused access 401, anything else 400 with the AMQP text.
    fn from(e: CoreError) -> Self {
        let text = e.to_string();
        match e.kind {
            ErrorKind::NotFound => ApiError::new(StatusCode::NOT_FOUND, "not_found", text),
            ErrorKind::AccessRefused | ErrorKind::NotAllowed => {
                ApiError::new(StatusCode::UNAUTHORIZED, "not_authorised", text)
            }
            _ => ApiError::bad_request(text),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.error, "reason": self.reason});
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // Browsers then show a login box; RabbitMQ sends the same realm.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"RabbitMQ Management\""),
            );
        }
        response
    }
}

/// A 204 No Content.
pub(crate) fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// 201 when `created`, else 204: RabbitMQ's answer to a PUT.
pub(crate) fn created_or_updated(created: bool) -> Response {
    if created {
        StatusCode::CREATED.into_response()
    } else {
        no_content()
    }
}

pub(crate) fn json(value: Value) -> Response {
    Json(value).into_response()
}

// ---- the authenticated caller ----

/// RabbitMQ's management tags.
const ADMINISTRATOR: &str = "administrator";
const MONITORING: &str = "monitoring";
const POLICYMAKER: &str = "policymaker";
const MANAGEMENT: &str = "management";

/// The user a request authenticated as (HTTP Basic), with its tags. Extracting it
/// rejects a request without valid credentials or by a user with no management tag.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub name: String,
    pub tags: Vec<String>,
}

impl Caller {
    fn has(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
    pub(crate) fn is_admin(&self) -> bool {
        self.has(ADMINISTRATOR)
    }
    pub(crate) fn is_monitor(&self) -> bool {
        self.is_admin() || self.has(MONITORING)
    }
    pub(crate) fn is_policymaker(&self) -> bool {
        self.is_admin() || self.has(POLICYMAKER)
    }
    pub(crate) fn require_admin(&self) -> ApiResult<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::unauthorized("Not administrator user"))
        }
    }
    pub(crate) fn require_monitor(&self) -> ApiResult<()> {
        if self.is_monitor() {
            Ok(())
        } else {
            Err(ApiError::unauthorized("Not monitor user"))
        }
    }
    pub(crate) fn require_policymaker(&self) -> ApiResult<()> {
        if self.is_policymaker() {
            Ok(())
        } else {
            Err(ApiError::unauthorized("Not policymaker user"))
        }
    }

    /// Whether this user may see objects of `vhost` (RabbitMQ: permissions in it;
    /// monitors and administrators see every vhost in lists).
    pub(crate) fn sees_vhost(&self, m: &Management, vhost: &str) -> bool {
        self.is_monitor() || m.broker.auth.check_vhost(&self.name, vhost).is_ok()
    }

    /// For endpoints naming one vhost: it must exist (404) and the user must have
    /// access to it (401), as RabbitMQ's `is_authorized_vhost`.
    pub(crate) fn require_vhost(
        &self,
        m: &Management,
        vhost: &str,
    ) -> ApiResult<std::sync::Arc<switchyard_core::vhost::VHost>> {
        let v = m
            .broker
            .vhost(vhost)
            .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "not_found", "vhost_not_found"))?;
        if self.is_admin() || m.broker.auth.check_vhost(&self.name, vhost).is_ok() {
            Ok(v)
        } else {
            Err(ApiError::unauthorized("Not_Authorized"))
        }
    }

    /// The AMQP permission check a channel of this user would make.
    pub(crate) fn check(
        &self,
        m: &Management,
        vhost: &str,
        access: Access,
        resource: Resource,
        name: &str,
    ) -> ApiResult<()> {
        m.broker
            .auth
            .check(&self.name, vhost, access, resource, name)
            .map_err(ApiError::from)
    }
}

impl FromRequestParts<Management> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, m: &Management) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let (user, password) =
            basic_credentials(parts).ok_or_else(|| ApiError::unauthorized("Not_Authorized"))?;
        // The same authentication backends as the protocols' logins.
        let request = switchyard_core::authn::LoginRequest {
            username: user,
            password: password.into_bytes(),
            peer,
            ..Default::default()
        };
        let logged_in = m
            .broker
            .auth
            .login_chain(request)
            .await
            .map_err(|e| match e {
                switchyard_core::auth::LoginError::NotLoopback(_) => {
                    ApiError::unauthorized("User can only log in via localhost")
                }
                switchyard_core::auth::LoginError::BadCredentials(_) => {
                    ApiError::unauthorized("Login failed")
                }
            })?;
        let caller = Caller {
            name: logged_in.name.clone(),
            tags: logged_in.tags.clone(),
        };
        let management = [ADMINISTRATOR, MONITORING, POLICYMAKER, MANAGEMENT];
        if !caller.tags.iter().any(|t| management.contains(&t.as_str())) {
            return Err(ApiError::unauthorized("Not management user"));
        }
        Ok(caller)
    }
}

/// The user name and password of an `Authorization: Basic` header.
fn basic_credentials(parts: &Parts) -> Option<(String, String)> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

// ---- request bodies ----

/// A request body as a JSON object: empty means `{}` (pyrabbit2 PUTs vhosts with
/// no body); anything but an object is a 400.
pub(crate) fn body_object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request("not_a_json_object")),
        Err(e) => Err(ApiError::bad_request(format!("failed_to_parse_json: {e}"))),
    }
}

/// A boolean field: JSON `true`/`false` or the strings `"true"`/`"false"`
/// (rabbitmqadmin v1 sends strings). Absent or null: `None`.
pub(crate) fn field_bool(body: &Map<String, Value>, key: &str) -> ApiResult<Option<bool>> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "true" => Ok(Some(true)),
            "false" | "" => Ok(Some(false)),
            _ => Err(ApiError::bad_request(format!(
                "{key}: expected a boolean, got \"{s}\""
            ))),
        },
        Some(other) => Err(ApiError::bad_request(format!(
            "{key}: expected a boolean, got {other}"
        ))),
    }
}

/// An unsigned integer field, as a JSON number or a decimal string.
pub(crate) fn field_u64(body: &Map<String, Value>, key: &str) -> ApiResult<Option<u64>> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad_request(format!("{key}: expected a non-negative integer"))
        }),
        Some(Value::String(s)) => {
            s.trim().parse().map(Some).map_err(|_| {
                ApiError::bad_request(format!("{key}: expected an integer, got \"{s}\""))
            })
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "{key}: expected an integer, got {other}"
        ))),
    }
}

/// A string field (absent or null: `None`).
pub(crate) fn field_str<'a>(body: &'a Map<String, Value>, key: &str) -> ApiResult<Option<&'a str>> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key}: expected a string, got {other}"
        ))),
    }
}

/// `arguments`: an object, or `[]`/null/absent for none (pyrabbit2 sends `[]`).
pub(crate) fn field_arguments(body: &Map<String, Value>, key: &str) -> ApiResult<FieldTable> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(FieldTable::new()),
        Some(Value::Array(a)) if a.is_empty() => Ok(FieldTable::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(FieldTable::new()),
        Some(Value::Object(map)) => Ok(json_to_table(map)),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key}: expected an object, got {other}"
        ))),
    }
}

// ---- JSON <-> field tables ----

/// A JSON value as an AMQP field value, as RabbitMQ converts management input:
/// integers become longs, other numbers doubles, strings long strings.
pub(crate) fn json_to_field(value: &Value) -> FieldValue {
    match value {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => FieldValue::I64(i),
            (None, Some(f)) => FieldValue::F64(f),
            (None, None) => FieldValue::Void,
        },
        Value::String(s) => FieldValue::string(s.clone()),
        Value::Array(a) => FieldValue::Array(a.iter().map(json_to_field).collect()),
        Value::Object(map) => FieldValue::Table(json_to_table(map)),
    }
}

pub(crate) fn json_to_table(map: &Map<String, Value>) -> FieldTable {
    let mut t = FieldTable::new();
    for (k, v) in map {
        t.insert(k.clone(), json_to_field(v));
    }
    t
}

/// An AMQP field value as JSON (binary and non-UTF-8 strings lossily as text).
pub(crate) fn field_to_json(value: &FieldValue) -> Value {
    match value {
        FieldValue::Bool(b) => Value::Bool(*b),
        FieldValue::I8(v) => Value::from(*v),
        FieldValue::U8(v) => Value::from(*v),
        FieldValue::I16(v) => Value::from(*v),
        FieldValue::U16(v) => Value::from(*v),
        FieldValue::I32(v) => Value::from(*v),
        FieldValue::U32(v) => Value::from(*v),
        FieldValue::I64(v) => Value::from(*v),
        FieldValue::F32(v) => Value::from(f64::from(*v)),
        FieldValue::F64(v) => Value::from(*v),
        FieldValue::Decimal { scale, value } => {
            Value::from(f64::from(*value) / 10f64.powi(i32::from(*scale)))
        }
        FieldValue::LongStr(b) | FieldValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b).into_owned())
        }
        FieldValue::Array(a) => Value::Array(a.iter().map(field_to_json).collect()),
        FieldValue::Timestamp(t) => Value::from(*t),
        FieldValue::Table(t) => table_to_json(t),
        FieldValue::Void => Value::Null,
    }
}

/// A field table as a JSON object: always an object, never `[]` (typed clients
/// decode `arguments` as a map).
pub(crate) fn table_to_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .iter()
            .map(|(k, v)| (k.to_owned(), field_to_json(v)))
            .collect(),
    )
}

// ---- lists: filter, sort, page ----

/// A sort key: what a list is ordered by.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
pub(crate) enum Key {
    /// Missing values sort first.
    None,
    Bool(bool),
    Num(f64),
    Str(String),
}

impl Key {
    fn cmp(&self, other: &Key) -> Ordering {
        self.partial_cmp(other).unwrap_or(Ordering::Equal)
    }

    /// The key of a rendered JSON value.
    fn of_json(v: Option<&Value>) -> Key {
        match v {
            None | Some(Value::Null) => Key::None,
            Some(Value::Bool(b)) => Key::Bool(*b),
            Some(Value::Number(n)) => Key::Num(n.as_f64().unwrap_or(0.0)),
            Some(Value::String(s)) => Key::Str(s.clone()),
            Some(other) => Key::Str(other.to_string()),
        }
    }
}

/// One item of a list endpoint. `key` answers the cheap sort fields without
/// building the item's JSON, so a page of 500 out of 10,000 queues renders 500.
pub(crate) trait Row {
    /// What the `name` filter matches.
    fn name(&self) -> &str;
    /// A sort key for `field`, or `None` if it has to be read from the JSON.
    fn key(&self, field: &str) -> Option<Key>;
    fn render(&self, m: &Management) -> Value;
}

/// The query parameters every list takes.
#[derive(Debug, Default)]
pub(crate) struct ListQuery {
    page: Option<usize>,
    page_size: usize,
    name: Option<String>,
    use_regex: bool,
    sort: Vec<String>,
    sort_reverse: bool,
    columns: Vec<String>,
    /// `disable_stats=true`: definition fields only (RabbitMQ's light listing);
    /// with `enable_queue_totals=true` the `messages*` counts stay.
    disable_stats: bool,
    queue_totals: bool,
}

/// RabbitMQ's largest page.
const MAX_PAGE_SIZE: usize = 500;
const DEFAULT_PAGE_SIZE: usize = 100;

impl ListQuery {
    pub(crate) fn parse(q: &HashMap<String, String>) -> ApiResult<Self> {
        let bad = || ApiError::bad_request("invalid_pagination_parameters");
        let number = |k: &str| -> ApiResult<Option<usize>> {
            q.get(k)
                .filter(|s| !s.is_empty())
                .map(|s| s.trim().parse::<usize>().map_err(|_| bad()))
                .transpose()
        };
        let page = number("page")?;
        let page_size = number("page_size")?.unwrap_or(DEFAULT_PAGE_SIZE);
        if page == Some(0) || page_size == 0 || page_size > MAX_PAGE_SIZE {
            return Err(bad());
        }
        let list = |k: &str| -> Vec<String> {
            q.get(k)
                .map(|s| {
                    s.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(ListQuery {
            page,
            page_size,
            name: q.get("name").filter(|s| !s.is_empty()).cloned(),
            use_regex: q.get("use_regex").is_some_and(|s| s == "true"),
            sort: list("sort"),
            sort_reverse: q.get("sort_reverse").is_some_and(|s| s == "true"),
            columns: list("columns"),
            disable_stats: q.get("disable_stats").is_some_and(|s| s == "true"),
            queue_totals: q.get("enable_queue_totals").is_some_and(|s| s == "true"),
        })
    }
}

/// Looks up a dotted path (`message_stats.publish_details.rate`) in a JSON value.
fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// Keeps only `columns` (dotted paths) of an item.
fn select_columns(v: Value, columns: &[String]) -> Value {
    if columns.is_empty() {
        return v;
    }
    let mut out = Value::Object(Map::new());
    for c in columns {
        let Some(found) = lookup(&v, c) else { continue };
        let mut at = &mut out;
        let parts: Vec<&str> = c.split('.').collect();
        let Some((last, init)) = parts.split_last() else {
            continue;
        };
        for p in init {
            let Value::Object(map) = at else { break };
            at = map
                .entry((*p).to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
        }
        if let Value::Object(map) = at {
            map.insert((*last).to_owned(), found.clone());
        }
    }
    out
}

/// An item without its statistics (`disable_stats=true`): no `message_stats`,
/// no `*_details` rates, and no `messages*` counts unless `queue_totals`.
fn without_stats(mut v: Value, queue_totals: bool) -> Value {
    if let Value::Object(map) = &mut v {
        map.retain(|k, _| {
            k != "message_stats"
                && !k.ends_with("_details")
                && (queue_totals || !k.starts_with("messages"))
        });
    }
    v
}

/// Filters, sorts and pages `rows`, then renders what is left: a plain array
/// without `page`, RabbitMQ's seven-field wrapper with it. `default_sort` is the
/// order without `sort` (RabbitMQ: vhost then name).
pub(crate) fn list_response<R: Row>(
    m: &Management,
    rows: Vec<R>,
    q: &ListQuery,
    default_sort: &[&str],
) -> ApiResult {
    let total = rows.len();
    let mut rows = match &q.name {
        None => rows,
        Some(pattern) if q.use_regex => {
            let re = regex::RegexBuilder::new(pattern)
                .case_insensitive(true)
                .build()
                .map_err(|e| ApiError::bad_request(format!("invalid regex: {e}")))?;
            rows.into_iter().filter(|r| re.is_match(r.name())).collect()
        }
        Some(needle) => {
            let needle = needle.to_lowercase();
            rows.into_iter()
                .filter(|r| r.name().to_lowercase().contains(&needle))
                .collect()
        }
    };
    let filtered = rows.len();
    let sort: Vec<&str> = if q.sort.is_empty() {
        default_sort.to_vec()
    } else {
        q.sort.iter().map(String::as_str).collect()
    };
    // Keys are computed once per row; fields the row cannot answer cheaply come
    // from its rendered JSON.
    let mut keyed: Vec<(Vec<Key>, R)> = rows
        .drain(..)
        .map(|r| {
            let mut rendered = None;
            let keys = sort
                .iter()
                .map(|f| {
                    r.key(f).unwrap_or_else(|| {
                        let v = rendered.get_or_insert_with(|| r.render(m));
                        Key::of_json(lookup(v, f))
                    })
                })
                .collect();
            (keys, r)
        })
        .collect();
    keyed.sort_by(|(a, _), (b, _)| {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.cmp(y))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    });
    if q.sort_reverse {
        keyed.reverse();
    }
    let render = |r: &R| {
        let v = r.render(m);
        let v = if q.disable_stats {
            without_stats(v, q.queue_totals)
        } else {
            v
        };
        select_columns(v, &q.columns)
    };
    let Some(page) = q.page else {
        return Ok(json(Value::Array(
            keyed.iter().map(|(_, r)| render(r)).collect(),
        )));
    };
    let page_count = filtered.div_ceil(q.page_size);
    if page > page_count.max(1) {
        return Err(ApiError::bad_request("page_out_of_range"));
    }
    let items: Vec<Value> = keyed
        .iter()
        .skip((page - 1).saturating_mul(q.page_size))
        .take(q.page_size)
        .map(|(_, r)| render(r))
        .collect();
    Ok(json(serde_json::json!({
        "filtered_count": filtered,
        "item_count": items.len(),
        "items": items,
        "page": page,
        "page_count": page_count,
        "page_size": q.page_size,
        "total_count": total,
    })))
}

/// A single object, with `columns` applied when given.
pub(crate) fn object_response(v: Value, q: &HashMap<String, String>) -> Response {
    let columns: Vec<String> = q
        .get("columns")
        .map(|s| s.split(',').map(str::trim).map(str::to_owned).collect())
        .unwrap_or_default();
    json(select_columns(v, &columns))
}

/// The exchange a path segment names: `amq.default` is the default exchange `""`.
pub(crate) fn exchange_name(segment: &str) -> &str {
    if segment == "amq.default" {
        ""
    } else {
        segment
    }
}

/// A new connection id for one HTTP operation: exclusive queues of real
/// connections stay theirs.
pub(crate) fn http_connection(m: &Management) -> u64 {
    m.broker.next_id()
}

// ---- what the core offers the lists ----

/// Every vhost of the broker.
pub(crate) fn all_vhosts(m: &Management) -> Vec<std::sync::Arc<switchyard_core::vhost::VHost>> {
    m.broker.vhosts()
}

/// The vhosts a list shows this caller: one (`only`), or all it may see.
pub(crate) fn visible_vhosts(
    m: &Management,
    caller: &Caller,
    only: Option<&str>,
) -> Vec<std::sync::Arc<switchyard_core::vhost::VHost>> {
    match only {
        Some(name) => m.broker.vhost(name).into_iter().collect(),
        None => all_vhosts(m)
            .into_iter()
            .filter(|v| caller.sees_vhost(m, &v.name))
            .collect(),
    }
}

/// Open connections and channels, over every protocol.
pub(crate) fn connection_totals(m: &Management) -> (usize, usize) {
    let connections = m.broker.connections().list();
    let channels = connections.iter().map(|c| c.channel_count() as usize).sum();
    (connections.len(), channels)
}

/// The sample ranges a request asks for: `msg_rates_age`/`msg_rates_incr` for
/// message rates, `lengths_age`/`lengths_incr` for queue lengths (ms), as the
/// UI's charts send them. Without them only the current `rate` is given.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ranges {
    pub msg: Option<Range>,
    pub lengths: Option<Range>,
}

impl Ranges {
    pub(crate) fn parse(q: &HashMap<String, String>) -> Self {
        let range = |age: &str, incr: &str| -> Option<Range> {
            let age_ms = q.get(age)?.parse::<u64>().ok()?;
            let incr_ms = q.get(incr)?.parse::<u64>().ok()?.max(1);
            Some(Range { age_ms, incr_ms })
        };
        Ranges {
            msg: range("msg_rates_age", "msg_rates_incr"),
            lengths: range("lengths_age", "lengths_incr"),
        }
    }
}

/// `message_stats` as JSON: only when some activity was counted (RabbitMQ:
/// "only fields for which some activity has taken place will appear").
pub(crate) fn message_stats_json(stats: &MessageStats) -> Option<Value> {
    if stats.is_empty() {
        None
    } else {
        serde_json::to_value(stats).ok()
    }
}

/// Inserts `message_stats` (when there is any) and the length `*_details` into
/// a rendered object.
pub(crate) fn add_stats(
    v: &mut Value,
    stats: Option<&MessageStats>,
    lengths: Option<&switchyard_core::stats::LengthDetails>,
) {
    let Value::Object(map) = v else { return };
    if let Some(stats) = stats.and_then(message_stats_json) {
        map.insert("message_stats".into(), stats);
    }
    if let Some(Value::Object(details)) = lengths.and_then(|l| serde_json::to_value(l).ok()) {
        map.extend(details);
    }
}

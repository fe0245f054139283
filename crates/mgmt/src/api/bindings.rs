//! `/api/bindings`, and the binding lists of one exchange or queue.
//!
//! A binding is named in paths by its *properties key*, as RabbitMQ does: `~` for
//! no routing key and no arguments, the form-encoded routing key when there are
//! no arguments, and `<encoded key>~<arguments hash>` otherwise. The hash is
//! opaque to clients (they read the key from lists or from the `Location` of the
//! POST that created the binding); here it is the first 4 bytes of the SHA-256 of
//! the arguments' canonical JSON, base64url: stable across restarts and
//! versions, so a key Terraform stored keeps naming the same binding.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use switchyard_core::auth::{Access, Resource};
use switchyard_core::exchange::Destination;
use switchyard_core::field::FieldTable;
use switchyard_core::vhost::VHost;

use super::{
    body_object, exchange_name, field_arguments, field_str, list_response, no_content,
    table_to_json, ApiError, ApiResult, Caller, Key, ListQuery, Row,
};
use crate::Management;

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/bindings", get(list_all))
        .route("/bindings/{vhost}", get(list_vhost))
        .route(
            "/bindings/{vhost}/e/{source}/{kind}/{destination}",
            get(list_between).post(create),
        )
        .route(
            "/bindings/{vhost}/e/{source}/{kind}/{destination}/{props}",
            get(show).delete(delete),
        )
        .route(
            "/exchanges/{vhost}/{exchange}/bindings/{side}",
            get(list_of_exchange),
        )
        .route("/queues/{vhost}/{queue}/bindings", get(list_of_queue))
}

/// One binding, as listed.
#[derive(Debug, Clone)]
pub(crate) struct BindingRow {
    pub vhost: String,
    pub source: String,
    pub destination: String,
    /// `queue` or `exchange`.
    pub destination_type: &'static str,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// Characters `quote_plus` leaves alone besides letters and digits.
const FORM_SAFE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');
/// Characters a path segment of a `Location` keeps as they are.
const SEGMENT_SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// RabbitMQ's `quote_plus` of a routing key: form encoding, space as `+`, `~`
/// encoded (it separates the key from the hash).
fn quote_plus(s: &str) -> String {
    s.split(' ')
        .map(|part| utf8_percent_encode(part, FORM_SAFE).to_string())
        .collect::<Vec<_>>()
        .join("+")
}

/// A path segment, percent-encoded.
pub(crate) fn encode_segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT_SAFE).to_string()
}

/// The stable hash of a binding's arguments.
fn arguments_hash(arguments: &FieldTable) -> String {
    let canonical = table_to_json(arguments).to_string();
    let digest = Sha256::digest(canonical.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.get(..4).unwrap_or(&digest))
}

impl BindingRow {
    pub(crate) fn properties_key(&self) -> String {
        match (self.routing_key.is_empty(), self.arguments.is_empty()) {
            (true, true) => "~".to_owned(),
            (_, true) => quote_plus(&self.routing_key),
            _ => format!(
                "{}~{}",
                quote_plus(&self.routing_key),
                arguments_hash(&self.arguments)
            ),
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "source": self.source,
            "vhost": self.vhost,
            "destination": self.destination,
            "destination_type": self.destination_type,
            "routing_key": self.routing_key,
            "arguments": table_to_json(&self.arguments),
            "properties_key": self.properties_key(),
        })
    }
}

impl Row for BindingRow {
    fn name(&self) -> &str {
        &self.source
    }
    fn key(&self, field: &str) -> Option<Key> {
        Some(match field {
            "vhost" => Key::Str(self.vhost.clone()),
            "source" => Key::Str(self.source.clone()),
            "destination" => Key::Str(self.destination.clone()),
            "destination_type" => Key::Str(self.destination_type.to_owned()),
            "routing_key" => Key::Str(self.routing_key.clone()),
            "properties_key" => Key::Str(self.properties_key()),
            _ => return None,
        })
    }
    fn render(&self, _m: &Management) -> Value {
        self.to_json()
    }
}

/// Every binding of a vhost, the default exchange's implicit ones first (one per
/// queue, keyed by its name, as RabbitMQ lists them).
pub(crate) fn vhost_bindings(v: &VHost) -> Vec<BindingRow> {
    let mut out: Vec<BindingRow> = v
        .queues()
        .into_iter()
        .map(|q| BindingRow {
            vhost: v.name.clone(),
            source: String::new(),
            destination: q.name.clone(),
            destination_type: "queue",
            routing_key: q.name.clone(),
            arguments: FieldTable::new(),
        })
        .collect();
    for x in v.exchanges() {
        if x.name.is_empty() {
            continue;
        }
        for b in x.bindings() {
            let (destination, destination_type) = match &b.destination {
                Destination::Queue(q) => (q.name.clone(), "queue"),
                Destination::Exchange(e) => (e.clone(), "exchange"),
            };
            out.push(BindingRow {
                vhost: v.name.clone(),
                source: x.name.clone(),
                destination,
                destination_type,
                routing_key: b.routing_key.clone(),
                arguments: b.arguments.clone(),
            });
        }
    }
    out
}

const DEFAULT_SORT: &[&str] = &["vhost", "source", "destination", "routing_key"];

async fn list_all(
    State(m): State<Management>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let query = ListQuery::parse(&q)?;
    let rows = super::visible_vhosts(&m, &caller, None)
        .iter()
        .flat_map(|v| vhost_bindings(v))
        .collect();
    list_response(&m, rows, &query, DEFAULT_SORT)
}

async fn list_vhost(
    State(m): State<Management>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let v = caller.require_vhost(&m, &vhost)?;
    let query = ListQuery::parse(&q)?;
    list_response(&m, vhost_bindings(&v), &query, DEFAULT_SORT)
}

/// `q` or `e` in a binding path.
fn destination_type(kind: &str) -> ApiResult<&'static str> {
    match kind {
        "q" => Ok("queue"),
        "e" => Ok("exchange"),
        _ => Err(ApiError::not_found()),
    }
}

/// The bindings from `source` to `destination`, checking both exist (404).
fn between(
    v: &VHost,
    source: &str,
    kind: &'static str,
    destination: &str,
) -> ApiResult<Vec<BindingRow>> {
    v.exchange(source).map_err(|_| ApiError::not_found())?;
    let exists = match kind {
        "queue" => v.queue(destination).is_ok(),
        _ => v.exchange(destination).is_ok(),
    };
    if !exists {
        return Err(ApiError::not_found());
    }
    Ok(vhost_bindings(v)
        .into_iter()
        .filter(|b| {
            b.source == source && b.destination == destination && b.destination_type == kind
        })
        .collect())
}

async fn list_between(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, source, kind, destination)): Path<(String, String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let v = caller.require_vhost(&m, &vhost)?;
    let kind = destination_type(&kind)?;
    let rows = between(&v, exchange_name(&source), kind, &destination)?;
    list_response(&m, rows, &ListQuery::parse(&q)?, DEFAULT_SORT)
}

/// The AMQP checks of `queue.bind` / `exchange.bind`: write on the destination,
/// read on the source.
fn check_bind(
    m: &Management,
    caller: &Caller,
    vhost: &str,
    source: &str,
    kind: &str,
    destination: &str,
) -> ApiResult<()> {
    let resource = if kind == "queue" {
        Resource::Queue
    } else {
        Resource::Exchange
    };
    caller.check(m, vhost, Access::Write, resource, destination)?;
    caller.check(m, vhost, Access::Read, Resource::Exchange, source)
}

/// POST: binds, then answers 201 with a relative `Location` ending in the new
/// binding's properties key (Terraform reads it from there).
async fn create(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, source, kind, destination)): Path<(String, String, String, String)>,
    body: Bytes,
) -> ApiResult {
    let v = caller.require_vhost(&m, &vhost)?;
    let kind = destination_type(&kind)?;
    let source = exchange_name(&source).to_owned();
    // 404 before anything else when either end is missing.
    between(&v, &source, kind, &destination)?;
    let body = body_object(&body)?;
    let routing_key = field_str(&body, "routing_key")?
        .unwrap_or_default()
        .to_owned();
    let arguments = field_arguments(&body, "arguments")?;
    check_bind(&m, &caller, &vhost, &source, kind, &destination)?;
    if kind == "queue" {
        v.bind_queue(
            &destination,
            &source,
            &routing_key,
            arguments.clone(),
            super::http_connection(&m),
        )?;
    } else {
        v.bind_exchange(&destination, &source, &routing_key, arguments.clone())?;
    }
    let row = BindingRow {
        vhost: vhost.clone(),
        source,
        destination: destination.clone(),
        destination_type: kind,
        routing_key,
        arguments,
    };
    let location = format!(
        "{}/{}",
        encode_segment(&destination),
        encode_segment(&row.properties_key())
    );
    let mut response = StatusCode::CREATED.into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

fn find_binding(
    v: &VHost,
    source: &str,
    kind: &'static str,
    destination: &str,
    props: &str,
) -> ApiResult<BindingRow> {
    between(v, source, kind, destination)?
        .into_iter()
        .find(|b| b.properties_key() == props)
        .ok_or_else(ApiError::not_found)
}

async fn show(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
) -> ApiResult {
    let v = caller.require_vhost(&m, &vhost)?;
    let kind = destination_type(&kind)?;
    let b = find_binding(&v, exchange_name(&source), kind, &destination, &props)?;
    Ok(super::json(b.to_json()))
}

async fn delete(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
) -> ApiResult {
    let v = caller.require_vhost(&m, &vhost)?;
    let kind = destination_type(&kind)?;
    let source = exchange_name(&source);
    let b = find_binding(&v, source, kind, &destination, &props)?;
    check_bind(&m, &caller, &vhost, source, kind, &destination)?;
    if kind == "queue" {
        v.unbind_queue(
            &destination,
            source,
            &b.routing_key,
            &b.arguments,
            super::http_connection(&m),
        )?;
    } else {
        v.unbind_exchange(&destination, source, &b.routing_key, &b.arguments)?;
    }
    Ok(no_content())
}

/// `/exchanges/{v}/{x}/bindings/source` (bindings from it) or `.../destination`
/// (bindings to it).
async fn list_of_exchange(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, exchange, side)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let v = caller.require_vhost(&m, &vhost)?;
    let name = exchange_name(&exchange);
    v.exchange(name).map_err(|_| ApiError::not_found())?;
    let rows: Vec<BindingRow> = match side.as_str() {
        "source" => vhost_bindings(&v)
            .into_iter()
            .filter(|b| b.source == name)
            .collect(),
        "destination" => vhost_bindings(&v)
            .into_iter()
            .filter(|b| b.destination_type == "exchange" && b.destination == name)
            .collect(),
        _ => return Err(ApiError::not_found()),
    };
    list_response(&m, rows, &ListQuery::parse(&q)?, DEFAULT_SORT)
}

async fn list_of_queue(
    State(m): State<Management>,
    caller: Caller,
    Path((vhost, queue)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let v = caller.require_vhost(&m, &vhost)?;
    v.queue(&queue).map_err(|_| ApiError::not_found())?;
    let rows: Vec<BindingRow> = vhost_bindings(&v)
        .into_iter()
        .filter(|b| b.destination_type == "queue" && b.destination == queue)
        .collect();
    list_response(&m, rows, &ListQuery::parse(&q)?, DEFAULT_SORT)
}

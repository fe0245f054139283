//! `/api/parameters` and `/api/global-parameters`.
//!
//! Switchyard has no plugin that reads runtime parameters (no shovel, no
//! federation), so none can be stored: a PUT answers 400 naming the component,
//! rather than accepting a parameter that would do nothing. Lists are empty
//! (vhost-scoped) or hold the one global parameter there is, `cluster_name`.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use super::{json, ApiError, ApiResult, Caller};
use crate::Management;

pub(super) fn routes() -> Router<Management> {
    Router::new()
        .route("/parameters", get(empty_list))
        .route("/parameters/{component}", get(empty_list))
        .route("/parameters/{component}/{vhost}", get(empty_list))
        .route(
            "/parameters/{component}/{vhost}/{name}",
            get(missing).put(unsupported).delete(missing),
        )
        .route("/global-parameters", get(globals))
        .route(
            "/global-parameters/{name}",
            get(global).put(unsupported_global).delete(missing),
        )
}

/// Why a parameter of `component` cannot be set.
pub(crate) fn unsupported_reason(component: &str) -> String {
    format!(
        "runtime parameter component '{component}' is not supported by Switchyard (it has no shovel or federation plugin)"
    )
}

async fn empty_list(_caller: Caller) -> ApiResult {
    Ok(json(json!([])))
}

async fn missing(_caller: Caller) -> ApiResult {
    Err(ApiError::not_found())
}

async fn unsupported(
    caller: Caller,
    Path((component, _, _)): Path<(String, String, String)>,
) -> ApiResult {
    caller.require_policymaker()?;
    Err(ApiError::bad_request(unsupported_reason(&component)))
}

async fn unsupported_global(caller: Caller, Path(name): Path<String>) -> ApiResult {
    caller.require_admin()?;
    Err(ApiError::bad_request(format!(
        "global parameter '{name}' cannot be set at runtime in Switchyard"
    )))
}

fn cluster_name(m: &Management) -> Value {
    json!({"name": "cluster_name", "value": m.node.cluster_name})
}

async fn globals(State(m): State<Management>, _caller: Caller) -> ApiResult {
    Ok(json(json!([cluster_name(&m)])))
}

async fn global(
    State(m): State<Management>,
    _caller: Caller,
    Path(name): Path<String>,
) -> ApiResult {
    if name == "cluster_name" {
        Ok(json(cluster_name(&m)))
    } else {
        Err(ApiError::not_found())
    }
}

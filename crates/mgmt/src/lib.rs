//! Switchyard's management surface, all over HTTP on axum:
//! - `api`: the RabbitMQ-compatible HTTP API under `/api` (MANAGEMENT.md §0-§6), which
//!   rabbitmqadmin, KEDA, Terraform, pyrabbit2 and the web UI use;
//! - `prometheus`: `/metrics` and `/metrics/per-object` in rabbitmq_prometheus's names
//!   (MANAGEMENT.md §7), on their own listener;
//! - `ui`: the web UI's static assets, embedded in the binary, served at `/`.
//!
//! It reads and changes the broker only through the core's public API (the admin
//! commands, the connection registry, the statistics counters); it never names a
//! protocol adapter's internals, and it owns no state a restart must keep.

pub mod api;
pub mod prometheus;
pub mod ui;

use std::sync::Arc;

use switchyard_core::Broker;

/// What every handler needs: the broker, plus facts about the node that the
/// core does not know (listeners, start time).
#[derive(Clone)]
pub struct Management {
    pub broker: Arc<Broker>,
}

/// The router of the management listener (15672): the API and the UI.
pub fn management_router(state: Management) -> axum::Router {
    api::router(state.clone()).merge(ui::router())
}

/// The router of the Prometheus listener (15692).
pub fn prometheus_router(state: Management) -> axum::Router {
    prometheus::router(state)
}

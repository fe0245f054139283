//! The HTTP API under `/api` (owned by the HTTP API work; see MANAGEMENT.md).

use crate::Management;

pub fn router(state: Management) -> axum::Router {
    axum::Router::new().with_state(state)
}

//! Prometheus exposition on its own listener (see MANAGEMENT.md §7).

use crate::Management;

pub fn router(state: Management) -> axum::Router {
    axum::Router::new().with_state(state)
}

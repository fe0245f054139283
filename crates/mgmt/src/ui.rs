//! The web UI's static assets, embedded in the binary and served at `/`.

pub fn router() -> axum::Router {
    axum::Router::new()
}

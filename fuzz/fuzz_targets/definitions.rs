//! Arbitrary bytes as a definitions file imported over the management HTTP API
//! (`POST /api/definitions` as an administrator), on an in-process broker: the
//! JSON parser, the RabbitMQ-shaped object readers and every metadata command
//! they build. Whatever the document, the answer is an HTTP status, never a
//! panic; the seeds (fuzz/seeds/definitions) are real exports.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{header, Request};
use libfuzzer_sys::fuzz_target;
use switchyard_core::auth::{hash_password, Auth};
use switchyard_core::Broker;
use switchyard_mgmt::{Management, NodeInfo};
use tower::ServiceExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let mut auth = Auth::new();
    let _ = auth.add_user(
        "admin",
        &hash_password("admin", [1, 2, 3, 4]),
        vec!["administrator".into()],
        false,
    );
    let _ = auth.set_permissions("admin", "/", ".*", ".*", ".*");
    let broker = Broker::new(auth, &[], 0);
    let app = switchyard_mgmt::api::router(Management {
        broker,
        node: Arc::new(NodeInfo::local()),
    });
    let request = Request::post("/api/definitions")
        .header(header::AUTHORIZATION, "Basic YWRtaW46YWRtaW4=")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(data.to_vec()))
        .unwrap();
    let response = runtime().block_on(app.oneshot(request)).unwrap();
    assert!(response.status().as_u16() < 500 || response.status().as_u16() == 503);
});

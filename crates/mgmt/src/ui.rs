//! The web UI's static assets (`crates/mgmt/ui/`), embedded in the binary and served
//! at `/` of the management listener.
//!
//! The UI is plain HTML, one CSS file and small ES modules: no framework, no CDN, no
//! build step, so it works offline and behind a path prefix (every URL it uses is
//! relative, `api/...`). It reads the same `/api` every other client reads; nothing
//! here knows about the broker.
//!
//! Each asset is served with a strong `ETag` (a hash of its bytes, computed once) and
//! `Cache-Control: no-cache`, so a browser revalidates with `If-None-Match` and gets
//! `304` until the binary is upgraded, never a stale page.

use std::sync::OnceLock;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One embedded file: its URL path, content type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $ctype:expr) => {
        Asset {
            path: concat!("/", $path),
            content_type: $ctype,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/ui/", $path)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file under `ui/` (a test checks that none is missing).
static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("js/main.js", JS),
    asset!("js/api.js", JS),
    asset!("js/dom.js", JS),
    asset!("js/chart.js", JS),
    asset!("js/list.js", JS),
    asset!("js/forms.js", JS),
    asset!("js/pages/overview.js", JS),
    asset!("js/pages/connections.js", JS),
    asset!("js/pages/exchanges.js", JS),
    asset!("js/pages/queues.js", JS),
    asset!("js/pages/mqtt.js", JS),
    asset!("js/pages/admin.js", JS),
];

/// The page's own rules: scripts and styles from this origin only (inline style
/// attributes are allowed: the charts and bars set widths), no framing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'";

pub fn router() -> axum::Router {
    let mut router = axum::Router::new();
    for (index, asset) in ASSETS.iter().enumerate() {
        router = router.route(asset.path, get(move |h: HeaderMap| serve(index, h)));
    }
    // `/` is the page itself (no redirect, so a relative `api/` resolves the same).
    if let Some(index) = ASSETS.iter().position(|a| a.path == "/index.html") {
        router = router.route("/", get(move |h: HeaderMap| serve(index, h)));
    }
    router
}

/// ETags, one per asset, in `ASSETS` order.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| format!("\"{:016x}\"", fnv1a(a.body)))
            .collect()
    })
}

/// FNV-1a, 64 bit: stable across builds and Rust versions (unlike `DefaultHasher`),
/// and strong enough to tell two versions of one file apart.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

async fn serve(index: usize, request: HeaderMap) -> Response {
    let (Some(asset), Some(etag)) = (ASSETS.get(index), etags().get(index)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let etag_value = HeaderValue::from_str(etag).unwrap_or(HeaderValue::from_static("\"0\""));
    let common = [
        (header::ETAG, etag_value),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
    ];
    let matches = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/") == etag
        });
    if matches {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        StatusCode::OK,
        common,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        )],
        asset.body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::path::Path;

    /// Every file under `ui/` is embedded (a file added without a line in `ASSETS`
    /// would be a 404 in the browser, found only by clicking).
    #[test]
    fn every_ui_file_is_embedded() {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, root, out);
                } else {
                    let rel = path.strip_prefix(root).unwrap().to_string_lossy();
                    out.push(format!("/{rel}"));
                }
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
        let mut files = Vec::new();
        walk(&root, &root, &mut files);
        files.sort();
        let mut embedded: Vec<String> = ASSETS.iter().map(|a| a.path.to_owned()).collect();
        embedded.sort();
        assert_eq!(files, embedded);
    }

    /// Every module the page imports is one of the embedded files.
    #[test]
    fn every_import_resolves_to_an_embedded_file() {
        for asset in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            let text = std::str::from_utf8(asset.body).unwrap();
            let dir = asset.path.rsplit_once('/').unwrap().0;
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let spec = line.rsplit_once(" from '").unwrap().1;
                let spec = spec.trim_end_matches("';");
                let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
                for seg in spec.split('/') {
                    match seg {
                        "." => {}
                        ".." => {
                            parts.pop();
                        }
                        s => parts.push(s),
                    }
                }
                let target = format!("/{}", parts.join("/"));
                assert!(
                    ASSETS.iter().any(|a| a.path == target),
                    "{} imports {spec}, which is not embedded ({target})",
                    asset.path
                );
            }
        }
    }

    fn http_get(addr: std::net::SocketAddr, path: &str, extra: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{extra}\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn serves_the_page_with_types_etags_and_304() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, router()).await });

        let (root, css, missing) = tokio::task::spawn_blocking(move || {
            (
                http_get(addr, "/", ""),
                http_get(addr, "/app.css", ""),
                http_get(addr, "/nope.js", ""),
            )
        })
        .await
        .unwrap();
        assert!(root.starts_with("HTTP/1.1 200"), "{root}");
        assert!(root.contains("content-type: text/html; charset=utf-8"));
        assert!(root.contains("<script type=\"module\" src=\"js/main.js\">"));
        assert!(css.contains("content-type: text/css"));
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

        let etag = root
            .lines()
            .find_map(|l| l.strip_prefix("etag: "))
            .unwrap()
            .to_owned();
        let again = tokio::task::spawn_blocking(move || {
            http_get(addr, "/", &format!("if-none-match: {etag}\r\n"))
        })
        .await
        .unwrap();
        assert!(again.starts_with("HTTP/1.1 304"), "{again}");
        server.abort();
    }
}

//! RabbitMQ's HTTP authentication backend (`rabbitmq_auth_backend_http`), the
//! authentication part: the login is sent to `[auth.http] user_path` as
//! `username` and `password` (plus `vhost` and `client_id` when the protocol
//! gives them, as RabbitMQ's MQTT plugin does), in the query of a GET or the
//! form-encoded body of a POST (`http_method`). Only an HTTP 200 or 201 answers;
//! its body, lower-cased, is `allow [tag ...]` or `deny [reason]`. Anything else
//! (refused connection, timeout, other status, other body) is an error, logged,
//! and the next backend of the chain is asked.
//!
//! The authorisation part, for the users it let in: `vhost_path`,
//! `resource_path` and `topic_path`, each asked with RabbitMQ's parameters and
//! answered `allow` or `deny [reason]` the same way (an error is a refusal). A
//! path left empty leaves that check to the internal database. Sessions check
//! permissions synchronously, so a check whose answer is not cached blocks its
//! connection until the service answers (at most `request_timeout_ms`), as a
//! RabbitMQ channel waits for its backend; `block_in_place` hands the worker's
//! other connections to another thread meanwhile. Sessions keep what they were
//! allowed for their lifetime, as RabbitMQ channels do.
//!
//! Answers are cached for `cache_ttl_secs` (RabbitMQ's
//! `rabbitmq_auth_backend_cache` in front of it): logins per user name and
//! password digest, checks per request, so a reconnect storm does not become a
//! request storm. Plain `http://` only.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use switchyard_core::auth::{Access, Resource};
use switchyard_core::authn::{
    AuthzUser, BoxFuture, Decision, ExternalAuthz, ExternalBackend, LoginRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config_auth::HttpAuthConfig;

/// Largest answer read (an answer is a word and some tags).
const MAX_RESPONSE: usize = 64 * 1024;
/// Cached answers kept at most.
const MAX_CACHED: usize = 100_000;

/// An `http://host:port/path` URL, split.
#[derive(Debug, Clone)]
struct Url {
    /// `host:port`, for connecting and the Host header.
    authority: String,
    path: String,
}

impl Url {
    fn parse(url: &str) -> Result<Url, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("'{url}' is not an http:// URL"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("'{url}' has no host"));
        }
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Url {
            authority,
            path: path.to_owned(),
        })
    }
}

type CacheKey = (String, [u8; 32]);

#[derive(Debug)]
struct Inner {
    user: Url,
    vhost: Option<Url>,
    resource: Option<Url>,
    topic: Option<Url>,
    post: bool,
    ttl: Duration,
    timeout: Duration,
    /// Answers by (user name, SHA-256 of the password): no password is kept.
    cache: Mutex<HashMap<CacheKey, (Decision, Instant)>>,
    /// Authorisation answers by request (path and form).
    checks: Mutex<HashMap<String, (bool, Instant)>>,
}

/// The backend; cheap to clone into the request futures.
#[derive(Debug, Clone)]
pub struct HttpBackend {
    inner: Arc<Inner>,
}

impl HttpBackend {
    pub fn new(config: &HttpAuthConfig) -> Result<Self, String> {
        let user =
            Url::parse(&config.user_path).map_err(|e| format!("auth.http.user_path: {e}"))?;
        let optional = |key: &str, url: &str| -> Result<Option<Url>, String> {
            if url.is_empty() {
                return Ok(None);
            }
            Url::parse(url)
                .map(Some)
                .map_err(|e| format!("auth.http.{key}: {e}"))
        };
        let vhost = optional("vhost_path", &config.vhost_path)?;
        let resource = optional("resource_path", &config.resource_path)?;
        let topic = optional("topic_path", &config.topic_path)?;
        let post = match config.http_method.to_ascii_lowercase().as_str() {
            "get" => false,
            "post" => true,
            other => {
                return Err(format!(
                    "invalid value \"{other}\" for key auth.http.http_method: get or post"
                ))
            }
        };
        Ok(HttpBackend {
            inner: Arc::new(Inner {
                user,
                vhost,
                resource,
                topic,
                post,
                ttl: Duration::from_secs(config.cache_ttl_secs),
                timeout: Duration::from_millis(config.request_timeout_ms.max(1)),
                cache: Mutex::new(HashMap::new()),
                checks: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl ExternalBackend for HttpBackend {
    fn name(&self) -> &'static str {
        "http"
    }

    fn authenticate(&self, request: LoginRequest) -> BoxFuture<Decision> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.authenticate(request).await })
    }

    fn authz(&self) -> Option<Arc<dyn ExternalAuthz>> {
        let i = &self.inner;
        if i.vhost.is_none() && i.resource.is_none() && i.topic.is_none() {
            return None;
        }
        Some(Arc::new(self.clone()))
    }
}

fn permission(access: Access) -> &'static [u8] {
    match access {
        Access::Configure => b"configure",
        Access::Write => b"write",
        Access::Read => b"read",
    }
}

impl ExternalAuthz for HttpBackend {
    fn vhost(&self, user: &AuthzUser, vhost: &str) -> Option<bool> {
        let url = self.inner.vhost.as_ref()?;
        let ip = user.peer.map(|ip| ip.to_string()).unwrap_or_default();
        let tags = user.tags.join(" ");
        Some(self.inner.check(
            url,
            &[
                ("username", user.username.as_bytes()),
                ("vhost", vhost.as_bytes()),
                ("ip", ip.as_bytes()),
                ("tags", tags.as_bytes()),
            ],
        ))
    }

    fn resource(
        &self,
        user: &AuthzUser,
        vhost: &str,
        resource: Resource,
        name: &str,
        access: Access,
    ) -> Option<bool> {
        let url = self.inner.resource.as_ref()?;
        let tags = user.tags.join(" ");
        Some(self.inner.check(
            url,
            &[
                ("username", user.username.as_bytes()),
                ("vhost", vhost.as_bytes()),
                ("resource", resource.name().as_bytes()),
                ("name", name.as_bytes()),
                ("permission", permission(access)),
                ("tags", tags.as_bytes()),
            ],
        ))
    }

    fn decides_topics(&self) -> bool {
        self.inner.topic.is_some()
    }

    fn topic(
        &self,
        user: &AuthzUser,
        vhost: &str,
        exchange: &str,
        access: Access,
        routing_key: &str,
        client_id: Option<&str>,
    ) -> bool {
        let Some(url) = self.inner.topic.as_ref() else {
            return true;
        };
        let tags = user.tags.join(" ");
        let mut params: Vec<(&str, &[u8])> = vec![
            ("username", user.username.as_bytes()),
            ("vhost", vhost.as_bytes()),
            ("resource", b"topic"),
            ("name", exchange.as_bytes()),
            ("permission", permission(access)),
            ("routing_key", routing_key.as_bytes()),
            ("tags", tags.as_bytes()),
        ];
        if let Some(c) = client_id {
            params.push(("client_id", c.as_bytes()));
        }
        self.inner.check(url, &params)
    }
}

impl Inner {
    async fn authenticate(&self, request: LoginRequest) -> Decision {
        let key: CacheKey = (
            request.username.clone(),
            Sha256::digest(&request.password).into(),
        );
        let now = Instant::now();
        if let Some((decision, until)) = self.cache.lock().get(&key) {
            if *until > now {
                return decision.clone();
            }
        }
        let mut params: Vec<(&str, &[u8])> = vec![
            ("username", request.username.as_bytes()),
            ("password", &request.password),
        ];
        if let Some(v) = &request.vhost {
            params.push(("vhost", v.as_bytes()));
        }
        if let Some(c) = &request.client_id {
            params.push(("client_id", c.as_bytes()));
        }
        let form = form_encode(&params);
        let answer = tokio::time::timeout(self.timeout, self.request(&self.user, &form)).await;
        let decision = match answer {
            Ok(Ok(body)) => match parse_answer(&body) {
                Some(d) => d,
                None => {
                    return Decision::Deny(format!(
                        "HTTP auth backend: unexpected answer {:?}",
                        body.chars().take(100).collect::<String>()
                    ))
                }
            },
            // Errors are not cached: the next login asks again.
            Ok(Err(e)) => return Decision::Deny(format!("HTTP auth backend: {e}")),
            Err(_) => {
                return Decision::Deny(format!(
                    "HTTP auth backend: no answer within {:?}",
                    self.timeout
                ))
            }
        };
        if !self.ttl.is_zero() {
            let mut cache = self.cache.lock();
            if cache.len() >= MAX_CACHED {
                cache.retain(|_, (_, until)| *until > now);
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
            }
            cache.insert(key, (decision.clone(), now + self.ttl));
        }
        decision
    }

    /// One authorisation check: a cached answer, or the service's, waited for
    /// in place. A `deny` or an error refuses (logged; errors are not cached).
    fn check(&self, url: &Url, params: &[(&str, &[u8])]) -> bool {
        let form = form_encode(params);
        let key = format!("{}{}?{form}", url.authority, url.path);
        let now = Instant::now();
        if let Some((allowed, until)) = self.checks.lock().get(&key) {
            if *until > now {
                return *allowed;
            }
        }
        let answer = wait_in_place(async {
            tokio::time::timeout(self.timeout, self.request(url, &form)).await
        })
        .unwrap_or_else(|| Ok(Err("no runtime to send the request on".to_owned())));
        let allowed = match answer {
            Ok(Ok(body)) => match parse_answer(&body) {
                Some(Decision::Deny(why)) => {
                    tracing::info!(path = %url.path, request = %form.chars().take(300).collect::<String>(), "{why}");
                    false
                }
                Some(_) => true,
                None => {
                    tracing::warn!(path = %url.path, "HTTP auth backend: unexpected answer {:?}; refused", body.chars().take(100).collect::<String>());
                    return false;
                }
            },
            Ok(Err(e)) => {
                tracing::warn!(path = %url.path, "HTTP auth backend: {e}; refused");
                return false;
            }
            Err(_) => {
                tracing::warn!(path = %url.path, "HTTP auth backend: no answer within {:?}; refused", self.timeout);
                return false;
            }
        };
        if !self.ttl.is_zero() {
            let mut checks = self.checks.lock();
            if checks.len() >= MAX_CACHED {
                checks.retain(|_, (_, until)| *until > now);
                if checks.len() >= MAX_CACHED {
                    checks.clear();
                }
            }
            checks.insert(key, (allowed, now + self.ttl));
        }
        allowed
    }

    /// One HTTP/1.1 request (`Connection: close`); the body of a 200 or 201.
    async fn request(&self, url: &Url, form: &str) -> Result<String, String> {
        let mut stream = TcpStream::connect(&url.authority)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", url.authority))?;
        let head = if self.post {
            format!(
                "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
                url.path,
                url.authority,
                form.len()
            )
        } else {
            let sep = if url.path.contains('?') { '&' } else { '?' };
            format!(
                "GET {}{sep}{form} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                url.path, url.authority
            )
        };
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| format!("cannot send the request: {e}"))?;
        let mut raw = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("cannot read the answer: {e}"))?;
        parse_response(&raw)
    }
}

/// Runs `fut` to completion from synchronous code. On a multi-threaded runtime's
/// worker the worker's other tasks move to another thread while this one waits
/// (`block_in_place`); elsewhere (a current-thread runtime in a test, no
/// runtime) it runs on a thread of its own with a runtime of its own. None if
/// that runtime cannot be made.
fn wait_in_place<T: Send>(fut: impl std::future::Future<Output = T> + Send) -> Option<T> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if let Ok(handle) = Handle::try_current() {
        if handle.runtime_flavor() == RuntimeFlavor::MultiThread {
            return Some(tokio::task::block_in_place(|| handle.block_on(fut)));
        }
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()
                    .map(|rt| rt.block_on(fut))
            })
            .join()
            .ok()
            .flatten()
    })
}

/// Status and body of an HTTP/1.x response read to its end.
fn parse_response(raw: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "incomplete HTTP answer".to_owned())?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| "malformed HTTP status line".to_owned())?;
    if status != 200 && status != 201 {
        return Err(format!("HTTP status {status}"));
    }
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if chunked {
        return Ok(dechunk(body));
    }
    Ok(body.to_owned())
}

/// A chunked body's data (the sizes and trailers dropped).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size =
            usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(rest.get(..size).unwrap_or(rest));
        body = rest.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
    out
}

/// `allow [tags]` / `deny [reason]`, lower-cased as RabbitMQ reads it.
fn parse_answer(body: &str) -> Option<Decision> {
    let body = body.trim().to_lowercase();
    let mut words = body.split_whitespace();
    match words.next()? {
        "allow" => Some(Decision::Allow {
            tags: words.map(str::to_owned).collect(),
        }),
        "deny" => Some(Decision::Deny(format!(
            "denied by the HTTP auth backend{}",
            body.strip_prefix("deny")
                .filter(|r| !r.trim().is_empty())
                .map(|r| format!(":{r}"))
                .unwrap_or_default()
        ))),
        _ => None,
    }
}

/// `application/x-www-form-urlencoded` (RFC 3986 unreserved kept, the rest %XX).
fn form_encode(params: &[(&str, &[u8])]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_into(&mut out, k.as_bytes());
        out.push('=');
        encode_into(&mut out, v);
    }
    out
}

fn encode_into(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_rabbitmq_reads_them() {
        assert_eq!(
            parse_answer("Allow Administrator management\n"),
            Some(Decision::Allow {
                tags: vec!["administrator".into(), "management".into()]
            })
        );
        assert_eq!(
            parse_answer("allow"),
            Some(Decision::Allow { tags: vec![] })
        );
        assert!(matches!(parse_answer("deny"), Some(Decision::Deny(_))));
        assert_eq!(parse_answer("maybe"), None);
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nallow").unwrap(),
            "allow"
        );
        assert!(parse_response(b"HTTP/1.1 500 Oops\r\n\r\nallow").is_err());
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nallow\r\n0\r\n\r\n"
            )
            .unwrap(),
            "allow"
        );
        assert_eq!(
            form_encode(&[("username", b"a b&c"), ("password", "p=%".as_bytes())]),
            "username=a%20b%26c&password=p%3D%25"
        );
        assert_eq!(
            Url::parse("http://127.0.0.1:8000/auth/user").unwrap().path,
            "/auth/user"
        );
        assert_eq!(Url::parse("http://auth").unwrap().authority, "auth:80");
        assert!(Url::parse("https://x/").is_err());
    }
}

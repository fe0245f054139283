//! The HTTP side of `switchyard ctl`: one blocking request at a time with ureq
//! (no TLS, no async runtime: the CLI stays small), HTTP Basic on every request,
//! and every failure turned into a [`CtlError`] that carries its exit code.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

/// Exit codes, from BSD's sysexits.h as rabbitmqadmin v2 uses them, so scripts can
/// tell the cases apart. `--help` lists them.
pub mod exit {
    pub const OK: u8 = 0;
    /// The health check ran and reported a failure (503).
    pub const UNHEALTHY: u8 = 1;
    /// Bad command line (EX_USAGE).
    pub const USAGE: u8 = 64;
    /// The broker refused the request's content: 400, 405, 409, 412 (EX_DATAERR).
    pub const DATA: u8 = 65;
    /// The object (queue, user, vhost...) does not exist: 404 (EX_NOINPUT).
    pub const NOT_FOUND: u8 = 66;
    /// The broker cannot be reached: connection refused, unknown host, timeout
    /// (EX_UNAVAILABLE).
    pub const UNAVAILABLE: u8 = 69;
    /// The broker failed (5xx other than a health check's 503) or answered
    /// something that is not the API's JSON (EX_SOFTWARE).
    pub const SERVER: u8 = 70;
    /// A local file could not be read or written (EX_IOERR).
    pub const IO: u8 = 74;
    /// Wrong credentials, or the user lacks the tag or permission: 401, 403
    /// (EX_NOPERM).
    pub const AUTH: u8 = 77;
}

#[derive(Debug)]
pub struct CtlError {
    pub code: u8,
    pub message: String,
}

impl CtlError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        CtlError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Where the API is and who we are.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    auth: String,
}

/// A response the caller wants whatever its status (health checks read 503 bodies).
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Client {
    pub fn new(host: &str, port: u16, base_path: &str, user: &str, password: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .timeout_connect(Some(Duration::from_secs(10)))
            .build()
            .into();
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let prefix = base_path.trim_matches('/');
        let base = if prefix.is_empty() {
            format!("http://{host}:{port}/api")
        } else {
            format!("http://{host}:{port}/{prefix}/api")
        };
        let auth = format!(
            "Basic {}",
            base64_encode(format!("{user}:{password}").as_bytes())
        );
        Client { agent, base, auth }
    }

    /// The URL of `path` (already encoded, no leading slash).
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path)
    }

    /// Sends one request; any status is returned, transport errors are errors.
    pub fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, CtlError> {
        self.send_with(method, path, body, None)
    }

    /// [`Client::send`] with an `X-Reason` header (why a connection is closed).
    pub fn send_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        reason: Option<&str>,
    ) -> Result<Answer, CtlError> {
        let url = self.url(path);
        let json = body.map(Value::to_string);
        let result = match (method, json) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("authorization", &self.auth)
                .call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("authorization", &self.auth)
                .header("x-reason", reason.unwrap_or(""))
                .call(),
            ("PUT", json) => self
                .agent
                .put(&url)
                .header("authorization", &self.auth)
                .content_type("application/json")
                .send(json.unwrap_or_else(|| "{}".into())),
            (_, json) => self
                .agent
                .post(&url)
                .header("authorization", &self.auth)
                .content_type("application/json")
                .send(json.unwrap_or_else(|| "{}".into())),
        };
        let mut response = result.map_err(|e| transport_error(&url, e))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(512 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| CtlError::new(exit::UNAVAILABLE, format!("{url}: {e}")))?;
        Ok(Answer { status, body })
    }

    /// Sends one request and fails on any non-2xx status. Returns the JSON body
    /// (`Null` for an empty one).
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, CtlError> {
        let a = self.send(method, path, body)?;
        check(&a)?;
        parse(&a.body)
    }

    pub fn get(&self, path: &str) -> Result<Value, CtlError> {
        self.call("GET", path, None)
    }
}

/// The broker's JSON, or `Null` for an empty body.
pub fn parse(body: &str) -> Result<Value, CtlError> {
    if body.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(body).map_err(|e| {
        CtlError::new(
            exit::SERVER,
            format!("the broker answered something that is not JSON ({e})"),
        )
    })
}

/// Turns a non-2xx answer into the error a user reads: the API's `reason`.
pub fn check(a: &Answer) -> Result<(), CtlError> {
    if (200..300).contains(&a.status) {
        return Ok(());
    }
    let reason = serde_json::from_str::<Value>(&a.body)
        .ok()
        .and_then(|v| {
            v.get("reason").map(|r| match r {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| a.body.trim().to_owned());
    let (code, what) = match a.status {
        401 | 403 => (exit::AUTH, "access refused"),
        404 => (exit::NOT_FOUND, "not found"),
        400 | 405 | 409 | 412 | 413 | 415 | 422 => (exit::DATA, "rejected"),
        _ => (exit::SERVER, "broker error"),
    };
    let reason = if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    };
    Err(CtlError::new(
        code,
        format!("{what} (HTTP {}){reason}", a.status),
    ))
}

fn transport_error(url: &str, e: ureq::Error) -> CtlError {
    CtlError::new(exit::UNAVAILABLE, format!("cannot reach {url}: {e}"))
}

/// Percent-encodes one path segment: everything but unreserved characters, as
/// rabbitmqadmin v2 does (the vhost `/` becomes `%2F`).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Standard base64 with padding (for the Basic credentials).
fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sym = |i: u32| char::from(ALPHABET.get((i & 63) as usize).copied().unwrap_or(b'='));
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        out.push(sym(n >> 18));
        out.push(sym(n >> 12));
        out.push(if chunk.len() > 1 { sym(n >> 6) } else { '=' });
        out.push(if chunk.len() > 2 { sym(n) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64_encode(b"guest:guest"), "Z3Vlc3Q6Z3Vlc3Q=");
        assert_eq!(base64_encode(b"a"), "YQ==");
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_encode(b""), "");
    }

    #[test]
    fn segments_are_fully_encoded() {
        assert_eq!(seg("/"), "%2F");
        assert_eq!(seg("my queue/é"), "my%20queue%2F%C3%A9");
        assert_eq!(seg("a-b.c_d~"), "a-b.c_d~");
    }
}

//! What an OAuth 2.0 access token grants, in RabbitMQ's scope format
//! (`rabbitmq_auth_backend_oauth2`, `rabbit_oauth2_scope`):
//!
//! - `<prefix>configure:<vhost>/<name>`, `<prefix>write:<vhost>/<name>`,
//!   `<prefix>read:<vhost>/<name>`, where `<prefix>` is the resource server id
//!   and a dot (`rabbitmq.`), and `<vhost>` and `<name>` are patterns in which
//!   `*` matches any run of characters, percent-encoded (`%2F` is `/`). An
//!   optional third part (`.../<routing key>`) limits the routing keys of a
//!   topic exchange (topic authorisation; none: any key).
//! - `<prefix>tag:<tag>` gives the user a tag (`administrator`, `monitoring`...).
//!
//! Scopes without the prefix belong to other services and are ignored. A user
//! who logged in with a token is checked against these grants instead of the
//! internal permission table ([`crate::auth::Auth::grant_scopes`]).

use crate::auth::Access;

/// One `configure`/`write`/`read` scope.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    access: Access,
    vhost: String,
    name: String,
    routing_key: Option<String>,
}

/// The permissions and tags of a token, and when it expires.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeGrants {
    grants: Vec<Grant>,
    tags: Vec<String>,
    /// The token's `exp`, in milliseconds since the Unix epoch.
    pub expires_at_ms: Option<u64>,
}

impl ScopeGrants {
    /// The grants of `scopes` that start with `prefix` (e.g. `"rabbitmq."`).
    pub fn parse<'a>(
        prefix: &str,
        scopes: impl IntoIterator<Item = &'a str>,
        expires_at_ms: Option<u64>,
    ) -> Self {
        let mut out = ScopeGrants {
            expires_at_ms,
            ..Default::default()
        };
        for scope in scopes {
            let Some(rest) = scope.strip_prefix(prefix) else {
                continue;
            };
            let Some((permission, target)) = rest.split_once(':') else {
                continue;
            };
            let access = match permission {
                "configure" => Access::Configure,
                "write" => Access::Write,
                "read" => Access::Read,
                "tag" => {
                    if !target.is_empty() {
                        out.tags.push(target.to_owned());
                    }
                    continue;
                }
                _ => continue,
            };
            let mut parts = target.splitn(3, '/');
            let (Some(vhost), Some(name)) = (parts.next(), parts.next()) else {
                continue;
            };
            out.grants.push(Grant {
                access,
                vhost: percent_decode(vhost),
                name: percent_decode(name),
                routing_key: parts.next().map(percent_decode),
            });
        }
        out
    }

    /// The tags the token gives.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// Whether the token has not expired: an expired one grants nothing (AMQP
    /// 0-9-1 refuses operations until `connection.update-secret`, as RabbitMQ).
    pub fn is_live(&self) -> bool {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.expires_at_ms.is_none_or(|at| now_ms < at)
    }

    /// Whether any scope names `vhost` (RabbitMQ's vhost access check).
    pub fn allows_vhost(&self, vhost: &str) -> bool {
        self.is_live() && self.grants.iter().any(|g| wildcard_match(&g.vhost, vhost))
    }

    /// Whether a scope grants `access` to resource `name` in `vhost`.
    /// `{vhost}` in a name pattern stands for the vhost checked.
    pub fn allows(&self, access: Access, vhost: &str, name: &str) -> bool {
        self.is_live()
            && self
                .grants
                .iter()
                .any(|g| g.access == access && g.covers(vhost, name))
    }

    /// Whether a scope grants `access` to `routing_key` on topic exchange
    /// `exchange` of `vhost` (a scope without a routing-key part: any key).
    pub fn allows_topic(
        &self,
        access: Access,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
    ) -> bool {
        self.is_live()
            && self.grants.iter().any(|g| {
                g.access == access
                    && g.covers(vhost, exchange)
                    && g.routing_key
                        .as_deref()
                        .is_none_or(|rk| expand_match(rk, vhost, routing_key))
            })
    }
}

impl Grant {
    fn covers(&self, vhost: &str, name: &str) -> bool {
        wildcard_match(&self.vhost, vhost) && expand_match(&self.name, vhost, name)
    }
}

/// `pattern` with `{vhost}` replaced, matched against `text`.
fn expand_match(pattern: &str, vhost: &str, text: &str) -> bool {
    if pattern.contains("{vhost}") {
        wildcard_match(&pattern.replace("{vhost}", vhost), text)
    } else {
        wildcard_match(pattern, text)
    }
}

/// `%XX` sequences decoded; an invalid one is kept as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `*` matches any run of characters (none included); everything else itself.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return text.is_empty();
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let middle: Vec<&str> = parts.collect();
    let Some((last, between)) = middle.split_last() else {
        // No `*`: the whole text had to be `first`.
        return rest.is_empty();
    };
    for part in between {
        match rest.find(part) {
            Some(at) => rest = rest.get(at + part.len()..).unwrap_or_default(),
            None => return false,
        }
    }
    rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("*", "anything"));
        assert!(wildcard_match("app.*", "app.orders"));
        assert!(!wildcard_match("app.*", "other"));
        assert!(wildcard_match("a*c*e", "abcde"));
        assert!(!wildcard_match("a*c*e", "abcd"));
        assert!(wildcard_match("exact", "exact"));
        assert!(!wildcard_match("exact", "exactly"));
        assert!(wildcard_match("*-log", "audit-log"));
    }

    #[test]
    fn rabbitmqs_scope_format() {
        let g = ScopeGrants::parse(
            "rabbitmq.",
            [
                "rabbitmq.read:*/*",
                "rabbitmq.write:%2F/app.*",
                "rabbitmq.configure:dev/*/ignored.key",
                "rabbitmq.write:%2F/amq.topic/sensors.*",
                "rabbitmq.write:dev/{vhost}-*",
                "rabbitmq.tag:monitoring",
                "other.write:*/*",
                "openid",
                "rabbitmq.bogus:*/*",
            ],
            Some(u64::MAX),
        );
        assert_eq!(g.tags(), ["monitoring".to_owned()]);
        assert_eq!(g.expires_at_ms, Some(u64::MAX));
        assert!(g.allows(Access::Read, "/", "anything"));
        assert!(g.allows(Access::Write, "/", "app.orders"));
        assert!(!g.allows(Access::Write, "/", "billing"));
        assert!(!g.allows(Access::Write, "dev", "app.orders"));
        assert!(g.allows(Access::Configure, "dev", "q1"));
        assert!(!g.allows(Access::Configure, "/", "q1"));
        assert!(g.allows_vhost("dev"));
        assert!(g.allows(Access::Write, "dev", "dev-q"));
        assert!(g.allows_topic(Access::Write, "/", "amq.topic", "sensors.t1"));
        assert!(!g.allows_topic(Access::Write, "/", "amq.topic", "alarms.t1"));
        assert!(
            g.allows_topic(Access::Write, "/", "app.x", "anything"),
            "no key part: any key"
        );
        assert!(g.allows_topic(Access::Read, "/", "amq.topic", "alarms.t1"));
        assert!(!g.allows(Access::Write, "dev", "prod-q"));
        let none = ScopeGrants::parse("rabbitmq.", ["other.read:*/*"], None);
        assert!(!none.allows_vhost("/"));
        // Expired (1970): grants nothing.
        let old = ScopeGrants::parse("rabbitmq.", ["rabbitmq.read:*/*"], Some(7));
        assert!(!old.allows(Access::Read, "/", "q") && !old.allows_vhost("/"));
    }
}

//! The security part of the configuration file: `[[topic_permissions]]` and
//! `[limits]`' connection rate limit. Kept apart from `config.rs` so the TLS
//! keys (owned elsewhere) and these can change without touching each other.

use serde::Deserialize;

/// One `[[topic_permissions]]` entry, as `rabbitmqctl set_topic_permissions`:
/// on a topic `exchange` of `vhost`, `write` is a regex over the routing keys
/// `user` may publish with and `read` one over the binding keys it may bind
/// (subscribe) with. `{username}`, `{vhost}` and `{client_id}` (MQTT) are
/// expanded. A user with no topic permission on an exchange may use any key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicPermissionConfig {
    pub user: String,
    pub vhost: String,
    pub exchange: String,
    #[serde(default)]
    pub write: String,
    #[serde(default)]
    pub read: String,
}

/// `[auth]`: how logins are checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// RabbitMQ's `auth_backends`, in order: `"internal"` (the user database),
    /// `"http"` (`[auth.http]`) and `"jwt"` (`[auth.jwt]`). The first that allows a login decides; a
    /// refusal passes it to the next.
    pub backends: Vec<String>,
    pub http: HttpAuthConfig,
    /// `[auth.jwt]`: OAuth 2.0 access tokens (auth_jwt.rs).
    pub jwt: crate::auth_jwt::JwtAuthConfig,
    /// Where a certificate login's user name comes from (config_tls.rs).
    pub ssl_cert_login_from: crate::config_tls::CertLoginFromConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            backends: vec!["internal".to_owned()],
            http: HttpAuthConfig::default(),
            jwt: Default::default(),
            ssl_cert_login_from: Default::default(),
        }
    }
}

/// `[auth.http]`: RabbitMQ's `auth_http.*` keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpAuthConfig {
    /// Where logins are sent (`http://host:port/path`).
    pub user_path: String,
    /// Where vhost access is asked (`username`, `vhost`, `ip`, `tags`); empty:
    /// the internal database decides it for HTTP users.
    pub vhost_path: String,
    /// Where queue and exchange permissions are asked (`username`, `vhost`,
    /// `resource`, `name`, `permission`, `tags`); empty: the internal database.
    pub resource_path: String,
    /// Where topic permissions are asked (`resource=topic`, `name` = exchange,
    /// `permission`, `routing_key`, and `client_id` for MQTT); empty: the
    /// internal database's topic permissions.
    pub topic_path: String,
    /// `"get"` (RabbitMQ's default) or `"post"` (form-encoded body; keeps
    /// passwords out of access logs).
    pub http_method: String,
    /// How long an answer is reused for the same user name and password; 0 = never.
    pub cache_ttl_secs: u64,
    /// How long to wait for an answer (the handshake timeout bounds it too).
    pub request_timeout_ms: u64,
}

impl Default for HttpAuthConfig {
    fn default() -> Self {
        HttpAuthConfig {
            user_path: String::new(),
            vhost_path: String::new(),
            resource_path: String::new(),
            topic_path: String::new(),
            http_method: "get".to_owned(),
            cache_ttl_secs: 15,
            request_timeout_ms: 15_000,
        }
    }
}

impl AuthConfig {
    /// The backend chain; errors name the key.
    pub fn backends(&self) -> Result<Vec<switchyard_core::authn::Backend>, String> {
        use switchyard_core::authn::Backend;
        if self.backends.is_empty() {
            return Err("auth.backends is empty: name at least one backend".into());
        }
        let mut out = Vec::new();
        for name in &self.backends {
            match name.as_str() {
                "internal" => out.push(Backend::Internal),
                "http" => {
                    if self.http.user_path.is_empty() {
                        return Err(
                            "auth.backends names \"http\" but auth.http.user_path is not set"
                                .into(),
                        );
                    }
                    let b = crate::auth_http::HttpBackend::new(&self.http)?;
                    out.push(Backend::External(std::sync::Arc::new(b)));
                }
                "jwt" => {
                    let b = crate::auth_jwt::JwtBackend::new(&self.jwt)?;
                    out.push(Backend::External(std::sync::Arc::new(b)));
                }
                other => {
                    return Err(format!(
                        "invalid value \"{other}\" in auth.backends: internal, http or jwt"
                    ))
                }
            }
        }
        Ok(out)
    }
}

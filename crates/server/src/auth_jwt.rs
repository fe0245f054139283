//! The `jwt` authentication backend: OAuth 2.0 access tokens as passwords, as
//! RabbitMQ's `rabbitmq_auth_backend_oauth2` takes them (SECURITY.md §2.2).
//!
//! The client sends the token as its password; the user name it sends is
//! ignored. The token must be signed with one of the configured keys
//! (`[auth.jwt] signing_keys`: RSA or EC public keys in PEM files, or
//! `hmac_keys`: shared secrets), chosen by the token's `kid` or
//! `default_key`; it must carry `exp` (and is refused once past it or before
//! `nbf`), and its `aud` must name `resource_server_id` unless `verify_aud` is
//! false. The user name comes from the first of `preferred_username_claims`
//! present (default `sub`, then `client_id`), its permissions and tags from
//! the scopes in `scope` (a string or a list) and `additional_scopes_key`, in
//! RabbitMQ's format ([`switchyard_core::scopes`]); `{claim}` in a scope is
//! replaced by that string claim. Static keys only: no JWKS or OIDC discovery.

use std::collections::BTreeMap;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use switchyard_core::authn::{BoxFuture, Decision, ExternalBackend, LoginRequest};
use switchyard_core::scopes::ScopeGrants;

/// `[auth.jwt]`: RabbitMQ's `auth_oauth2.*` keys that apply to static keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtAuthConfig {
    /// The audience a token must name, and the default scope prefix
    /// (`<resource_server_id>.`).
    pub resource_server_id: String,
    /// Overrides the scope prefix.
    pub scope_prefix: Option<String>,
    /// Whether `aud` must contain `resource_server_id`.
    pub verify_aud: bool,
    /// Claims tried in order for the user name.
    pub preferred_username_claims: Vec<String>,
    /// A claim whose scopes count too (string or list).
    pub additional_scopes_key: Option<String>,
    /// The key for tokens without a `kid`.
    pub default_key: Option<String>,
    /// Key id -> path of a PEM public key (RSA: RS256/384/512, PS*; EC: ES256/384).
    pub signing_keys: BTreeMap<String, String>,
    /// Key id -> shared secret (HS256/384/512).
    pub hmac_keys: BTreeMap<String, String>,
}

impl Default for JwtAuthConfig {
    fn default() -> Self {
        JwtAuthConfig {
            resource_server_id: "rabbitmq".to_owned(),
            scope_prefix: None,
            verify_aud: true,
            preferred_username_claims: vec!["sub".to_owned(), "client_id".to_owned()],
            additional_scopes_key: None,
            default_key: None,
            signing_keys: BTreeMap::new(),
            hmac_keys: BTreeMap::new(),
        }
    }
}

/// A verification key and the algorithms it may be used with.
struct Key {
    key: DecodingKey,
    algorithms: &'static [Algorithm],
}

const RSA: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
const EC: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];
const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

struct Inner {
    config: JwtAuthConfig,
    prefix: String,
    keys: BTreeMap<String, Key>,
}

/// The backend; cheap to clone.
#[derive(Clone)]
pub struct JwtBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JwtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtBackend")
            .field("resource_server_id", &self.inner.config.resource_server_id)
            .field("keys", &self.inner.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl JwtBackend {
    /// Loads the keys; errors name the key of the config.
    pub fn new(config: &JwtAuthConfig) -> Result<Self, String> {
        let mut keys = BTreeMap::new();
        for (id, path) in &config.signing_keys {
            let pem = std::fs::read(path)
                .map_err(|e| format!("auth.jwt.signing_keys.{id}: cannot read {path}: {e}"))?;
            let key = match DecodingKey::from_rsa_pem(&pem) {
                Ok(key) => Key {
                    key,
                    algorithms: RSA,
                },
                Err(_) => Key {
                    key: DecodingKey::from_ec_pem(&pem).map_err(|e| {
                        format!("auth.jwt.signing_keys.{id}: {path} is not an RSA or EC public key in PEM: {e}")
                    })?,
                    algorithms: EC,
                },
            };
            keys.insert(id.clone(), key);
        }
        for (id, secret) in &config.hmac_keys {
            if secret.is_empty() {
                return Err(format!("auth.jwt.hmac_keys.{id} is empty"));
            }
            if keys.contains_key(id) {
                return Err(format!(
                    "auth.jwt: key id '{id}' is in both signing_keys and hmac_keys"
                ));
            }
            keys.insert(
                id.clone(),
                Key {
                    key: DecodingKey::from_secret(secret.as_bytes()),
                    algorithms: HMAC,
                },
            );
        }
        if keys.is_empty() {
            return Err(
                "auth.backends names \"jwt\" but auth.jwt has no signing_keys or hmac_keys".into(),
            );
        }
        if let Some(d) = &config.default_key {
            if !keys.contains_key(d) {
                return Err(format!(
                    "auth.jwt.default_key '{d}' names no configured key"
                ));
            }
        }
        let prefix = config
            .scope_prefix
            .clone()
            .unwrap_or_else(|| format!("{}.", config.resource_server_id));
        Ok(JwtBackend {
            inner: Arc::new(Inner {
                config: config.clone(),
                prefix,
                keys,
            }),
        })
    }

    /// Checks a token; the error is for the log.
    pub fn verify(&self, token: &str) -> Result<(String, ScopeGrants), String> {
        self.inner.verify(token)
    }
}

impl ExternalBackend for JwtBackend {
    fn name(&self) -> &'static str {
        "jwt"
    }

    fn authenticate(&self, request: LoginRequest) -> BoxFuture<Decision> {
        // Verifying is CPU work only: decided now, handed over as a future.
        let decision = match std::str::from_utf8(&request.password)
            .map_err(|_| "the password is not a token".to_owned())
            .and_then(|token| self.verify(token.trim()))
        {
            Ok((username, grants)) => Decision::AllowToken { username, grants },
            Err(why) => Decision::Deny(format!("access token refused: {why}")),
        };
        Box::pin(async move { decision })
    }
}

impl Inner {
    fn verify(&self, token: &str) -> Result<(String, ScopeGrants), String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        let kid = header
            .kid
            .as_deref()
            .or(self.config.default_key.as_deref())
            .or_else(|| {
                // One key configured: it is the default.
                (self.keys.len() == 1)
                    .then(|| self.keys.keys().next().map(String::as_str))
                    .flatten()
            })
            .ok_or("the token has no kid and auth.jwt.default_key is not set")?;
        let key = self
            .keys
            .get(kid)
            .ok_or_else(|| format!("unknown signing key '{kid}'"))?;
        if !key.algorithms.contains(&header.alg) {
            return Err(format!(
                "algorithm {:?} does not fit signing key '{kid}'",
                header.alg
            ));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_nbf = true;
        if self.config.verify_aud {
            validation.set_audience(&[self.config.resource_server_id.as_str()]);
        } else {
            validation.validate_aud = false;
        }
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key.key, &validation)
                .map_err(|e| e.to_string())?;
        let claims = data.claims;
        let username = self
            .config
            .preferred_username_claims
            .iter()
            .find_map(|c| claims.get(c).and_then(Value::as_str))
            .ok_or("no user name claim (sub, client_id or auth.jwt.preferred_username_claims)")?
            .to_owned();
        let expires_at_ms = claims
            .get("exp")
            .and_then(Value::as_u64)
            .map(|s| s.saturating_mul(1000));
        let mut scopes = Vec::new();
        collect_scopes(claims.get("scope"), &mut scopes);
        if let Some(k) = &self.config.additional_scopes_key {
            collect_scopes(claims.get(k), &mut scopes);
        }
        let scopes: Vec<String> = scopes
            .into_iter()
            .map(|s| expand_claims(&s, &claims))
            .collect();
        let grants = ScopeGrants::parse(
            &self.prefix,
            scopes.iter().map(String::as_str),
            expires_at_ms,
        );
        Ok((username, grants))
    }
}

/// Scopes from a claim: a space-separated string or a list of strings.
fn collect_scopes(claim: Option<&Value>, out: &mut Vec<String>) {
    match claim {
        Some(Value::String(s)) => out.extend(s.split_whitespace().map(str::to_owned)),
        Some(Value::Array(items)) => out.extend(
            items
                .iter()
                .filter_map(Value::as_str)
                .flat_map(str::split_whitespace)
                .map(str::to_owned),
        ),
        _ => {}
    }
}

/// `{claim}` replaced by that string claim; `{vhost}` (and unknown names)
/// stay for the check ([`switchyard_core::scopes`]).
fn expand_claims(scope: &str, claims: &serde_json::Map<String, Value>) -> String {
    let mut out = scope.to_owned();
    for (name, value) in claims {
        if name == "vhost" {
            continue;
        }
        if let Some(v) = value.as_str() {
            let var = format!("{{{name}}}");
            if out.contains(&var) {
                out = out.replace(&var, v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    use switchyard_core::auth::Access;

    fn backend() -> JwtBackend {
        let mut config = JwtAuthConfig::default();
        config.hmac_keys.insert("k1".into(), "secret-one".into());
        JwtBackend::new(&config).unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn a_valid_token_names_the_user_and_grants_its_scopes() {
        let t = token(
            json!({"sub": "svc", "aud": ["rabbitmq"], "exp": now() + 60,
                   "scope": "rabbitmq.read:*/* rabbitmq.write:%2F/out-{sub} rabbitmq.tag:monitoring openid"}),
            "secret-one",
        );
        let (user, grants) = backend().verify(&t).unwrap();
        assert_eq!(user, "svc");
        assert_eq!(grants.tags(), ["monitoring".to_owned()]);
        assert!(grants.allows(Access::Read, "/", "q"));
        assert!(grants.allows(Access::Write, "/", "out-svc"));
        assert!(!grants.allows(Access::Write, "/", "out-other"));
        assert!(!grants.allows(Access::Configure, "/", "q"));
    }

    #[test]
    fn bad_tokens_are_refused() {
        let b = backend();
        let good = json!({"sub": "svc", "aud": "rabbitmq", "exp": now() + 60});
        assert!(b.verify(&token(good.clone(), "secret-one")).is_ok());
        assert!(b.verify(&token(good, "wrong")).is_err(), "bad signature");
        let expired = json!({"sub": "svc", "aud": "rabbitmq", "exp": now() - 5});
        assert!(b.verify(&token(expired, "secret-one")).is_err());
        let no_exp = json!({"sub": "svc", "aud": "rabbitmq"});
        assert!(b.verify(&token(no_exp, "secret-one")).is_err());
        let other_aud = json!({"sub": "svc", "aud": "billing", "exp": now() + 60});
        assert!(b.verify(&token(other_aud, "secret-one")).is_err());
        let no_user = json!({"aud": "rabbitmq", "exp": now() + 60});
        assert!(b.verify(&token(no_user, "secret-one")).is_err());
        assert!(b.verify("not.a.token").is_err());
    }

    #[test]
    fn config_errors_name_the_key() {
        let mut c = JwtAuthConfig::default();
        assert!(JwtBackend::new(&c).unwrap_err().contains("signing_keys"));
        c.signing_keys.insert("k".into(), "/nonexistent.pem".into());
        assert!(JwtBackend::new(&c)
            .unwrap_err()
            .contains("auth.jwt.signing_keys.k"));
    }
}

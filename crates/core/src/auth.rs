//! Users, passwords and permissions, as RabbitMQ models them.
//!
//! Passwords are kept only as RabbitMQ's salted SHA-256 hash
//! (`base64(salt ++ sha256(salt ++ password))`, 4-byte salt), so a definitions
//! export from RabbitMQ can be reused and no plain password stays in memory.
//! Permissions are three regular expressions per user and vhost over resource
//! names: `configure` (declare, delete), `write` (publish to an exchange, bind to a
//! queue) and `read` (consume from a queue, bind from an exchange).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::Engine;
use parking_lot::{Mutex, RwLock};
use regex::Regex;
use sha2::{Digest, Sha256, Sha512};

use crate::admin::{PermissionInfo, TopicPermissionInfo, UserInfo};
use crate::authn::{
    AuthzUser, Backend, Decision, ExternalAuthz, LoginRequest, LoginStart, PendingLogin,
};
use crate::error::{CoreError, CoreResult};
use crate::exchange::ExchangeKind;
use crate::scopes::ScopeGrants;
use crate::vhost::VHost;

/// What a permission check is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Configure,
    Write,
    Read,
}

/// The kind of resource a permission check names, for the error text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Queue,
    Exchange,
}

impl Resource {
    pub fn name(self) -> &'static str {
        match self {
            Resource::Queue => "queue",
            Resource::Exchange => "exchange",
        }
    }
}

/// How a user's password hash was made (RabbitMQ's `hashing_algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgorithm {
    Sha256,
    Sha512,
}

impl HashAlgorithm {
    /// RabbitMQ's module name for it; an empty name is SHA-256 (its default).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "" | crate::admin::SHA256 => Some(HashAlgorithm::Sha256),
            crate::admin::SHA512 => Some(HashAlgorithm::Sha512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha256 => crate::admin::SHA256,
            HashAlgorithm::Sha512 => crate::admin::SHA512,
        }
    }

    fn digest_len(self) -> usize {
        match self {
            HashAlgorithm::Sha256 => 32,
            HashAlgorithm::Sha512 => 64,
        }
    }

    fn digest(self, salt: &[u8], password: &[u8]) -> Vec<u8> {
        match self {
            HashAlgorithm::Sha256 => Sha256::new()
                .chain_update(salt)
                .chain_update(password)
                .finalize()
                .to_vec(),
            HashAlgorithm::Sha512 => Sha512::new()
                .chain_update(salt)
                .chain_update(password)
                .finalize()
                .to_vec(),
        }
    }
}

/// A user's stored credentials.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    /// `salt ++ H(salt ++ password)`, decoded from base64; empty: no password
    /// login (RabbitMQ's `password_hash: ""`).
    hash: Vec<u8>,
    pub algorithm: HashAlgorithm,
    pub tags: Vec<String>,
    /// May log in only from a loopback address (RabbitMQ's rule for `guest`).
    pub loopback_only: bool,
}

impl User {
    /// The hash as RabbitMQ exports it (base64).
    pub fn password_hash(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.hash)
    }
}

/// One compiled pattern with its source text (for listing).
#[derive(Debug, Clone)]
struct Pattern {
    source: String,
    regex: Option<Regex>,
}

impl Pattern {
    fn new(source: &str) -> Result<Self, regex::Error> {
        Ok(Pattern {
            source: source.to_owned(),
            regex: compile_pattern(source)?,
        })
    }
}

/// A user's rights in one vhost.
#[derive(Debug, Clone)]
pub struct Permission {
    configure: Pattern,
    write: Pattern,
    read: Pattern,
}

/// A user's rights on one topic exchange of a vhost (RabbitMQ's topic
/// permissions: regexes over routing keys), as written: the variables in them
/// are expanded per connection, see [`Auth::topic_rules`].
#[derive(Debug, Clone)]
struct TopicPermission {
    write: String,
    read: String,
}

/// Why a login failed. The text is safe to log: it never holds the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("user '{0}' - invalid credentials")]
    BadCredentials(String),
    #[error("user '{0}' can only connect via localhost")]
    NotLoopback(String),
}

#[derive(Debug, Default)]
struct AuthState {
    users: HashMap<String, User>,
    /// (user, vhost) -> permission
    permissions: HashMap<(String, String), Permission>,
    /// (user, vhost, exchange) -> topic permission
    topic_permissions: BTreeMap<(String, String, String), TopicPermission>,
    /// Users that may log in only from loopback (the node's `loopback_users`).
    loopback_users: HashSet<String>,
    /// Users who logged in with an access token (the `jwt` backend): checked
    /// against its scopes instead of `permissions`. The latest login of a name
    /// decides (RabbitMQ keeps them per connection; one entry per name here).
    scoped: HashMap<String, Arc<ScopeGrants>>,
    /// Users let in by a backend that also authorises them (the HTTP backend
    /// with its vhost, resource or topic paths); latest login of a name decides.
    delegated: HashMap<String, Arc<Delegated>>,
}

/// A user authorised by the backend that let it in.
#[derive(Debug)]
struct Delegated {
    user: AuthzUser,
    authz: Arc<dyn ExternalAuthz>,
}

impl AuthState {
    /// The token grants `user` is checked against: none for an internal user
    /// (the user database wins if one is created under a token user's name).
    fn scoped(&self, user: &str) -> Option<&ScopeGrants> {
        self.scoped_arc_ref(user).map(|g| &**g)
    }

    fn scoped_arc(&self, user: &str) -> Option<Arc<ScopeGrants>> {
        self.scoped_arc_ref(user).cloned()
    }

    fn scoped_arc_ref(&self, user: &str) -> Option<&Arc<ScopeGrants>> {
        if self.users.contains_key(user) {
            return None;
        }
        self.scoped.get(user)
    }

    fn delegated(&self, user: &str) -> Option<Arc<Delegated>> {
        if self.users.contains_key(user) {
            return None;
        }
        self.delegated.get(user).cloned()
    }
}

/// The broker's user database. Changes come only through
/// [`crate::Broker::apply`] at runtime (and the builder methods at start); every
/// change of rights bumps [`Auth::generation`], which sessions compare to drop
/// the permission results they cached.
#[derive(Debug, Default)]
pub struct Auth {
    state: RwLock<AuthState>,
    generation: AtomicU64,
    /// Compiled topic rules by (user, vhost, client id if a pattern names it),
    /// valid for the generation kept with them. A mutex: held only for a map
    /// lookup or insert, never while compiling.
    topic_cache: Mutex<(u64, TopicCache)>,
    /// `[auth] backends`; empty means `["internal"]`.
    backends: RwLock<Vec<Backend>>,
}

type TopicCache = HashMap<(String, String, Option<String>), Arc<TopicRules>>;

/// Bound on the compiled topic rules kept (one per client id at most).
const TOPIC_CACHE_MAX: usize = 10_000;

/// The values a topic permission pattern may name.
#[derive(Debug, Clone, Copy)]
pub struct TopicVars<'a> {
    pub username: &'a str,
    pub vhost: &'a str,
    /// MQTT's client id; other protocols have none, and a `{client_id}` in a
    /// pattern then stays literal text (as in RabbitMQ).
    pub client_id: Option<&'a str>,
}

/// Expands `{username}`, `{vhost}` and `{client_id}` in a topic permission
/// pattern and compiles it. The values are inserted as literal text (escaped),
/// so a user named `a.b` does not match `axb`. An empty pattern allows only
/// the empty routing key (RabbitMQ turns it into `^$`).
fn compile_topic_pattern(pattern: &str, vars: &TopicVars<'_>) -> Result<Regex, regex::Error> {
    if pattern.is_empty() {
        return Regex::new("^$");
    }
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut rest = pattern;
    while let Some(at) = rest.find('{') {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let var = [
            ("{username}", Some(vars.username)),
            ("{vhost}", Some(vars.vhost)),
            ("{client_id}", vars.client_id),
        ]
        .into_iter()
        .find(|(name, _)| from.starts_with(name));
        match var {
            Some((name, value)) => {
                match value {
                    Some(v) => out.push_str(&regex::escape(v)),
                    None => out.push_str(&regex::escape(name)),
                }
                rest = from.get(name.len()..).unwrap_or("");
            }
            None => {
                out.push('{');
                rest = from.get(1..).unwrap_or("");
            }
        }
    }
    out.push_str(rest);
    Regex::new(&out)
}

/// One exchange's compiled topic rule (None: the pattern grants nothing).
#[derive(Debug)]
struct TopicRule {
    write: Option<Regex>,
    read: Option<Regex>,
}

/// A user's topic permissions in one vhost, compiled for one connection: what
/// sessions hold and check routing keys against.
#[derive(Debug)]
pub struct TopicRules {
    user: String,
    vhost: String,
    exchanges: HashMap<String, TopicRule>,
    /// A token user's scopes, which decide instead of `exchanges`.
    scopes: Option<Arc<ScopeGrants>>,
    /// The backend that decides instead of `exchanges` (asked per routing key),
    /// with the connection's client id.
    delegated: Option<(Arc<Delegated>, Option<String>)>,
}

impl TopicRules {
    /// Checks `routing_key` for `access` (write: a published routing key; read:
    /// a binding key) on `exchange` of `vhost`. Only topic exchanges are
    /// subject to topic permissions; an exchange without a rule allows all; an
    /// exchange that does not exist is left to the operation to report.
    pub fn authorize(
        &self,
        vhost: &VHost,
        exchange: &str,
        access: Access,
        routing_key: &str,
    ) -> CoreResult<()> {
        let rule = self.exchanges.get(exchange);
        if rule.is_none() && self.scopes.is_none() && self.delegated.is_none() {
            return Ok(());
        }
        match vhost.exchange(exchange) {
            Ok(x) if x.kind == ExchangeKind::Topic => {}
            _ => return Ok(()),
        }
        let what = match access {
            Access::Write => "write",
            Access::Read => "read",
            Access::Configure => return Ok(()),
        };
        let allowed = match (&self.scopes, rule) {
            _ if self.delegated.is_some() => self.delegated.as_ref().is_some_and(|(d, client)| {
                d.authz.topic(
                    &d.user,
                    &self.vhost,
                    exchange,
                    access,
                    routing_key,
                    client.as_deref(),
                )
            }),
            (Some(scopes), _) => scopes.allows_topic(access, &self.vhost, exchange, routing_key),
            (None, Some(rule)) => {
                let re = match access {
                    Access::Write => rule.write.as_ref(),
                    _ => rule.read.as_ref(),
                };
                re.is_some_and(|re| re.is_match(routing_key))
            }
            (None, None) => true,
        };
        if allowed {
            Ok(())
        } else {
            // RabbitMQ's rabbit_access_control text.
            Err(CoreError::access_refused(format!(
                "{what} access to topic '{routing_key}' in exchange '{exchange}' in vhost '{}' refused for user '{}'",
                self.vhost, self.user
            )))
        }
    }
}

/// RabbitMQ's password hash of `password` with `salt`, base64-encoded.
pub fn hash_password(password: &str, salt: [u8; 4]) -> String {
    let mut bytes = salt.to_vec();
    bytes.extend_from_slice(&HashAlgorithm::Sha256.digest(&salt, password.as_bytes()));
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A new random 4-byte salt.
pub fn random_salt() -> [u8; 4] {
    rand::random()
}

/// Compiles a permission pattern; RabbitMQ anchors nothing, but an empty pattern
/// grants nothing at all.
fn compile_pattern(pattern: &str) -> Result<Option<Regex>, regex::Error> {
    if pattern.is_empty() {
        Ok(None)
    } else {
        Regex::new(pattern).map(Some)
    }
}

/// Decodes and checks a base64 password hash.
pub(crate) fn decode_hash(
    name: &str,
    password_hash: &str,
    algorithm: HashAlgorithm,
) -> Result<Vec<u8>, String> {
    let hash = base64::engine::general_purpose::STANDARD
        .decode(password_hash.trim())
        .map_err(|e| format!("password_hash of user '{name}' is not base64: {e}"))?;
    let want = 4 + algorithm.digest_len();
    if !hash.is_empty() && hash.len() != want {
        return Err(format!(
            "password_hash of user '{name}' must be base64 of a 4-byte salt and a {} digest ({want} bytes), got {} bytes",
            match algorithm {
                HashAlgorithm::Sha256 => "SHA-256",
                HashAlgorithm::Sha512 => "SHA-512",
            },
            hash.len()
        ));
    }
    Ok(hash)
}

impl Auth {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bumped on every change of users or rights.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Adds or replaces a user from its base64 (SHA-256) password hash.
    pub fn add_user(
        &mut self,
        name: &str,
        password_hash: &str,
        tags: Vec<String>,
        loopback_only: bool,
    ) -> Result<(), String> {
        let hash = decode_hash(name, password_hash, HashAlgorithm::Sha256)?;
        if hash.is_empty() {
            return Err(format!("password_hash of user '{name}' is empty"));
        }
        let state = self.state.get_mut();
        if loopback_only {
            state.loopback_users.insert(name.to_owned());
        }
        state.users.insert(
            name.to_owned(),
            User {
                name: name.to_owned(),
                hash,
                algorithm: HashAlgorithm::Sha256,
                tags,
                loopback_only,
            },
        );
        Ok(())
    }

    /// Grants `user` the three patterns in `vhost`.
    pub fn set_permissions(
        &mut self,
        user: &str,
        vhost: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Result<(), String> {
        self.put_permissions(user, vhost, configure, write, read)
    }

    /// Marks users that may log in only from a loopback address (RabbitMQ's
    /// `loopback_users`, `guest` by default): a node setting, not metadata.
    pub fn set_loopback_users(&self, users: impl IntoIterator<Item = String>) {
        let mut st = self.state.write();
        st.loopback_users = users.into_iter().collect();
        let loopback = st.loopback_users.clone();
        for u in st.users.values_mut() {
            u.loopback_only = loopback.contains(&u.name);
        }
    }

    /// Validates permission patterns without storing them.
    pub(crate) fn validate_permissions(
        user: &str,
        vhost: &str,
        patterns: &[(&str, &str)],
    ) -> Result<(), String> {
        for (what, p) in patterns {
            compile_pattern(p).map_err(|e| {
                format!(
                    "{what} pattern of user '{user}' in vhost '{vhost}' is not a valid regex: {e}"
                )
            })?;
        }
        Ok(())
    }

    /// Validates topic permission patterns: they are compiled after their
    /// `{username}`, `{vhost}` and `{client_id}` are expanded, so they are
    /// checked with sample values in those places.
    pub(crate) fn validate_topic_permissions(
        user: &str,
        vhost: &str,
        patterns: &[(&str, &str)],
    ) -> Result<(), String> {
        let sample = TopicVars {
            username: "user",
            vhost: "vhost",
            client_id: Some("client"),
        };
        for (what, p) in patterns {
            compile_topic_pattern(p, &sample).map_err(|e| {
                format!(
                    "topic {what} pattern of user '{user}' in vhost '{vhost}' is not a valid regex: {e}"
                )
            })?;
        }
        Ok(())
    }

    /// Checks a topic permission's write and read patterns (for the config).
    pub fn check_topic_patterns(
        user: &str,
        vhost: &str,
        write: &str,
        read: &str,
    ) -> Result<(), String> {
        Self::validate_topic_permissions(user, vhost, &[("write", write), ("read", read)])
    }

    // ---- runtime changes (called by Broker::apply once the store has them) ----

    pub(crate) fn put_user(
        &self,
        name: &str,
        hash: Vec<u8>,
        algorithm: HashAlgorithm,
        tags: Vec<String>,
    ) {
        let mut st = self.state.write();
        let loopback_only = st.loopback_users.contains(name);
        st.users.insert(
            name.to_owned(),
            User {
                name: name.to_owned(),
                hash,
                algorithm,
                tags,
                loopback_only,
            },
        );
        drop(st);
        self.changed();
    }

    /// Removes a user with its permissions and topic permissions.
    pub(crate) fn delete_user(&self, name: &str) {
        let mut st = self.state.write();
        st.users.remove(name);
        st.permissions.retain(|(u, _), _| u != name);
        st.topic_permissions.retain(|(u, _, _), _| u != name);
        drop(st);
        self.changed();
    }

    /// Removes every permission naming `vhost`.
    pub(crate) fn delete_vhost(&self, vhost: &str) {
        let mut st = self.state.write();
        st.permissions.retain(|(_, v), _| v != vhost);
        st.topic_permissions.retain(|(_, v, _), _| v != vhost);
        drop(st);
        self.changed();
    }

    pub(crate) fn put_permissions(
        &self,
        user: &str,
        vhost: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Result<(), String> {
        let compile = |what: &str, p: &str| {
            Pattern::new(p).map_err(|e| {
                format!(
                    "{what} pattern of user '{user}' in vhost '{vhost}' is not a valid regex: {e}"
                )
            })
        };
        let perm = Permission {
            configure: compile("configure", configure)?,
            write: compile("write", write)?,
            read: compile("read", read)?,
        };
        self.state
            .write()
            .permissions
            .insert((user.to_owned(), vhost.to_owned()), perm);
        self.changed();
        Ok(())
    }

    pub(crate) fn clear_permissions(&self, user: &str, vhost: &str) {
        self.state
            .write()
            .permissions
            .remove(&(user.to_owned(), vhost.to_owned()));
        self.changed();
    }

    pub(crate) fn put_topic_permissions(
        &self,
        user: &str,
        vhost: &str,
        exchange: &str,
        write: &str,
        read: &str,
    ) -> Result<(), String> {
        Self::validate_topic_permissions(user, vhost, &[("write", write), ("read", read)])?;
        // Compiled per session once the variables are known (`topic_rules`).
        let perm = TopicPermission {
            write: write.to_owned(),
            read: read.to_owned(),
        };
        self.state.write().topic_permissions.insert(
            (user.to_owned(), vhost.to_owned(), exchange.to_owned()),
            perm,
        );
        self.changed();
        Ok(())
    }

    pub(crate) fn clear_topic_permissions(&self, user: &str, vhost: &str, exchange: Option<&str>) {
        self.state
            .write()
            .topic_permissions
            .retain(|(u, v, x), _| !(u == user && v == vhost && exchange.is_none_or(|e| e == x)));
        self.changed();
    }

    // ---- reads ----

    /// A copy of a user's record.
    pub fn user(&self, name: &str) -> Option<User> {
        self.state.read().users.get(name).cloned()
    }

    pub fn has_user(&self, name: &str) -> bool {
        self.state.read().users.contains_key(name)
    }

    pub fn has_permissions(&self, user: &str, vhost: &str) -> bool {
        if let Some(allowed) = self
            .delegated(user)
            .and_then(|d| d.authz.vhost(&d.user, vhost))
        {
            return allowed;
        }
        let st = self.state.read();
        match st.scoped(user) {
            Some(grants) => grants.allows_vhost(vhost),
            None => st
                .permissions
                .contains_key(&(user.to_owned(), vhost.to_owned())),
        }
    }

    /// From now on `user` is checked against a token's `grants`, not the
    /// permission table (see [`crate::scopes`]).
    pub fn grant_scopes(&self, user: &str, grants: ScopeGrants) {
        let mut st = self.state.write();
        st.delegated.remove(user);
        st.scoped.insert(user.to_owned(), Arc::new(grants));
        drop(st);
        self.changed();
    }

    /// From now on `user` is authorised by `authz` where it decides (the
    /// backend that let the user in; see [`ExternalAuthz`]).
    fn delegate(&self, user: AuthzUser, authz: Arc<dyn ExternalAuthz>) {
        let mut st = self.state.write();
        st.scoped.remove(&user.username);
        st.delegated
            .insert(user.username.clone(), Arc::new(Delegated { user, authz }));
        drop(st);
        self.changed();
    }

    /// The external authoriser of `user`, taken out of the lock: it may block.
    fn delegated(&self, user: &str) -> Option<Arc<Delegated>> {
        self.state.read().delegated(user)
    }

    /// When the token `user` logged in with expires (ms since the epoch).
    pub fn token_expiry(&self, user: &str) -> Option<u64> {
        self.state.read().scoped(user).and_then(|g| g.expires_at_ms)
    }

    pub fn has_topic_permissions(&self, user: &str, vhost: &str, exchange: Option<&str>) -> bool {
        self.state
            .read()
            .topic_permissions
            .keys()
            .any(|(u, v, x)| u == user && v == vhost && exchange.is_none_or(|e| e == x))
    }

    /// Every user, by name.
    pub fn users(&self) -> Vec<UserInfo> {
        let mut out: Vec<UserInfo> = self
            .state
            .read()
            .users
            .values()
            .map(|u| UserInfo {
                name: u.name.clone(),
                password_hash: u.password_hash(),
                hashing_algorithm: u.algorithm.name().to_owned(),
                tags: u.tags.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Every permission, by vhost then user.
    pub fn permissions(&self) -> Vec<PermissionInfo> {
        let mut out: Vec<PermissionInfo> = self
            .state
            .read()
            .permissions
            .iter()
            .map(|((user, vhost), p)| PermissionInfo {
                user: user.clone(),
                vhost: vhost.clone(),
                configure: p.configure.source.clone(),
                write: p.write.source.clone(),
                read: p.read.source.clone(),
            })
            .collect();
        out.sort_by(|a, b| (&a.vhost, &a.user).cmp(&(&b.vhost, &b.user)));
        out
    }

    /// Every topic permission, by user, vhost, exchange.
    pub fn topic_permissions(&self) -> Vec<TopicPermissionInfo> {
        self.state
            .read()
            .topic_permissions
            .iter()
            .map(|((user, vhost, exchange), p)| TopicPermissionInfo {
                user: user.clone(),
                vhost: vhost.clone(),
                exchange: exchange.clone(),
                write: p.write.clone(),
                read: p.read.clone(),
            })
            .collect()
    }

    /// The topic permissions of `user` in `vhost`, compiled with the
    /// connection's variables; None when there are none (then every routing
    /// key is allowed, RabbitMQ's opt-in rule), which costs a session nothing
    /// per message. Compiled rules are cached per (user, vhost[, client id when
    /// a pattern names it]) until the next change of rights.
    pub fn topic_rules(
        &self,
        user: &str,
        vhost: &str,
        client_id: Option<&str>,
    ) -> Option<Arc<TopicRules>> {
        let st = self.state.read();
        if let Some(d) = st.delegated(user).filter(|d| d.authz.decides_topics()) {
            return Some(Arc::new(TopicRules {
                user: user.to_owned(),
                vhost: vhost.to_owned(),
                exchanges: HashMap::new(),
                scopes: None,
                delegated: Some((d, client_id.map(str::to_owned))),
            }));
        }
        if let Some(scopes) = st.scoped_arc(user) {
            return Some(Arc::new(TopicRules {
                user: user.to_owned(),
                vhost: vhost.to_owned(),
                exchanges: HashMap::new(),
                scopes: Some(scopes),
                delegated: None,
            }));
        }
        let mine: Vec<(&String, &TopicPermission)> = st
            .topic_permissions
            .range((user.to_owned(), vhost.to_owned(), String::new())..)
            .take_while(|((u, v, _), _)| u == user && v == vhost)
            .map(|((_, _, x), p)| (x, p))
            .collect();
        if mine.is_empty() {
            return None;
        }
        let per_client = mine
            .iter()
            .any(|(_, p)| p.write.contains("{client_id}") || p.read.contains("{client_id}"));
        let key = (
            user.to_owned(),
            vhost.to_owned(),
            if per_client {
                client_id.map(str::to_owned)
            } else {
                None
            },
        );
        let generation = self.generation();
        {
            let cache = self.topic_cache.lock();
            if cache.0 == generation {
                if let Some(rules) = cache.1.get(&key) {
                    return Some(rules.clone());
                }
            }
        }
        let vars = TopicVars {
            username: user,
            vhost,
            client_id,
        };
        let mut exchanges = HashMap::with_capacity(mine.len());
        for (exchange, p) in mine {
            // Validated when stored; a pattern that still fails grants nothing.
            let write = compile_topic_pattern(&p.write, &vars).ok();
            let read = compile_topic_pattern(&p.read, &vars).ok();
            exchanges.insert(exchange.clone(), TopicRule { write, read });
        }
        drop(st);
        let rules = Arc::new(TopicRules {
            user: user.to_owned(),
            vhost: vhost.to_owned(),
            exchanges,
            scopes: None,
            delegated: None,
        });
        let mut cache = self.topic_cache.lock();
        if cache.0 != generation || cache.1.len() >= TOPIC_CACHE_MAX {
            cache.1.clear();
            cache.0 = generation;
        }
        cache.1.insert(key, rules.clone());
        Some(rules)
    }

    /// Sets the authentication chain (`[auth] backends`).
    pub fn set_backends(&self, backends: Vec<Backend>) {
        *self.backends.write() = backends;
    }

    /// Whether only the internal database authenticates (logins never wait).
    pub fn internal_only(&self) -> bool {
        self.backends
            .read()
            .iter()
            .all(|b| matches!(b, Backend::Internal))
    }

    /// Starts a login through the backend chain. Internal backends answer at
    /// once; from the first external one on, the rest of the chain runs in a
    /// spawned task (so this must be called inside a tokio runtime when an
    /// external backend is configured), which calls `wake` once the answer is
    /// in the [`PendingLogin`].
    pub fn begin_login(
        self: &Arc<Self>,
        request: LoginRequest,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> LoginStart {
        let chain: Vec<Backend> = {
            let b = self.backends.read();
            if b.is_empty() {
                vec![Backend::Internal]
            } else {
                b.clone()
            }
        };
        let mut last = Err(LoginError::BadCredentials(request.username.clone()));
        for (i, backend) in chain.iter().enumerate() {
            match backend {
                Backend::Internal => {
                    last = self.login(&request.username, &request.password, request.peer);
                    if last.is_ok() {
                        return LoginStart::Done(last);
                    }
                }
                Backend::External(_) => {
                    let rest: Vec<Backend> = chain.get(i..).unwrap_or_default().to_vec();
                    let pending = PendingLogin::default();
                    let (auth, slot) = (self.clone(), pending.clone());
                    tokio::spawn(async move {
                        let result = auth.run_chain(rest, request, last).await;
                        slot.fill(result);
                        wake();
                    });
                    return LoginStart::Pending(pending);
                }
            }
        }
        LoginStart::Done(last)
    }

    /// A login through the backend chain, for async callers (the management
    /// API): waits for external backends without blocking.
    pub async fn login_chain(self: &Arc<Self>, request: LoginRequest) -> Result<User, LoginError> {
        let notify = Arc::new(tokio::sync::Notify::new());
        let wake = notify.clone();
        match self.begin_login(request, move || wake.notify_one()) {
            LoginStart::Done(result) => result,
            LoginStart::Pending(pending) => loop {
                if let Some(result) = pending.take() {
                    break result;
                }
                // notify_one keeps a permit: a wake before this wait is not lost.
                notify.notified().await;
            },
        }
    }

    async fn run_chain(
        &self,
        chain: Vec<Backend>,
        request: LoginRequest,
        mut last: Result<User, LoginError>,
    ) -> Result<User, LoginError> {
        for backend in chain {
            match backend {
                Backend::Internal => {
                    last = self.login(&request.username, &request.password, request.peer);
                }
                Backend::External(b) => match b.authenticate(request.clone()).await {
                    Decision::Allow { tags } => {
                        if let Some(authz) = b.authz() {
                            let user = AuthzUser {
                                username: request.username.clone(),
                                tags: tags.clone(),
                                peer: request.peer,
                            };
                            self.delegate(user, authz);
                        }
                        last = Ok(User {
                            name: request.username.clone(),
                            hash: Vec::new(),
                            algorithm: HashAlgorithm::Sha256,
                            tags,
                            loopback_only: false,
                        });
                    }
                    Decision::AllowToken { username, .. } if self.has_user(&username) => {
                        // A token may not speak for an internal user: its scopes
                        // would become that user's rights.
                        tracing::info!(backend = b.name(), user = %username, "login refused: the token's user name is an internal user");
                        last = Err(LoginError::BadCredentials(username));
                    }
                    Decision::AllowToken { username, grants } => {
                        let tags = grants.tags().to_vec();
                        self.grant_scopes(&username, grants);
                        last = Ok(User {
                            name: username,
                            hash: Vec::new(),
                            algorithm: HashAlgorithm::Sha256,
                            tags,
                            loopback_only: false,
                        });
                    }
                    Decision::Deny(why) => {
                        tracing::info!(backend = b.name(), user = %request.username, "login refused: {why}");
                        last = Err(LoginError::BadCredentials(request.username.clone()));
                    }
                },
            }
            if last.is_ok() {
                break;
            }
        }
        last
    }

    /// Checks a username and password, and where the client connects from.
    pub fn login(
        &self,
        username: &str,
        password: &[u8],
        peer: Option<IpAddr>,
    ) -> Result<User, LoginError> {
        let bad = || LoginError::BadCredentials(username.to_owned());
        let st = self.state.read();
        let user = st.users.get(username).ok_or_else(bad)?;
        if user.hash.len() < 4 {
            // No password set: password logins are refused (RabbitMQ's rule).
            return Err(bad());
        }
        let (salt, digest) = user.hash.split_at(4);
        let computed = user.algorithm.digest(salt, password);
        // Constant-time compare: the time taken must not tell how much matched.
        let diff = computed
            .iter()
            .zip(digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 || digest.len() != computed.len() {
            return Err(bad());
        }
        if user.loopback_only
            && !peer.is_some_and(|ip| ip.is_loopback() || ipv4_mapped_loopback(ip))
        {
            return Err(LoginError::NotLoopback(username.to_owned()));
        }
        Ok(user.clone())
    }

    /// A login without a password, for an identity already proven another way (a
    /// verified client certificate: SASL EXTERNAL, MQTT/STOMP certificate login).
    /// The user must exist; RabbitMQ's loopback rule still applies.
    pub fn login_external(&self, username: &str, peer: Option<IpAddr>) -> Result<User, LoginError> {
        let st = self.state.read();
        let user = st
            .users
            .get(username)
            .ok_or_else(|| LoginError::BadCredentials(username.to_owned()))?;
        if user.loopback_only
            && !peer.is_some_and(|ip| ip.is_loopback() || ipv4_mapped_loopback(ip))
        {
            return Err(LoginError::NotLoopback(username.to_owned()));
        }
        Ok(user.clone())
    }

    /// Whether `user` may use `vhost` at all.
    pub fn check_vhost(&self, user: &str, vhost: &str) -> CoreResult<()> {
        if self.has_permissions(user, vhost) {
            Ok(())
        } else {
            Err(CoreError::not_allowed(format!(
                "access to vhost '{vhost}' refused for user '{user}'"
            )))
        }
    }

    /// Checks one permission; the error text is RabbitMQ's.
    pub fn check(
        &self,
        user: &str,
        vhost: &str,
        access: Access,
        resource: Resource,
        name: &str,
    ) -> CoreResult<()> {
        let decided = self
            .delegated(user)
            .and_then(|d| d.authz.resource(&d.user, vhost, resource, name, access));
        let st = self.state.read();
        let allowed = match st.scoped(user) {
            _ if decided.is_some() => decided == Some(true),
            Some(grants) => grants.allows(access, vhost, name),
            None => {
                let perm = st.permissions.get(&(user.to_owned(), vhost.to_owned()));
                let pattern = perm.and_then(|p| match access {
                    Access::Configure => p.configure.regex.as_ref(),
                    Access::Write => p.write.regex.as_ref(),
                    Access::Read => p.read.regex.as_ref(),
                });
                pattern.is_some_and(|re| re.is_match(name))
            }
        };
        if allowed {
            Ok(())
        } else {
            // RabbitMQ's wording does not say which of the three was missing.
            Err(CoreError::access_refused(format!(
                "access to {} '{}' in vhost '{}' refused for user '{}'",
                resource.name(),
                name,
                vhost,
                user
            )))
        }
    }
}

fn ipv4_mapped_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        IpAddr::V4(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let mut a = Auth::new();
        a.add_user("guest", &hash_password("guest", [1, 2, 3, 4]), vec![], true)
            .unwrap();
        a.add_user(
            "app",
            &hash_password("s3cret", random_salt()),
            vec![],
            false,
        )
        .unwrap();
        a.set_permissions("app", "/", "^app\\.", "^app\\.", ".*")
            .unwrap();
        a
    }

    #[test]
    fn rabbitmq_hash_of_guest_verifies() {
        // The hash shipped in config.toml, made the way RabbitMQ makes them.
        let mut a = Auth::new();
        a.add_user(
            "guest",
            "kI3GCrswBLNZQzHJJ95QLoyfAVooYhnvf7jbqiW9BjOYUloe",
            vec![],
            false,
        )
        .unwrap();
        assert!(a.login("guest", b"guest", None).is_ok());
        assert!(a.login("guest", b"guesT", None).is_err());
    }

    #[test]
    fn loopback_only_user_is_refused_from_elsewhere() {
        let a = auth();
        assert!(a
            .login("guest", b"guest", Some("127.0.0.1".parse().unwrap()))
            .is_ok());
        assert!(a
            .login("guest", b"guest", Some("::1".parse().unwrap()))
            .is_ok());
        assert_eq!(
            a.login("guest", b"guest", Some("10.0.0.7".parse().unwrap()))
                .err(),
            Some(LoginError::NotLoopback("guest".into()))
        );
        assert!(a
            .login("app", b"s3cret", Some("10.0.0.7".parse().unwrap()))
            .is_ok());
        assert!(a.login("nobody", b"x", None).is_err());
    }

    #[test]
    fn permissions_are_regexes_and_empty_grants_nothing() {
        let mut a = auth();
        assert!(a
            .check("app", "/", Access::Configure, Resource::Queue, "app.q")
            .is_ok());
        let err = a
            .check("app", "/", Access::Configure, Resource::Queue, "other")
            .unwrap_err();
        assert_eq!(
            err.text,
            "access to queue 'other' in vhost '/' refused for user 'app'"
        );
        a.set_permissions("app", "/", "", ".*", ".*").unwrap();
        assert!(a
            .check("app", "/", Access::Configure, Resource::Queue, "app.q")
            .is_err());
        assert!(a.check_vhost("app", "other").is_err());
    }

    #[test]
    fn topic_patterns_expand_variables_as_literal_text() {
        let vars = TopicVars {
            username: "a.b",
            vhost: "/",
            client_id: Some("dev-1"),
        };
        let re = compile_topic_pattern("^{username}\\.{client_id}\\..*$", &vars).unwrap();
        assert!(re.is_match("a.b.dev-1.x"));
        assert!(!re.is_match("axb.dev-1.x"));
        let re = compile_topic_pattern("^x{1,2}$", &vars).unwrap();
        assert!(re.is_match("xx"));
        // No client id (AMQP, STOMP): the placeholder stays literal text.
        let none = TopicVars {
            client_id: None,
            ..vars
        };
        let re = compile_topic_pattern("^{client_id}$", &none).unwrap();
        assert!(re.is_match("{client_id}"));
        // Empty grants only the empty routing key.
        let re = compile_topic_pattern("", &vars).unwrap();
        assert!(re.is_match("") && !re.is_match("a"));
    }

    #[test]
    fn topic_rules_exist_only_for_users_with_topic_permissions() {
        let a = auth();
        assert!(a.topic_rules("app", "/", None).is_none());
        a.put_topic_permissions("app", "/", "amq.topic", "^{username}\\.", "^r\\.")
            .unwrap();
        let rules = a.topic_rules("app", "/", None).unwrap();
        let rule = rules.exchanges.get("amq.topic").unwrap();
        assert!(rule.write.as_ref().unwrap().is_match("app.x"));
        assert!(!rule.write.as_ref().unwrap().is_match("bob.x"));
        assert!(a.topic_rules("app", "other", None).is_none());
        assert!(a.topic_rules("guest", "/", None).is_none());
        // Cached until the rights change.
        assert!(Arc::ptr_eq(
            &rules,
            &a.topic_rules("app", "/", None).unwrap()
        ));
        a.clear_topic_permissions("app", "/", None);
        assert!(a.topic_rules("app", "/", None).is_none());
        assert!(Auth::validate_topic_permissions("app", "/", &[("write", "(")]).is_err());
        assert!(
            Auth::validate_topic_permissions("app", "/", &[("write", "^{username}-.*")]).is_ok()
        );
    }
}

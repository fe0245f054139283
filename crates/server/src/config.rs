//! The configuration file, exactly as the shipped `config.toml` documents it.
//!
//! Every key has the default written next to it in `config.toml`; a key left out
//! takes that default. Two rules need a word:
//! - `[listeners]`: a listener runs only if its key is present, because removing the
//!   key is how a listener is switched off. The built-in file (used when no
//!   `--config` is given) names the default addresses.
//! - `[[users]]` left out entirely means the default user `guest` as shipped, and
//!   `[[permissions]]` left out entirely means guest's full rights on `/` when a user
//!   `guest` exists (and none otherwise), so a file that only changes `[limits]`
//!   behaves like the shipped one. Writing either list replaces its default.
//! - `[[vhosts]]`, `[[users]]`, `[[permissions]]` and `[[policies]]` are boot
//!   definitions ([`Config::boot_definitions`]): each object is created at start
//!   only if the store has never seen it, so what was changed or deleted at
//!   runtime stays so across restarts, and an object added to the file later is
//!   created at the next start.
//!
//! Errors name the file, the line and the key (`limits.frame_max`), on one line, so
//! they can be printed as they are.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_core::auth::Auth;

/// The shipped `config.toml`, built into the binary and used when no `--config`
/// is given.
pub const EMBEDDED_CONFIG: &str = include_str!("../../../config.toml");

/// Where the built-in configuration says it comes from in error messages.
pub const EMBEDDED_ORIGIN: &str = "built-in config.toml";

/// A configuration that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// `origin` is the file name (or [`EMBEDDED_ORIGIN`]); `message` names the key.
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where durable state lives; created at startup if missing.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub listeners: Listeners,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub stomp: StompConfig,
    #[serde(default)]
    pub stream: StreamConfig,
    /// `[tls]`: certificates of the TLS listeners (config_tls.rs).
    #[serde(default)]
    pub tls: crate::config_tls::TlsConfig,
    #[serde(default = "default_vhosts")]
    pub vhosts: Vec<VHostConfig>,
    /// `None` when the file has no `[[users]]`: see the module docs.
    #[serde(default)]
    users: Option<Vec<UserConfig>>,
    /// `None` when the file has no `[[permissions]]`: see the module docs.
    #[serde(default)]
    permissions: Option<Vec<PermissionConfig>>,
    /// Queue arguments set by pattern, as RabbitMQ's policies.
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
    /// Topic permissions (boot definitions, see the module docs).
    #[serde(default)]
    pub topic_permissions: Vec<crate::config_auth::TopicPermissionConfig>,
    /// `[auth]`: the authentication backends (config_auth.rs) and where a
    /// certificate login's user name comes from (config_tls.rs).
    #[serde(default)]
    pub auth: crate::config_auth::AuthConfig,
    /// `[cluster]` (crates/server/src/cluster.rs): absent means one node.
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Where this configuration came from, for error messages.
    #[serde(skip)]
    origin: String,
}

/// `[listeners]`: one address per protocol; an absent key switches it off.
///
/// Every listener the broker opens belongs here (a test in this module checks
/// that the shipped file has no socket address elsewhere), so that
/// [`Listeners::move_all_to_port_zero`] moves them all.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listeners {
    /// AMQP 0-9-1 over TCP.
    #[serde(default)]
    pub amqp: Option<SocketAddr>,
    /// MQTT 3.1/3.1.1/5.0 over TCP.
    #[serde(default)]
    pub mqtt: Option<SocketAddr>,
    /// MQTT over WebSocket (path `[mqtt] ws_path`).
    #[serde(default)]
    pub mqtt_ws: Option<SocketAddr>,
    /// STOMP 1.0/1.1/1.2 over TCP.
    #[serde(default)]
    pub stomp: Option<SocketAddr>,
    /// STOMP over WebSocket (path `[stomp] ws_path`).
    #[serde(default)]
    pub stomp_ws: Option<SocketAddr>,
    /// The HTTP management API (`/api`) and the web UI (`/`).
    #[serde(default)]
    pub management: Option<SocketAddr>,
    /// Prometheus metrics (`/metrics`, `/metrics/per-object`).
    #[serde(default)]
    pub prometheus: Option<SocketAddr>,
    /// AMQP 0-9-1 over TLS (`[tls]`).
    #[serde(default)]
    pub amqps: Option<SocketAddr>,
    /// MQTT over TLS.
    #[serde(default)]
    pub mqtts: Option<SocketAddr>,
    /// STOMP over TLS.
    #[serde(default)]
    pub stomps: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS.
    #[serde(default)]
    pub mqtt_wss: Option<SocketAddr>,
    /// STOMP over WebSocket over TLS.
    #[serde(default)]
    pub stomp_wss: Option<SocketAddr>,
    /// The management API and UI over TLS (HTTPS).
    #[serde(default)]
    pub management_tls: Option<SocketAddr>,
    /// The RabbitMQ Stream protocol over TCP.
    #[serde(default)]
    pub stream: Option<SocketAddr>,
    /// The RabbitMQ Stream protocol over TLS.
    #[serde(default)]
    pub streams: Option<SocketAddr>,
}

impl Listeners {
    /// Moves every listener that is on, whatever its name, to `ip` port 0 (a
    /// port the kernel picks), for tests and tools that must not need the
    /// default ports free. It goes through serde rather than a list of names, so
    /// a listener added later is moved too the day it is added.
    pub fn move_all_to_port_zero(&mut self, ip: IpAddr) -> Result<(), ConfigError> {
        let invalid = |e: &dyn std::fmt::Display| ConfigError::Invalid {
            origin: "[listeners]".into(),
            message: e.to_string(),
        };
        let mut value = toml::Value::try_from(&*self).map_err(|e| invalid(&e))?;
        move_addresses_to_port_zero(&mut value, ip);
        *self = value.try_into().map_err(|e| invalid(&e))?;
        Ok(())
    }
}

/// Rewrites every socket address inside `value` (a listener's address, in a
/// configuration's `[listeners]` table or any table below it) to `ip` port 0.
/// What is not a socket address is left as it is.
pub fn move_addresses_to_port_zero(value: &mut toml::Value, ip: IpAddr) {
    match value {
        toml::Value::String(s) if s.parse::<SocketAddr>().is_ok() => {
            *s = SocketAddr::new(ip, 0).to_string();
        }
        toml::Value::Table(t) => t
            .iter_mut()
            .for_each(|(_, v)| move_addresses_to_port_zero(v, ip)),
        toml::Value::Array(a) => a
            .iter_mut()
            .for_each(|v| move_addresses_to_port_zero(v, ip)),
        _ => {}
    }
}

/// `[stomp]`: the STOMP adapter (TCP and WebSocket alike).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StompConfig {
    /// The vhost of a CONNECT whose `host` header names no existing vhost.
    pub default_vhost: String,
    /// The login for a CONNECT without one (RabbitMQ's `stomp.default_user`);
    /// empty: CONNECT must carry a login.
    pub default_user: String,
    pub default_pass: String,
    /// Largest frame body accepted; also capped by `limits.max_message_size`.
    pub max_frame_size: usize,
    /// Header lines per frame.
    pub max_headers: usize,
    /// Bytes per header line (and command line).
    pub max_header_length: usize,
    /// The shortest heart-beat interval agreed to, either way (ms).
    pub heartbeat_min_ms: u64,
    /// The HTTP path of STOMP over WebSocket.
    pub ws_path: String,
}

impl Default for StompConfig {
    fn default() -> Self {
        StompConfig {
            default_vhost: "/".into(),
            default_user: "guest".into(),
            default_pass: "guest".into(),
            max_frame_size: 134_217_728,
            max_headers: 1000,
            max_header_length: 102_400,
            heartbeat_min_ms: 1000,
            ws_path: "/ws".into(),
        }
    }
}

/// `[stream]`: the RabbitMQ Stream protocol adapter (RabbitMQ's `stream.*`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Largest frame accepted after Open and offered in Tune (bytes).
    pub frame_max: u32,
    /// Heartbeat interval offered in Tune (seconds; 0 = none).
    pub heartbeat: u32,
    /// Host clients are told to connect to (Open, Metadata); empty: the
    /// address the client reached.
    pub advertised_host: String,
    /// Port clients are told; 0: the port the client reached.
    pub advertised_port: u16,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            frame_max: 1_048_576,
            heartbeat: 60,
            advertised_host: String::new(),
            advertised_port: 0,
        }
    }
}

/// `[mqtt]`: the MQTT adapter (TCP and WebSocket alike).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// The topic exchange MQTT publishes to and subscribes from.
    pub exchange: String,
    /// The vhost of a client whose user name is not `vhost:user`.
    pub default_vhost: String,
    /// Vhosts whose topics are mapped losslessly (`.` inside a level escaped).
    pub lossless_topic_vhosts: Vec<String>,
    /// Whether a CONNECT without user name logs in as `anonymous_user`.
    pub allow_anonymous: bool,
    pub anonymous_user: String,
    /// Largest packet accepted from a logged-in client (bytes).
    pub max_packet_size: usize,
    /// Largest packet accepted before login (bounds CONNECT).
    pub max_packet_size_unauthenticated: usize,
    /// Highest keep-alive granted (s, MQTT 5 Server Keep Alive); 0 = any.
    pub max_keep_alive_secs: u16,
    /// Highest session expiry interval granted (s); bounds 3.1.1 sessions too.
    pub max_session_expiry_secs: u32,
    /// Our Receive Maximum: unacknowledged QoS 2 PUBLISHes a client may send.
    pub receive_maximum: u16,
    /// Unacknowledged QoS 1/2 messages sent to one client at most (Mosquitto's
    /// name; `max_inflight`, this key's earlier name, is still read).
    #[serde(alias = "max_inflight")]
    pub max_inflight_messages: u16,
    /// QoS 1/2 messages held for one client beyond those in flight (while it is
    /// offline or its window is full), Mosquitto's `max_queued_messages`; past
    /// it the oldest are dropped and counted. 0 = no limit.
    pub max_queued_messages: u32,
    /// Topic aliases a client may set up towards the broker.
    pub topic_alias_maximum: u16,
    /// The HTTP path of MQTT over WebSocket.
    pub ws_path: String,
    /// How often `$SYS` topics are published (s); 0 = never.
    pub sys_interval_secs: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            exchange: "amq.topic".into(),
            default_vhost: "/".into(),
            lossless_topic_vhosts: Vec::new(),
            allow_anonymous: true,
            anonymous_user: "guest".into(),
            max_packet_size: 268_435_455,
            max_packet_size_unauthenticated: 65_536,
            max_keep_alive_secs: 0,
            max_session_expiry_secs: 86_400,
            receive_maximum: 1024,
            max_inflight_messages: 20,
            max_queued_messages: 1000,
            topic_alias_maximum: 16,
            ws_path: "/ws".into(),
            sys_interval_secs: 10,
        }
    }
}

impl Config {
    /// The `[mqtt]` rules the types cannot express.
    fn validate_mqtt(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        if !(64..=268_435_460).contains(&m.max_packet_size) {
            return Err(self.invalid(format!(
                "invalid value {} for key mqtt.max_packet_size: must be 64..=268435460",
                m.max_packet_size
            )));
        }
        if m.max_packet_size_unauthenticated < 64 {
            return Err(self.invalid(format!(
                "invalid value {} for key mqtt.max_packet_size_unauthenticated: must be at least 64",
                m.max_packet_size_unauthenticated
            )));
        }
        if m.receive_maximum == 0 || m.max_inflight_messages == 0 {
            return Err(self.invalid(
                "invalid value 0 for key mqtt.receive_maximum or mqtt.max_inflight_messages: must be at least 1"
                    .into(),
            ));
        }
        if m.exchange.is_empty() {
            return Err(self.invalid(
                "invalid value \"\" for key mqtt.exchange: MQTT needs a topic exchange".into(),
            ));
        }
        let vhosts = self.vhost_names();
        for v in std::iter::once(&m.default_vhost).chain(&m.lossless_topic_vhosts) {
            if !vhosts.contains(v) {
                return Err(self.invalid(format!(
                    "[mqtt] names vhost '{v}', which is not in [[vhosts]]"
                )));
            }
        }
        Ok(())
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub frame_max: u32,
    pub channel_max: u32,
    pub heartbeat_secs: u64,
    pub max_connections: usize,
    pub max_message_size: usize,
    pub handshake_timeout_secs: u64,
    /// Absolute memory watermark; 0: use `memory_high_watermark_relative`.
    pub memory_high_watermark_bytes: usize,
    /// Fraction of the machine's (or the cgroup's) memory; RabbitMQ's
    /// `vm_memory_high_watermark.relative`. 0 (with no absolute value): off.
    pub memory_high_watermark_relative: f64,
    pub disk_free_limit_bytes: u64,
    /// New connections a second from one IP address (0 = no limit).
    pub connection_rate_per_ip: u32,
    /// Unacknowledged AMQP deliveries per connection (0 = no cap).
    pub max_unacked_per_connection: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat_secs: 60,
            max_connections: 65_536,
            max_message_size: 134_217_728,
            handshake_timeout_secs: 10,
            memory_high_watermark_bytes: 0,
            memory_high_watermark_relative: 0.4,
            disk_free_limit_bytes: 50_000_000,
            connection_rate_per_ip: 0,
            max_unacked_per_connection: 0,
        }
    }
}

impl Limits {
    /// The handshake timeout as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
}

/// One `[[vhosts]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VHostConfig {
    pub name: String,
}

/// One `[[users]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// RabbitMQ's `base64(salt ++ sha256(salt ++ password))`.
    pub password_hash: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub loopback_only: bool,
}

/// One `[[permissions]]` entry: three regexes over resource names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionConfig {
    pub user: String,
    pub vhost: String,
    #[serde(default)]
    pub configure: String,
    #[serde(default)]
    pub write: String,
    #[serde(default)]
    pub read: String,
}

/// One `[[policies]]` entry: queue settings applied by name pattern to the
/// queues of a vhost, existing (recovered) and new, as `rabbitmqctl set_policy`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    #[serde(default = "default_policy_vhost")]
    pub vhost: String,
    /// A regex searched in queue names (`^` anchors it).
    pub pattern: String,
    /// `queues`, `exchanges` or `all`.
    #[serde(default = "default_apply_to")]
    pub apply_to: String,
    /// Of the policies that match a queue, the highest priority applies.
    #[serde(default)]
    pub priority: i64,
    /// RabbitMQ's policy keys: `message-ttl`, `expires`, `max-length`,
    /// `max-length-bytes`, `overflow`, `dead-letter-exchange`,
    /// `dead-letter-routing-key`, `delivery-limit`.
    pub definition: toml::Table,
}

fn default_policy_vhost() -> String {
    "/".into()
}

fn default_apply_to() -> String {
    "all".into()
}

/// A policy definition's TOML value as the field value a queue argument would be.
fn toml_to_field(v: &toml::Value) -> switchyard_core::FieldValue {
    use switchyard_core::FieldValue;
    match v {
        toml::Value::Integer(i) => FieldValue::I64(*i),
        toml::Value::String(s) => FieldValue::string(s.as_str()),
        toml::Value::Boolean(b) => FieldValue::Bool(*b),
        toml::Value::Float(f) => FieldValue::F64(*f),
        other => FieldValue::string(other.to_string()),
    }
}

/// A policy definition from TOML as a field table.
fn policy_definition(table: &toml::Table) -> switchyard_core::FieldTable {
    let mut definition = switchyard_core::FieldTable::new();
    for (k, v) in table {
        definition.insert(k.as_str(), toml_to_field(v));
    }
    definition
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

fn default_vhosts() -> Vec<VHostConfig> {
    vec![VHostConfig { name: "/".into() }]
}

const GUEST: &str = "guest";
/// The hash of `guest` shipped in config.toml.
const GUEST_HASH: &str = "kI3GCrswBLNZQzHJJ95QLoyfAVooYhnvf7jbqiW9BjOYUloe";

fn default_users() -> Vec<UserConfig> {
    vec![UserConfig {
        name: GUEST.into(),
        password_hash: GUEST_HASH.into(),
        tags: vec!["administrator".into()],
        loopback_only: true,
    }]
}

fn guest_permissions() -> PermissionConfig {
    PermissionConfig {
        user: GUEST.into(),
        vhost: "/".into(),
        configure: ".*".into(),
        write: ".*".into(),
        read: ".*".into(),
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Config::from_str(&text, &path.display().to_string())
    }

    /// The built-in configuration (the shipped `config.toml`).
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::from_str(EMBEDDED_CONFIG, EMBEDDED_ORIGIN)
    }

    /// Parses and validates `text`; `origin` names it in error messages.
    pub fn from_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            origin: origin.to_owned(),
            message: describe_toml_error(text, &e),
        })?;
        config.origin = origin.to_owned();
        config.validate()?;
        Ok(config)
    }

    /// Where this configuration came from ("" if built in code).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The users, with the default applied when the file has none.
    pub fn users(&self) -> Vec<UserConfig> {
        self.users.clone().unwrap_or_else(default_users)
    }

    /// Replaces the user list.
    pub fn set_users(&mut self, users: Vec<UserConfig>) {
        self.users = Some(users);
    }

    /// The permissions, with the default applied when the file has none.
    pub fn permissions(&self) -> Vec<PermissionConfig> {
        match &self.permissions {
            Some(p) => p.clone(),
            None if self.users().iter().any(|u| u.name == GUEST) => vec![guest_permissions()],
            None => Vec::new(),
        }
    }

    /// Replaces the permission list.
    pub fn set_permissions(&mut self, permissions: Vec<PermissionConfig>) {
        self.permissions = Some(permissions);
    }

    /// The vhost names, `/` included.
    pub fn vhost_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.vhosts.iter().map(|v| v.name.clone()).collect();
        if !names.iter().any(|n| n == "/") {
            names.push("/".into());
        }
        names
    }

    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: if self.origin.is_empty() {
                "config".into()
            } else {
                self.origin.clone()
            },
            message,
        }
    }

    /// Checks every rule the types cannot express. [`crate::start`] calls it again,
    /// since a `Config` may have been changed in code after it was loaded.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.auth.backends().map_err(|e| self.invalid(e))?;
        let l = &self.limits;
        if !(0.0..=1.0).contains(&l.memory_high_watermark_relative) {
            return Err(self.invalid(format!(
                "invalid value {} for key limits.memory_high_watermark_relative: must be 0.0..=1.0",
                l.memory_high_watermark_relative
            )));
        }
        if l.frame_max < 4096 {
            return Err(self.invalid(format!(
                "invalid value {} for key limits.frame_max: must be at least 4096",
                l.frame_max
            )));
        }
        if !(1..=65535).contains(&l.channel_max) {
            return Err(self.invalid(format!(
                "invalid value {} for key limits.channel_max: must be 1..=65535",
                l.channel_max
            )));
        }
        if u16::try_from(l.heartbeat_secs).is_err() {
            return Err(self.invalid(format!(
                "invalid value {} for key limits.heartbeat_secs: must be at most 65535",
                l.heartbeat_secs
            )));
        }
        if l.max_connections == 0 || l.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(self.invalid(format!(
                "invalid value {} for key limits.max_connections: must be 1..={}",
                l.max_connections,
                tokio::sync::Semaphore::MAX_PERMITS
            )));
        }
        if l.handshake_timeout_secs == 0 {
            return Err(self.invalid(
                "invalid value 0 for key limits.handshake_timeout_secs: must be at least 1".into(),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(
                self.invalid("invalid value \"\" for key data_dir: must not be empty".into())
            );
        }
        for v in &self.vhosts {
            if v.name.is_empty() {
                return Err(self.invalid("invalid value \"\" for key vhosts.name".into()));
            }
        }
        let st = &self.stomp;
        if !self.vhost_names().contains(&st.default_vhost) {
            return Err(self.invalid(format!(
                "invalid value {:?} for key stomp.default_vhost: no such vhost in [[vhosts]]",
                st.default_vhost
            )));
        }
        if st.max_headers == 0 {
            return Err(self
                .invalid("invalid value 0 for key stomp.max_headers: must be at least 1".into()));
        }
        if st.max_header_length < 256 {
            return Err(self.invalid(format!(
                "invalid value {} for key stomp.max_header_length: must be at least 256",
                st.max_header_length
            )));
        }
        if !st.ws_path.starts_with('/') {
            return Err(self.invalid(format!(
                "invalid value {:?} for key stomp.ws_path: must start with '/'",
                st.ws_path
            )));
        }
        self.validate_mqtt()?;
        self.validate_tls()?;
        self.policies()?;
        self.auth().map(|_| ())
    }

    /// The queue policies the config describes; errors name the policy.
    pub fn policies(&self) -> Result<switchyard_core::policy::Policies, ConfigError> {
        use switchyard_core::policy::{Policies, Policy};
        let vhosts = self.vhost_names();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for p in &self.policies {
            if !seen.insert((p.vhost.clone(), p.name.clone())) {
                return Err(self.invalid(format!(
                    "policy '{}' in vhost '{}' is defined twice",
                    p.name, p.vhost
                )));
            }
            if !vhosts.contains(&p.vhost) {
                return Err(self.invalid(format!(
                    "policy '{}' names vhost '{}', which is not in [[vhosts]]",
                    p.name, p.vhost
                )));
            }
            let definition = policy_definition(&p.definition);
            let policy = Policy::new(
                &p.name,
                &p.vhost,
                &p.pattern,
                &p.apply_to,
                p.priority,
                &definition,
            )
            .map_err(|e| self.invalid(e))?;
            out.push(policy);
        }
        Ok(Policies(out))
    }

    /// The objects of the config file as boot definitions, in the order they
    /// must be applied (vhosts, users, permissions, policies), each with the id
    /// under which the store remembers that it was created once (see
    /// `Broker::seed`: an object the store has seen is never created again, so
    /// runtime changes and deletions survive restarts, and an object added to the
    /// file later is created at the next start). Call after [`Config::validate`].
    pub fn boot_definitions(
        &self,
    ) -> Result<Vec<(String, switchyard_core::admin::MetaCommand)>, ConfigError> {
        use switchyard_core::admin::{MetaCommand, PolicySpec};
        let mut out = Vec::new();
        for name in self.vhost_names() {
            out.push((
                format!("vhost\0{name}"),
                MetaCommand::PutVhost {
                    name,
                    description: String::new(),
                    tags: Vec::new(),
                    default_queue_type: None,
                },
            ));
        }
        for u in self.users() {
            out.push((
                format!("user\0{}", u.name),
                MetaCommand::PutUser {
                    name: u.name,
                    password_hash: u.password_hash,
                    hashing_algorithm: switchyard_core::admin::SHA256.to_owned(),
                    tags: u.tags,
                },
            ));
        }
        for p in self.permissions() {
            out.push((
                format!("permission\0{}\0{}", p.vhost, p.user),
                MetaCommand::SetPermissions {
                    user: p.user,
                    vhost: p.vhost,
                    configure: p.configure,
                    write: p.write,
                    read: p.read,
                },
            ));
        }
        for p in &self.topic_permissions {
            out.push((
                format!("topic_permission\0{}\0{}\0{}", p.vhost, p.user, p.exchange),
                MetaCommand::SetTopicPermissions {
                    user: p.user.clone(),
                    vhost: p.vhost.clone(),
                    exchange: p.exchange.clone(),
                    write: p.write.clone(),
                    read: p.read.clone(),
                },
            ));
        }
        for p in &self.policies {
            out.push((
                format!("policy\0{}\0{}", p.vhost, p.name),
                MetaCommand::SetPolicy(PolicySpec {
                    vhost: p.vhost.clone(),
                    name: p.name.clone(),
                    pattern: p.pattern.clone(),
                    apply_to: p.apply_to.clone(),
                    priority: p.priority,
                    definition: policy_definition(&p.definition),
                }),
            ));
        }
        Ok(out)
    }

    /// Users that may log in only from a loopback address (RabbitMQ's
    /// `loopback_users`): a node setting, so it stays in the file.
    pub fn loopback_users(&self) -> Vec<String> {
        self.users()
            .into_iter()
            .filter(|u| u.loopback_only)
            .map(|u| u.name)
            .collect()
    }

    /// The user database the config describes; errors name the user.
    pub fn auth(&self) -> Result<Auth, ConfigError> {
        let mut auth = Auth::new();
        let mut seen = HashSet::new();
        for user in self.users() {
            if user.name.is_empty() {
                return Err(self.invalid("invalid value \"\" for key users.name".into()));
            }
            if !seen.insert(user.name.clone()) {
                return Err(self.invalid(format!("user '{}' is defined twice", user.name)));
            }
            auth.add_user(
                &user.name,
                &user.password_hash,
                user.tags.clone(),
                user.loopback_only,
            )
            .map_err(|e| self.invalid(e))?;
        }
        let vhosts = self.vhost_names();
        for p in self.permissions() {
            if !seen.contains(&p.user) {
                return Err(self.invalid(format!(
                    "permissions for vhost '{}' name user '{}', which is not in [[users]]",
                    p.vhost, p.user
                )));
            }
            if !vhosts.contains(&p.vhost) {
                return Err(self.invalid(format!(
                    "permissions of user '{}' name vhost '{}', which is not in [[vhosts]]",
                    p.user, p.vhost
                )));
            }
            auth.set_permissions(&p.user, &p.vhost, &p.configure, &p.write, &p.read)
                .map_err(|e| self.invalid(e))?;
        }
        for p in &self.topic_permissions {
            if !seen.contains(&p.user) {
                return Err(self.invalid(format!(
                    "topic permissions for vhost '{}' name user '{}', which is not in [[users]]",
                    p.vhost, p.user
                )));
            }
            if !vhosts.contains(&p.vhost) {
                return Err(self.invalid(format!(
                    "topic permissions of user '{}' name vhost '{}', which is not in [[vhosts]]",
                    p.user, p.vhost
                )));
            }
            if p.exchange.is_empty() {
                return Err(
                    self.invalid("invalid value \"\" for key topic_permissions.exchange".into())
                );
            }
            Auth::check_topic_patterns(&p.user, &p.vhost, &p.write, &p.read)
                .map_err(|e| self.invalid(e))?;
        }
        Ok(auth)
    }
}

/// Turns toml's multi-line error into one line naming the line and the key.
///
/// toml gives the message (e.g. "unknown field `x`, expected one of ...") and the
/// byte span it is about; the key path is recovered from the text: the nearest
/// table header above the span, and the key on the span's line.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim().replace('\n', " ");
    let Some(span) = err.span() else {
        return message;
    };
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or("");
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text
        .get(line_start..)
        .and_then(|rest| rest.lines().next())
        .unwrap_or("");
    // The nearest table header at or above the span's line, as written
    // (`[limits]`, `[[users]]`).
    let header = text
        .get(..line_start + line.len())
        .unwrap_or("")
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(header_of);
    let table = header
        .as_ref()
        .map(|h| h.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    // The key of the span's line, unless the line is itself a table header.
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_owned())
        .filter(|k| !k.is_empty() && !k.starts_with('['));

    let mut out = format!("line {line_no}: ");
    if message.starts_with("unknown field") {
        // "unknown field `x`, expected ..." -> "unknown field `x` in [limits], expected ..."
        let (head, tail) = message.split_once(", ").unwrap_or((&message, ""));
        out.push_str(head);
        match &header {
            Some(h) => {
                let _ = write!(out, " in {h}");
            }
            None => out.push_str(" at the top level"),
        }
        if !tail.is_empty() {
            let _ = write!(out, ", {tail}");
        }
        return out;
    }
    let path = match (&table, &key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k.clone()),
        (_, None) => None,
    };
    match (path, &header) {
        (Some(p), _) => {
            let _ = write!(out, "{message} (key {p})");
        }
        (None, Some(h)) => {
            let _ = write!(out, "{message} in {h}");
        }
        (None, None) => out.push_str(&message),
    }
    out
}

/// `[limits]` from `[limits] # comment`, `[[users]]` from `[[users]]`.
fn header_of(line: &str) -> String {
    let close = if line.starts_with("[[") { "]]" } else { "]" };
    match line.find(close) {
        Some(end) => line.get(..end + close.len()).unwrap_or(line).to_owned(),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::from_str(text, "test.toml").unwrap_err().to_string()
    }

    /// Every socket address in a TOML value, with the path of its key.
    fn addresses(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::String(s) if s.parse::<SocketAddr>().is_ok() => {
                out.push(format!("{prefix} = {s}"));
            }
            toml::Value::Table(t) => {
                for (k, v) in t {
                    addresses(&format!("{prefix}.{k}"), v, out);
                }
            }
            toml::Value::Array(a) => a.iter().for_each(|v| addresses(prefix, v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_address_of_the_shipped_config_is_a_listener() {
        // Tests move every listener to port 0 through [listeners]; a listener
        // configured anywhere else would stay on its default port in every test.
        let mut shipped: toml::Value = toml::from_str(EMBEDDED_CONFIG).unwrap();
        let listeners = shipped.as_table_mut().unwrap().remove("listeners").unwrap();
        let mut elsewhere = Vec::new();
        addresses("", &shipped, &mut elsewhere);
        assert!(
            elsewhere.is_empty(),
            "listener addresses outside [listeners]: {elsewhere:?}"
        );
        let mut found = Vec::new();
        addresses("listeners", &listeners, &mut found);
        assert!(found.len() >= 5, "{found:?}");
    }

    #[test]
    fn moving_listeners_to_port_zero_moves_every_one_and_keeps_the_off_ones_off() {
        let mut l = Config::embedded().unwrap().listeners;
        let on_before = toml::Value::try_from(&l).unwrap().as_table().unwrap().len();
        l.stomp_ws = None;
        l.move_all_to_port_zero(IpAddr::from([127, 0, 0, 1]))
            .unwrap();
        let after = toml::Value::try_from(&l).unwrap();
        let after = after.as_table().unwrap();
        assert_eq!(after.len(), on_before - 1, "{after:?}");
        for (name, addr) in after {
            assert_eq!(addr.as_str(), Some("127.0.0.1:0"), "{name}");
        }
        assert_eq!(l.stomp_ws, None);
        assert_eq!(l.amqp, Some("127.0.0.1:0".parse().unwrap()));
    }

    #[test]
    fn the_shipped_config_parses_with_its_documented_values() {
        let c = Config::embedded().unwrap();
        assert_eq!(c.data_dir, PathBuf::from("data"));
        assert_eq!(c.listeners.amqp, Some("0.0.0.0:5672".parse().unwrap()));
        let d = Limits::default();
        assert_eq!(c.limits.frame_max, d.frame_max);
        assert_eq!(c.limits.channel_max, d.channel_max);
        assert_eq!(c.limits.heartbeat_secs, d.heartbeat_secs);
        assert_eq!(c.limits.max_connections, d.max_connections);
        assert_eq!(c.limits.max_message_size, d.max_message_size);
        assert_eq!(c.limits.handshake_timeout_secs, d.handshake_timeout_secs);
        assert_eq!(
            c.limits.memory_high_watermark_bytes,
            d.memory_high_watermark_bytes
        );
        assert_eq!(
            c.limits.memory_high_watermark_relative,
            d.memory_high_watermark_relative
        );
        assert_eq!(c.vhost_names(), vec!["/".to_string()]);
        let users = c.users();
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].name, "guest");
        assert!(users[0].loopback_only);
        assert_eq!(users[0].tags, vec!["administrator".to_string()]);
        let auth = c.auth().unwrap();
        assert!(auth
            .login("guest", b"guest", Some("127.0.0.1".parse().unwrap()))
            .is_ok());
        assert!(auth.check_vhost("guest", "/").is_ok());
    }

    #[test]
    fn missing_keys_take_their_defaults() {
        let c = Config::from_str("[limits]\nframe_max = 8192\n", "t").unwrap();
        assert_eq!(c.limits.frame_max, 8192);
        assert_eq!(c.limits.channel_max, 2047);
        assert_eq!(c.limits.heartbeat_secs, 60);
        assert_eq!(c.data_dir, PathBuf::from("data"));
        // An absent listener key is an absent listener.
        assert_eq!(c.listeners.amqp, None);
        // No [[users]] / [[permissions]]: the shipped guest.
        assert_eq!(c.users()[0].name, "guest");
        assert_eq!(c.permissions()[0].user, "guest");
        let empty = Config::from_str("", "t").unwrap();
        assert_eq!(empty.limits.max_connections, 65_536);
        assert_eq!(empty.vhost_names(), vec!["/".to_string()]);
    }

    #[test]
    fn writing_users_replaces_the_default_guest_and_its_permissions() {
        let hash = switchyard_core::auth::hash_password("pw", [1, 2, 3, 4]);
        let c = Config::from_str(
            &format!("[[users]]\nname = \"app\"\npassword_hash = \"{hash}\"\n"),
            "t",
        )
        .unwrap();
        assert_eq!(c.users().len(), 1);
        assert!(c.permissions().is_empty());
        assert!(c.auth().unwrap().login("guest", b"guest", None).is_err());
    }

    #[test]
    fn an_unknown_key_is_named_with_its_table_and_line() {
        let e = err("[limits]\nframe_max = 8192\nheartbeat = 5\n");
        assert!(e.starts_with("test.toml: line 3: "), "{e}");
        assert!(e.contains("unknown field `heartbeat` in [limits]"), "{e}");
        assert!(e.contains("heartbeat_secs"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = err("datadir = \"x\"\n");
        assert!(
            e.contains("unknown field `datadir` at the top level"),
            "{e}"
        );
        let e = err("[[users]]\nname = \"bob\"\n");
        assert!(
            e.contains("missing field `password_hash` in [[users]]"),
            "{e}"
        );
        let e = err("[listeners]\nampq = \"0.0.0.0:5672\"\n");
        assert!(e.contains("unknown field `ampq` in [listeners]"), "{e}");
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let e = err("[limits]\nframe_max = 1024\n");
        assert!(e.contains("key limits.frame_max"), "{e}");
        let e = err("[limits]\nframe_max = \"big\"\n");
        assert!(e.contains("limits.frame_max"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = err("[limits]\nchannel_max = 0\n");
        assert!(e.contains("limits.channel_max"), "{e}");
        let e = err("[limits]\nchannel_max = 65536\n");
        assert!(e.contains("limits.channel_max"), "{e}");
        let e = err("[limits]\nheartbeat_secs = 70000\n");
        assert!(e.contains("limits.heartbeat_secs"), "{e}");
        let e = err("[listeners]\namqp = \"localhost\"\n");
        assert!(e.contains("listeners.amqp"), "{e}");
    }

    #[test]
    fn a_bad_hash_or_regex_names_the_user() {
        let e = err("[[users]]\nname = \"bob\"\npassword_hash = \"not-base64!\"\n");
        assert!(e.contains("'bob'"), "{e}");
        let e = err("[[users]]\nname = \"bob\"\npassword_hash = \"AAAA\"\n");
        assert!(e.contains("'bob'") && e.contains("36 bytes"), "{e}");
        let e = err(
            "[[permissions]]\nuser = \"guest\"\nvhost = \"/\"\nconfigure = \"(\"\nwrite = \"\"\nread = \"\"\n",
        );
        assert!(e.contains("'guest'") && e.contains("configure"), "{e}");
    }

    #[test]
    fn permissions_must_name_known_users_and_vhosts() {
        let e = err("[[permissions]]\nuser = \"nobody\"\nvhost = \"/\"\n");
        assert!(e.contains("'nobody'"), "{e}");
        let e = err("[[permissions]]\nuser = \"guest\"\nvhost = \"/prod\"\n");
        assert!(e.contains("'/prod'"), "{e}");
        let ok = Config::from_str(
            "[[vhosts]]\nname = \"/prod\"\n[[permissions]]\nuser = \"guest\"\nvhost = \"/prod\"\nread = \".*\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(ok.vhost_names(), vec!["/prod".to_string(), "/".to_string()]);
        assert!(ok.auth().unwrap().check_vhost("guest", "/prod").is_ok());
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = Config::load(Path::new("/nonexistent/switchyard.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/switchyard.toml: "), "{e}");
    }
    #[test]
    fn policies_parse_and_bad_ones_are_named() {
        let base = Config::embedded().unwrap();
        let text = format!(
            "{EMBEDDED_CONFIG}\n[[policies]]\nname = \"ttl\"\npattern = \"^orders\\\\.\"\n\
             priority = 2\ndefinition = {{ \"message-ttl\" = 1000, \"overflow\" = \"reject-publish\" }}\n"
        );
        let c = Config::from_str(&text, "test.toml").unwrap();
        assert!(base.policies.is_empty());
        let p = c.policies().unwrap();
        let got = p.for_queue("/", "orders.eu").unwrap();
        assert_eq!(got.name, "ttl");
        assert_eq!(got.apply_to, switchyard_core::policy::ApplyTo::All);
        assert_eq!(got.definition.message_ttl, Some(1000));
        assert!(p.for_queue("/", "payments").is_none());

        let bad = |extra: &str| {
            let text = format!("{EMBEDDED_CONFIG}\n[[policies]]\nname = \"p\"\n{extra}\n");
            err(&text)
        };
        assert_eq!(
            bad("pattern = \".*\"\ndefinition = { \"max-priority\" = 5 }"),
            "test.toml: policy 'p': Validation failed: [{<<\"max-priority\">>,5}] are not recognised policy settings"
        );
        assert_eq!(
            bad("pattern = \".*\"\ndefinition = { \"expires\" = 0 }"),
            "test.toml: policy 'p': Validation failed: 0 is not a valid queue expiry"
        );
        assert!(bad("pattern = \"(\"\ndefinition = {}").contains("invalid pattern"));
        assert_eq!(
            bad("vhost = \"nope\"\npattern = \".*\"\ndefinition = {}"),
            "test.toml: policy 'p' names vhost 'nope', which is not in [[vhosts]]"
        );
    }
}

#[cfg(test)]
mod mqtt_config_tests {
    use super::*;

    #[test]
    fn the_shipped_config_enables_mqtt_with_its_documented_defaults() {
        let c = Config::embedded().unwrap();
        assert_eq!(c.listeners.mqtt, Some("0.0.0.0:1883".parse().unwrap()));
        assert_eq!(c.listeners.mqtt_ws, Some("0.0.0.0:15675".parse().unwrap()));
        let d = MqttConfig::default();
        assert_eq!(c.mqtt.exchange, d.exchange);
        assert_eq!(c.mqtt.default_vhost, d.default_vhost);
        assert_eq!(c.mqtt.lossless_topic_vhosts, d.lossless_topic_vhosts);
        assert_eq!(c.mqtt.allow_anonymous, d.allow_anonymous);
        assert_eq!(c.mqtt.anonymous_user, d.anonymous_user);
        assert_eq!(c.mqtt.max_packet_size, d.max_packet_size);
        assert_eq!(
            c.mqtt.max_packet_size_unauthenticated,
            d.max_packet_size_unauthenticated
        );
        assert_eq!(c.mqtt.max_keep_alive_secs, d.max_keep_alive_secs);
        assert_eq!(c.mqtt.max_session_expiry_secs, d.max_session_expiry_secs);
        assert_eq!(c.mqtt.receive_maximum, d.receive_maximum);
        assert_eq!(c.mqtt.max_inflight_messages, d.max_inflight_messages);
        assert_eq!(c.mqtt.max_queued_messages, d.max_queued_messages);
        assert_eq!(c.mqtt.topic_alias_maximum, d.topic_alias_maximum);
        assert_eq!(c.mqtt.ws_path, d.ws_path);
        assert_eq!(c.mqtt.sys_interval_secs, d.sys_interval_secs);
    }

    #[test]
    fn bad_mqtt_values_are_named() {
        let e = Config::from_str("[mqtt]\nreceive_maximum = 0\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.receive_maximum"), "{e}");
        let e = Config::from_str("[mqtt]\nlossless_topic_vhosts = [\"/iot\"]\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vhost '/iot'"), "{e}");
        let ok = Config::from_str(
            "[[vhosts]]\nname = \"/iot\"\n[mqtt]\nlossless_topic_vhosts = [\"/iot\"]\n",
            "t",
        )
        .unwrap();
        assert_eq!(ok.mqtt.lossless_topic_vhosts, vec!["/iot".to_string()]);
    }
}

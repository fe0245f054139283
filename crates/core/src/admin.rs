//! Runtime administration: every change to the broker's metadata (vhosts, users,
//! permissions, topic permissions, policies, operator policies, vhost and user
//! limits) is one [`MetaCommand`], applied by [`crate::Broker::apply`]. In a
//! cluster, the replicated exchanges and bindings travel as
//! [`MetaCommand::Entity`] too (vhost.rs proposes them).
//!
//! `apply` validates the command, commits it to the metadata store (one
//! transaction, on disk before it returns) and only then changes the live state:
//! a command that could not be stored changes nothing. It is deterministic given
//! the command (no clock, no randomness inside): a cluster will put exactly these
//! commands in its replicated log and apply them on every node. So whatever needs
//! randomness happens before the command is built: a plain password is hashed by
//! the caller ([`crate::auth::hash_password`] with [`crate::auth::random_salt`]).
//!
//! The read side ([`crate::Broker::vhost_infos`] and friends) returns plain
//! serialisable snapshots, for the management API and definitions export.

use serde::{Deserialize, Serialize};

use crate::field::FieldTable;

/// RabbitMQ's name of its default password hashing (salted SHA-256).
pub const SHA256: &str = "rabbit_password_hashing_sha256";
/// RabbitMQ's salted SHA-512 hashing, also accepted.
pub const SHA512: &str = "rabbit_password_hashing_sha512";

/// One metadata change. Serialised as an externally tagged enum, which both JSON
/// and the store's compact binary encoding (postcard) read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Creates a vhost or updates its metadata (its contents stay).
    PutVhost {
        name: String,
        description: String,
        tags: Vec<String>,
        /// `classic` or `quorum`: the type of queues declared without `x-queue-type`.
        default_queue_type: Option<String>,
    },
    /// Deletes a vhost and everything in it: its connections are closed; its
    /// queues (with their messages), exchanges, bindings, permissions, policies
    /// and limits are deleted, durably.
    DeleteVhost {
        name: String,
    },
    /// Creates or replaces a user. `password_hash` is RabbitMQ's
    /// `base64(salt ++ H(salt ++ password))` (4-byte salt); an empty hash means a
    /// user that cannot log in with a password, as RabbitMQ's `password_hash: ""`.
    PutUser {
        name: String,
        password_hash: String,
        /// [`SHA256`] (RabbitMQ's default) or [`SHA512`]; empty means SHA-256.
        hashing_algorithm: String,
        tags: Vec<String>,
    },
    /// Deletes a user, its permissions and limits, and closes its connections.
    DeleteUser {
        name: String,
    },
    SetPermissions {
        user: String,
        vhost: String,
        configure: String,
        write: String,
        read: String,
    },
    ClearPermissions {
        user: String,
        vhost: String,
    },
    SetTopicPermissions {
        user: String,
        vhost: String,
        exchange: String,
        write: String,
        read: String,
    },
    /// Clears the topic permissions of one exchange, or of all (`None`).
    ClearTopicPermissions {
        user: String,
        vhost: String,
        exchange: Option<String>,
    },
    SetPolicy(PolicySpec),
    ClearPolicy {
        vhost: String,
        name: String,
    },
    SetOperatorPolicy(PolicySpec),
    ClearOperatorPolicy {
        vhost: String,
        name: String,
    },
    /// Sets the limits that are `Some`; the others keep their value.
    SetVhostLimits {
        vhost: String,
        limits: VhostLimits,
    },
    /// Clears one limit by its RabbitMQ name (`max-connections`, `max-queues`),
    /// or all of them (`None`).
    ClearVhostLimit {
        vhost: String,
        limit: Option<String>,
    },
    /// Sets the limits that are `Some`; the others keep their value.
    SetUserLimits {
        user: String,
        limits: UserLimits,
    },
    /// Clears one limit by its RabbitMQ name (`max-connections`,
    /// `max-channels`), or all of them (`None`).
    ClearUserLimit {
        user: String,
        limit: Option<String>,
    },
    /// A change to a vhost's routing topology that a cluster replicates (see
    /// [`EntityCommand`]). A single node never builds one: its declarations go
    /// straight to the vhost.
    Entity(EntityCommand),
}

/// The exchange and binding changes a cluster carries in its metadata log, so
/// that every node routes the same way. Only durable exchanges that are not
/// auto-delete, and the bindings between two of them, are replicated: transient
/// and auto-delete exchanges live and die with a node's connections, and
/// classic queues (with their bindings) are node-local.
///
/// A node checks a declaration (equivalence, `if-unused`, reserved names)
/// before proposing it; applying it is then unconditional on every node, so the
/// nodes cannot diverge on local state (their node-local bindings differ).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EntityCommand {
    /// Creates an exchange; refused on every node alike if one of the name
    /// exists with other properties (two nodes declared it concurrently).
    DeclareExchange {
        vhost: String,
        name: String,
        kind: String,
        options: crate::exchange::ExchangeOptions,
    },
    /// Deletes an exchange and every binding from or to it, on every node.
    DeleteExchange {
        vhost: String,
        name: String,
    },
    /// Binds exchange `destination` to exchange `source`.
    BindExchange {
        vhost: String,
        source: String,
        destination: String,
        routing_key: String,
        arguments: FieldTable,
    },
    UnbindExchange {
        vhost: String,
        source: String,
        destination: String,
        routing_key: String,
        arguments: FieldTable,
    },
    /// Creates a quorum queue on every node (its messages then go through
    /// `QueueCommand`s of the replicated log, quorum.rs).
    DeclareQueue {
        vhost: String,
        name: String,
        options: crate::queue::QueueOptions,
    },
    DeleteQueue {
        vhost: String,
        name: String,
    },
    /// Binds quorum queue `queue` to replicated exchange `source`.
    BindQueue {
        vhost: String,
        source: String,
        queue: String,
        routing_key: String,
        arguments: FieldTable,
    },
    UnbindQueue {
        vhost: String,
        source: String,
        queue: String,
        routing_key: String,
        arguments: FieldTable,
    },
}

impl EntityCommand {
    pub fn vhost(&self) -> &str {
        match self {
            EntityCommand::DeclareExchange { vhost, .. }
            | EntityCommand::DeleteExchange { vhost, .. }
            | EntityCommand::BindExchange { vhost, .. }
            | EntityCommand::UnbindExchange { vhost, .. }
            | EntityCommand::DeclareQueue { vhost, .. }
            | EntityCommand::DeleteQueue { vhost, .. }
            | EntityCommand::BindQueue { vhost, .. }
            | EntityCommand::UnbindQueue { vhost, .. } => vhost,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            EntityCommand::DeclareExchange { vhost, name, .. } => {
                format!("declare_exchange '{name}' in '{vhost}'")
            }
            EntityCommand::DeleteExchange { vhost, name } => {
                format!("delete_exchange '{name}' in '{vhost}'")
            }
            EntityCommand::BindExchange {
                vhost,
                source,
                destination,
                ..
            } => format!("bind_exchange '{source}' -> '{destination}' in '{vhost}'"),
            EntityCommand::UnbindExchange {
                vhost,
                source,
                destination,
                ..
            } => format!("unbind_exchange '{source}' -> '{destination}' in '{vhost}'"),
            EntityCommand::DeclareQueue { vhost, name, .. } => {
                format!("declare_queue '{name}' in '{vhost}'")
            }
            EntityCommand::DeleteQueue { vhost, name } => {
                format!("delete_queue '{name}' in '{vhost}'")
            }
            EntityCommand::BindQueue {
                vhost,
                source,
                queue,
                ..
            } => format!("bind_queue '{source}' -> '{queue}' in '{vhost}'"),
            EntityCommand::UnbindQueue {
                vhost,
                source,
                queue,
                ..
            } => format!("unbind_queue '{source}' -> '{queue}' in '{vhost}'"),
        }
    }
}

impl MetaCommand {
    /// A [`MetaCommand::PutUser`] for a plain password (the HTTP API's
    /// `password`): hashed here, with a fresh random salt, before the command
    /// exists, so that applying the command stays deterministic.
    pub fn put_user_with_password(name: &str, password: &str, tags: Vec<String>) -> Self {
        MetaCommand::PutUser {
            name: name.to_owned(),
            password_hash: crate::auth::hash_password(password, crate::auth::random_salt()),
            hashing_algorithm: SHA256.to_owned(),
            tags,
        }
    }

    /// A short description for logs and errors (`put_user 'bob'`).
    pub fn describe(&self) -> String {
        match self {
            MetaCommand::PutVhost { name, .. } => format!("put_vhost '{name}'"),
            MetaCommand::DeleteVhost { name } => format!("delete_vhost '{name}'"),
            MetaCommand::PutUser { name, .. } => format!("put_user '{name}'"),
            MetaCommand::DeleteUser { name } => format!("delete_user '{name}'"),
            MetaCommand::SetPermissions { user, vhost, .. } => {
                format!("set_permissions '{user}' in '{vhost}'")
            }
            MetaCommand::ClearPermissions { user, vhost } => {
                format!("clear_permissions '{user}' in '{vhost}'")
            }
            MetaCommand::SetTopicPermissions { user, vhost, .. } => {
                format!("set_topic_permissions '{user}' in '{vhost}'")
            }
            MetaCommand::ClearTopicPermissions { user, vhost, .. } => {
                format!("clear_topic_permissions '{user}' in '{vhost}'")
            }
            MetaCommand::SetPolicy(p) => format!("set_policy '{}' in '{}'", p.name, p.vhost),
            MetaCommand::ClearPolicy { vhost, name } => {
                format!("clear_policy '{name}' in '{vhost}'")
            }
            MetaCommand::SetOperatorPolicy(p) => {
                format!("set_operator_policy '{}' in '{}'", p.name, p.vhost)
            }
            MetaCommand::ClearOperatorPolicy { vhost, name } => {
                format!("clear_operator_policy '{name}' in '{vhost}'")
            }
            MetaCommand::SetVhostLimits { vhost, .. } => format!("set_vhost_limits '{vhost}'"),
            MetaCommand::ClearVhostLimit { vhost, .. } => format!("clear_vhost_limits '{vhost}'"),
            MetaCommand::SetUserLimits { user, .. } => format!("set_user_limits '{user}'"),
            MetaCommand::ClearUserLimit { user, .. } => format!("clear_user_limits '{user}'"),
            MetaCommand::Entity(e) => e.describe(),
        }
    }
}

/// A policy or operator policy as set (RabbitMQ's `set_policy` arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySpec {
    pub vhost: String,
    pub name: String,
    /// A regex searched (unanchored) in entity names.
    pub pattern: String,
    /// `queues`, `exchanges`, `all` (also `classic_queues`, `quorum_queues`).
    pub apply_to: String,
    pub priority: i64,
    /// RabbitMQ's keys (`max-length`, `message-ttl`, ...), values as JSON gives them.
    pub definition: FieldTable,
}

/// A vhost's limits. RabbitMQ's rule: a negative value means no limit, 0 refuses
/// every connection (or queue).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostLimits {
    #[serde(rename = "max-connections")]
    pub max_connections: Option<i64>,
    #[serde(rename = "max-queues")]
    pub max_queues: Option<i64>,
}

impl VhostLimits {
    pub fn is_empty(&self) -> bool {
        self.max_connections.is_none() && self.max_queues.is_none()
    }
}

/// A user's limits (negative: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLimits {
    #[serde(rename = "max-connections")]
    pub max_connections: Option<i64>,
    #[serde(rename = "max-channels")]
    pub max_channels: Option<i64>,
}

impl UserLimits {
    pub fn is_empty(&self) -> bool {
        self.max_connections.is_none() && self.max_channels.is_none()
    }
}

/// A vhost as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VhostInfo {
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    pub default_queue_type: Option<String>,
}

/// A user as listed (the hash, never a password).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserInfo {
    pub name: String,
    pub password_hash: String,
    pub hashing_algorithm: String,
    pub tags: Vec<String>,
}

/// A user's permissions in one vhost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PermissionInfo {
    pub user: String,
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// A user's topic permissions on one exchange of a vhost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicPermissionInfo {
    pub user: String,
    pub vhost: String,
    pub exchange: String,
    pub write: String,
    pub read: String,
}

/// A policy or operator policy as listed (the same fields as set).
pub type PolicyInfo = PolicySpec;

/// A vhost's limits as listed (only vhosts that have some).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VhostLimitsInfo {
    pub vhost: String,
    pub limits: VhostLimits,
}

/// A user's limits as listed (only users that have some).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserLimitsInfo {
    pub user: String,
    pub limits: UserLimits,
}

/// A queue as listed (a snapshot; counts are the moment's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueInfo {
    pub vhost: String,
    pub name: String,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    /// `classic` or `quorum`.
    pub queue_type: String,
    /// The policy and operator policy that apply, if any.
    pub policy: Option<String>,
    pub operator_policy: Option<String>,
    /// The connection id owning an exclusive queue.
    pub owner: Option<u64>,
    pub messages_ready: usize,
    pub messages_unacknowledged: usize,
    pub messages_delayed: usize,
    pub consumers: usize,
}

/// An exchange as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeInfo {
    pub vhost: String,
    pub name: String,
    /// `direct`, `fanout`, `topic`, `headers`, `x-delayed-message`...
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

/// A binding as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindingInfo {
    pub vhost: String,
    pub source: String,
    pub destination: String,
    /// `queue` or `exchange`.
    pub destination_type: String,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// What a store write of one command consists of: puts and deletes of metadata
/// records, and the wholesale removal of a vhost's durable entities. The core
/// builds it; the store commits it in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaWrite {
    /// Stores (replaces) a record: `kind` is one of the `KIND_*` constants.
    Put {
        kind: &'static str,
        key: String,
        value: Vec<u8>,
    },
    Delete {
        kind: &'static str,
        key: String,
    },
    /// Deletes every record of `kind` whose key starts with `prefix`.
    DeletePrefix {
        kind: &'static str,
        prefix: String,
    },
    /// Deletes every durable exchange, queue and binding of a vhost, and every
    /// adapter record keyed `vhost \0 ...` (see [`crate::persist::Store::save_record`]).
    DeleteVhostEntities {
        vhost: String,
    },
}

/// Record kinds of the metadata, in the store's record table.
pub const KIND_VHOST: &str = "meta.vhost";
pub const KIND_USER: &str = "meta.user";
pub const KIND_PERMISSION: &str = "meta.permission";
pub const KIND_TOPIC_PERMISSION: &str = "meta.topic_permission";
pub const KIND_POLICY: &str = "meta.policy";
pub const KIND_OPERATOR_POLICY: &str = "meta.operator_policy";
pub const KIND_VHOST_LIMITS: &str = "meta.vhost_limits";
pub const KIND_USER_LIMITS: &str = "meta.user_limits";
/// Ids of config-file objects already created once (see the server's boot
/// definitions): a deleted one is not created again.
pub const KIND_SEEDED: &str = "meta.seeded";

//! `switchyard ctl`: administer a running broker over its HTTP API, shaped like
//! rabbitmqadmin v2 (`list queues`, `declare queue --name q --durable true`, ...).
//!
//! Tables for people, `--json` for scripts (the API's own JSON, unchanged), and
//! exit codes a script can branch on (see [`client::exit`] and `--help`). Everything
//! goes through the same `/api` the web UI and RabbitMQ's tools use; this module
//! never links the broker's internals.

mod client;
mod cluster;
mod table;

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};

pub use client::exit;
use client::{seg, Client, CtlError};
use table::{col, render, render_pairs, text, Column};

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   success
  1   health-check: the check ran and failed (the broker answered 503)
  64  bad usage (unknown command, missing or invalid option)
  65  the broker rejected the request (HTTP 400/405/409/412): invalid arguments,
      inequivalent redeclaration, a local file that is not valid JSON
  66  not found (HTTP 404): no such queue, exchange, user, vhost...
  69  the broker cannot be reached (connection refused, unknown host, timeout)
  70  the broker failed (HTTP 5xx) or answered something that is not the API's JSON
  74  a local file cannot be read or written
  77  access refused (HTTP 401/403): wrong credentials, or a missing tag or permission";

/// Administer a running Switchyard over its HTTP management API.
///
/// Connection options (--host, --port, --username, --password) come before the
/// command, as with rabbitmqadmin; --vhost and --json may go anywhere.
#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct CtlArgs {
    /// Host of the management listener.
    #[arg(long, default_value = "localhost", env = "SWITCHYARD_CTL_HOST")]
    host: String,
    /// Port of the management listener.
    #[arg(long, default_value_t = 15672, env = "SWITCHYARD_CTL_PORT")]
    port: u16,
    /// Path prefix in front of /api, when the API sits behind a proxy.
    #[arg(long, default_value = "", env = "SWITCHYARD_CTL_PATH_PREFIX")]
    path_prefix: String,
    /// User name (HTTP Basic).
    #[arg(
        long,
        short = 'u',
        default_value = "guest",
        env = "SWITCHYARD_CTL_USERNAME"
    )]
    username: String,
    /// Password (HTTP Basic).
    #[arg(
        long,
        short = 'p',
        default_value = "guest",
        env = "SWITCHYARD_CTL_PASSWORD",
        hide_env_values = true
    )]
    password: String,
    /// Virtual host: scopes lists (all vhosts when left out) and is where objects
    /// are declared, deleted and read (`/` when left out).
    #[arg(long, short = 'V', global = true)]
    vhost: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Show the overview: versions, totals, listeners.
    Show {
        #[arg(value_enum)]
        what: ShowWhat,
    },
    /// List objects.
    List {
        #[arg(value_enum)]
        what: ListWhat,
    },
    /// Declare (create or update) an object.
    Declare {
        #[command(subcommand)]
        what: Declare,
    },
    /// Delete an object.
    Delete {
        #[command(subcommand)]
        what: Delete,
    },
    /// Remove every ready message from a queue.
    Purge {
        #[command(subcommand)]
        what: Purge,
    },
    /// Close a client connection.
    Close {
        #[command(subcommand)]
        what: Close,
    },
    /// Publish one message to an exchange (the default exchange when none is given).
    Publish(PublishArgs),
    /// Get messages from a queue (consumes them unless the ack mode requeues).
    Get(GetArgs),
    /// Read messages from a queue without consuming or requeueing them.
    Peek(PeekArgs),
    /// Export or import definitions (RabbitMQ's JSON format).
    Definitions {
        #[command(subcommand)]
        what: Definitions,
    },
    /// Run a health check; exit code 0 when healthy, 1 when not.
    HealthCheck {
        #[command(subcommand)]
        what: HealthCheck,
    },
    /// Cluster membership and status, over a node's inter-node port.
    Cluster {
        /// A node's config file: its `[tls]` certificate and `[cluster]
        /// cookie` are used to reach nodes that require them.
        #[arg(long, global = true)]
        config: Option<std::path::PathBuf>,
        #[command(subcommand)]
        what: cluster::ClusterCmd,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ShowWhat {
    Overview,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ListWhat {
    Queues,
    Exchanges,
    Bindings,
    Users,
    Vhosts,
    Connections,
    Channels,
    Consumers,
    Permissions,
    TopicPermissions,
    Policies,
    OperatorPolicies,
    VhostLimits,
    UserLimits,
    Nodes,
}

/// `true`/`false` as rabbitmqadmin spells booleans (`--durable true`); a bare
/// `--durable` means true.
fn bool_arg() -> clap::builder::BoolishValueParser {
    clap::builder::BoolishValueParser::new()
}

#[derive(Debug, Subcommand)]
enum Declare {
    /// A queue.
    Queue {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum, default_value = "classic")]
        r#type: QueueType,
        #[arg(long, default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = bool_arg())]
        durable: bool,
        #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = bool_arg())]
        auto_delete: bool,
        /// Queue arguments as a JSON object, e.g. '{"x-max-length": 10}'.
        #[arg(long)]
        arguments: Option<String>,
    },
    /// An exchange.
    Exchange {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "direct")]
        r#type: String,
        #[arg(long, default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = bool_arg())]
        durable: bool,
        #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = bool_arg())]
        auto_delete: bool,
        #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = bool_arg())]
        internal: bool,
        #[arg(long)]
        arguments: Option<String>,
    },
    /// A binding from an exchange to a queue or exchange.
    Binding {
        #[arg(long)]
        source: String,
        #[arg(long)]
        destination: String,
        #[arg(long, value_enum, default_value = "queue")]
        destination_type: DestinationType,
        #[arg(long, default_value = "")]
        routing_key: String,
        #[arg(long)]
        arguments: Option<String>,
    },
    /// A user (a plain password is hashed by the broker on arrival).
    User {
        #[arg(long)]
        name: String,
        #[arg(long, conflicts_with = "password_hash")]
        password: Option<String>,
        /// A RabbitMQ-format salted SHA-256 hash (base64), instead of --password.
        #[arg(long)]
        password_hash: Option<String>,
        /// Comma-separated tags: administrator, monitoring, policymaker, management.
        #[arg(long, default_value = "")]
        tags: String,
    },
    /// A virtual host.
    Vhost {
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        tags: Option<String>,
        #[arg(long)]
        default_queue_type: Option<String>,
    },
    /// A user's permissions in the vhost (--vhost).
    Permissions {
        #[arg(long)]
        user: String,
        #[arg(long, default_value = ".*")]
        configure: String,
        #[arg(long, default_value = ".*")]
        write: String,
        #[arg(long, default_value = ".*")]
        read: String,
    },
    /// A user's topic permissions on one exchange in the vhost (--vhost).
    TopicPermissions {
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "amq.topic")]
        exchange: String,
        #[arg(long, default_value = ".*")]
        write: String,
        #[arg(long, default_value = ".*")]
        read: String,
    },
    /// A policy in the vhost (--vhost).
    Policy(PolicyArgs),
    /// An operator policy in the vhost (--vhost).
    OperatorPolicy(PolicyArgs),
    /// A vhost limit: max-connections or max-queues (-1 = none).
    VhostLimit {
        #[arg(long)]
        name: String,
        #[arg(long, allow_negative_numbers = true)]
        value: i64,
    },
    /// A user limit: max-connections or max-channels (-1 = none).
    UserLimit {
        #[arg(long)]
        user: String,
        #[arg(long)]
        name: String,
        #[arg(long, allow_negative_numbers = true)]
        value: i64,
    },
}

#[derive(Debug, Args)]
struct PolicyArgs {
    #[arg(long)]
    name: String,
    /// Regular expression matched against queue or exchange names.
    #[arg(long)]
    pattern: String,
    /// The definition as a JSON object, e.g. '{"max-length": 100}'.
    #[arg(long)]
    definition: String,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i16,
    /// queues, classic_queues, quorum_queues, streams, exchanges or all.
    #[arg(long, default_value = "queues")]
    apply_to: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum QueueType {
    Classic,
    Quorum,
    Stream,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DestinationType {
    Queue,
    Exchange,
}

#[derive(Debug, Subcommand)]
enum Delete {
    Queue {
        #[arg(long)]
        name: String,
        /// Only if the queue has no consumers.
        #[arg(long)]
        if_unused: bool,
        /// Only if the queue has no messages.
        #[arg(long)]
        if_empty: bool,
    },
    Exchange {
        #[arg(long)]
        name: String,
        #[arg(long)]
        if_unused: bool,
    },
    /// The binding(s) from --source to --destination with this routing key and arguments.
    Binding {
        #[arg(long)]
        source: String,
        #[arg(long)]
        destination: String,
        #[arg(long, value_enum, default_value = "queue")]
        destination_type: DestinationType,
        #[arg(long, default_value = "")]
        routing_key: String,
        #[arg(long)]
        arguments: Option<String>,
    },
    User {
        #[arg(long)]
        name: String,
    },
    Vhost {
        #[arg(long)]
        name: String,
    },
    Permissions {
        #[arg(long)]
        user: String,
    },
    TopicPermissions {
        #[arg(long)]
        user: String,
    },
    Policy {
        #[arg(long)]
        name: String,
    },
    OperatorPolicy {
        #[arg(long)]
        name: String,
    },
    VhostLimit {
        #[arg(long)]
        name: String,
    },
    UserLimit {
        #[arg(long)]
        user: String,
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum Purge {
    Queue {
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum Close {
    Connection {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "Closed by switchyard ctl")]
        reason: String,
    },
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// Exchange ("" or left out: the default exchange).
    #[arg(long, default_value = "")]
    exchange: String,
    #[arg(long, default_value = "")]
    routing_key: String,
    /// The body; read from --payload-file or standard input when left out.
    #[arg(long)]
    payload: Option<String>,
    #[arg(long, conflicts_with = "payload")]
    payload_file: Option<PathBuf>,
    /// Message properties as a JSON object, e.g. '{"delivery_mode": 2, "headers": {"k": "v"}}'.
    #[arg(long)]
    properties: Option<String>,
}

#[derive(Debug, Args)]
struct GetArgs {
    #[arg(long)]
    queue: String,
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// ack_requeue_true keeps the messages (they come back redelivered).
    #[arg(long, default_value = "ack_requeue_true", value_parser = ["ack_requeue_true", "ack_requeue_false", "reject_requeue_true", "reject_requeue_false"])]
    ackmode: String,
    #[arg(long, default_value = "auto", value_parser = ["auto", "base64"])]
    encoding: String,
}

#[derive(Debug, Args)]
struct PeekArgs {
    #[arg(long)]
    queue: String,
    #[arg(long, default_value_t = 10)]
    count: u32,
}

#[derive(Debug, Subcommand)]
enum Definitions {
    /// Write the definitions (cluster-wide, or of --vhost) to --file or standard output.
    Export {
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Import definitions from --file or standard input (into --vhost when given).
    Import {
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum HealthCheck {
    /// No resource alarm (memory, disk) anywhere in the cluster.
    Alarms,
    /// No resource alarm on this node.
    LocalAlarms,
    /// A listener is bound to this port (`health-check port-listener 5672`).
    PortListener {
        #[arg(value_name = "PORT")]
        listener_port: u16,
    },
    /// A listener speaks this protocol (`health-check protocol-listener mqtt`).
    ProtocolListener { protocol: String },
    /// Every virtual host is running.
    VirtualHosts,
}

/// Runs one `switchyard ctl` command; the returned code is the process's exit code.
pub fn run(args: CtlArgs) -> u8 {
    let client = Client::new(
        &args.host,
        args.port,
        &args.path_prefix,
        &args.username,
        &args.password,
    );
    let mut out = std::io::stdout().lock();
    match dispatch(&args, &client, &mut out) {
        Ok(code) => code,
        Err(e) => {
            let _ = out.flush();
            eprintln!("switchyard ctl: {e}");
            e.code
        }
    }
}

fn vhost(args: &CtlArgs) -> &str {
    args.vhost.as_deref().unwrap_or("/")
}

fn json_arg(what: &str, s: Option<&str>) -> Result<Value, CtlError> {
    match s {
        None => Ok(json!({})),
        Some(s) => {
            let v: Value = serde_json::from_str(s).map_err(|e| {
                CtlError::new(exit::USAGE, format!("--{what} is not valid JSON: {e}"))
            })?;
            if v.is_object() {
                Ok(v)
            } else {
                Err(CtlError::new(
                    exit::USAGE,
                    format!("--{what} must be a JSON object"),
                ))
            }
        }
    }
}

fn write(out: &mut impl Write, s: &str) -> Result<(), CtlError> {
    out.write_all(s.as_bytes())
        .map_err(|e| CtlError::new(exit::IO, format!("cannot write the output: {e}")))
}

fn print_json(out: &mut impl Write, v: &Value) -> Result<(), CtlError> {
    let s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    write(out, &format!("{s}\n"))
}

/// Prints what a change returned: JSON when asked, else one line for people.
fn done(args: &CtlArgs, out: &mut impl Write, v: &Value, line: String) -> Result<u8, CtlError> {
    if args.json {
        let empty = Value::Object(Map::new());
        print_json(out, if v.is_null() { &empty } else { v })?;
    } else {
        write(out, &format!("{line}\n"))?;
    }
    Ok(exit::OK)
}

fn columns(what: ListWhat) -> &'static [Column] {
    const QUEUES: &[Column] = &[
        col("vhost", "vhost"),
        col("name", "name"),
        col("type", "type"),
        col("durable", "durable"),
        col("auto_delete", "auto_delete"),
        col("policy", "policy"),
        col("ready", "messages_ready"),
        col("unacked", "messages_unacknowledged"),
        col("messages", "messages"),
        col("consumers", "consumers"),
        col("state", "state"),
    ];
    const EXCHANGES: &[Column] = &[
        col("vhost", "vhost"),
        col("name", "name"),
        col("type", "type"),
        col("durable", "durable"),
        col("auto_delete", "auto_delete"),
        col("internal", "internal"),
        col("policy", "policy"),
    ];
    const BINDINGS: &[Column] = &[
        col("vhost", "vhost"),
        col("source", "source"),
        col("destination", "destination"),
        col("destination_type", "destination_type"),
        col("routing_key", "routing_key"),
        col("arguments", "arguments"),
        col("properties_key", "properties_key"),
    ];
    const USERS: &[Column] = &[col("name", "name"), col("tags", "tags")];
    const VHOSTS: &[Column] = &[
        col("name", "name"),
        col("description", "description"),
        col("default_queue_type", "default_queue_type"),
        col("messages", "messages"),
    ];
    const CONNECTIONS: &[Column] = &[
        col("name", "name"),
        col("protocol", "protocol"),
        col("user", "user"),
        col("vhost", "vhost"),
        col("peer_host", "peer_host"),
        col("peer_port", "peer_port"),
        col("channels", "channels"),
        col("state", "state"),
    ];
    const CHANNELS: &[Column] = &[
        col("name", "name"),
        col("user", "user"),
        col("vhost", "vhost"),
        col("consumers", "consumer_count"),
        col("prefetch", "prefetch_count"),
        col("unacked", "messages_unacknowledged"),
        col("confirm", "confirm"),
        col("state", "state"),
    ];
    const CONSUMERS: &[Column] = &[
        col("vhost", "queue.vhost"),
        col("queue", "queue.name"),
        col("consumer_tag", "consumer_tag"),
        col("channel", "channel_details.name"),
        col("ack_required", "ack_required"),
        col("prefetch", "prefetch_count"),
        col("active", "active"),
    ];
    const PERMISSIONS: &[Column] = &[
        col("user", "user"),
        col("vhost", "vhost"),
        col("configure", "configure"),
        col("write", "write"),
        col("read", "read"),
    ];
    const TOPIC_PERMISSIONS: &[Column] = &[
        col("user", "user"),
        col("vhost", "vhost"),
        col("exchange", "exchange"),
        col("write", "write"),
        col("read", "read"),
    ];
    const POLICIES: &[Column] = &[
        col("vhost", "vhost"),
        col("name", "name"),
        col("pattern", "pattern"),
        col("apply-to", "apply-to"),
        col("priority", "priority"),
        col("definition", "definition"),
    ];
    const VHOST_LIMITS: &[Column] = &[col("vhost", "vhost"), col("limits", "value")];
    const USER_LIMITS: &[Column] = &[col("user", "user"), col("limits", "value")];
    const NODES: &[Column] = &[
        col("name", "name"),
        col("uptime_ms", "uptime"),
        col("mem_used", "mem_used"),
        col("mem_limit", "mem_limit"),
        col("mem_alarm", "mem_alarm"),
        col("disk_free", "disk_free"),
        col("disk_free_alarm", "disk_free_alarm"),
    ];
    match what {
        ListWhat::Queues => QUEUES,
        ListWhat::Exchanges => EXCHANGES,
        ListWhat::Bindings => BINDINGS,
        ListWhat::Users => USERS,
        ListWhat::Vhosts => VHOSTS,
        ListWhat::Connections => CONNECTIONS,
        ListWhat::Channels => CHANNELS,
        ListWhat::Consumers => CONSUMERS,
        ListWhat::Permissions => PERMISSIONS,
        ListWhat::TopicPermissions => TOPIC_PERMISSIONS,
        ListWhat::Policies | ListWhat::OperatorPolicies => POLICIES,
        ListWhat::VhostLimits => VHOST_LIMITS,
        ListWhat::UserLimits => USER_LIMITS,
        ListWhat::Nodes => NODES,
    }
}

fn list_path(what: ListWhat, vhost: Option<&str>) -> String {
    let base = match what {
        ListWhat::Queues => "queues",
        ListWhat::Exchanges => "exchanges",
        ListWhat::Bindings => "bindings",
        ListWhat::Users => return "users".into(),
        ListWhat::Vhosts => return "vhosts".into(),
        ListWhat::Connections => "connections",
        ListWhat::Channels => "channels",
        ListWhat::Consumers => "consumers",
        ListWhat::Permissions => "permissions",
        ListWhat::TopicPermissions => "topic-permissions",
        ListWhat::Policies => "policies",
        ListWhat::OperatorPolicies => "operator-policies",
        ListWhat::VhostLimits => "vhost-limits",
        ListWhat::UserLimits => return "user-limits".into(),
        ListWhat::Nodes => return "nodes".into(),
    };
    match (what, vhost) {
        (_, None) => base.into(),
        // These have no per-vhost route in the API; filter the global list.
        (ListWhat::Permissions | ListWhat::TopicPermissions, Some(_)) => base.into(),
        (ListWhat::Connections | ListWhat::Channels, Some(v)) => {
            format!("vhosts/{}/{base}", seg(v))
        }
        (_, Some(v)) => format!("{base}/{}", seg(v)),
    }
}

fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        Value::Object(mut m) => match m.remove("items") {
            Some(Value::Array(a)) => a,
            _ => vec![Value::Object(m)],
        },
        Value::Null => Vec::new(),
        other => vec![other],
    }
}

fn read_input(file: Option<&PathBuf>) -> Result<String, CtlError> {
    match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| CtlError::new(exit::IO, format!("cannot read {}: {e}", path.display()))),
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| CtlError::new(exit::IO, format!("cannot read standard input: {e}")))?;
            Ok(s)
        }
    }
}

/// The exchange's name in a URL: the default exchange is `amq.default`.
fn xseg(name: &str) -> String {
    if name.is_empty() {
        "amq.default".into()
    } else {
        seg(name)
    }
}

fn dispatch(args: &CtlArgs, c: &Client, out: &mut impl Write) -> Result<u8, CtlError> {
    let v = vhost(args);
    let vs = seg(v);
    match &args.command {
        CtlCommand::Cluster { config, what } => {
            cluster::run(what, config.as_deref(), args.json, out)
        }
        CtlCommand::Show {
            what: ShowWhat::Overview,
        } => {
            let o = c.get("overview")?;
            if args.json {
                print_json(out, &o)?;
                return Ok(exit::OK);
            }
            let t = |p: &str| text(table::lookup(&o, p));
            let listeners = table::lookup(&o, "listeners")
                .and_then(Value::as_array)
                .map(|ls| {
                    ls.iter()
                        .map(|l| {
                            format!(
                                "{} {}:{}",
                                t_of(l, "protocol"),
                                t_of(l, "ip_address"),
                                t_of(l, "port")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            write(
                out,
                &render_pairs(&[
                    (
                        "product",
                        format!("{} {}", t("product_name"), t("product_version")),
                    ),
                    ("rabbitmq_version", t("rabbitmq_version")),
                    ("cluster_name", t("cluster_name")),
                    ("node", t("node")),
                    ("connections", t("object_totals.connections")),
                    ("channels", t("object_totals.channels")),
                    ("exchanges", t("object_totals.exchanges")),
                    ("queues", t("object_totals.queues")),
                    ("consumers", t("object_totals.consumers")),
                    ("messages", t("queue_totals.messages")),
                    ("messages_ready", t("queue_totals.messages_ready")),
                    (
                        "messages_unacknowledged",
                        t("queue_totals.messages_unacknowledged"),
                    ),
                    ("publish_rate", t("message_stats.publish_details.rate")),
                    (
                        "deliver_get_rate",
                        t("message_stats.deliver_get_details.rate"),
                    ),
                    ("listeners", listeners),
                ]),
            )?;
            Ok(exit::OK)
        }
        CtlCommand::List { what } => {
            let mut rows = items(c.get(&list_path(*what, args.vhost.as_deref()))?);
            if let (ListWhat::Permissions | ListWhat::TopicPermissions, Some(only)) =
                (what, &args.vhost)
            {
                rows.retain(|r| r.get("vhost").and_then(Value::as_str) == Some(only.as_str()));
            }
            if args.json {
                print_json(out, &Value::Array(rows))?;
            } else {
                write(out, &render(columns(*what), &rows))?;
            }
            Ok(exit::OK)
        }
        CtlCommand::Declare { what } => declare(args, c, out, what, v, &vs),
        CtlCommand::Delete { what } => delete(args, c, out, what, v, &vs),
        CtlCommand::Purge {
            what: Purge::Queue { name },
        } => {
            let r = c.call(
                "DELETE",
                &format!("queues/{vs}/{}/contents", seg(name)),
                None,
            )?;
            done(args, out, &r, format!("purged queue {name} in {v}"))
        }
        CtlCommand::Close {
            what: Close::Connection { name, reason },
        } => {
            let a = c.send_with(
                "DELETE",
                &format!("connections/{}", seg(name)),
                None,
                Some(reason),
            )?;
            client::check(&a)?;
            done(
                args,
                out,
                &client::parse(&a.body)?,
                format!("closed connection {name}"),
            )
        }
        CtlCommand::Publish(p) => {
            let payload = match (&p.payload, &p.payload_file) {
                (Some(s), _) => s.clone(),
                (None, file) => read_input(file.as_ref())?,
            };
            let properties = json_arg("properties", p.properties.as_deref())?;
            let body = json!({
                "routing_key": p.routing_key,
                "payload": payload,
                "payload_encoding": "string",
                "properties": properties,
            });
            let r = c.call(
                "POST",
                &format!("exchanges/{vs}/{}/publish", xseg(&p.exchange)),
                Some(&body),
            )?;
            let routed = r.get("routed").and_then(Value::as_bool).unwrap_or(false);
            let x = if p.exchange.is_empty() {
                "the default exchange"
            } else {
                p.exchange.as_str()
            };
            done(
                args,
                out,
                &r,
                if routed {
                    format!(
                        "published to {x} with routing key '{}': routed",
                        p.routing_key
                    )
                } else {
                    format!(
                        "published to {x} with routing key '{}': not routed (no binding matched)",
                        p.routing_key
                    )
                },
            )
        }
        CtlCommand::Get(g) => {
            let body = json!({"count": g.count, "ackmode": g.ackmode, "encoding": g.encoding, "truncate": 50000});
            let r = c.call(
                "POST",
                &format!("queues/{vs}/{}/get", seg(&g.queue)),
                Some(&body),
            )?;
            messages(args, out, r)
        }
        CtlCommand::Peek(p) => {
            let r = c.get(&format!(
                "queues/{vs}/{}/peek?count={}",
                seg(&p.queue),
                p.count
            ))?;
            messages(args, out, r)
        }
        CtlCommand::Definitions {
            what: Definitions::Export { file },
        } => {
            let path = match &args.vhost {
                Some(v) => format!("definitions/{}", seg(v)),
                None => "definitions".into(),
            };
            let a = c.send("GET", &path, None)?;
            client::check(&a)?;
            // Pretty-printed, so the file diffs well; the content is the broker's.
            let v = client::parse(&a.body)?;
            let text = serde_json::to_string_pretty(&v).unwrap_or(a.body) + "\n";
            match file {
                Some(f) => {
                    std::fs::write(f, text).map_err(|e| {
                        CtlError::new(exit::IO, format!("cannot write {}: {e}", f.display()))
                    })?;
                    if !args.json {
                        eprintln!("exported definitions to {}", f.display());
                    }
                }
                None => write(out, &text)?,
            }
            Ok(exit::OK)
        }
        CtlCommand::Definitions {
            what: Definitions::Import { file },
        } => {
            let text = read_input(file.as_ref())?;
            let body: Value = serde_json::from_str(&text).map_err(|e| {
                CtlError::new(
                    exit::DATA,
                    format!("the definitions are not valid JSON: {e}"),
                )
            })?;
            let path = match &args.vhost {
                Some(v) => format!("definitions/{}", seg(v)),
                None => "definitions".into(),
            };
            let r = c.call("POST", &path, Some(&body))?;
            done(args, out, &r, "imported definitions".into())
        }
        CtlCommand::HealthCheck { what } => {
            let path = match what {
                HealthCheck::Alarms => "health/checks/alarms".to_owned(),
                HealthCheck::LocalAlarms => "health/checks/local-alarms".to_owned(),
                HealthCheck::PortListener { listener_port } => {
                    format!("health/checks/port-listener/{listener_port}")
                }
                HealthCheck::ProtocolListener { protocol } => {
                    format!("health/checks/protocol-listener/{}", seg(protocol))
                }
                HealthCheck::VirtualHosts => "health/checks/virtual-hosts".to_owned(),
            };
            let a = c.send("GET", &path, None)?;
            if a.status != 503 {
                client::check(&a)?;
            }
            let v = client::parse(&a.body)?;
            let healthy = a.status != 503;
            if args.json {
                print_json(out, &v)?;
            } else if healthy {
                write(out, "ok\n")?;
            } else {
                let reason = v
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("the check failed");
                let detail = v
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter(|(k, _)| k.as_str() != "status" && k.as_str() != "reason")
                            .map(|(k, v)| format!("{k}: {v}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_default();
                write(
                    out,
                    &format!(
                        "failed: {reason}{}{detail}\n",
                        if detail.is_empty() { "" } else { "; " }
                    ),
                )?;
            }
            Ok(if healthy { exit::OK } else { exit::UNHEALTHY })
        }
    }
}

fn t_of(v: &Value, path: &str) -> String {
    text(table::lookup(v, path))
}

fn messages(args: &CtlArgs, out: &mut impl Write, r: Value) -> Result<u8, CtlError> {
    let list = items(r);
    if args.json {
        print_json(out, &Value::Array(list))?;
        return Ok(exit::OK);
    }
    if list.is_empty() {
        write(out, "the queue is empty\n")?;
        return Ok(exit::OK);
    }
    const COLS: &[Column] = &[
        col("routing_key", "routing_key"),
        col("exchange", "exchange"),
        col("redelivered", "redelivered"),
        col("message_count", "message_count"),
        col("payload_bytes", "payload_bytes"),
        col("payload_encoding", "payload_encoding"),
        col("properties", "properties"),
        col("payload", "payload"),
    ];
    write(out, &render(COLS, &list))?;
    Ok(exit::OK)
}

fn declare(
    args: &CtlArgs,
    c: &Client,
    out: &mut impl Write,
    what: &Declare,
    v: &str,
    vs: &str,
) -> Result<u8, CtlError> {
    match what {
        Declare::Queue {
            name,
            r#type,
            durable,
            auto_delete,
            arguments,
        } => {
            let mut a = json_arg("arguments", arguments.as_deref())?;
            let t = match r#type {
                QueueType::Classic => None,
                QueueType::Quorum => Some("quorum"),
                QueueType::Stream => Some("stream"),
            };
            if let (Some(t), Some(m)) = (t, a.as_object_mut()) {
                m.insert("x-queue-type".into(), json!(t));
            }
            let body = json!({"durable": durable, "auto_delete": auto_delete, "arguments": a});
            let r = c.call("PUT", &format!("queues/{vs}/{}", seg(name)), Some(&body))?;
            done(args, out, &r, format!("declared queue {name} in {v}"))
        }
        Declare::Exchange {
            name,
            r#type,
            durable,
            auto_delete,
            internal,
            arguments,
        } => {
            let a = json_arg("arguments", arguments.as_deref())?;
            let body = json!({"type": r#type, "durable": durable, "auto_delete": auto_delete, "internal": internal, "arguments": a});
            let r = c.call("PUT", &format!("exchanges/{vs}/{}", seg(name)), Some(&body))?;
            done(
                args,
                out,
                &r,
                format!("declared exchange {name} ({}) in {v}", r#type),
            )
        }
        Declare::Binding {
            source,
            destination,
            destination_type,
            routing_key,
            arguments,
        } => {
            let a = json_arg("arguments", arguments.as_deref())?;
            let kind = match destination_type {
                DestinationType::Queue => "q",
                DestinationType::Exchange => "e",
            };
            let body = json!({"routing_key": routing_key, "arguments": a});
            let r = c.call(
                "POST",
                &format!(
                    "bindings/{vs}/e/{}/{kind}/{}",
                    xseg(source),
                    seg(destination)
                ),
                Some(&body),
            )?;
            done(
                args,
                out,
                &r,
                format!("bound {source} -> {destination} with routing key '{routing_key}' in {v}"),
            )
        }
        Declare::User {
            name,
            password,
            password_hash,
            tags,
        } => {
            let mut body = json!({"tags": tags});
            if let Some(m) = body.as_object_mut() {
                match (password, password_hash) {
                    (Some(p), _) => m.insert("password".into(), json!(p)),
                    (None, Some(h)) => m.insert("password_hash".into(), json!(h)),
                    (None, None) => m.insert("password_hash".into(), json!("")),
                };
            }
            let r = c.call("PUT", &format!("users/{}", seg(name)), Some(&body))?;
            done(args, out, &r, format!("declared user {name}"))
        }
        Declare::Vhost {
            name,
            description,
            tags,
            default_queue_type,
        } => {
            let mut m = Map::new();
            if let Some(d) = description {
                m.insert("description".into(), json!(d));
            }
            if let Some(t) = tags {
                let list: Vec<&str> = t
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect();
                m.insert("tags".into(), json!(list));
            }
            if let Some(q) = default_queue_type {
                m.insert("default_queue_type".into(), json!(q));
            }
            let r = c.call(
                "PUT",
                &format!("vhosts/{}", seg(name)),
                Some(&Value::Object(m)),
            )?;
            done(args, out, &r, format!("declared vhost {name}"))
        }
        Declare::Permissions {
            user,
            configure,
            write: w,
            read,
        } => {
            let body = json!({"configure": configure, "write": w, "read": read});
            let r = c.call(
                "PUT",
                &format!("permissions/{vs}/{}", seg(user)),
                Some(&body),
            )?;
            done(args, out, &r, format!("set permissions of {user} in {v}"))
        }
        Declare::TopicPermissions {
            user,
            exchange,
            write: w,
            read,
        } => {
            let body = json!({"exchange": exchange, "write": w, "read": read});
            let r = c.call(
                "PUT",
                &format!("topic-permissions/{vs}/{}", seg(user)),
                Some(&body),
            )?;
            done(
                args,
                out,
                &r,
                format!("set topic permissions of {user} on {exchange} in {v}"),
            )
        }
        Declare::Policy(p) | Declare::OperatorPolicy(p) => {
            let kind = if matches!(what, Declare::Policy(_)) {
                "policies"
            } else {
                "operator-policies"
            };
            let definition = json_arg("definition", Some(&p.definition))?;
            let body = json!({"pattern": p.pattern, "definition": definition, "priority": p.priority, "apply-to": p.apply_to});
            let r = c.call("PUT", &format!("{kind}/{vs}/{}", seg(&p.name)), Some(&body))?;
            done(
                args,
                out,
                &r,
                format!(
                    "declared {} {} in {v}",
                    if kind == "policies" {
                        "policy"
                    } else {
                        "operator policy"
                    },
                    p.name
                ),
            )
        }
        Declare::VhostLimit { name, value } => {
            let r = c.call(
                "PUT",
                &format!("vhost-limits/{vs}/{}", seg(name)),
                Some(&json!({"value": value})),
            )?;
            done(args, out, &r, format!("set {name} = {value} on vhost {v}"))
        }
        Declare::UserLimit { user, name, value } => {
            let r = c.call(
                "PUT",
                &format!("user-limits/{}/{}", seg(user), seg(name)),
                Some(&json!({"value": value})),
            )?;
            done(
                args,
                out,
                &r,
                format!("set {name} = {value} on user {user}"),
            )
        }
    }
}

fn delete(
    args: &CtlArgs,
    c: &Client,
    out: &mut impl Write,
    what: &Delete,
    v: &str,
    vs: &str,
) -> Result<u8, CtlError> {
    let (path, line) = match what {
        Delete::Queue {
            name,
            if_unused,
            if_empty,
        } => {
            let mut q = Vec::new();
            if *if_unused {
                q.push("if-unused=true");
            }
            if *if_empty {
                q.push("if-empty=true");
            }
            let query = if q.is_empty() {
                String::new()
            } else {
                format!("?{}", q.join("&"))
            };
            (
                format!("queues/{vs}/{}{query}", seg(name)),
                format!("deleted queue {name} in {v}"),
            )
        }
        Delete::Exchange { name, if_unused } => (
            format!(
                "exchanges/{vs}/{}{}",
                seg(name),
                if *if_unused { "?if-unused=true" } else { "" }
            ),
            format!("deleted exchange {name} in {v}"),
        ),
        Delete::Binding {
            source,
            destination,
            destination_type,
            routing_key,
            arguments,
        } => {
            // As rabbitmqadmin v2 does: list the bindings between the two, match
            // key and arguments, delete by the properties_key the broker gave.
            let kind = match destination_type {
                DestinationType::Queue => "q",
                DestinationType::Exchange => "e",
            };
            let want_args = json_arg("arguments", arguments.as_deref())?;
            let list = items(c.get(&format!(
                "bindings/{vs}/e/{}/{kind}/{}",
                xseg(source),
                seg(destination)
            ))?);
            let keys: Vec<String> = list
                .iter()
                .filter(|b| {
                    b.get("routing_key").and_then(Value::as_str) == Some(routing_key.as_str())
                })
                .filter(|b| {
                    let have = b.get("arguments").cloned().unwrap_or(json!({}));
                    have == want_args || (have == json!([]) && want_args == json!({}))
                })
                .filter_map(|b| {
                    b.get("properties_key")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .collect();
            if keys.is_empty() {
                return Err(CtlError::new(
                    exit::NOT_FOUND,
                    format!("no binding from {source} to {destination} with routing key '{routing_key}' in {v}"),
                ));
            }
            for key in &keys {
                c.call(
                    "DELETE",
                    &format!(
                        "bindings/{vs}/e/{}/{kind}/{}/{}",
                        xseg(source),
                        seg(destination),
                        seg(key)
                    ),
                    None,
                )?;
            }
            return done(
                args,
                out,
                &Value::Null,
                format!("deleted the binding from {source} to {destination} in {v}"),
            );
        }
        Delete::User { name } => (
            format!("users/{}", seg(name)),
            format!("deleted user {name}"),
        ),
        Delete::Vhost { name } => (
            format!("vhosts/{}", seg(name)),
            format!("deleted vhost {name}"),
        ),
        Delete::Permissions { user } => (
            format!("permissions/{vs}/{}", seg(user)),
            format!("cleared permissions of {user} in {v}"),
        ),
        Delete::TopicPermissions { user } => (
            format!("topic-permissions/{vs}/{}", seg(user)),
            format!("cleared topic permissions of {user} in {v}"),
        ),
        Delete::Policy { name } => (
            format!("policies/{vs}/{}", seg(name)),
            format!("deleted policy {name} in {v}"),
        ),
        Delete::OperatorPolicy { name } => (
            format!("operator-policies/{vs}/{}", seg(name)),
            format!("deleted operator policy {name} in {v}"),
        ),
        Delete::VhostLimit { name } => (
            format!("vhost-limits/{vs}/{}", seg(name)),
            format!("cleared {name} on vhost {v}"),
        ),
        Delete::UserLimit { user, name } => (
            format!("user-limits/{}/{}", seg(user), seg(name)),
            format!("cleared {name} on user {user}"),
        ),
    };
    let r = c.call("DELETE", &path, None)?;
    done(args, out, &r, line)
}
